"""The decoder stack: tied embedding, the layers, final norm, logits scaled by 1/sqrt(V)."""

import math

import gin
import tensorflow as tf

from meliad_tf.layers import dropout as dropout_lib
from meliad_tf.layers import initializers
from meliad_tf.layers import norms
from meliad_tf.layers import positions
from meliad_tf.layers import scopes
from meliad_tf.model import layer as layer_lib


_SEED_FINAL_DROPOUT = 1 << 20
_SEED_CHUNK = 1 << 21


def resolve_layer_indices(indices, num_layers, name):
  """Meliad's placement: negative indices count from the top; out of range is an error."""
  resolved = []
  for index in indices:
    if not -num_layers <= index < num_layers:
      raise ValueError(f"DecoderStack.{name} contains {index}, outside [-{num_layers}, "
                       f"{num_layers}) for {num_layers} layers")
    resolved.append(index % num_layers)
  return tuple(sorted(set(resolved)))


@gin.configurable(module="decoder_stack")
class DecoderStack(tf.Module):
  """Embedding, a stack of TransformerLayers, the final norm and the tied output.

  Args (Meliad's gin names):
    task_config: a TransformerTaskConfig (vocabulary size, segment length, batch size).
    num_layers: NL.
    embedding_size: E.
    embedding_stddev: initial standard deviation of the embedding table (no sqrt(E)
      scaling at lookup).
    layer_factory: builds each layer (gin: TransformerLayer).
    dstack_window_length: D; run the whole stack on chunks of D tokens, one after another,
      carrying every layer's state from chunk to chunk (for block feedback); 0 = one chunk.
    use_absolute_positions: add sinusoids restarting at 0 every segment.
    use_final_layernorm: RMS norm before the output.
    final_dropout_rate: tiled dropout before the output, in training.
    final_mlp_factory: must be None (Meliad's final MLP option is broken).
    recurrent_layer_indices, memory_factory, memory_layer_indices: placement of the
      recurrent and memory layers (negative indices count from the top).
    feedback_recurrence: with recurrent layers and chunks (dstack_window_length > 0), every
      other layer cross-attends to the state entering each chunk of the last recurrent
      layer (block feedback). Meliad's default, True; recurrent/*.gin set False.
    dtype: compute dtype.
  """

  def __init__(self, task_config, num_layers=12, embedding_size=512, embedding_stddev=1.0,
               layer_factory=layer_lib.TransformerLayer, dstack_window_length=0,
               use_absolute_positions=False, use_final_layernorm=True, final_dropout_rate=0.0,
               final_mlp_factory=None, recurrent_layer_indices=(), feedback_recurrence=True,
               memory_factory=None, memory_layer_indices=(), dtype="float32",
               name="decoder_stack"):
    super().__init__(name=name)
    if final_mlp_factory is not None:
      raise ValueError("DecoderStack.final_mlp_factory is not supported: Meliad's final MLP "
                       "option (options/final_mlp.gin) does not run in Meliad either")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
      raise ValueError(f"DecoderStack.num_layers (NUM_LAYERS) must be a positive integer, got "
                       f"{num_layers!r}")
    dropout_lib.check_rate("DecoderStack.final_dropout_rate (DROPOUT_RATE)", final_dropout_rate)
    sequence_length = task_config.sequence_length
    if dstack_window_length < 0:
      raise ValueError(f"DecoderStack.dstack_window_length must be >= 0, got "
                       f"{dstack_window_length}")
    if 0 < dstack_window_length < sequence_length and sequence_length % dstack_window_length:
      raise ValueError(
          f"the segment length (TransformerTaskConfig.sequence_length = {sequence_length}) "
          f"must be a multiple of DecoderStack.dstack_window_length = {dstack_window_length}")
    # Meliad runs the stack on the whole segment when the chunk is 0 or not shorter.
    self.chunk_length = (dstack_window_length if 0 < dstack_window_length < sequence_length
                         else sequence_length)
    self.task_config = task_config
    self.num_layers = num_layers
    self.embedding_size = embedding_size
    self.vocab_size = task_config.vocab_size
    self.use_absolute_positions = use_absolute_positions
    self.final_dropout_rate = final_dropout_rate
    self.dstack_window_length = dstack_window_length
    self.dtype = initializers.as_dtype(dtype)
    self.recurrent_layer_indices = resolve_layer_indices(recurrent_layer_indices, num_layers,
                                                         "recurrent_layer_indices")
    self.memory_layer_indices = resolve_layer_indices(memory_layer_indices, num_layers,
                                                      "memory_layer_indices")
    if self.memory_layer_indices and memory_factory is None:
      raise ValueError("DecoderStack.memory_layer_indices is set but memory_factory is None")
    self.feedback = (feedback_recurrence and bool(self.recurrent_layer_indices)
                     and dstack_window_length > 0)
    with self.name_scope:
      self.embedding = tf.Variable(
          initializers.normal([self.vocab_size, embedding_size], embedding_stddev),
          name="embedding")
      self.layers = []
      for i in range(num_layers):
        is_recurrent = i in self.recurrent_layer_indices
        memory = memory_factory() if i in self.memory_layer_indices else None
        self.layers.append(layer_factory(
            embedding_size=embedding_size, is_recurrent=is_recurrent, memory=memory,
            cross_attention=self.feedback and not is_recurrent,
            dtype=dtype, name=f"layer_{i}"))
      self.final_layernorm = (norms.LayerNorm(embedding_size, dtype=dtype,
                                              name="final_layernorm")
                              if use_final_layernorm else None)
    for layer in self.layers:
      layer.check_sequence_length(self.chunk_length)

  @property
  def host_search_layers(self):
    """Names of the layers whose memory is searched on the host (ScaNN, a Python call)."""
    return [layer.name for layer in self.layers
            if layer.memory is not None and layer.memory.searches_on_host]

  def state_spec(self, batch_size):
    """Per-stream state of every layer: {"layer_i": {...}} (layers without state omitted)."""
    spec = {}
    for i, layer in enumerate(self.layers):
      layer_spec = layer.state_spec(batch_size)
      if layer_spec:
        spec[f"layer_{i}"] = layer_spec
    return spec

  def __call__(self, tokens, start_of_sequence, state, *, training=False, seed=None,
               diagnostics=None):
    """Logits of the next token for every position.

    Args:
      tokens: int32 [B, N].
      start_of_sequence: bool [B].
      state: nested dict as `state_spec`.
      training: enables dropout.
      seed: [2] int seed for this step's dropout (required when training with dropout).
      diagnostics: optional dict; receives each layer's diagnostic scalars as
        "layer_<i>/<name>" (averaged over chunks).
    Returns:
      (logits float32 [B, N, V], new state).
    """
    x = self.embed(tokens)
    # Truncated backpropagation through time: no gradient into the previous segment, but
    # gradients do cross the chunks of this one.
    state = tf.nest.map_structure(tf.stop_gradient, state)
    num_chunks = self._num_chunks(tokens.shape[1])
    per_layer = [{} for _ in self.layers] if diagnostics is not None else None
    outputs = []
    for chunk, x_chunk in enumerate(tf.split(x, num_chunks, axis=1)):
      chunk_seed = seed
      if chunk and seed is not None:
        chunk_seed = dropout_lib.fold_in(seed, _SEED_CHUNK + chunk)
      x_chunk, state = self._run_layers(x_chunk, start_of_sequence, state, training,
                                        chunk_seed, per_layer)
      # Only the first chunk starts a document; later ones continue from the carried state.
      start_of_sequence = tf.zeros_like(start_of_sequence)
      outputs.append(x_chunk)
    x = tf.concat(outputs, axis=1) if num_chunks > 1 else outputs[0]
    new_state = state
    if diagnostics is not None:
      for i, layer_diagnostics in enumerate(per_layer):
        for name, values in layer_diagnostics.items():
          diagnostics[f"layer_{i}/{name}"] = tf.reduce_mean(tf.stack(values))
    return self.logits(x, training=training, seed=seed), new_state

  @scopes.scoped("embedding")
  def embed(self, tokens, offset=None):
    """The layers' input: embedded tokens, plus the absolute positions if the stack has them.

    Args:
      tokens: int32 [B, n].
      offset: optional int32 [B], the position of tokens[:, 0] in its segment (absolute
        positions restart at every segment); None: the tokens are a whole segment.
    Returns:
      [B, n, E] in the compute dtype.
    """
    x = tf.cast(tf.gather(self.embedding, tokens), self.dtype)
    if self.use_absolute_positions:
      length = tokens.shape[1]
      if offset is None:
        table = positions.absolute_position_encoding(length, self.embedding_size)
      else:
        table = tf.gather(
            positions.absolute_position_encoding(self.task_config.sequence_length,
                                                 self.embedding_size),
            offset[:, None] + tf.range(length)[None])  # [B, n, E]
      x += tf.cast(table, self.dtype)
    return x

  @scopes.scoped("output")
  def logits(self, x, *, training=False, seed=None):
    """Next-token logits of the last layer's output x [B, n, E]: the final norm, dropout in
    training and the tied output layer, scaled by 1/sqrt(V). Returns float32 [B, n, V]."""
    if self.final_layernorm is not None:
      x = self.final_layernorm(x)
    if training and self.final_dropout_rate > 0.0:
      x = dropout_lib.tiled_dropout(x, self.final_dropout_rate,
                                    dropout_lib.fold_in(seed, _SEED_FINAL_DROPOUT))
    logits = tf.matmul(tf.cast(x, tf.float32), self.embedding, transpose_b=True)
    return logits / math.sqrt(self.vocab_size)

  def _num_chunks(self, length):
    if not self.dstack_window_length or self.dstack_window_length >= length:
      return 1
    if length % self.dstack_window_length:
      raise ValueError(f"{length} tokens cannot be cut into chunks of "
                       f"DecoderStack.dstack_window_length = {self.dstack_window_length}")
    return length // self.dstack_window_length

  def _run_layers(self, x, start_of_sequence, state, training, seed, per_layer_diagnostics):
    """Every layer on one chunk [B, D, E]; returns (output, every layer's new state).

    Under block feedback, the non-recurrent layers cross-attend to the keys and values of
    the last recurrent layer's state as it enters the chunk.
    """
    feedback_kv = None
    if self.feedback:
      index = self.recurrent_layer_indices[-1]
      cell = self.layers[index].recurrent
      feedback_kv = cell.kv(cell.load(start_of_sequence, state[f"layer_{index}"]["recurrent"]))
    new_state = {}
    for i, layer in enumerate(self.layers):
      key = f"layer_{i}"
      layer_seed = dropout_lib.fold_in(seed, i) if seed is not None else None
      layer_diagnostics = {} if per_layer_diagnostics is not None else None
      x, layer_state = layer(x, start_of_sequence, state.get(key, {}), training=training,
                             seed=layer_seed,
                             cross_attention_kv=feedback_kv if layer.cross_attention else None,
                             diagnostics=layer_diagnostics)
      if layer_state:
        new_state[key] = layer_state
      for name, value in (layer_diagnostics or {}).items():
        per_layer_diagnostics[i].setdefault(name, []).append(value)
    return x, new_state

  def init_decode_state(self, state, start_of_sequence):
    """The state of one-token decoding (`decode_step`) from the model state at a segment
    boundary.

    Args:
      state: the model state (`state_spec`) the previous segment left.
      start_of_sequence: bool [B]; the streams whose document starts with the next token.
    Returns:
      {"layers": every layer's token state, "boundaries": the boundary states of the layers
      that have one (see `TransformerLayer.init_decode_state`), and under block feedback
      "feedback": the (keys, values) [B, H, S, d] of the recurrent state entering the
      current chunk}. A decoding step changes the token states only; `end_boundaries`
      changes the rest.
    """
    layers, boundaries = {}, {}
    for i, layer in enumerate(self.layers):
      key = f"layer_{i}"
      layers[key], boundary = layer.init_decode_state(state.get(key, {}), start_of_sequence,
                                                      self.chunk_length)
      if boundary:
        boundaries[key] = boundary
    decode_state = {"layers": layers, "boundaries": boundaries}
    if self.feedback:
      decode_state["feedback"] = self._feedback_kv(boundaries)
    return decode_state

  def _feedback_kv(self, boundaries):
    """Block feedback's keys and values: those of the last recurrent layer's state."""
    recurrent = boundaries[f"layer_{self.recurrent_layer_indices[-1]}"]
    return recurrent["state_keys"], recurrent["state_values"]

  def decode_step(self, tokens, position, decode_state):
    """Logits of the token after `tokens`, one token per stream: the forward pass's logits
    at that position.

    Args:
      tokens: int32 [B].
      position: int32 [B], each token's index in its document; streams may be at different
        positions, and must have started decoding at a segment boundary.
      decode_state: from `init_decode_state`, a previous step or `end_boundaries`.
    Returns:
      (logits float32 [B, V], the new token states "layers"). The rest of the decode state
      changes only where a block or call ends, in `end_boundaries`.
    """
    x = self.embed(tokens[:, None], position % self.task_config.sequence_length)
    boundaries = decode_state["boundaries"]
    feedback_kv = decode_state.get("feedback")
    layers = {}
    for i, layer in enumerate(self.layers):
      key = f"layer_{i}"
      x, layers[key] = layer.decode_step(
          x, decode_state["layers"][key], boundaries.get(key, {}), position,
          cross_attention_kv=feedback_kv if layer.cross_attention else None)
    return self.logits(x)[:, 0], layers

  def ends_boundary(self, position, write_memory=True):
    """bool [B]: whether the token at `position` ends a block or call after which
    `end_boundaries` changes some state (a recurrent state, a memory, when written, or the
    fed-back state)."""
    ended = tf.zeros(position.shape, tf.bool)
    for layer in self.layers:
      ended |= layer.ends_boundary(position, self.chunk_length, write_memory)
    return ended

  def end_boundaries(self, decode_state, position, write_memory=True):
    """The decode state after the token at `position` for the streams whose block or call
    (segment or chunk) it ends, as the forward pass has it: recurrent states moved on,
    memories written (if `write_memory`) and, at a chunk's end, the fed-back state.

    Args:
      decode_state: with the token states after the `decode_step` of the tokens at
        `position` (int32 [B]).
      position: int32 [B].
      write_memory: bool scalar; False leaves the memories as they are.
    Returns:
      The decode state with new "boundaries" (and "feedback").
    """
    boundaries = {
        key: self.layers[int(key[len("layer_"):])].end_boundaries(
            decode_state["layers"][key], boundary, position, self.chunk_length, write_memory)
        for key, boundary in decode_state["boundaries"].items()}
    new_state = dict(decode_state, boundaries=boundaries)
    if self.feedback:
      # The next chunk's tokens see the state its first token enters with.
      chunk_ended = layer_lib.ends_a_multiple(position, self.chunk_length)[:, None, None, None]
      new_state["feedback"] = tuple(
          tf.where(chunk_ended, new, old)
          for new, old in zip(self._feedback_kv(boundaries), decode_state["feedback"]))
    return new_state
