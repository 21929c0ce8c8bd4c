"""Incremental decoding: a prompt in, a sampled continuation out (spec §7.9).

A prompt is consumed in two parts. Its whole segments of L tokens (all but the last token
of the prompt must fit in them) go through the ordinary forward pass of the model, the
same one training and scoring use, which leaves each layer's state (the XL cache) behind.
That state seeds the decode state of every layer, and the rest of the prompt and then the
generated tokens are fed one token at a time.

Per ordinary XL layer the decode state is a rolling buffer of the keys and values of the W
previous tokens (zeros at a document start, attended to, as in training). Each new token
attends to exactly those W keys, with the position bias of distances W..1 that the
training path gives them, so decoding reproduces the forward pass: the greedy token after
any prefix is the argmax of the forward pass's logits at that position.

Each layer kind has its decode step in a small class (`XLLayerDecoder`), picked by
`layer_decoder`. Memory and recurrent layers need their own steps (retrieval from the
memory and optional writes; the recurrent state updated at block boundaries), added there.

All functions here build TensorFlow ops only, so they run inside a tf.function and in a
SavedModel loaded without this package.
"""

import math

import tensorflow as tf

from meliad_tf import attention
from meliad_tf import layer as layer_lib
from meliad_tf import positions

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


def layer_decoder(layer):
  """The decode step for `layer`'s kind.

  Raises:
    GenerationNotSupportedError: for a layer without the XL cache (Meliad cannot generate
      with it either), or with state other than the XL cache or with cross attention
      (memory, recurrent and block-feedback layers, whose decode steps are not written).
  """
  if not layer.use_long_xl_architecture:
    raise GenerationNotSupportedError(
        f"{layer.name}: incremental decoding needs the XL cache "
        "(TransformerLayer.use_long_xl_architecture = True); Meliad's no-cache models "
        "cannot generate either")
  state_names = sorted(layer.state_spec(1))
  if state_names == ["keys", "values"] and layer.tbase.queries2_layer is None:
    return XLLayerDecoder(layer)
  raise GenerationNotSupportedError(
      f"{layer.name}: no decode step for a layer carrying state {state_names}"
      f"{' with cross attention' if layer.tbase.queries2_layer is not None else ''} "
      "(memory, recurrent or block-feedback layers); see meliad_tf.generation.layer_decoder")


def unsupported_reason(model):
  """Why `model` cannot generate, or None if it can."""
  try:
    for layer in model.decoder.layers:
      layer_decoder(layer)
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


def generate(model, prompt, lengths, max_length, temperature, top_k, seed, jit_compile=False):
  """Continues each stream's prompt by `max_length` tokens (graph ops; call in a tf.function).

  Each stream starts a new document with its prompt; nothing persists between calls.

  Args:
    model: a `model.DecoderOnlyLanguageModel` whose layers all have decode steps.
    prompt: int32 [B, P]; stream b's prompt is prompt[b, :lengths[b]].
    lengths: int32 [B], each in [1, P].
    max_length: int32 scalar >= 1, tokens to generate per stream.
    temperature: float32 scalar; 0 is greedy decoding.
    top_k: int32 scalar; 0 samples from the whole vocabulary.
    seed: int [2]; the same seed gives the same tokens.
    jit_compile: compile the forward pass over the prompt's segments and the decode step
      with XLA (sampling stays outside, so the draws do not depend on it).
  Returns:
    int32 [B, max_length], the generated tokens.
  """
  decoder = IncrementalDecoder(model)
  decode_step = tf.function(decoder.step, jit_compile=jit_compile)
  forward = tf.function(lambda batch, state: model(batch, state, training=False)[2],
                        jit_compile=jit_compile)
  batch_size = prompt.shape[0]
  length = decoder.sequence_length
  checks = check_generate_arguments(prompt, lengths, max_length, temperature, top_k,
                                    model.vocab_size)
  with tf.control_dependencies(checks):
    prompt = tf.identity(prompt)
  # Whole segments before the prompt's last token go through the forward pass.
  num_segments = (lengths - 1) // length  # [B]
  state = model.initial_state(batch_size)

  def consume_segment(s, state):
    segment = tf.slice(prompt, [0, s * length], [batch_size, length])
    batch = {"targets": segment, "start_of_sequence": tf.fill([batch_size], tf.equal(s, 0))}
    return s + 1, where_streams(s < num_segments, forward(batch, state), state)

  _, state = tf.while_loop(lambda s, _: s < tf.reduce_max(num_segments), consume_segment,
                           (tf.constant(0), state))

  start = num_segments * length  # [B], index of the first token fed one at a time
  remaining = lengths - start  # [B], prompt tokens left to feed, 1 .. L
  decode_state = decoder.init_state(state, tf.equal(num_segments, 0))
  last_index = tf.shape(prompt)[1] - 1

  def prompt_token(index):
    return tf.gather(prompt, tf.minimum(index, last_index), batch_dims=1)

  steps = tf.reduce_max(remaining) + max_length - 1
  seed = tf.cast(seed, tf.int64)

  def decode(t, token, position, decode_state, generated):
    logits, decode_state = decode_step(token, position, decode_state)
    sampled = sample_next(logits, temperature, top_k,
                          tf.random.experimental.stateless_fold_in(seed, t))
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
