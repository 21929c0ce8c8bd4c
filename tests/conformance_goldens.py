"""Every layer and model family, listed once: how to build it, its inputs, how to call it.

`test_conformance.py` runs each golden through tf.function, XLA, MirroredStrategy over two
logical CPUs, a SavedModel round trip and a checkpoint round trip. Adding a layer to the
project means adding one golden here.
"""

import dataclasses
import functools
from typing import Callable

import tensorflow as tf

from meliad_tf import decoder
from meliad_tf import layer
from meliad_tf import mlp
from meliad_tf import model
from meliad_tf import norms
from meliad_tf import positions
from meliad_tf import task_config

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


def _model_inputs():
  tokens = tf.random.stateless_uniform([BATCH, LENGTH], seed=[7, 8], minval=0, maxval=40,
                                       dtype=tf.int32)
  batch = {"targets": tokens, "start_of_sequence": tf.constant([True, False]),
           "loss_mask": tf.ones([BATCH, LENGTH], tf.bool), "num_chars": tf.constant([9, 12])}
  lm = _language_model()
  state = tf.nest.map_structure(
      lambda s: tf.random.stateless_normal(s.shape, seed=[9, 10], dtype=s.dtype),
      lm.state_spec(BATCH))
  return batch, state


def _model_call(module, batch, state):
  loss, metrics, new_state = module(batch, state, training=True, seed=tf.constant([11, 12]))
  return loss, metrics, new_state


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
    Golden("transformer_xl_model", _language_model, _model_inputs, _model_call),
]
