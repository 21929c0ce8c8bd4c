"""Every golden in every shell: tf.function, XLA, MirroredStrategy, SavedModel, checkpoint."""

import numpy as np
import pytest
import tensorflow as tf

from conformance_goldens import GOLDENS


IDS = [g.name for g in GOLDENS]


def build(golden, seed=0):
  tf.random.set_seed(seed)
  return golden.create()


def assert_nested_close(actual, expected, rtol=1e-5, atol=1e-6):
  tf.nest.assert_same_structure(actual, expected)
  for a, e in zip(tf.nest.flatten(actual), tf.nest.flatten(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


@pytest.mark.parametrize("golden", GOLDENS, ids=IDS)
def test_tf_function_equals_eager(golden):
  module = build(golden)
  inputs = golden.inputs()
  eager = golden.call(module, *inputs)
  traced = tf.function(lambda *xs: golden.call(module, *xs))(*inputs)
  assert_nested_close(traced, eager)


@pytest.mark.parametrize("golden", GOLDENS, ids=IDS)
def test_xla_equals_eager(golden):
  module = build(golden)
  inputs = golden.inputs()
  eager = golden.call(module, *inputs)
  compiled = tf.function(lambda *xs: golden.call(module, *xs), jit_compile=True)(*inputs)
  assert_nested_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("golden", GOLDENS, ids=IDS)
def test_mirrored_strategy_equals_eager(golden):
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  with strategy.scope():
    module = build(golden)
  inputs = golden.inputs()
  eager = golden.call(module, *inputs)

  @tf.function
  def run(*xs):
    return strategy.run(lambda *ys: golden.call(module, *ys), args=xs)

  for replica_result in strategy.experimental_local_results(run(*inputs)):
    assert_nested_close(replica_result, eager)


@pytest.mark.parametrize("golden", GOLDENS, ids=IDS)
def test_saved_model_round_trip(golden, tmp_path):
  module = build(golden)
  inputs = golden.inputs()
  expected = golden.call(module, *inputs)
  specs = tf.nest.map_structure(lambda x: tf.TensorSpec(x.shape, x.dtype), inputs)
  module.serve = tf.function(lambda *xs: golden.call(module, *xs), input_signature=specs)
  tf.saved_model.save(module, str(tmp_path))
  loaded = tf.saved_model.load(str(tmp_path))
  assert_nested_close(loaded.serve(*inputs), expected)


@pytest.mark.parametrize("golden", GOLDENS, ids=IDS)
def test_checkpoint_round_trip(golden, tmp_path):
  module = build(golden, seed=0)
  inputs = golden.inputs()
  expected = golden.call(module, *inputs)
  path = tf.train.Checkpoint(module=module).write(str(tmp_path / "ckpt"))
  fresh = build(golden, seed=1)
  # Some parameters start at fixed values (norm scales); scramble all so the restore shows.
  for variable in fresh.variables:
    variable.assign(tf.random.normal(variable.shape, dtype=variable.dtype))
  tf.train.Checkpoint(module=fresh).read(path).assert_consumed()
  assert_nested_close(golden.call(fresh, *inputs), expected)
