"""The Block-Recurrent Transformer's cell: a state of S vectors updated once per block.

A recurrent layer carries, per stream, a state c of S vectors of width E. The
segment is cut into blocks of W tokens (block = window). For block t the cell

  1. projects the state: hc = LN(c) + position embeddings; rk, rv, rq, rq2 = hc W_k, ...
     (keys and queries L2-normalised), with no dropout ever (Meliad's mode "pure");
  2. lets the states attend to themselves (rq over rk, rv: no mask, no bias) and to the
     block's 2W token keys (rq2 over the previous window or XL cache and the block itself);
  3. merges both attentions into the state through its gates (`TransformerBase.post_attn_ffn`
     with gate type "bias" or "lstm", arranged "dual", "single" or "skip").

The tokens of block t cross-attend to (rk, rv) of c_t, the state *entering* the block, so
no token sees information derived from its own block through the state. Gradients flow
through every block of a segment; the stack stops them at segment boundaries.

Functions a decoder calls one block at a time: `RecurrentCell.load` (the learned initial
state at a document start), `RecurrentCell.kv` (the keys and values tokens attend to),
`RecurrentCell.step` (c_t -> c_{t+1} from a block's keys and values) and `attend_to_state`.
"""

import tensorflow as tf

from meliad_tf.layers import attention
from meliad_tf.layers import initializers
from meliad_tf.layers import scopes


INITIAL_STATE_STDDEV = 0.1


class RecurrentCell(tf.Module):
  """The state direction of a recurrent layer: its TransformerBase and its initial state.

  Args:
    recurrent_tbase: a `layer.TransformerBase` with `cross_attention_q=True`,
      `num_cross_heads = num_heads` and `num_position_embeddings = num_states`, whose
      gate type and arrangement are the cell's.
    num_states: S.
    written_gradient: compute the cell's attentions with `attention.attend` (the gradient
      written out) rather than `attention.simple_attention` (TensorFlow's, op by op); the
      same arithmetic.
  """

  def __init__(self, recurrent_tbase, num_states, written_gradient=True, name=None):
    super().__init__(name=name)
    if num_states <= 0:
      raise ValueError(f"a recurrent layer needs TransformerLayer.recurrent_num_states > 0, "
                       f"got {num_states}")
    if recurrent_tbase.queries2_layer is None:
      raise ValueError("the recurrent cell's TransformerBase needs cross_attention_q=True")
    self.recurrent_tbase = recurrent_tbase
    self.num_states = num_states
    self.embedding_size = recurrent_tbase.embedding_size
    self.written_gradient = written_gradient
    self.dtype = recurrent_tbase.dtype
    with self.name_scope:
      # Small, yet large enough for Adafactor's parameter-scaled steps to move it.
      self.recurrent_initial_state = tf.Variable(
          initializers.normal([num_states, self.embedding_size], INITIAL_STATE_STDDEV),
          name="recurrent_initial_state")

  def load(self, start_of_sequence, state):
    """The state a segment starts from: the learned initial state where a document starts.

    Args:
      start_of_sequence: bool [B].
      state: [B, S, E], the state the previous segment left.
    Returns:
      [B, S, E]; a `where`, so gradients reach the initial state.
    """
    initial = tf.cast(self.recurrent_initial_state, state.dtype)[None]  # [1, S, E]
    return tf.where(start_of_sequence[:, None, None], initial, state)

  def kvq(self, state):
    """Keys, values, queries and cross-attention queries of the state, each [B, S, H, d]."""
    return self.recurrent_tbase.kvq(state, training=False)

  def kv(self, state):
    """The keys and values that tokens cross-attend to, each [B, S, H, d]."""
    keys, values, _, _ = self.kvq(state)
    return keys, values

  def step(self, state, block_keys, block_values, state_kvq=None, gates=None):
    """One block's update: c_{t+1} from c_t and the block's token keys and values.

    Args:
      state: c_t [B, S, E].
      block_keys, block_values: [B, 2W, H, d], the window before the block (the XL cache,
        zeros at a document start, for the first block) then the block; without the XL
        architecture, the block's own W keys.
      state_kvq: `kvq(state)` if already computed.
      gates: optional list; each of the cell's gates appends its mean values to it (see
        `mlp.MLP.__call__`).
    Returns:
      c_{t+1} [B, S, E].
    """
    keys, values, queries, queries2 = state_kvq or self.kvq(state)
    tbase = self.recurrent_tbase
    attend = attention.attend if self.written_gradient else attention.simple_attention
    self_attn = attend(keys, values, queries, scale=tbase.attention_scale)
    token_attn = attend(block_keys, block_values, queries2, scale=tbase.attention_scale2)
    return tbase.post_attn_ffn(state, self_attn, token_attn, gates=gates)

  def __call__(self, state, window_keys, window_values, diagnostics=None):
    """Runs the cell over the blocks of a segment, in order.

    Args:
      state: c_0 [B, S, E], already `load`ed.
      window_keys, window_values: [B, nW, 2W, H, d], each block's token keys and values.
      diagnostics: optional dict; receives the mean gate values (see `gate_diagnostics`).
    Returns:
      (state_keys, state_values, final_state): the keys and values of c_0 .. c_{nW-1}, the
      states entering each block, [B, nW, S, H, d] each; and c_nW [B, S, E].
    """
    state_keys, state_values, gates = [], [], []
    # The number of blocks is static: a Python loop that XLA unrolls, gradients included.
    for t in range(window_keys.shape[1]):
      state_kvq = self.kvq(state)
      state_keys.append(state_kvq[0])
      state_values.append(state_kvq[1])
      block_gates = [] if diagnostics is not None else None
      state = self.step(state, window_keys[:, t], window_values[:, t], state_kvq,
                        gates=block_gates)
      if block_gates is not None:
        gates.append(block_gates)
    if diagnostics is not None:
      diagnostics.update(gate_diagnostics(gates))
    return tf.stack(state_keys, axis=1), tf.stack(state_values, axis=1), state


def gate_diagnostics(gates_per_block):
  """Mean gate values over blocks, streams, states and features.

  Args:
    gates_per_block: per block, the list of gate means the cell's MLPs appended (see
      `mlp.MLP.__call__`): the gate merging the attention into the state first (the only
      one for "single" and "skip"), then the FFN's gate for "dual".
  Returns:
    {"gate_mean": share of the old state kept by the first gate (sigmoid(b) for "bias", the
    forget gate for "lstm")}, plus "input_gate_mean" for "lstm" (the multiplier of the new
    value) and "ffn_gate_mean" (the keep share of the FFN's gate) for "dual". Empty for
    residual connections, which have no gate.
  """
  if not gates_per_block or not gates_per_block[0]:
    return {}

  def mean(position, key):
    return tf.reduce_mean(tf.stack([block[position][key] for block in gates_per_block]))

  result = {"gate_mean": mean(0, "keep")}
  if "input" in gates_per_block[0][0]:
    result["input_gate_mean"] = mean(0, "input")
  if len(gates_per_block[0]) > 1:
    result["ffn_gate_mean"] = mean(1, "keep")
  return result


@scopes.scoped("cross_attention")
def attend_to_state(queries2, state_keys, state_values, scale, written_gradient=True):
  """Cross attention from tokens to a recurrent state: no mask, no bias, no dropout.

  Args:
    queries2: [..., nq, H, d] token queries.
    state_keys, state_values: [..., S, H, d].
    scale: [H] (`attention_scale2` of the attending layer) or None.
    written_gradient: as for RecurrentCell.
  Returns:
    [..., nq, H, d].
  """
  attend = attention.attend if written_gradient else attention.simple_attention
  return attend(state_keys, state_values, queries2, scale=scale)


# The share is estimated on every 7th token: a scalar over thousands of tokens needs no more,
# and projecting every token again would cost as much as the layer's output projection. A
# prime stride visits every position of the (power of two) windows, not only their starts.
SHARE_TOKEN_STRIDE = 7


def attention_share(self_attn, cross_attn, projection_kernel):
  """Share of a layer's projected attention output that comes from cross attention.

  The projection input is [self heads, cross heads], so `a W_o = self W_s + cross W_c`.
  The share is sum_tokens |cross W_c| / sum_tokens (|self W_s| + |cross W_c|), with |.|
  the L2 norm over E, summed over every SHARE_TOKEN_STRIDE-th token of the flattened
  [B * N] positions: 0 when the tokens ignore the state, 1 when they read only it.

  Args:
    self_attn, cross_attn: [B, N, H, d].
    projection_kernel: [2 H d, E], the output projection W_o.
  Returns:
    float32 scalar.
  """
  shape = self_attn.shape.as_list()
  width = shape[-2] * shape[-1]
  kernel = tf.cast(projection_kernel, tf.float32)

  def projected_norm(heads, rows):
    # [ceil(B * N / stride), H d]
    flat = tf.reshape(tf.cast(heads, tf.float32), [-1, width])[::SHARE_TOKEN_STRIDE]
    return tf.reduce_sum(tf.norm(tf.matmul(flat, rows), axis=-1))

  self_norm = projected_norm(self_attn, kernel[:width])
  cross_norm = projected_norm(cross_attn, kernel[width:])
  return cross_norm / (self_norm + cross_norm + 1e-9)
