"""Dropout masks: shared as Meliad shares them, and identical in graph mode and under XLA."""

import numpy as np
import pytest
import tensorflow as tf

from meliad_tf.layers import dropout


def test_masks_are_identical_in_eager_graph_and_xla():
  seed = tf.constant([42, 7], tf.int64)

  def draw(s):
    return dropout.keep_mask([3, 40, 16], 0.3, dropout.fold_in(s, 5), tf.float32)

  eager = draw(seed).numpy()
  graph = tf.function(draw)(seed).numpy()
  xla = tf.function(draw, jit_compile=True)(seed).numpy()
  np.testing.assert_array_equal(eager, graph)
  np.testing.assert_array_equal(eager, xla)


def test_keep_rate_and_scaling():
  mask = dropout.keep_mask([200, 500], 0.25, tf.constant([1, 2]), tf.float32).numpy()
  np.testing.assert_allclose(np.unique(mask), [0.0, 1 / 0.75], rtol=1e-6)
  assert abs((mask > 0).mean() - 0.75) < 0.01


def test_seeds_give_independent_masks():
  a = dropout.uniform([10000], tf.constant([1, 2])).numpy()
  b = dropout.uniform([10000], dropout.fold_in(tf.constant([1, 2]), 1)).numpy()
  c = dropout.uniform([10000], tf.constant([1, 3])).numpy()
  assert abs(np.corrcoef(a, b)[0, 1]) < 0.05
  assert abs(np.corrcoef(a, c)[0, 1]) < 0.05
  assert 0.0 <= a.min() and a.max() < 1.0
  assert abs(a.mean() - 0.5) < 0.02


def test_tiled_dropout_shares_one_tile_over_batch_and_sequence():
  x = tf.ones([3, 256, 8])
  y = dropout.tiled_dropout(x, 0.5, tf.constant([3, 4]), tile_length=128).numpy()
  np.testing.assert_array_equal(y[0], y[2])
  np.testing.assert_array_equal(y[:, :128], y[:, 128:])
  assert 0 < (y == 0).mean() < 1


def test_tiled_dropout_rejects_lengths_that_are_not_tile_multiples():
  with pytest.raises(ValueError, match="multiple of 128"):
    dropout.tiled_dropout(tf.ones([1, 200, 4]), 0.1, tf.constant([0, 0]))
