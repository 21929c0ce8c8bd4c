"""Attention primitives: the safe softmax, the sliding-window mask, and windowed attention.

Shapes use B batch, N sequence, H heads, d head size; `nq`/`nk` are query/key counts.
"""

import tensorflow as tf

from meliad_tf.layers import positions
from meliad_tf.layers import scopes


MASK_VALUE = -1_000_000.0
SOFTMAX_FLOOR = -1000.0
# Queries per block of the banded sliding-window attention (see sliding_window_attention).
DEFAULT_BLOCK_LENGTH = 128


def safe_softmax(x, axis=-1, min_x=SOFTMAX_FLOOR):
  """Softmax with an extra `exp(min_x)` term in the denominator.

  Equal to the ordinary softmax whenever some logit is well above `min_x`; a row whose
  logits are all masked gives (almost) all zeros, i.e. "attend to nothing", rather than
  the uniform weights an ordinary softmax would give.
  """
  m = tf.stop_gradient(tf.maximum(tf.reduce_max(x, axis=axis, keepdims=True), min_x))
  e = tf.exp(x - m)
  return e / (tf.reduce_sum(e, axis=axis, keepdims=True) + tf.exp(min_x - m))


def sliding_window_mask(num_queries, num_keys, window_length):
  """Causal band mask [nq, nk]: query i sees keys at distances 1..W (never itself).

  The last `nq` keys are aligned with the queries (offset nk - nq).
  """
  rel = positions.relative_positions(num_queries, num_keys)
  return tf.constant((rel < 0) & (rel >= -window_length))


def simple_attention(keys, values, queries, *, bias=None, scale=None, mask=None,
                     dropout_multiplier=None):
  """Dot-product attention as Meliad computes it.

  `logits = (q.k + bias) * scale`, masked to -1e6, safe softmax in float32, then an
  optional dropout multiplier on the probabilities (no renormalisation).

  Args:
    keys: [..., nk, H, d].
    values: [..., nk, H, d].
    queries: [..., nq, H, d].
    bias: optional [H, nq, nk] added to the logits (position bias).
    scale: optional [H] multiplying content plus bias.
    mask: optional bool [nq, nk]; False entries are masked.
    dropout_multiplier: optional [H, nq, nk] of 0 or 1/keep_prob.
  Returns:
    [..., nq, H, d] in the dtype of `values`.
  """
  with tf.name_scope("scores"):
    logits = tf.cast(tf.einsum("...qhd,...khd->...hqk", queries, keys), tf.float32)
    if bias is not None:
      logits += bias
    if scale is not None:
      logits *= tf.cast(scale, tf.float32)[:, None, None]
    if mask is not None:
      logits = tf.where(mask, logits, MASK_VALUE)
  with tf.name_scope("softmax"):
    probs = safe_softmax(logits)
  with tf.name_scope("weighted_values"):
    if dropout_multiplier is not None:
      probs *= dropout_multiplier
    return tf.einsum("...hqk,...khd->...qhd", tf.cast(probs, values.dtype), values)


def split_windows(x, window_length):
  """[B, N, ...] -> [B, N / W, W, ...]."""
  shape = list(x.shape)
  return tf.reshape(x, [shape[0], shape[1] // window_length, window_length] + shape[2:])


def merge_windows(x):
  """[B, nW, W, ...] -> [B, nW * W, ...]."""
  shape = list(x.shape)
  return tf.reshape(x, [shape[0], shape[1] * shape[2]] + shape[3:])


def window_keys(keys, previous_keys, window_length):
  """Keys seen by each window: the previous window (the cache for window 0) then its own.

  Args:
    keys: [B, N, H, d] for the whole segment.
    previous_keys: [B, W, H, d], the last window of the previous segment.
    window_length: W; N must be a multiple of W.
  Returns:
    [B, N / W, 2W, H, d].
  """
  current = split_windows(keys, window_length)  # [B, nW, W, H, d]
  previous = tf.concat([previous_keys[:, None], current[:, :-1]], axis=1)
  return tf.concat([previous, current], axis=2)


def attend_heads_first(queries, keys, values, *, bias=None, scale=None, mask=None,
                       dropout_multiplier=None):
  """`simple_attention` on heads-first tensors, with its gradient written out.

  The same forward arithmetic; the backward pass is the textbook softmax gradient
  `g = p * (dp - sum(dp * p))` (the safe softmax's extra denominator term is constant to
  the gradient, its max being stopped), which takes fewer passes over the [nq, nk] scores
  than differentiating the masked, scaled softmax op by op.

  Args:
    queries: [..., H, nq, d].
    keys, values: [..., H, nk, d].
    bias: optional [H, nq, nk].
    scale: optional [H].
    mask: optional bool [nq, nk] (a constant; False entries are masked).
    dropout_multiplier: optional [..., H, nq, nk] broadcastable to the scores (a constant).
  Returns:
    [..., H, nq, d] in the dtype of `values`.
  """
  has_bias, has_scale = bias is not None, scale is not None
  inputs = [queries, keys, values]
  inputs += [tf.convert_to_tensor(bias, tf.float32)] if has_bias else []
  inputs += [tf.cast(scale, tf.float32)] if has_scale else []

  # The gradient is built where the tape asks for it, outside this scope; it is named as
  # TensorFlow names the gradients it derives, for the profile's categories.
  backward_scope = f"{scopes.BACKWARD_PREFIX}{tf.get_current_name_scope()}/"

  @tf.custom_gradient
  def attend(*inputs):
    q, k, v = inputs[:3]
    b = inputs[3] if has_bias else None
    s = inputs[-1][:, None, None] if has_scale else None
    with tf.name_scope("scores"):
      raw = tf.cast(tf.einsum("...qd,...kd->...qk", q, k), tf.float32)
      if b is not None:
        raw += b
      logits = raw * s if s is not None else raw
      if mask is not None:
        logits = tf.where(mask, logits, MASK_VALUE)
    with tf.name_scope("softmax"):
      probs = safe_softmax(logits)
    with tf.name_scope("weighted_values"):
      kept = probs * dropout_multiplier if dropout_multiplier is not None else probs
      out = tf.einsum("...qk,...kd->...qd", tf.cast(kept, v.dtype), v)

    def grad(upstream):
      with tf.name_scope(backward_scope):
        return backward(upstream)

    def backward(upstream):
      with tf.name_scope("weighted_values"):
        d_kept = tf.cast(tf.einsum("...qd,...kd->...qk", upstream, v), tf.float32)
        d_values = tf.einsum("...qk,...qd->...kd", tf.cast(kept, upstream.dtype), upstream)
        d_probs = d_kept * dropout_multiplier if dropout_multiplier is not None else d_kept
      with tf.name_scope("softmax"):
        # Zero wherever the mask is False, since the probabilities are exactly zero there.
        d_logits = probs * (d_probs - tf.reduce_sum(d_probs * probs, axis=-1, keepdims=True))
      with tf.name_scope("scores"):
        g = tf.cast(d_logits, q.dtype)
        # The products before the scale (d logits / d raw = scale, applied per head after).
        d_queries = tf.einsum("...qk,...kd->...qd", g, k)
        d_keys = tf.einsum("...qk,...qd->...kd", g, q)
        lead_axes = list(range(len(d_logits.shape) - 3))
        summed = tf.reduce_sum(d_logits, axis=lead_axes) if (has_bias or has_scale) else None
        grads = [d_queries, d_keys, d_values]
        if has_bias:
          grads.append(summed * s if has_scale else summed)
        if has_scale:
          # d scale = sum of d_logits * raw, with raw = q.k + bias:
          # sum of q . (d_logits k) plus sum of d_logits * bias.
          d_scale = tf.reduce_sum(tf.cast(d_queries, tf.float32) * tf.cast(q, tf.float32),
                                  axis=lead_axes + [len(d_logits.shape) - 2,
                                                    len(d_logits.shape) - 1])
          if has_bias:
            d_scale += tf.reduce_sum(summed * b, axis=[1, 2])
          grads[0] = d_queries * tf.cast(s, d_queries.dtype)
          grads[1] = d_keys * tf.cast(s, d_keys.dtype)
          grads.append(d_scale)
      return grads

    return out, grad

  return attend(*inputs)


def attend(keys, values, queries, *, bias=None, scale=None, mask=None,
           dropout_multiplier=None):
  """`simple_attention` (same arguments, same layout) computed by `attend_heads_first`."""
  def heads_first(x):  # [..., n, H, d] <-> [..., H, n, d]
    rank = len(x.shape)
    return tf.transpose(x, list(range(rank - 3)) + [rank - 2, rank - 3, rank - 1])

  out = attend_heads_first(heads_first(queries), heads_first(keys), heads_first(values),
                           bias=bias, scale=scale, mask=mask,
                           dropout_multiplier=dropout_multiplier)
  return heads_first(out)


def block_length_for(window_length, target=DEFAULT_BLOCK_LENGTH):
  """The longest block of queries, at most `target`, that divides the window."""
  return next(length for length in range(min(target, window_length), 0, -1)
              if window_length % length == 0)


@scopes.scoped("attention")
def sliding_window_attention(queries, keys, values, previous_keys, previous_values,
                             window_length, *, position_bias=None, scale=None,
                             dropout_multiplier=None, rotary_wavelength=None, block_length=0):
  """Causal attention where each token sees exactly the W tokens before it.

  Two implementations of the same arithmetic:

  * `block_length = 0`, window by window as Meliad computes it: all windows of the segment
    at once, window t attending to the 2W keys of window t-1 (the XL cache for t = 0) and
    its own under the band mask, half of which is masked; the gradient is TensorFlow's.
  * `block_length = b` (a divisor of W shorter than W), in blocks: every block of b
    queries attends to the W + b keys that end with it (its W-token band and nothing
    further), so only (W + b) / 2W of the scores are computed; `attend_heads_first` gives
    the gradient. Meliad's attention dropout mask [H, W, 2W] is cut into the blocks' parts,
    so the same probabilities are dropped. A block as long as the window would compute
    what window by window does, and is computed that way.

  Args:
    queries, keys, values: [B, N, H, d].
    previous_keys, previous_values: [B, W, H, d] (zeros at a document start; attended to).
    window_length: W.
    position_bias: optional function (num_queries, num_keys) -> [H, nq, nk] bias, the last
      queries aligned with the last keys (the layer's relative positions).
    scale: optional [H].
    dropout_multiplier: optional [H, W, 2W], shared by all windows and batch elements.
    rotary_wavelength: if set, RoPE is applied to the window's keys and queries.
    block_length: 0, or queries per block (a divisor of W). A decoding step passes one
      token (N = 1) in a block of 1: it attends to the W cached tokens before it.
  Returns:
    [B, N, H, d].
  """
  if not block_length or block_length == window_length:
    window_k = window_keys(keys, previous_keys, window_length)
    window_v = window_keys(values, previous_values, window_length)
    window_q = split_windows(queries, window_length)
    if rotary_wavelength is not None:
      window_k, window_q = positions.rotate_keys_and_queries(window_k, window_q,
                                                             rotary_wavelength)
    mask = sliding_window_mask(window_length, 2 * window_length, window_length)
    bias = position_bias(window_length, 2 * window_length) if position_bias else None
    out = simple_attention(window_k, window_v, window_q, bias=bias, scale=scale, mask=mask,
                           dropout_multiplier=dropout_multiplier)
    return merge_windows(out)

  if window_length % block_length:
    raise ValueError(f"the attention block length ({block_length}) must divide the window "
                     f"({window_length})")
  batch_size, length, num_heads, head_size = queries.shape
  num_blocks = length // block_length
  band = window_length + block_length
  block_k = band_keys(keys, previous_keys, block_length)  # [B, nb, W + b, H, d]
  block_v = band_keys(values, previous_values, block_length)
  block_q = split_windows(queries, block_length)  # [B, nb, b, H, d]
  if rotary_wavelength is not None:
    block_k, block_q = positions.rotate_keys_and_queries(block_k, block_q, rotary_wavelength)
  heads_first = lambda x: tf.transpose(x, [0, 1, 3, 2, 4])
  multiplier = None
  if dropout_multiplier is not None:
    # Block j of a window holds its queries j b .. j b + b - 1, whose band starts at key j b
    # of the window's 2W keys.
    per_window = tf.stack([dropout_multiplier[:, j * block_length:(j + 1) * block_length,
                                              j * block_length:j * block_length + band]
                           for j in range(window_length // block_length)])
    multiplier = tf.tile(per_window, [length // window_length, 1, 1, 1])  # [nb, H, b, W + b]
  out = attend_heads_first(
      heads_first(block_q), heads_first(block_k), heads_first(block_v),
      bias=position_bias(block_length, band) if position_bias else None, scale=scale,
      mask=sliding_window_mask(block_length, band, window_length),
      dropout_multiplier=multiplier)
  return tf.reshape(tf.transpose(out, [0, 1, 3, 2, 4]),
                    [batch_size, num_blocks * block_length, num_heads, head_size])


def band_keys(keys, previous_keys, block_length):
  """Keys seen by each block of queries: the W keys before the block, then the block's own.

  Args:
    keys: [B, N, H, d] for the whole segment.
    previous_keys: [B, W, H, d], the last window of the previous segment.
    block_length: b, a divisor of W.
  Returns:
    [B, N / b, W + b, H, d]: for block i, the keys at positions i b - W .. i b + b - 1
    (negative positions are in the cache).
  """
  window_length = previous_keys.shape[1]
  num_blocks = keys.shape[1] // block_length
  if num_blocks == 1:
    # One block (a decoding step's single token): its band is the whole sequence, taken in
    # one op rather than as W / b + 1 slices of it.
    return tf.concat([previous_keys, keys], axis=1)[:, None]
  blocks = split_windows(tf.concat([previous_keys, keys], axis=1), block_length)
  shifts = window_length // block_length + 1
  return tf.concat([blocks[:, j:j + num_blocks] for j in range(shifts)], axis=2)


@scopes.scoped("attention")
def causal_attention(queries, keys, values, *, position_bias=None, scale=None,
                     dropout_multiplier=None, rotary_wavelength=None):
  """Attention without an XL cache (window = segment): token i sees tokens 0..i-1 only.

  Token 0 sees nothing and, through the safe softmax, gets a zero output.
  """
  length = queries.shape[1]
  if rotary_wavelength is not None:
    keys, queries = positions.rotate_keys_and_queries(keys, queries, rotary_wavelength)
  mask = sliding_window_mask(length, length, length)
  bias = position_bias(length, length) if position_bias else None
  return simple_attention(keys, values, queries, bias=bias, scale=scale, mask=mask,
                          dropout_multiplier=dropout_multiplier)


def l2_normalize(x, epsilon=1e-6):
  """x / sqrt(sum(x^2) + eps) over the last axis (epsilon inside the root, as Meliad)."""
  x32 = tf.cast(x, tf.float32)
  normed = x32 * tf.math.rsqrt(tf.reduce_sum(tf.square(x32), axis=-1, keepdims=True) + epsilon)
  return tf.cast(normed, x.dtype)

