"""One transformer layer: projections, sliding-window attention with the XL cache, FFN.

`TransformerBase` holds the parameters of a pre-norm attention block (norms, key/value/
query projections, the output projection and the FFN). `TransformerLayer` wires it to
the windowed attention, the per-stream XL cache, and the optional memory or recurrence.
"""

from absl import logging
import gin
import tensorflow as tf

from meliad_tf.layers import attention
from meliad_tf.layers import dropout as dropout_lib
from meliad_tf.layers import initializers
from meliad_tf.layers import mlp
from meliad_tf.layers import norms
from meliad_tf.layers import positions
from meliad_tf.layers import recurrence
from meliad_tf.layers import scopes


POSITION_TYPES = ("t5", "fourier", "rotary", None)
ROTARY_WAVELENGTH = 10000

# Offsets for deriving the seed of each use of randomness within a layer.
(_SEED_PRE_ATTENTION, _SEED_ATTENTION, _SEED_POST_ATTENTION, _SEED_PRE_FFN,
 _SEED_POST_FFN) = range(5)


def ends_a_multiple(position, length):
  """bool [B]: whether the token at `position` (int32 [B]) is the last of a block, call or
  chunk of `length` tokens."""
  return tf.equal((position + 1) % length, 0)


def heads_first(x):
  """[B, n, H, d] <-> [B, H, n, d]."""
  return tf.transpose(x, [0, 2, 1, 3])


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
    fuse_projections: compute the key, value and query projections as one matrix product
      of the concatenated kernels (the kernels stay separate parameters); False computes
      one product per kernel. The same arithmetic either way.
    dtype: compute dtype.
  """

  def __init__(self, embedding_size, num_heads, head_size, *, cross_attention_q=False,
               num_cross_heads=0, num_position_embeddings=0, gate_type="residual",
               single_gate=False, skip_ffn=False, attn_mlp_factory=projection_mlp,
               ffn_factory=feed_forward_mlp, normalize_keys=True, dropout_rate=0.0,
               pre_attn_dropout=True, post_attn_dropout=False, pre_ffn_dropout=False,
               post_ffn_dropout=True, fuse_projections=True, dtype="float32", name=None):
    super().__init__(name=name)
    for arg, value in (("embedding_size (EMBED_DIM)", embedding_size),
                       ("num_heads (NUM_HEADS)", num_heads), ("head_size (HEAD_DIM)", head_size)):
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"TransformerBase.{arg} must be a positive integer, got {value!r}")
    dropout_lib.check_rate("TransformerBase.dropout_rate (DROPOUT_RATE)", dropout_rate)
    if single_gate and skip_ffn:
      raise ValueError("TransformerBase: single_gate and skip_ffn exclude each other (the "
                       "single gate is the FFN's); set recurrent_single_gate or "
                       "recurrent_skip_ffn, not both")
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
    self.fuse_projections = fuse_projections
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

  @scopes.scoped("kvq")
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
    projections = [self.keys_layer, self.values_layer, self.queries_layer]
    if self.queries2_layer is not None:
      projections.append(self.queries2_layer)
    if self.fuse_projections and x.shape[-2] != 1:
      # One product with the kernels side by side: on CPU a wider matmul runs nearer the
      # peak, and the backward pass gets one product per gradient instead of one per kernel.
      # Not for one token per stream (a decoding step), where putting the kernels side by
      # side would cost more than the products.
      kernel = tf.concat([tf.cast(p.kernel, self.dtype) for p in projections], axis=1)
      outputs = tf.split(tf.matmul(h, kernel), len(projections), axis=-1)
    else:
      outputs = [p(h) for p in projections]
    keys, values, queries = (self._split_heads(y) for y in outputs[:3])
    queries2 = self._split_heads(outputs[3]) if len(outputs) > 3 else None
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

  def post_attn_ffn(self, x, attn, cross_attn=None, *, training=False, seed=None,
                    gates=None):
    """Output projection with its gate, then the FFN with its gate.

    Args:
      x: the block input [B, N, E] (the residual).
      attn: self-attention output [B, N, H, d].
      cross_attn: optional cross-attention output [B, N, H', d], concatenated after the
        self-attention heads.
      gates: optional list to which each learned gate appends its mean values, the
        projection's gate first (see `mlp.MLP.__call__`).
    Returns:
      [B, N, E].
    """
    heads = attn if cross_attn is None else tf.concat([attn, cross_attn], axis=-2)
    shape = heads.shape.as_list()
    heads = tf.reshape(heads, shape[:-2] + [shape[-2] * shape[-1]])
    if self.single_gate:
      with tf.name_scope("ffn"):
        return self.ffn(heads, x, gates=gates)
    with tf.name_scope("projection"):
      y = self.post_attn_mlp(heads, x,
                             dropout=self._dropout(self.post_attn_dropout, training, seed,
                                                   _SEED_POST_ATTENTION),
                             gates=gates)
    if self.ffn is None:
      return y
    with tf.name_scope("ffn"):
      z = self.pre_ffn_layernorm(y)
      drop = self._dropout(self.pre_ffn_dropout, training, seed, _SEED_PRE_FFN)
      if drop is not None:
        z = drop(z)
      return self.ffn(z, y, dropout=self._dropout(self.post_ffn_dropout, training, seed,
                                                   _SEED_POST_FFN), gates=gates)


@gin.configurable(module="transformer_layer")
class TransformerLayer(tf.Module):
  """A decoder layer with sliding-window attention over the current and previous window.

  Per stream it carries the XL cache: the keys and values (normalised, unrotated) of
  the last window of the previous segment, zeros at a document start (attended to, not
  masked). Call signature is functional: `(x, start_of_sequence, state) -> (y, state)`.

  A recurrent layer (`is_recurrent`) also carries a state of S vectors, updated once per
  window by its `recurrence.RecurrentCell`; its tokens cross-attend to the state entering
  their window. A layer with `cross_attention` (block feedback) cross-attends
  to keys and values the stack passes in, those of a recurrent layer's state.
  Either way the projection takes [self heads, cross heads], 2 H d wide.

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
    memory_num_neighbors: K, neighbours retrieved per query by a memory layer (gin sets it
      for every layer; only those given a memory use it).
    memory_reset_on_new_doc: empty a stream's memory when its document starts.
    compute_importance: must be False (vestigial in Meliad).
    is_recurrent, memory, cross_attention: set by the stack for special layers.
    attention_block_length: queries per block of the sliding-window attention, which then
      computes only the band of W keys each block needs (the longest divisor of W up to this
      value; with the XL architecture and a window longer than it), and the recurrent
      cell's and cross attentions get their gradients written out (`attention.attend`);
      0 computes every attention of the layer op by op as Meliad does, the sliding window
      window by window against 2W keys, masked half included. The same arithmetic either
      way; see attention.sliding_window_attention.
    dtype: compute dtype.
  """

  def __init__(self, embedding_size, num_heads=8, head_size=128, window_length=512,
               use_long_xl_architecture=True, max_unrolled_windows=-1,
               relative_position_type="fourier", use_causal_mask=True, attn_dropout_rate=0.0,
               recurrent_num_states=0, recurrent_gate_type="bias",
               recurrent_single_gate=False, recurrent_skip_ffn=False,
               memory_num_neighbors=0, memory_reset_on_new_doc=True, compute_importance=False,
               is_recurrent=False, memory=None, cross_attention=False,
               attention_block_length=attention.DEFAULT_BLOCK_LENGTH, dtype="float32",
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
    if isinstance(window_length, bool) or not isinstance(window_length, int) or window_length <= 0:
      raise ValueError(f"TransformerLayer.window_length must be a positive integer, got "
                       f"{window_length!r}")
    if (isinstance(attention_block_length, bool) or not isinstance(attention_block_length, int)
        or attention_block_length < 0):
      raise ValueError(f"TransformerLayer.attention_block_length must be an integer >= 0, got "
                       f"{attention_block_length!r}")
    dropout_lib.check_rate("TransformerLayer.attn_dropout_rate (ATTN_DROPOUT_RATE)",
                           attn_dropout_rate)
    if memory is not None:
      memory.check_layer(num_heads, head_size, memory_num_neighbors)
    if cross_attention and is_recurrent:
      raise ValueError("a recurrent layer attends to its own state; cross_attention is for "
                       "the other layers under block feedback")
    self.embedding_size = embedding_size
    self.num_heads = num_heads
    self.head_size = head_size
    self.window_length = window_length
    self.attention_block_length = (attention.block_length_for(window_length,
                                                              attention_block_length)
                                   if attention_block_length else 0)
    self.use_long_xl_architecture = use_long_xl_architecture
    self.relative_position_type = relative_position_type
    self.attn_dropout_rate = attn_dropout_rate
    self.cross_attention = cross_attention
    self.memory = memory
    self.memory_num_neighbors = memory_num_neighbors
    self.memory_reset_on_new_doc = memory_reset_on_new_doc
    self.dtype = initializers.as_dtype(dtype)
    # Tokens of a recurrent layer cross-attend to its state, those of a feedback layer to
    # the stack's recurrent state: a second query and cross heads in the projection.
    num_cross_heads = num_heads if is_recurrent or cross_attention else 0
    with self.name_scope:
      self.tbase = TransformerBase(embedding_size, num_heads, head_size,
                                   cross_attention_q=bool(num_cross_heads),
                                   num_cross_heads=num_cross_heads, dtype=dtype, name="tbase")
      if is_recurrent:
        self.recurrent = recurrence.RecurrentCell(
            TransformerBase(embedding_size, num_heads, head_size, cross_attention_q=True,
                            num_cross_heads=num_heads,
                            num_position_embeddings=recurrent_num_states,
                            gate_type=recurrent_gate_type, single_gate=recurrent_single_gate,
                            skip_ffn=recurrent_skip_ffn, dtype=dtype, name="recurrent_tbase"),
            recurrent_num_states, written_gradient=self.written_gradient,
            name="recurrent")
      else:
        self.recurrent = None
      if relative_position_type == "t5":
        self.relative_positions = positions.T5RelativePositionBias(num_heads)
      elif relative_position_type == "fourier":
        self.relative_positions = positions.RelativeFourierPositions(num_heads, window_length)
      else:
        self.relative_positions = None
      # The gate between local and memory attention, sigmoid(0) = 0.5 at the start.
      self.external_memory_bias = (tf.Variable(tf.zeros([num_heads]),
                                               name="external_memory_bias")
                                   if memory is not None else None)

  @property
  def written_gradient(self):
    """Whether the layer's attentions besides the sliding window get the written-out
    gradient (attention.attend); not on the reference path, attention_block_length = 0."""
    return bool(self.attention_block_length)

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
    if self.memory is not None:
      self.memory.check_sequence_length(sequence_length)
      if self.window_length < sequence_length:
        logging.warning(
            "%s has an external memory and a window (TransformerLayer.window_length = %d) "
            "shorter than the segment (%d tokens). The memory is read once per segment and "
            "holds previous segments only, so a token of a later window sees neither the "
            "earlier windows of its own segment nor their memory entries. Meliad's recipes "
            "use window = segment (e.g. options/seq_512.gin with window 512).",
            self.name, self.window_length, sequence_length)

  def state_spec(self, batch_size):
    """The per-stream state: the XL cache (none without the XL architecture), for a
    recurrent layer the recurrent state "recurrent" [B, S, E], and for a memory layer
    the memory "memory" (keys, values [B, H, N, d], index [B]; see memory.py)."""
    spec = {}
    if self.use_long_xl_architecture:
      shape = [batch_size, self.window_length, self.num_heads, self.head_size]
      spec.update(keys=tf.TensorSpec(shape, self.dtype), values=tf.TensorSpec(shape, self.dtype))
    if self.recurrent is not None:
      spec["recurrent"] = tf.TensorSpec(
          [batch_size, self.recurrent.num_states, self.embedding_size], self.dtype)
    if self.memory is not None:
      spec["memory"] = self.memory.state_spec(batch_size)
    return spec

  def _position_bias(self, num_queries, num_keys):
    if self.relative_positions is None:
      return None
    return self.relative_positions(num_queries, num_keys)

  def _attention_dropout(self, num_queries, num_keys, training, seed):
    if not training or self.attn_dropout_rate == 0.0:
      return None
    return dropout_lib.keep_mask([self.num_heads, num_queries, num_keys], self.attn_dropout_rate,
                                 dropout_lib.fold_in(seed, _SEED_ATTENTION), tf.float32)

  def __call__(self, x, start_of_sequence, state, *, training=False, seed=None,
               cross_attention_kv=None, diagnostics=None):
    """Runs the layer on one segment.

    Args:
      x: [B, N, E] inputs.
      start_of_sequence: bool [B]; where True the cache is replaced by zeros (and the
        recurrent state by the learned initial state).
      state: dict from `state_spec` (what the previous segment left). No gradient is
        stopped here: the stack stops it once per step, so that block feedback, which calls
        the layer once per chunk, keeps gradients across the chunks of a segment.
      training: enables dropout (never in the recurrent cell).
      seed: [2] int seed for this layer's dropout in this step.
      cross_attention_kv: for a `cross_attention` layer, the (keys, values) [B, S, H, d]
        of the recurrent state to cross-attend to.
      diagnostics: optional dict this layer fills with float32 scalars: for a recurrent
        layer its gates' means (`recurrence.gate_diagnostics`), and for any layer that
        cross-attends to a state "state_attention_share" (`recurrence.attention_share`),
        for a memory layer "memory_gate" (the mean of its per-head gates).
    Returns:
      (y [B, N, E], new state).
    """
    keys, values, queries, queries2 = self.tbase.kvq(x, training=training, seed=seed)
    if self.use_long_xl_architecture:
      window = self.window_length
      previous_keys, previous_values = self._load_cache(state, start_of_sequence)
      attn = self._local_attention(
          queries, keys, values, previous_keys, previous_values, self.attention_block_length,
          dropout_multiplier=self._attention_dropout(window, 2 * window, training, seed))
      new_state = {"keys": keys[:, -window:], "values": values[:, -window:]}
    else:
      length = x.shape[1]
      attn = attention.causal_attention(
          queries, keys, values, position_bias=self._position_bias,
          scale=self.tbase.attention_scale,
          dropout_multiplier=self._attention_dropout(length, length, training, seed),
          rotary_wavelength=self._rotary_wavelength)
      new_state = {}
      previous_keys = previous_values = None
    if self.memory is not None:
      attn, new_state["memory"] = self._memory_attention(
          attn, keys, values, queries, start_of_sequence, state["memory"], training,
          diagnostics, rotary_wavelength=self._rotary_wavelength)
    cross_attn = None
    if self.recurrent is not None:
      cross_attn, new_state["recurrent"] = self._recurrence(
          start_of_sequence, state["recurrent"], keys, values, queries2, previous_keys,
          previous_values, diagnostics)
    elif self.cross_attention:
      cross_attn = self._feedback_attention(queries2, cross_attention_kv)
    if diagnostics is not None and cross_attn is not None:
      diagnostics["state_attention_share"] = recurrence.attention_share(
          attn, cross_attn, self.tbase.post_attn_mlp.output_layer.kernel)
    y = self.tbase.post_attn_ffn(x, attn, cross_attn, training=training, seed=seed)
    return y, new_state

  @property
  def _rotary_wavelength(self):
    return ROTARY_WAVELENGTH if self.relative_position_type == "rotary" else None

  def _load_cache(self, state, start_of_sequence):
    """The XL cache as attended to: (keys, values) [B, W, H, d], zeros at a document start."""
    reset = start_of_sequence[:, None, None, None]
    return (tf.where(reset, tf.zeros_like(state["keys"]), state["keys"]),
            tf.where(reset, tf.zeros_like(state["values"]), state["values"]))

  def _local_attention(self, queries, keys, values, previous_keys, previous_values,
                       block_length, dropout_multiplier=None):
    """The sliding window: each of the n tokens [B, n, H, d] attends to the W before it,
    the first of them in `previous_keys`, `previous_values` [B, W, H, d]."""
    return attention.sliding_window_attention(
        queries, keys, values, previous_keys, previous_values, self.window_length,
        position_bias=self._position_bias, scale=self.tbase.attention_scale,
        dropout_multiplier=dropout_multiplier, rotary_wavelength=self._rotary_wavelength,
        block_length=block_length)

  def _feedback_attention(self, queries2, cross_attention_kv):
    """Block feedback: the tokens' attention to the stack's recurrent state (keys, values)."""
    self._check_cross_attention_kv(cross_attention_kv)
    return recurrence.attend_to_state(queries2, *cross_attention_kv,
                                      scale=self.tbase.attention_scale2,
                                      written_gradient=self.written_gradient)

  def _check_cross_attention_kv(self, cross_attention_kv):
    if cross_attention_kv is None:
      raise ValueError(f"layer {self.name} has cross_attention (block feedback) but was "
                       "called without cross_attention_kv")

  @scopes.scoped("memory")
  def _memory_attention(self, attn, keys, values, queries, start_of_sequence, state,
                        training, diagnostics, rotary_wavelength=None):
    """Mixes local attention with attention over the memory, then stores this segment.

    In Meliad's order: reset the memory of streams whose document starts, retrieve the K
    neighbours of every query from the memory as it was (so never from this segment),
    then write this segment's keys and values. With rotary positions the search uses the
    unrotated queries but the attention over the neighbours the queries as the local
    attention rotates them (by their position in their window), as Meliad does.

    Args:
      attn: local attention output [B, N, H, d].
      keys, values, queries: [B, N, H, d] (normalised, unrotated keys and queries).
      start_of_sequence: bool [B].
      state: this layer's memory state.
      training: whether this is a training step (a host search keeps separate indices for
        the training and the test state).
      diagnostics: optional dict for the mean gate.
      rotary_wavelength: set with rotary positions (see above).
    Returns:
      ((1 - g) * attn + g * memory attention [B, N, H, d], the new memory state).
    """
    if self.memory_reset_on_new_doc:
      state = self.memory.reset(state, start_of_sequence)
    neighbors = None
    if self.memory.searches_on_host:
      neighbors = self.memory.host_search(state, queries, keys, self.memory_num_neighbors,
                                          "train" if training else "test")
    attention_queries = None
    if rotary_wavelength is not None:
      window = self.window_length if self.use_long_xl_architecture else queries.shape[1]
      attention_queries = attention.merge_windows(positions.rotate_half_split(
          attention.split_windows(queries, window), range(window), rotary_wavelength))
    mixed = self.read_memory(attn, queries, state, neighbors, diagnostics,
                             attention_queries=attention_queries)
    return mixed, self.memory.write(state, keys, values)

  @scopes.scoped("memory")
  def read_memory(self, attn, queries, state, neighbors=None, diagnostics=None,
                  attention_queries=None, empty=None):
    """Mixes local attention with attention over each query's K neighbours in memory.

    The memory is only read: on a segment the caller resets and writes around it; a
    decoding step calls it with one query per stream, and the decoder writes the segment
    once complete (`end_boundaries`).

    Args:
      attn: local attention output [B, n, H, d].
      queries: [B, n, H, d] normalised, unrotated queries.
      state: this layer's memory state.
      neighbors: slots [B, H, n, K] found on the host, or None to search on device.
      diagnostics: optional dict for the mean gate.
      attention_queries: [B, n, H, d], the queries that attend over the neighbours when
        they are not those that found them (rotated ones, with rotary positions).
      empty: optional `ExternalMemory.empty_slots(state)`, when already computed (a
        decoder reads the same memory for a whole call).
    Returns:
      (1 - g) * attn + g * memory attention, [B, n, H, d], with g = sigmoid(bias) per head.
    """
    scores = None
    if neighbors is None:
      neighbors, scores = self.memory.search(state, queries, self.memory_num_neighbors,
                                             empty=empty)
    if attention_queries is not None:
      # The search's scores are those of the other queries: the logits are recomputed.
      queries, scores = attention_queries, None
    external = self.memory.attend(state, queries, neighbors, scores,
                                  scale=self.tbase.attention_scale, empty=empty)
    gate = tf.sigmoid(self.external_memory_bias)  # [H]
    if diagnostics is not None:
      diagnostics["memory_gate"] = tf.reduce_mean(gate)
    gate = tf.cast(gate, attn.dtype)[:, None]
    return (1.0 - gate) * attn + gate * tf.cast(external, attn.dtype)

  @scopes.scoped("recurrence")
  def _recurrence(self, start_of_sequence, state, keys, values, queries2, previous_keys,
                  previous_values, diagnostics):
    """Runs the cell over the windows; returns (token->state attention, final state).

    Args:
      start_of_sequence: bool [B].
      state: [B, S, E], the state the previous segment left.
      keys, values, queries2: [B, N, H, d] of the tokens.
      previous_keys, previous_values: [B, W, H, d], the XL cache as loaded (zeros at a
        document start), or None without the XL architecture.
      diagnostics: optional dict for the gate means.
    Returns:
      (cross attention [B, N, H, d], final state [B, S, E]).
    """
    if previous_keys is not None:
      window = self.window_length
      # The state attends to the 2W keys of each window: [B, nW, 2W, H, d].
      window_keys = attention.window_keys(keys, previous_keys, window)
      window_values = attention.window_keys(values, previous_values, window)
    else:
      window = keys.shape[1]
      window_keys, window_values = keys[:, None], values[:, None]  # [B, 1, N, H, d]
    state_keys, state_values, final_state = self.recurrent(
        self.recurrent.load(start_of_sequence, state), window_keys, window_values,
        diagnostics=diagnostics)
    # Window t's tokens attend to c_t, the state entering it: [B, nW, W, H, d].
    cross = recurrence.attend_to_state(attention.split_windows(queries2, window), state_keys,
                                       state_values, scale=self.tbase.attention_scale2,
                                       written_gradient=self.written_gradient)
    return attention.merge_windows(cross), final_state

  def init_decode_state(self, state, start_of_sequence, call_length):
    """This layer's decode state for a call of the layer (a segment, or a chunk of the
    stack) decoded one token at a time, from the state the previous call left.

    The state comes in two parts. The token state changes with every token and is what a
    decoding step returns. The boundary state changes only where a block or a call ends
    (`end_boundaries`); a decoding step only reads it, so that a compiled step neither
    returns nor copies it (a memory is hundreds of MB) with every token.

    Args:
      state: this layer's part of the model state (see `state_spec`).
      start_of_sequence: bool [B]; the streams whose document starts with the call.
      call_length: tokens per call (the segment, or the stack's chunk); the memory is read
        and written once per call, as the segment step does.
    Returns:
      (token state, boundary state). The token state holds "keys", "values": the keys and
        values of the previous tokens, oldest first, zeros at a document start, [B, W, H, d]
        or, for a memory layer, [B, max(W, call_length), H, d]: the memory is written with
        the last call_length of them when a call completes.
      The boundary state (empty for a layer with neither a memory nor a recurrent state)
      holds
        for a memory layer, "memory" (reset where a document starts) and, for a memory
          searched on device, "empty_slots" (bool [B, H, N], see `memory.empty_slots`);
        for a recurrent layer, "recurrent" [B, S, E], the state entering the current block
          (the learned initial state at a document start), "state_keys", "state_values"
          [B, H, S, d], its keys and values heads first, which the tokens attend to, and
          "previous_keys", "previous_values" [B, W, H, d], those of the window before the
          block, which the state update at the block's end reads with the block's own.
    Raises:
      ValueError: for a layer without the XL cache, which has no one-token step.
    """
    if not self.use_long_xl_architecture:
      raise ValueError(f"{self.name}: decoding one token at a time needs the XL cache "
                       "(TransformerLayer.use_long_xl_architecture = True)")
    keys, values = self._load_cache(state, start_of_sequence)
    token_state, boundary_state = {"keys": keys, "values": values}, {}
    if self.memory is not None:
      memory = state["memory"]
      if self.memory_reset_on_new_doc:
        memory = self.memory.reset(memory, start_of_sequence)
      boundary_state.update(self._memory_boundary_state(memory))
      if call_length > self.window_length:
        # Rows that the call's own tokens replace before its write reads them.
        unread = tf.zeros([keys.shape[0], call_length - self.window_length]
                          + keys.shape.as_list()[2:], keys.dtype)
        token_state = {"keys": tf.concat([unread, keys], axis=1),
                       "values": tf.concat([unread, values], axis=1)}
    if self.recurrent is not None:
      boundary_state.update(
          self._recurrent_boundary_state(
              self.recurrent.load(start_of_sequence, state["recurrent"])),
          previous_keys=keys, previous_values=values)
    return token_state, boundary_state

  def _memory_boundary_state(self, memory):
    if self.memory.searches_on_host:
      return {"memory": memory}
    return {"memory": memory, "empty_slots": self.memory.empty_slots(memory)}

  def _recurrent_boundary_state(self, recurrent_state):
    state_keys, state_values = self.recurrent.kv(recurrent_state)
    return {"recurrent": recurrent_state, "state_keys": heads_first(state_keys),
            "state_values": heads_first(state_values)}

  def decode_step(self, x, token_state, boundary_state, position, cross_attention_kv=None):
    """One token per stream through the layer: what `__call__` computes for that token.

    The same attention code as the segment step: the sliding window (in blocks of one
    query), the memory's search, attention and gate, and the cross attention to a state.
    The boundary state is only read: `end_boundaries` moves a recurrent state on when a
    block ends and writes a memory when a call ends, as the segment step does.

    Args:
      x: [B, 1, E], the token's input to this layer.
      token_state: from `init_decode_state` or the previous step.
      boundary_state: from `init_decode_state` or `end_boundaries`.
      position: int32 [B], each token's index in its document (segments, chunks and blocks
        start at multiples of their lengths).
      cross_attention_kv: for a `cross_attention` layer, the (keys, values) [B, H, S, d],
        heads first, of the recurrent state entering the current chunk.
    Returns:
      (y [B, 1, E], the new token state).
    """
    keys, values, queries, queries2 = self.tbase.kvq(x)  # [B, 1, H, d] each
    window = self.window_length
    attn = self._local_attention(queries, keys, values, token_state["keys"][:, -window:],
                                 token_state["values"][:, -window:], block_length=1)
    new_state = {"keys": tf.concat([token_state["keys"][:, 1:], keys], axis=1),
                 "values": tf.concat([token_state["values"][:, 1:], values], axis=1)}
    if self.memory is not None:
      attn = self._read_memory_for_token(attn, queries, boundary_state, position)
    cross_attn = None
    if self.recurrent is not None:
      cross_attn = self._attend_to_state_for_token(
          queries2, boundary_state["state_keys"], boundary_state["state_values"])
    elif self.cross_attention:
      self._check_cross_attention_kv(cross_attention_kv)
      cross_attn = self._attend_to_state_for_token(queries2, *cross_attention_kv)
    return self.tbase.post_attn_ffn(x, attn, cross_attn), new_state

  @scopes.scoped("cross_attention")
  def _attend_to_state_for_token(self, queries2, state_keys, state_values):
    """`recurrence.attend_to_state` for one token per stream, against heads-first keys and
    values [B, H, S, d] (the decode state keeps them so: no transpose per token)."""
    out = attention.attend_heads_first(heads_first(queries2), state_keys, state_values,
                                       scale=self.tbase.attention_scale2)
    return heads_first(out)

  def _read_memory_for_token(self, attn, queries, boundary_state, position):
    """`read_memory` for one token per stream, its query rotated by its position in the
    window with rotary positions (as `_memory_attention` rotates a segment's)."""
    memory = boundary_state["memory"]
    neighbors = None
    if self.memory.searches_on_host:
      neighbors = self.memory.host_lookup(memory, queries, self.memory_num_neighbors, "test")
    attention_queries = None
    if self._rotary_wavelength is not None:
      attention_queries = positions.rotate_at(queries, position % self.window_length,
                                              self.window_length, self._rotary_wavelength)
    return self.read_memory(attn, queries, memory, neighbors,
                            attention_queries=attention_queries,
                            empty=boundary_state.get("empty_slots"))

  def ends_boundary(self, position, call_length, write_memory=True):
    """bool [B]: whether the token at `position` ends a block of this recurrent layer or a
    call of this memory layer (counted when `write_memory`), after which `end_boundaries`
    changes its boundary state."""
    ended = tf.zeros(position.shape, tf.bool)
    if self.recurrent is not None:
      ended |= ends_a_multiple(position, self.window_length)
    if self.memory is not None:
      ended |= ends_a_multiple(position, call_length) & write_memory
    return ended

  def end_boundaries(self, token_state, boundary_state, position, call_length,
                     write_memory=True):
    """The boundary state after the token at `position`, for the streams whose block or
    call it ends: a recurrent state moved on with the block's keys and values (and the
    window before it), a memory written with the call's keys and values, as the segment
    step does. The other streams keep theirs.

    Args:
      token_state: after the `decode_step` of the token at `position` (int32 [B]).
      boundary_state: the one that step read.
      position: int32 [B].
      call_length: tokens per call, as given to `init_decode_state`.
      write_memory: bool scalar; False leaves a memory as it is.
    Returns:
      The new boundary state.
    """
    new_state = dict(boundary_state)
    if self.recurrent is not None:
      new_state.update(self._end_blocks(token_state, boundary_state,
                                        ends_a_multiple(position, self.window_length)))
    if self.memory is not None:
      ended = ends_a_multiple(position, call_length) & write_memory
      unchanged = {key: boundary_state[key] for key in ("memory", "empty_slots")
                   if key in boundary_state}
      # Once per call per stream: other boundaries pass the memory through.
      new_state.update(tf.cond(
          tf.reduce_any(ended),
          lambda: self._memory_boundary_state(
              self._write_decoded_call(token_state, boundary_state["memory"], ended,
                                       call_length)),
          lambda: unchanged))
    return new_state

  def _end_blocks(self, token_state, boundary_state, ended):
    """The recurrent part of the boundary state, moved on for the streams whose block ended
    (bool [B]) with the keys and values of the block (the token state's window) and of the
    window before it."""
    names = ("recurrent", "state_keys", "state_values", "previous_keys", "previous_values")
    previous = {name: boundary_state[name] for name in names}

    def update():
      block_keys = token_state["keys"][:, -self.window_length:]
      block_values = token_state["values"][:, -self.window_length:]
      window_keys = tf.concat([boundary_state["previous_keys"], block_keys], axis=1)
      window_values = tf.concat([boundary_state["previous_values"], block_values], axis=1)
      moved = self._recurrent_boundary_state(
          self.recurrent.step(boundary_state["recurrent"], window_keys, window_values))
      moved.update(previous_keys=block_keys, previous_values=block_values)
      return {name: tf.where(tf.reshape(ended, [-1] + [1] * (len(moved[name].shape) - 1)),
                             moved[name], previous[name]) for name in names}

    # Once per block per stream: other boundaries skip the cell.
    return tf.cond(tf.reduce_any(ended), update, lambda: previous)

  def _write_decoded_call(self, token_state, memory, ended, call_length):
    """Writes the call's keys and values (the last `call_length` of the token state) to the
    memory of the streams in `ended` (bool [B], those whose call just completed), as the
    segment step writes a segment."""
    keys = token_state["keys"][:, -call_length:]
    values = token_state["values"][:, -call_length:]
    if self.memory.searches_on_host:
      indexed = self.memory.host_write(memory, keys, self.memory_num_neighbors, "test", ended)
      # The next lookup takes the written memory, so it runs after the host has indexed it.
      with tf.control_dependencies([indexed]):
        keys = tf.identity(keys)
    return self.memory.write(memory, keys, values, streams=ended)
