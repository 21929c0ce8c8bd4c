"""Every layer and model family, listed once: how to build it, its inputs, how to call it.

`test_conformance.py` runs each golden through tf.function, XLA, MirroredStrategy over two
logical CPUs, a SavedModel round trip and a checkpoint round trip. Adding a layer to the
project means adding one golden here.
"""

import dataclasses
import functools
from typing import Callable

import tensorflow as tf

from meliad_tf.layers import memory
from meliad_tf.layers import mlp
from meliad_tf.layers import norms
from meliad_tf.layers import positions
from meliad_tf.model import decoder
from meliad_tf.model import language_model as model
from meliad_tf.model import layer
from meliad_tf.model import task_config


BATCH = 2
LENGTH = 16
WINDOW = 8
EMBED = 16
HEADS = 2
HEAD_SIZE = 8


@dataclasses.dataclass(frozen=True)
class Golden:
  """A module to test in every shell.

  Attributes:
    name: test id.
    create: builds a fresh module (parameters drawn from TF's global seed).
    inputs: returns the input tensors (a tuple), the same on every call.
    call: (module, *inputs) -> nested tensors; must not depend on Python state.
  """
  name: str
  create: Callable[[], tf.Module]
  inputs: Callable[[], tuple]
  call: Callable


def _sequence():
  return (tf.random.stateless_normal([BATCH, LENGTH, EMBED], seed=[1, 2]),)


def _transformer_layer(**kwargs):
  return lambda: layer.TransformerLayer(embedding_size=EMBED, num_heads=HEADS,
                                        head_size=HEAD_SIZE, window_length=WINDOW, **kwargs)


def _layer_inputs(module_factory):
  def inputs():
    spec = module_factory().state_spec(BATCH)
    state = tf.nest.map_structure(
        lambda s: tf.random.stateless_normal(s.shape, seed=[3, 4], dtype=s.dtype), spec)
    return _sequence() + (tf.constant([True, False]), state)
  return inputs


def _layer_call(module, x, start, state):
  return module(x, start, state, training=True, seed=tf.constant([5, 6]))


def _language_model():
  config = task_config.TransformerTaskConfig(sequence_length=LENGTH, batch_size=BATCH,
                                             vocab_size=40)
  layer_factory = functools.partial(layer.TransformerLayer, num_heads=HEADS,
                                    head_size=HEAD_SIZE, window_length=WINDOW,
                                    relative_position_type="t5", attn_dropout_rate=0.1)
  decoder_factory = functools.partial(decoder.DecoderStack, num_layers=2,
                                      embedding_size=EMBED, layer_factory=layer_factory,
                                      final_dropout_rate=0.1)
  return model.DecoderOnlyLanguageModel(config, decoder_factory=decoder_factory)


def _model_inputs(create=None):
  tokens = tf.random.stateless_uniform([BATCH, LENGTH], seed=[7, 8], minval=0, maxval=40,
                                       dtype=tf.int32)
  batch = {"targets": tokens, "start_of_sequence": tf.constant([True, False]),
           "loss_mask": tf.ones([BATCH, LENGTH], tf.bool), "num_chars": tf.constant([9, 12])}
  lm = (create or _language_model)()
  state = tf.nest.map_structure(
      lambda s: tf.random.stateless_normal(s.shape, seed=[9, 10], dtype=s.dtype),
      lm.state_spec(BATCH))
  return batch, state


RECURRENT_STATES = 3


def _recurrent_layer(gate_type, single_gate, skip_ffn):
  return _transformer_layer(relative_position_type="t5", attn_dropout_rate=0.1,
                            recurrent_num_states=RECURRENT_STATES,
                            recurrent_gate_type=gate_type, recurrent_single_gate=single_gate,
                            recurrent_skip_ffn=skip_ffn, is_recurrent=True)


def _feedback_layer_inputs():
  state_kv = tuple(tf.random.stateless_normal([BATCH, RECURRENT_STATES, HEADS, HEAD_SIZE],
                                              seed=[13, i]) for i in range(2))
  return _layer_inputs(_transformer_layer(cross_attention=True))() + (state_kv,)


def _feedback_layer_call(module, x, start, state, state_kv):
  return module(x, start, state, training=True, seed=tf.constant([5, 6]),
                cross_attention_kv=state_kv)


def _block_recurrent_model(feedback):
  """Three layers, the middle one recurrent (bias gate, skip); with block feedback the others
  cross-attend to its state window by window."""
  config = task_config.TransformerTaskConfig(sequence_length=LENGTH, batch_size=BATCH,
                                             vocab_size=40)
  layer_factory = functools.partial(layer.TransformerLayer, num_heads=HEADS,
                                    head_size=HEAD_SIZE, window_length=WINDOW,
                                    relative_position_type="t5", attn_dropout_rate=0.1,
                                    recurrent_num_states=RECURRENT_STATES,
                                    recurrent_gate_type="bias", recurrent_skip_ffn=True)
  decoder_factory = functools.partial(decoder.DecoderStack, num_layers=3,
                                      embedding_size=EMBED, layer_factory=layer_factory,
                                      recurrent_layer_indices=(1,),
                                      dstack_window_length=WINDOW if feedback else 0,
                                      feedback_recurrence=feedback, final_dropout_rate=0.1)
  return lambda: model.DecoderOnlyLanguageModel(config, decoder_factory=decoder_factory)


def _model_call(module, batch, state):
  loss, metrics, new_state = module(batch, state, training=True, seed=tf.constant([11, 12]))
  return loss, metrics, new_state


MEMORY_SIZE = 2 * LENGTH
NEIGHBORS = 4


def _random_state(spec, seed):
  """Random floats; write counters (ints) as after one and two whole segments."""
  def random(s):
    if s.dtype.is_integer:
      return LENGTH * tf.range(1, s.shape[0] + 1, dtype=s.dtype)
    return tf.random.stateless_normal(s.shape, seed=seed, dtype=s.dtype)
  return tf.nest.map_structure(random, spec)


def _memory_factory(backend):
  # Chunks of LENGTH slots: the search loops over two chunks of the memory.
  return lambda: memory.ExternalMemory(HEADS, HEAD_SIZE, HEAD_SIZE, MEMORY_SIZE,
                                       backend=backend, search_chunk_size=LENGTH)


def _memory_layer(backend):
  return lambda: layer.TransformerLayer(
      embedding_size=EMBED, num_heads=HEADS, head_size=HEAD_SIZE, window_length=LENGTH,
      relative_position_type="t5", attn_dropout_rate=0.1, memory_num_neighbors=NEIGHBORS,
      memory=_memory_factory(backend)())


def _memory_layer_inputs(module_factory):
  return lambda: _sequence() + (tf.constant([True, False]),
                                _random_state(module_factory().state_spec(BATCH), [3, 4]))


def _memorizing_model():
  """Two layers, the top one with a bucketed memory (window = segment, as Meliad's recipe)."""
  config = task_config.TransformerTaskConfig(sequence_length=LENGTH, batch_size=BATCH,
                                             vocab_size=40)
  layer_factory = functools.partial(layer.TransformerLayer, num_heads=HEADS,
                                    head_size=HEAD_SIZE, window_length=LENGTH,
                                    relative_position_type="t5", attn_dropout_rate=0.1,
                                    memory_num_neighbors=NEIGHBORS)
  decoder_factory = functools.partial(decoder.DecoderStack, num_layers=2,
                                      embedding_size=EMBED, layer_factory=layer_factory,
                                      memory_factory=_memory_factory("bucketed"),
                                      memory_layer_indices=(-1,), final_dropout_rate=0.1)
  return model.DecoderOnlyLanguageModel(config, decoder_factory=decoder_factory)


def _memorizing_model_inputs():
  batch, _ = _model_inputs()
  return batch, _random_state(_memorizing_model().state_spec(BATCH), [9, 10])


def _decode_inputs(module_factory, positions):
  """x [B, 1, E], random token and boundary states shaped as the layer's, and positions."""
  module = module_factory()
  zeros = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), module.state_spec(BATCH))
  token_state, boundary_state = module.init_decode_state(zeros, tf.constant([True, False]),
                                                         LENGTH)
  token_state = tf.nest.map_structure(
      lambda t: tf.random.stateless_normal(t.shape, seed=[14, 15], dtype=t.dtype), token_state)
  if module.memory is not None:
    # A random memory, and its empty slots as the decoder derives them.
    memory = _random_state(module.memory.state_spec(BATCH), [18, 19])
    boundary_state = {"memory": memory, "empty_slots": module.memory.empty_slots(memory)}
  else:
    boundary_state = tf.nest.map_structure(
        lambda t: tf.random.stateless_normal(t.shape, seed=[18, 19], dtype=t.dtype),
        boundary_state)
  x = tf.random.stateless_normal([BATCH, 1, EMBED], seed=[16, 17])
  return x, token_state, boundary_state, tf.constant(positions)


def _decode_call(module, x, token_state, boundary_state, position):
  """A decoding step, then the boundaries it ends (a block, a call's memory write)."""
  y, new_state = module.decode_step(x, token_state, boundary_state, position)
  return y, new_state, module.end_boundaries(new_state, boundary_state, position, LENGTH)


GOLDENS = [
    Golden("layer_norm", lambda: norms.LayerNorm(EMBED), _sequence, lambda m, x: m(x)),
    *[Golden(f"mlp_{gate}",
             lambda gate=gate: mlp.MLP(EMBED, EMBED, num_layers=2, num_hidden_units=32,
                                       gate_type=gate),
             lambda: _sequence() * 2, lambda m, x, state: m(x, state))
      for gate in mlp.GATE_TYPES],
    Golden("t5_bias", lambda: positions.T5RelativePositionBias(HEADS), lambda: (),
           lambda m: m(WINDOW, 2 * WINDOW)),
    Golden("fourier_bias", lambda: positions.RelativeFourierPositions(HEADS, WINDOW),
           lambda: (), lambda m: m(WINDOW, 2 * WINDOW)),
    *[Golden(f"transformer_layer_{name}", factory, _layer_inputs(factory), _layer_call)
      for name, factory in (
          ("t5", _transformer_layer(relative_position_type="t5", attn_dropout_rate=0.1)),
          ("rotary", _transformer_layer(relative_position_type="rotary")),
          ("fourier", _transformer_layer(relative_position_type="fourier")),
          ("no_cache", lambda: layer.TransformerLayer(
              embedding_size=EMBED, num_heads=HEADS, head_size=HEAD_SIZE,
              window_length=LENGTH, use_long_xl_architecture=False)),
      )],
    *[Golden(f"recurrent_layer_{name}", factory, _layer_inputs(factory), _layer_call)
      for name, factory in (
          ("bias_skip", _recurrent_layer("bias", False, True)),
          ("lstm_dual", _recurrent_layer("lstm", False, False)),
      )],
    Golden("feedback_layer", _transformer_layer(cross_attention=True), _feedback_layer_inputs,
           _feedback_layer_call),
    Golden("transformer_xl_model", _language_model, _model_inputs, _model_call),
    # Stream 1's token ends a block of the recurrent layer and the memory layer's segment.
    *[Golden(f"{name}_decode_step", factory,
             functools.partial(_decode_inputs, factory, positions), _decode_call)
      for name, factory, positions in (
          ("xl", _transformer_layer(relative_position_type="t5"), [3, 40]),
          ("rotary_xl", _transformer_layer(relative_position_type="rotary"), [3, 40]),
          ("recurrent", _recurrent_layer("lstm", False, False), [3, 2 * WINDOW - 1]),
          ("memory", _memory_layer("bucketed"), [3, 2 * LENGTH - 1]),
      )],
    *[Golden(name, _block_recurrent_model(feedback),
             functools.partial(_model_inputs, _block_recurrent_model(feedback)), _model_call)
      for name, feedback in (("block_recurrent_model", False),
                             ("block_recurrent_feedback_model", True))],
    *[Golden(f"memory_layer_{backend}", _memory_layer(backend),
             _memory_layer_inputs(_memory_layer(backend)), _layer_call)
      for backend in ("bucketed", "exact", "approx_max_k")],
    Golden("memorizing_model", _memorizing_model, _memorizing_model_inputs, _model_call),
]
