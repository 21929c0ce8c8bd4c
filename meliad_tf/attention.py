"""Attention primitives: the safe softmax, the sliding-window mask, and windowed attention.

Shapes use B batch, N sequence, H heads, d head size; `nq`/`nk` are query/key counts.
"""

import tensorflow as tf

from meliad_tf import positions

MASK_VALUE = -1_000_000.0
SOFTMAX_FLOOR = -1000.0


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
  logits = tf.cast(tf.einsum("...qhd,...khd->...hqk", queries, keys), tf.float32)
  if bias is not None:
    logits += bias
  if scale is not None:
    logits *= tf.cast(scale, tf.float32)[:, None, None]
  if mask is not None:
    logits = tf.where(mask, logits, MASK_VALUE)
  probs = safe_softmax(logits)
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


def sliding_window_attention(queries, keys, values, previous_keys, previous_values,
                             window_length, *, bias=None, scale=None, dropout_multiplier=None,
                             rotary_wavelength=None):
  """Causal attention where each token sees exactly the W tokens before it.

  All windows of the segment are computed at once: window t attends to the keys of
  window t-1 (the XL cache for t = 0) and its own, under the band mask, so it equals
  a loop over windows carrying the previous window's keys, gradients included.

  Args:
    queries, keys, values: [B, N, H, d].
    previous_keys, previous_values: [B, W, H, d] (zeros at a document start; attended to).
    window_length: W.
    bias: optional [H, W, 2W] position bias shared by all windows.
    scale: optional [H].
    dropout_multiplier: optional [H, W, 2W], shared by all windows and batch elements.
    rotary_wavelength: if set, RoPE is applied to the window's keys and queries.
  Returns:
    [B, N, H, d].
  """
  window_k = window_keys(keys, previous_keys, window_length)
  window_v = window_keys(values, previous_values, window_length)
  window_q = split_windows(queries, window_length)
  if rotary_wavelength is not None:
    window_k, window_q = positions.rotate_keys_and_queries(window_k, window_q, rotary_wavelength)
  mask = sliding_window_mask(window_length, 2 * window_length, window_length)
  out = simple_attention(window_k, window_v, window_q, bias=bias, scale=scale, mask=mask,
                         dropout_multiplier=dropout_multiplier)
  return merge_windows(out)


def causal_attention(queries, keys, values, *, bias=None, scale=None, dropout_multiplier=None,
                     rotary_wavelength=None):
  """Attention without an XL cache (window = segment): token i sees tokens 0..i-1 only.

  Token 0 sees nothing and, through the safe softmax, gets a zero output.
  """
  length = queries.shape[1]
  if rotary_wavelength is not None:
    keys, queries = positions.rotate_keys_and_queries(keys, queries, rotary_wavelength)
  mask = sliding_window_mask(length, length, length)
  return simple_attention(keys, values, queries, bias=bias, scale=scale, mask=mask,
                          dropout_multiplier=dropout_multiplier)


def l2_normalize(x, epsilon=1e-6):
  """x / sqrt(sum(x^2) + eps) over the last axis (epsilon inside the root, as Meliad)."""
  x32 = tf.cast(x, tf.float32)
  normed = x32 * tf.math.rsqrt(tf.reduce_sum(tf.square(x32), axis=-1, keepdims=True) + epsilon)
  return tf.cast(normed, x.dtype)

