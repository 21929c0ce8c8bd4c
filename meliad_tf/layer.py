"""One transformer layer: projections, sliding-window attention with the XL cache, FFN.

`TransformerBase` holds the parameters of a pre-norm attention block (norms, key/value/
query projections, the output projection and the FFN). `TransformerLayer` wires it to
the windowed attention, the per-stream XL cache, and the optional memory or recurrence.
"""

import gin
import tensorflow as tf

from meliad_tf import attention
from meliad_tf import dropout as dropout_lib
from meliad_tf import initializers
from meliad_tf import mlp
from meliad_tf import norms
from meliad_tf import positions

POSITION_TYPES = ("t5", "fourier", "rotary", None)
ROTARY_WAVELENGTH = 10000

# Offsets for deriving the seed of each use of randomness within a layer.
(_SEED_PRE_ATTENTION, _SEED_ATTENTION, _SEED_POST_ATTENTION, _SEED_PRE_FFN,
 _SEED_POST_FFN) = range(5)


def projection_mlp(**kwargs):
  """Default output projection: one dense matmul (base_htrans.gin's transformer_attn MLP)."""
  return mlp.MLP(num_layers=1, hidden_activation=None, **kwargs)


def feed_forward_mlp(**kwargs):
  """Default FFN: relu(x W1) W2 with base_htrans.gin's 2048 hidden units."""
  return mlp.MLP(num_layers=2, num_hidden_units=2048, hidden_activation="relu", **kwargs)


@gin.configurable(module="transformer_base")
class TransformerBase(tf.Module):
  """Parameters and maths of one pre-norm attention block, without the attention itself.

  Args:
    embedding_size: E.
    num_heads: H.
    head_size: d.
    cross_attention_q: also project a second query q2 (for cross attention) and learn
      its scale.
    num_cross_heads: heads of cross attention whose outputs join the projection input,
      which then has width (H + num_cross_heads) * d.
    num_position_embeddings: if positive, learned position embeddings [n, E] added after
      the pre-attention norm (the recurrent cell's state positions).
    gate_type, single_gate, skip_ffn: the recurrent cell's arrangement (see MLP).
    attn_mlp_factory, ffn_factory: build the output projection and the FFN (gin-scoped
      MLPs in base_htrans.gin).
    normalize_keys: L2-normalise keys and queries and learn a per-head scale; otherwise
      queries are scaled by 1/sqrt(d).
    dropout_rate, pre_attn_dropout, post_attn_dropout, pre_ffn_dropout,
      post_ffn_dropout: where tiled dropout is applied, in training only.
    dtype: compute dtype.
  """

  def __init__(self, embedding_size, num_heads, head_size, *, cross_attention_q=False,
               num_cross_heads=0, num_position_embeddings=0, gate_type="residual",
               single_gate=False, skip_ffn=False, attn_mlp_factory=projection_mlp,
               ffn_factory=feed_forward_mlp, normalize_keys=True, dropout_rate=0.0,
               pre_attn_dropout=True, post_attn_dropout=False, pre_ffn_dropout=False,
               post_ffn_dropout=True, dtype="float32", name=None):
    super().__init__(name=name)
    self.embedding_size = embedding_size
    self.num_heads = num_heads
    self.head_size = head_size
    self.normalize_keys = normalize_keys
    self.dropout_rate = dropout_rate
    self.pre_attn_dropout = pre_attn_dropout
    self.post_attn_dropout = post_attn_dropout
    self.pre_ffn_dropout = pre_ffn_dropout
    self.post_ffn_dropout = post_ffn_dropout
    self.single_gate = single_gate
    self.skip_ffn = skip_ffn
    self.dtype = initializers.as_dtype(dtype)
    projection_width = num_heads * head_size
    attention_output_width = (num_heads + num_cross_heads) * head_size
    with self.name_scope:
      self.pre_attn_layernorm = norms.LayerNorm(embedding_size, dtype=dtype,
                                                name="pre_attn_layernorm")
      if num_position_embeddings:
        self.position_embeddings = tf.Variable(
            initializers.normal([num_position_embeddings, embedding_size], 1.0),
            name="position_embeddings")
      else:
        self.position_embeddings = None
      self.keys_layer = mlp.Dense(embedding_size, projection_width, dtype=dtype,
                                  name="keys_layer")
      self.values_layer = mlp.Dense(embedding_size, projection_width, dtype=dtype,
                                    name="values_layer")
      self.queries_layer = mlp.Dense(embedding_size, projection_width, dtype=dtype,
                                     name="queries_layer")
      self.queries2_layer = (mlp.Dense(embedding_size, projection_width, dtype=dtype,
                                       name="queries2_layer") if cross_attention_q else None)
      self.attention_scale = (tf.Variable(tf.ones([num_heads]), name="attention_scale")
                              if normalize_keys else None)
      self.attention_scale2 = (tf.Variable(tf.ones([num_heads]), name="attention_scale2")
                               if normalize_keys and cross_attention_q else None)
      if single_gate:
        # One gated FFN straight on the attention output: no projection, no second norm.
        self.post_attn_mlp = None
        self.pre_ffn_layernorm = None
        self.ffn = ffn_factory(num_input_features=attention_output_width,
                               num_output_features=embedding_size, gate_type=gate_type,
                               final_activation="tanh", dtype=dtype, name="ffn")
      else:
        self.post_attn_mlp = attn_mlp_factory(num_input_features=attention_output_width,
                                              num_output_features=embedding_size,
                                              gate_type=gate_type, dtype=dtype,
                                              name="post_attn_mlp")
        if skip_ffn:
          self.pre_ffn_layernorm = None
          self.ffn = None
        else:
          self.pre_ffn_layernorm = norms.LayerNorm(embedding_size, dtype=dtype,
                                                   name="pre_ffn_layernorm")
          self.ffn = ffn_factory(num_input_features=embedding_size,
                                 num_output_features=embedding_size, gate_type=gate_type,
                                 dtype=dtype, name="ffn")

  def _dropout(self, enabled, training, seed, offset):
    if not (enabled and training and self.dropout_rate > 0.0):
      return None
    return lambda x: dropout_lib.tiled_dropout(x, self.dropout_rate,
                                               dropout_lib.fold_in(seed, offset))

  def _split_heads(self, x):
    shape = x.shape.as_list()
    return tf.reshape(x, shape[:-1] + [self.num_heads, self.head_size])

  def kvq(self, x, *, training=False, seed=None):
    """Keys, values, queries (and second queries or None) of x [B, N, E], each [B, N, H, d].

    Keys and queries are L2-normalised when `normalize_keys`; values never are.
    """
    h = self.pre_attn_layernorm(x)
    if self.position_embeddings is not None:
      h += tf.cast(self.position_embeddings, h.dtype)
    drop = self._dropout(self.pre_attn_dropout, training, seed, _SEED_PRE_ATTENTION)
    if drop is not None:
      h = drop(h)
    keys = self._split_heads(self.keys_layer(h))
    values = self._split_heads(self.values_layer(h))
    queries = self._split_heads(self.queries_layer(h))
    queries2 = (self._split_heads(self.queries2_layer(h))
                if self.queries2_layer is not None else None)
    if self.normalize_keys:
      keys = attention.l2_normalize(keys)
      queries = attention.l2_normalize(queries)
      if queries2 is not None:
        queries2 = attention.l2_normalize(queries2)
    else:
      query_scale = tf.cast(self.head_size ** -0.5, queries.dtype)
      queries *= query_scale
      if queries2 is not None:
        queries2 *= query_scale
    return keys, values, queries, queries2

  def post_attn_ffn(self, x, attn, cross_attn=None, *, training=False, seed=None):
    """Output projection with its gate, then the FFN with its gate.

    Args:
      x: the block input [B, N, E] (the residual).
      attn: self-attention output [B, N, H, d].
      cross_attn: optional cross-attention output [B, N, H', d], concatenated after the
        self-attention heads.
    Returns:
      [B, N, E].
    """
    heads = attn if cross_attn is None else tf.concat([attn, cross_attn], axis=-2)
    shape = heads.shape.as_list()
    heads = tf.reshape(heads, shape[:-2] + [shape[-2] * shape[-1]])
    if self.single_gate:
      return self.ffn(heads, x)
    y = self.post_attn_mlp(heads, x,
                           dropout=self._dropout(self.post_attn_dropout, training, seed,
                                                         _SEED_POST_ATTENTION))
    if self.ffn is None:
      return y
    z = self.pre_ffn_layernorm(y)
    drop = self._dropout(self.pre_ffn_dropout, training, seed, _SEED_PRE_FFN)
    if drop is not None:
      z = drop(z)
    return self.ffn(z, y, dropout=self._dropout(self.post_ffn_dropout, training, seed,
                                                 _SEED_POST_FFN))


@gin.configurable(module="transformer_layer")
class TransformerLayer(tf.Module):
  """A decoder layer with sliding-window attention over the current and previous window.

  Per stream it carries the XL cache: the keys and values (normalised, unrotated) of
  the last window of the previous segment, zeros at a document start (attended to, not
  masked). Call signature is functional: `(x, start_of_sequence, state) -> (y, state)`.

  Args (Meliad's gin names):
    embedding_size: E (passed by the stack).
    num_heads, head_size: H, d.
    window_length: W; the segment length must be a multiple of it.
    use_long_xl_architecture: keep the XL cache; without it W must equal the segment.
    max_unrolled_windows: accepted for compatibility; windows are always computed
      together, which is numerically the same as Meliad's loop or scan.
    relative_position_type: "t5", "fourier", "rotary" or None.
    use_causal_mask: must be True for a language model.
    attn_dropout_rate: dropout on attention probabilities (mask shared by batch and windows).
    recurrent_num_states, recurrent_gate_type, recurrent_single_gate, recurrent_skip_ffn:
      configuration of a recurrent layer.
    memory_num_neighbors: K for a memory layer.
    compute_importance: must be False (vestigial in Meliad).
    is_recurrent, memory, cross_attention: set by the stack for special layers.
    dtype: compute dtype.
  """

  def __init__(self, embedding_size, num_heads=8, head_size=128, window_length=512,
               use_long_xl_architecture=True, max_unrolled_windows=-1,
               relative_position_type="fourier", use_causal_mask=True, attn_dropout_rate=0.0,
               recurrent_num_states=0, recurrent_gate_type="bias",
               recurrent_single_gate=False, recurrent_skip_ffn=False,
               memory_num_neighbors=0, memory_reset_on_new_doc=True, compute_importance=False,
               is_recurrent=False, memory=None, cross_attention=False, dtype="float32",
               name=None):
    super().__init__(name=name)
    del max_unrolled_windows  # Batched windows are exact; nothing to choose.
    if relative_position_type not in POSITION_TYPES:
      raise ValueError(f"TransformerLayer.relative_position_type must be one of "
                       f"{POSITION_TYPES}, got {relative_position_type!r}")
    if not use_causal_mask:
      raise ValueError("TransformerLayer.use_causal_mask=False is not supported: "
                       "a decoder-only language model needs the causal mask")
    if compute_importance:
      raise ValueError("TransformerLayer.compute_importance must be False "
                       "(it has no effect in Meliad and is not implemented)")
    if is_recurrent:
      raise NotImplementedError("recurrent layers (recurrent_layer_indices) are not "
                                "available in this version")
    if memory is not None or memory_num_neighbors:
      raise NotImplementedError("memory layers (memory_layer_indices, "
                                "memory_num_neighbors) are not available in this version")
    if cross_attention:
      raise NotImplementedError("feedback cross attention needs recurrent layers, which are "
                                "not available in this version")
    self.embedding_size = embedding_size
    self.num_heads = num_heads
    self.head_size = head_size
    self.window_length = window_length
    self.use_long_xl_architecture = use_long_xl_architecture
    self.relative_position_type = relative_position_type
    self.attn_dropout_rate = attn_dropout_rate
    self.dtype = initializers.as_dtype(dtype)
    with self.name_scope:
      self.tbase = TransformerBase(embedding_size, num_heads, head_size, dtype=dtype,
                                   name="tbase")
      if relative_position_type == "t5":
        self.relative_positions = positions.T5RelativePositionBias(num_heads)
      elif relative_position_type == "fourier":
        self.relative_positions = positions.RelativeFourierPositions(num_heads, window_length)
      else:
        self.relative_positions = None

  def check_sequence_length(self, sequence_length):
    """Raises ValueError unless a segment of this length can be split into windows."""
    if self.use_long_xl_architecture:
      if sequence_length % self.window_length:
        raise ValueError(
            f"the segment length (TransformerTaskConfig.sequence_length = {sequence_length}) "
            f"must be a multiple of the window (TransformerLayer.window_length = "
            f"{self.window_length})")
    elif sequence_length != self.window_length:
      raise ValueError(
          f"without the XL architecture (use_long_xl_architecture = False) the window "
          f"(TransformerLayer.window_length = {self.window_length}) must equal the segment "
          f"length ({sequence_length}); sliding windows need the XL cache")

  def state_spec(self, batch_size):
    """The per-stream state: the XL cache, or nothing without the XL architecture."""
    if not self.use_long_xl_architecture:
      return {}
    shape = [batch_size, self.window_length, self.num_heads, self.head_size]
    return {"keys": tf.TensorSpec(shape, self.dtype), "values": tf.TensorSpec(shape, self.dtype)}

  def _position_bias(self, num_queries, num_keys):
    if self.relative_positions is None:
      return None
    return self.relative_positions(num_queries, num_keys)

  def _attention_dropout(self, num_queries, num_keys, training, seed):
    if not training or self.attn_dropout_rate == 0.0:
      return None
    return dropout_lib.keep_mask([self.num_heads, num_queries, num_keys], self.attn_dropout_rate,
                                 dropout_lib.fold_in(seed, _SEED_ATTENTION), tf.float32)

  def __call__(self, x, start_of_sequence, state, *, training=False, seed=None):
    """Runs the layer on one segment.

    Args:
      x: [B, N, E] inputs.
      start_of_sequence: bool [B]; where True the cache is replaced by zeros.
      state: dict from `state_spec` (the cache left by the previous segment).
      training: enables dropout.
      seed: [2] int seed for this layer's dropout in this step.
    Returns:
      (y [B, N, E], new state).
    """
    keys, values, queries, _ = self.tbase.kvq(x, training=training, seed=seed)
    rotary = ROTARY_WAVELENGTH if self.relative_position_type == "rotary" else None
    scale = self.tbase.attention_scale
    if self.use_long_xl_architecture:
      window = self.window_length
      reset = start_of_sequence[:, None, None, None]
      previous_keys = tf.where(reset, tf.zeros_like(keys[:, :window]),
                               tf.stop_gradient(state["keys"]))
      previous_values = tf.where(reset, tf.zeros_like(values[:, :window]),
                                 tf.stop_gradient(state["values"]))
      attn = attention.sliding_window_attention(
          queries, keys, values, previous_keys, previous_values, window,
          bias=self._position_bias(window, 2 * window), scale=scale,
          dropout_multiplier=self._attention_dropout(window, 2 * window, training, seed),
          rotary_wavelength=rotary)
      new_state = {"keys": keys[:, -window:], "values": values[:, -window:]}
    else:
      length = x.shape[1]
      attn = attention.causal_attention(
          queries, keys, values, bias=self._position_bias(length, length), scale=scale,
          dropout_multiplier=self._attention_dropout(length, length, training, seed),
          rotary_wavelength=rotary)
      new_state = {}
    y = self.tbase.post_attn_ffn(x, attn, training=training, seed=seed)
    return y, new_state
