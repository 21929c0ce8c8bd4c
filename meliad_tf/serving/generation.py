"""Incremental decoding: a prompt in, a sampled continuation out.

A prompt is consumed in two parts. Its whole segments of L tokens (all but the last token
of the prompt must fit in them) go through the ordinary forward pass of the model, the
same one training and scoring use, which leaves each layer's state behind (XL caches,
memories with the prompt's segments written, recurrent states). The rest of the prompt
and the generated tokens then go through the model one token at a time
(`IncrementalDecoder`), with the decode step of the stack and of each layer
(`DecoderStack.decode_step`, `TransformerLayer.decode_step`), which share the segment
step's attention, memory and recurrence code. Each token gets the logits the forward pass
over the whole text gives at its position:

* every layer attends to exactly the W previous tokens (zeros at a document start,
  attended to), with the position bias of distances W..1 that the training path gives them;
* a memory layer retrieves from its memory as it was when the current segment started, and
  writes the segment to it once complete, as scoring does, if asked (`write_memory`);
* a recurrent layer's tokens attend to the state entering their block, and the state moves
  on at every block boundary, as in training (Meliad freezes it while generating); under
  block feedback the other layers see the state entering the current chunk.

A decoding step returns only what changes with every token, the windows' keys and values.
Memories, recurrent states and the fed-back state change where a block or call ends, in a
second step (`DecoderStack.end_boundaries`) that runs only for the tokens that end one; the
other tokens pass them through untouched rather than copy them out of a compiled step.

All functions here build TensorFlow ops only, so they run inside a tf.function and in a
SavedModel loaded without this package.
"""

import math

import tensorflow as tf

from meliad_tf.training import steps


GREEDY = "greedy"
SAMPLE = "sample"
SAMPLING_METHODS = (GREEDY, SAMPLE)
# The most tokens one call generates per stream. The tokens come back together at the end of
# the call, so a request has to fit in memory and finish in a sensible time (a million
# tokens takes minutes to hours on a CPU); beyond this it is refused before any work.
MAX_LENGTH = 1 << 20


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


def unsupported_reason(model):
  """Why `model` cannot generate (a layer without the XL cache), or None if it can."""
  for layer in model.decoder.layers:
    if not layer.use_long_xl_architecture:
      return (f"{layer.name}: generation needs the XL cache "
              "(TransformerLayer.use_long_xl_architecture = True); Meliad's no-cache models "
              "cannot generate either")
  return None


class IncrementalDecoder:
  """The model one token at a time, for every family.

  Args:
    model: a `model.DecoderOnlyLanguageModel` whose layers all have the XL cache.
    jit_compile: compile the decode step with XLA (around the host's search for a memory
      searched on the host).
  Raises:
    GenerationNotSupportedError: for a layer without the XL cache.
  """

  def __init__(self, model, jit_compile=False):
    reason = unsupported_reason(model)
    if reason is not None:
      raise GenerationNotSupportedError(reason)
    self.model = model
    self.stack = model.decoder
    calls_host = bool(self.stack.host_search_layers)
    self._token_step = steps.compile_step(self.stack.decode_step, jit_compile,
                                          calls_host=calls_host)
    self._boundary_step = steps.compile_step(self.stack.end_boundaries, jit_compile,
                                             calls_host=calls_host)

  def init_state(self, model_state, start_of_sequence):
    """Decode state from the model state at a segment boundary (see
    `DecoderStack.init_decode_state`); start_of_sequence: bool [B], the streams that
    consumed no segment of their document yet."""
    return self.stack.init_decode_state(model_state, start_of_sequence)

  def step(self, tokens, position, state, write_memory=True):
    """Logits of the token after `tokens`.

    Args:
      tokens: int32 [B], one token per stream.
      position: int32 [B], its index in the document.
      state: decode state from `init_state` or a previous step.
      write_memory: bool scalar; write each segment to the memory once complete, as the
        forward pass does. Off, the memory stays as `init_state` found it.
    Returns:
      (logits float32 [B, V], new decode state).
    """
    logits, layers = self._token_step(tokens, position, state)
    new_state = dict(state, layers=layers)
    if not state["boundaries"]:
      return logits, new_state
    write_memory = tf.convert_to_tensor(write_memory, tf.bool)
    # Only where a block or call ends does the rest of the state change; other tokens pass
    # it through without a copy.
    new_state = tf.cond(
        tf.reduce_any(self.stack.ends_boundary(position, write_memory)),
        lambda: self._boundary_step(new_state, position, write_memory),
        lambda: new_state)
    return logits, new_state


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
      tf.debugging.assert_less_equal(
          max_length, MAX_LENGTH,
          message=f"generate: max_length must be <= {MAX_LENGTH} (the most one call "
                  "generates per stream); continue a longer text with another call, the text "
                  "so far its prompt"),
      tf.debugging.assert_non_negative(
          temperature, message="generate: temperature must be >= 0 (0 means greedy)"),
      tf.debugging.assert_non_negative(top_k, message="generate: top_k must be >= 0 (0: off)"),
      tf.debugging.assert_less_equal(
          top_k, vocab_size, message=f"generate: top_k must be <= the vocabulary ({vocab_size})"),
  ]


def generate(model, prompt, lengths, max_length, temperature, top_k, seed, jit_compile=False,
             write_memory=False):
  """Continues each stream's prompt by `max_length` tokens (graph ops; call in a tf.function).

  Each stream starts a new document with its prompt; nothing persists between calls. The
  prompt's whole segments go through the forward pass, the rest of it and the generated
  tokens through `IncrementalDecoder`: each token gets the logits of the ordinary forward
  pass over the prompt and the tokens generated so far.

  Args:
    model: a `model.DecoderOnlyLanguageModel` whose layers all have the XL cache.
    prompt: int32 [B, P]; stream b's prompt is prompt[b, :lengths[b]].
    lengths: int32 [B], each in [1, P].
    max_length: int32 scalar in [1, MAX_LENGTH], tokens to generate per stream.
    temperature: float32 scalar; 0 is greedy decoding.
    top_k: int32 scalar; 0 samples from the whole vocabulary.
    seed: int [2]; the same seed gives the same tokens.
    jit_compile: compile the forward passes and the decode step with XLA (around the host's
      search for a memory searched on the host; sampling stays outside, so the draws do not
      depend on it).
    write_memory: bool scalar; for memory models, write the segments completed during
      generation to the memory, as the forward pass over the whole text would. Off, the
      tokens retrieve from the memory the prompt's whole segments built. Ignored by models
      without memory.
  Returns:
    int32 [B, max_length], the generated tokens.
  Raises:
    GenerationNotSupportedError: for a model with a layer without the XL cache.
  """
  reason = unsupported_reason(model)
  if reason is not None:
    raise GenerationNotSupportedError(reason)
  batch_size = prompt.shape[0]
  length = model.task_config.sequence_length
  checks = check_generate_arguments(prompt, lengths, max_length, temperature, top_k,
                                    model.vocab_size)
  # Nothing is allocated or run for arguments the checks refuse.
  with tf.control_dependencies(checks):
    prompt, lengths, max_length = (tf.identity(x) for x in (prompt, lengths, max_length))
  forward = steps.compile_step(
      lambda tokens, start, state: model.decoder(tokens, start, state, training=False)[1],
      jit_compile, calls_host=bool(model.decoder.host_search_layers))
  # Whole segments before the prompt's last token go through the forward pass.
  num_segments = (lengths - 1) // length  # [B]

  def consume_segment(s, state):
    segment = tf.slice(prompt, [0, s * length], [batch_size, length])
    new_state = forward(segment, tf.fill([batch_size], tf.equal(s, 0)), state)
    return s + 1, where_streams(s < num_segments, new_state, state)

  _, state = tf.while_loop(lambda s, _: s < tf.reduce_max(num_segments), consume_segment,
                           (tf.constant(0), model.initial_state(batch_size)))
  decoder = IncrementalDecoder(model, jit_compile=jit_compile)
  write_memory = tf.convert_to_tensor(write_memory, tf.bool)
  temperature = tf.convert_to_tensor(temperature, tf.float32)
  top_k = tf.convert_to_tensor(top_k, tf.int32)
  seed = tf.cast(seed, tf.int64)
  start = num_segments * length  # [B], the first token fed one at a time
  remaining = lengths - start  # [B], prompt tokens left to feed, 1 .. L
  decode_state = decoder.init_state(state, tf.equal(num_segments, 0))
  last_index = tf.shape(prompt)[1] - 1

  def prompt_token(index):
    return tf.gather(prompt, tf.minimum(index, last_index), batch_dims=1)

  num_steps = tf.reduce_max(remaining) + max_length - 1

  def decode(t, token, position, decode_state, sampled_tokens):
    logits, decode_state = decoder.step(token, position, decode_state, write_memory)
    sampled = sample_next(logits, temperature, top_k,
                          tf.random.experimental.stateless_fold_in(seed, t))
    sampled_tokens = sampled_tokens.write(t, sampled)
    next_token = tf.where(t + 1 < remaining, prompt_token(start + t + 1), sampled)
    return t + 1, next_token, position + 1, decode_state, sampled_tokens

  # Every step's draws, [steps, B]: one row written per step, rather than a [B, max_length]
  # tensor updated at every step.
  sampled_tokens = tf.TensorArray(tf.int32, size=num_steps, element_shape=[batch_size])
  loop_vars = (tf.constant(0), prompt_token(start), start, decode_state, sampled_tokens)
  *_, sampled_tokens = tf.while_loop(lambda t, *_: t < num_steps, decode, loop_vars)
  # Stream b's first generated token is the draw of the step that fed its last prompt token.
  steps_of_tokens = remaining[:, None] - 1 + tf.range(max_length)[None]  # [B, max_length]
  return tf.gather(tf.transpose(sampled_tokens.stack()), steps_of_tokens, batch_dims=1)
