"""Incremental decoding: a prompt in, a sampled continuation out.

A prompt is consumed in two parts. Its whole segments of L tokens (all but the last token
of the prompt must fit in them) go through the ordinary forward pass of the model, the
same one training and scoring use, which leaves each layer's state behind (XL caches,
memories with the prompt's segments written, recurrent states). The rest of the prompt
and the generated tokens follow in one of two ways.

Models made of ordinary XL layers only decode one token at a time (`IncrementalDecoder`). Per
layer the decode state is a rolling buffer of the keys and values of the W previous tokens
(zeros at a document start, attended to, as in training). Each new token attends to
exactly those W keys, with the position bias of distances W..1 that the training path
gives them, so decoding reproduces the forward pass: the greedy token after any prefix is
the argmax of the forward pass's logits at that position. Each layer kind with such a step
has it in a small class (`XLLayerDecoder`), picked by `layer_decoder`.

Models with a memory, recurrent or block-feedback layer re-run the current segment
(`SegmentDecoder`): the forward pass itself, on the segment's tokens so far, from the state
the segment started with. That is exact by construction for every layer kind, at the cost
of one forward pass of L tokens per generated token. Unlike Meliad, which freezes the
recurrent state while generating, the recurrent state moves on at every block
boundary, as in training; the memory is read as the forward pass reads it, and written to
only if asked (`write_memory`).

All functions here build TensorFlow ops only, so they run inside a tf.function and in a
SavedModel loaded without this package.
"""

import math

import tensorflow as tf

from meliad_tf.layers import attention
from meliad_tf.layers import positions
from meliad_tf.model import layer as layer_lib


GREEDY = "greedy"
SAMPLE = "sample"
SAMPLING_METHODS = (GREEDY, SAMPLE)


class GenerationNotSupportedError(NotImplementedError):
  """The model has a layer for which no decode step exists."""


def where_streams(streams, new, old):
  """Per stream b, `new` where streams[b] else `old`, over a nested state.

  Every state tensor must have the streams on its leading axis: [B, ...], or [B * k, ...]
  with stream b owning rows b*k .. b*k+k-1 (e.g. one memory per stream and head).

  Args:
    streams: bool [B].
    new, old: nested structures of tensors with the same structure.
  """
  batch_size = streams.shape[0]

  def select(n, o):
    rows = n.shape[0]
    if rows % batch_size:
      raise ValueError(f"a state tensor of shape {n.shape} does not have the {batch_size} "
                       "streams on its leading axis")
    mask = tf.repeat(streams, rows // batch_size) if rows != batch_size else streams
    mask = tf.reshape(mask, [rows] + [1] * (len(n.shape) - 1))
    return tf.where(mask, n, o)

  return tf.nest.map_structure(select, new, old)


class XLLayerDecoder:
  """The decode step of an ordinary layer with the XL cache.

  Decode state: {"keys", "values"}, each [B, W, H, d], the W previous tokens oldest first.

  Args:
    layer: a `layer.TransformerLayer` without memory or recurrence.
  """

  def __init__(self, layer):
    self.layer = layer
    self.window = layer.window_length
    # One query at offset W against the W buffered keys: distances W .. 1.
    self.offset = self.window

  def init_state(self, layer_state, start_of_sequence):
    """Decode state from the layer's state after the forward pass.

    Args:
      layer_state: the layer's part of the model state ({"keys", "values"}: its XL cache,
        the keys and values of the last W tokens consumed).
      start_of_sequence: bool [B]; streams that consumed no segment start a document.
    """
    return where_streams(start_of_sequence, tf.nest.map_structure(tf.zeros_like, layer_state),
                         layer_state)

  def _position_bias(self):
    relative = self.layer.relative_positions
    if relative is None:
      return None
    return relative(1, self.window, offset=self.offset)  # [H, 1, W]

  def step(self, x, state, position):
    """One token through the layer.

    Args:
      x: [B, 1, E], the token's input to this layer.
      state: the decode state.
      position: int32 [B], the token's index in its document (unused by this layer kind).
    Returns:
      (y [B, 1, E], new decode state).
    """
    del position
    tbase = self.layer.tbase
    keys, values, queries, _ = tbase.kvq(x)  # each [B, 1, H, d]
    window_keys, window_values = state["keys"], state["values"]  # [B, W, H, d]
    attend_keys = window_keys
    if self.layer.relative_position_type == "rotary":
      attend_keys, queries = positions.rotate_keys_and_queries(
          window_keys, queries, layer_lib.ROTARY_WAVELENGTH, offset=self.offset)
    attn = attention.simple_attention(attend_keys, window_values, queries,
                                      bias=self._position_bias(), scale=tbase.attention_scale)
    y = tbase.post_attn_ffn(x, attn)
    new_state = {"keys": tf.concat([window_keys[:, 1:], keys], axis=1),
                 "values": tf.concat([window_values[:, 1:], values], axis=1)}
    return y, new_state


def _check_xl_cache(layer):
  if not layer.use_long_xl_architecture:
    raise GenerationNotSupportedError(
        f"{layer.name}: generation needs the XL cache "
        "(TransformerLayer.use_long_xl_architecture = True); Meliad's no-cache models "
        "cannot generate either")


def has_decode_step(layer):
  """Whether `layer` has a one-token decode step: an ordinary XL layer (no memory,
  recurrence or cross attention)."""
  return (layer.use_long_xl_architecture and sorted(layer.state_spec(1)) == ["keys", "values"]
          and layer.tbase.queries2_layer is None)


def layer_decoder(layer):
  """The one-token decode step for `layer`'s kind.

  Raises:
    GenerationNotSupportedError: for a layer without the XL cache (Meliad cannot generate
      with it either), or with state other than the XL cache or with cross attention
      (memory, recurrent and block-feedback layers, which `SegmentDecoder` serves).
  """
  _check_xl_cache(layer)
  if has_decode_step(layer):
    return XLLayerDecoder(layer)
  state_names = sorted(layer.state_spec(1))
  raise GenerationNotSupportedError(
      f"{layer.name}: no decode step for a layer carrying state {state_names}"
      f"{' with cross attention' if layer.tbase.queries2_layer is not None else ''} "
      "(memory, recurrent or block-feedback layers); generate with SegmentDecoder")


def unsupported_reason(model):
  """Why `model` cannot generate (a layer without the XL cache), or None if it can."""
  try:
    for layer in model.decoder.layers:
      _check_xl_cache(layer)
  except GenerationNotSupportedError as e:
    return str(e)
  return None


class IncrementalDecoder:
  """The decoder stack one token at a time.

  Args:
    model: a `model.DecoderOnlyLanguageModel`.
  """

  def __init__(self, model):
    self.model = model
    self.stack = model.decoder
    self.layer_decoders = [layer_decoder(layer) for layer in self.stack.layers]
    self.sequence_length = model.task_config.sequence_length

  def init_state(self, model_state, start_of_sequence):
    """Decode state of every layer from the model state after the forward pass."""
    return {f"layer_{i}": decoder.init_state(model_state.get(f"layer_{i}", {}),
                                             start_of_sequence)
            for i, decoder in enumerate(self.layer_decoders)}

  def step(self, tokens, position, state):
    """Logits of the token after `tokens`.

    Args:
      tokens: int32 [B], one token per stream.
      position: int32 [B], its index in the document.
      state: decode state from `init_state` or a previous step.
    Returns:
      (logits float32 [B, V], new decode state).
    """
    stack = self.stack
    x = tf.cast(tf.gather(stack.embedding, tokens[:, None]), stack.dtype)  # [B, 1, E]
    if stack.use_absolute_positions:
      # Training restarts absolute positions at every segment boundary.
      table = positions.absolute_position_encoding(self.sequence_length, stack.embedding_size)
      x += tf.cast(tf.gather(table, position % self.sequence_length)[:, None], stack.dtype)
    new_state = {}
    for i, decoder in enumerate(self.layer_decoders):
      key = f"layer_{i}"
      x, new_state[key] = decoder.step(x, state[key], position)
    if stack.final_layernorm is not None:
      x = stack.final_layernorm(x)
    logits = tf.matmul(tf.cast(x[:, 0], tf.float32), stack.embedding, transpose_b=True)
    return logits / math.sqrt(stack.vocab_size), new_state


class SegmentDecoder:
  """Generation by re-running the current segment through the ordinary forward pass.

  For models with a layer that has no one-token step (memory, recurrent, block-feedback
  layers). The decode state is the model state at the start of the current segment and the
  segment's tokens so far, zero-padded to L. The logits of the token after in-segment offset
  p are those of the forward pass over that segment at p: attention is causal, a block's
  recurrent state depends on the blocks before it only, the memory is read once per segment
  and holds earlier segments only, and block feedback carries the state from chunk to chunk,
  so the padding after p cannot reach p. At p = L - 1 the pass is the segment's whole
  forward pass, and its new state (XL caches, recurrent states updated at every block
  boundary, the memory with the segment written) is the next segment's start, exactly as in
  training and scoring. The recurrent state thus keeps moving during generation, where
  Meliad freezes it.

  With `write_memory` off, the memory stays as the prompt's whole segments left it: a
  completed segment's new state keeps its predecessor's memory (keys, values and write
  counter), so later tokens retrieve from the prompt only, as in Meliad's read-only
  generation. The prompt's tail, in the segment where generation starts, is
  not written either: the memory is written per segment, never partially.

  Cost: one forward pass of L tokens per generated token, against one token's work per
  token for `IncrementalDecoder`.

  Args:
    model: a `model.DecoderOnlyLanguageModel`.
    jit_compile: compile the forward pass with XLA.
  """

  def __init__(self, model, jit_compile=False):
    self.model = model
    self.sequence_length = model.task_config.sequence_length
    self.forward = tf.function(
        lambda tokens, start, state: model.decoder(tokens, start, state, training=False),
        jit_compile=jit_compile)

  def init_state(self, prompt, lengths, num_segments, model_state):
    """Decode state after the prompt: its tail as the current segment.

    Args:
      prompt: int32 [B, P].
      lengths: int32 [B], prompt lengths.
      num_segments: int32 [B], whole segments of the prompt already consumed.
      model_state: the model state after those segments (the initial state for streams
        that consumed none).
    Returns:
      {"tokens" int32 [B, L]: the current segment's tokens so far, zeros after them;
      "offset" int32 [B]: the in-segment offset of the last token fed; "start_of_sequence"
      bool [B]: whether the current segment starts the document; "state": the model state
      at its start}.
    """
    length = self.sequence_length
    start = num_segments * length  # [B]
    index = start[:, None] + tf.range(length)[None]  # [B, L]
    tokens = tf.gather(prompt, tf.minimum(index, tf.shape(prompt)[1] - 1), batch_dims=1)
    return {"tokens": tf.where(index < lengths[:, None], tokens, tf.zeros_like(tokens)),
            "offset": lengths - 1 - start,
            "start_of_sequence": tf.equal(num_segments, 0),
            "state": model_state}

  def step(self, decode_state):
    """Logits of the token after the last one fed.

    Returns:
      (logits float32 [B, V], the model state after the whole current segment: the next
      segment's start for streams whose segment is complete).
    """
    logits, segment_state = self.forward(decode_state["tokens"],
                                         decode_state["start_of_sequence"],
                                         decode_state["state"])
    return tf.gather(logits, decode_state["offset"], batch_dims=1), segment_state

  def append(self, decode_state, tokens, segment_state, write_memory):
    """Feeds one token per stream after a `step`.

    Args:
      decode_state: the state `step` ran on.
      tokens: int32 [B], the tokens that follow.
      segment_state: the model state `step` returned.
      write_memory: bool scalar; whether a completed segment is written to the memory.
    Returns:
      The new decode state: where a stream's segment was complete, the token starts the
      next segment from `segment_state`.
    """
    length = self.sequence_length
    complete = tf.equal(decode_state["offset"], length - 1)  # [B]
    state = decode_state["state"]
    next_state = keep_memory(segment_state, state, write_memory)
    offset = tf.where(complete, 0, decode_state["offset"] + 1)
    kept = tf.where(complete[:, None], tf.zeros_like(decode_state["tokens"]),
                    decode_state["tokens"])
    written = tf.one_hot(offset, length, on_value=True, off_value=False)  # [B, L]
    return {"tokens": tf.where(written, tokens[:, None], kept),
            "offset": offset,
            "start_of_sequence": decode_state["start_of_sequence"] & ~complete,
            "state": where_streams(complete, next_state, state)}


def keep_memory(new_state, old_state, write_memory):
  """`new_state`, with the memory of every memory layer taken from `old_state` unless
  `write_memory` (bool scalar)."""
  result = dict(new_state)
  for key, layer_state in new_state.items():
    if "memory" in layer_state:
      memory = tf.nest.map_structure(lambda new, old: tf.where(write_memory, new, old),
                                     layer_state["memory"], old_state[key]["memory"])
      result[key] = dict(layer_state, memory=memory)
  return result


def sample_next(logits, temperature, top_k, seed):
  """Draws one token per row.

  Args:
    logits: float32 [B, V].
    temperature: float32 scalar; 0 means greedy (argmax).
    top_k: int32 scalar; if positive, sample only among the k most likely tokens.
    seed: int [2], the stateless seed of this draw.
  Returns:
    int32 [B].
  """
  greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)

  def draw():
    scaled = logits / temperature

    def keep_top_k():
      threshold = tf.math.top_k(scaled, k=top_k).values[:, -1:]  # [B, 1]
      return tf.where(scaled >= threshold, scaled, tf.constant(-math.inf, scaled.dtype))

    truncated = tf.cond(top_k > 0, keep_top_k, lambda: scaled)
    return tf.cast(tf.random.stateless_categorical(truncated, 1, seed)[:, 0], tf.int32)

  return tf.cond(temperature > 0.0, draw, lambda: greedy)


def check_generate_arguments(prompt, lengths, max_length, temperature, top_k, vocab_size):
  """Assertions (graph ops) naming the argument at fault; returns them for control deps."""
  prompt_length = tf.shape(prompt)[1]
  return [
      tf.debugging.assert_greater_equal(
          lengths, 1, message="generate: every prompt needs at least one token (lengths >= 1)"),
      tf.debugging.assert_less_equal(
          lengths, prompt_length,
          message="generate: lengths must not exceed the prompt tensor's second dimension"),
      tf.debugging.assert_greater_equal(
          prompt, 0, message=f"generate: prompt token ids must be in [0, {vocab_size})"),
      tf.debugging.assert_less(
          prompt, vocab_size, message=f"generate: prompt token ids must be in [0, {vocab_size})"),
      tf.debugging.assert_positive(max_length, message="generate: max_length must be >= 1"),
      tf.debugging.assert_non_negative(
          temperature, message="generate: temperature must be >= 0 (0 means greedy)"),
      tf.debugging.assert_non_negative(top_k, message="generate: top_k must be >= 0 (0: off)"),
      tf.debugging.assert_less_equal(
          top_k, vocab_size, message=f"generate: top_k must be <= the vocabulary ({vocab_size})"),
  ]


def generate(model, prompt, lengths, max_length, temperature, top_k, seed, jit_compile=False,
             write_memory=False):
  """Continues each stream's prompt by `max_length` tokens (graph ops; call in a tf.function).

  Each stream starts a new document with its prompt; nothing persists between calls.
  Models of ordinary XL layers decode one token at a time (`IncrementalDecoder`), the others
  re-run the current segment for every token (`SegmentDecoder`); both give the logits of
  the ordinary forward pass over the prompt and the tokens generated so far.

  Args:
    model: a `model.DecoderOnlyLanguageModel` whose layers all have the XL cache.
    prompt: int32 [B, P]; stream b's prompt is prompt[b, :lengths[b]].
    lengths: int32 [B], each in [1, P].
    max_length: int32 scalar >= 1, tokens to generate per stream.
    temperature: float32 scalar; 0 is greedy decoding.
    top_k: int32 scalar; 0 samples from the whole vocabulary.
    seed: int [2]; the same seed gives the same tokens.
    jit_compile: compile the forward passes and the decode step with XLA (sampling stays
      outside, so the draws do not depend on it).
    write_memory: bool scalar; for memory models, write the segments completed during
      generation to the memory, as the forward pass over the whole text would. Off, the
      tokens retrieve from the memory the prompt's whole segments built. Ignored by models
      without memory.
  Returns:
    int32 [B, max_length], the generated tokens.
  Raises:
    GenerationNotSupportedError: for a model with a layer without the XL cache.
    ValueError: for `jit_compile` with a memory searched on the host (ScaNN).
  """
  reason = unsupported_reason(model)
  if reason is not None:
    raise GenerationNotSupportedError(reason)
  host_layers = model.decoder.host_search_layers
  if jit_compile and host_layers:
    raise ValueError(f"generate: {', '.join(host_layers)} search their memory on the host "
                     "(memory_on_tpu_factory.backend = 'scann'), which XLA cannot compile; "
                     "set jit_compile=False")
  batch_size = prompt.shape[0]
  length = model.task_config.sequence_length
  checks = check_generate_arguments(prompt, lengths, max_length, temperature, top_k,
                                    model.vocab_size)
  with tf.control_dependencies(checks):
    prompt = tf.identity(prompt)
  forward = tf.function(
      lambda tokens, start, state: model.decoder(tokens, start, state, training=False)[1],
      jit_compile=jit_compile)
  # Whole segments before the prompt's last token go through the forward pass.
  num_segments = (lengths - 1) // length  # [B]

  def consume_segment(s, state):
    segment = tf.slice(prompt, [0, s * length], [batch_size, length])
    new_state = forward(segment, tf.fill([batch_size], tf.equal(s, 0)), state)
    return s + 1, where_streams(s < num_segments, new_state, state)

  _, state = tf.while_loop(lambda s, _: s < tf.reduce_max(num_segments), consume_segment,
                           (tf.constant(0), model.initial_state(batch_size)))
  sampling = (max_length, temperature, top_k, tf.cast(seed, tf.int64))
  if all(has_decode_step(layer) for layer in model.decoder.layers):
    return _generate_incrementally(model, prompt, lengths, num_segments, state, sampling,
                                   jit_compile)
  decoder = SegmentDecoder(model, jit_compile=jit_compile)
  write_memory = tf.convert_to_tensor(write_memory, tf.bool)

  def decode(t, decode_state, generated):
    logits, segment_state = decoder.step(decode_state)
    sampled = _sample(logits, sampling, t)
    decode_state = decoder.append(decode_state, sampled, segment_state, write_memory)
    return t + 1, decode_state, generated.write(t, sampled)

  decode_state = decoder.init_state(prompt, lengths, num_segments, state)
  generated = tf.TensorArray(tf.int32, size=max_length, element_shape=[batch_size])
  _, _, generated = tf.while_loop(lambda t, *_: t < max_length, decode,
                                  (tf.constant(0), decode_state, generated))
  return tf.transpose(generated.stack())  # [B, max_length]


def _sample(logits, sampling, t):
  """The draw of step t; `sampling` is (max_length, temperature, top_k, seed)."""
  _, temperature, top_k, seed = sampling
  return sample_next(logits, temperature, top_k,
                     tf.random.experimental.stateless_fold_in(seed, t))


def _generate_incrementally(model, prompt, lengths, num_segments, state, sampling,
                            jit_compile):
  """`generate` with `IncrementalDecoder`, from the state after the prompt's whole segments."""
  max_length = sampling[0]
  decoder = IncrementalDecoder(model)
  decode_step = tf.function(decoder.step, jit_compile=jit_compile)
  batch_size = prompt.shape[0]
  start = num_segments * decoder.sequence_length  # [B], first token fed one at a time
  remaining = lengths - start  # [B], prompt tokens left to feed, 1 .. L
  decode_state = decoder.init_state(state, tf.equal(num_segments, 0))
  last_index = tf.shape(prompt)[1] - 1

  def prompt_token(index):
    return tf.gather(prompt, tf.minimum(index, last_index), batch_dims=1)

  steps = tf.reduce_max(remaining) + max_length - 1

  def decode(t, token, position, decode_state, generated):
    logits, decode_state = decode_step(token, position, decode_state)
    sampled = _sample(logits, sampling, t)
    # Stream b's first generated token comes from its last prompt token.
    index = t - remaining + 1  # [B]
    write = tf.one_hot(index, max_length, on_value=True, off_value=False)  # [B, max_length]
    generated = tf.where(write, sampled[:, None], generated)
    next_token = tf.where(t + 1 < remaining, prompt_token(start + t + 1), sampled)
    return t + 1, next_token, position + 1, decode_state, generated

  generated = tf.zeros([batch_size, max_length], tf.int32)
  loop_vars = (tf.constant(0), prompt_token(start), start, decode_state, generated)
  invariants = (tf.TensorShape([]), tf.TensorShape([batch_size]), tf.TensorShape([batch_size]),
                tf.nest.map_structure(lambda x: x.shape, decode_state),
                tf.TensorShape([batch_size, None]))
  *_, generated = tf.while_loop(lambda t, *_: t < steps, decode, loop_vars,
                                shape_invariants=invariants)
  return generated
