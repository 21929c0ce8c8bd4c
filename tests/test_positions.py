"""Position encodings against the spec's tables and naive formulas."""

import math

import numpy as np
import tensorflow as tf

from meliad_tf.layers import positions


# Distance -> bucket ranges from the spec's table (buckets 16..31).
_T5_LOG_BUCKETS = [(16, 18), (19, 20), (21, 23), (24, 26), (27, 30), (31, 34), (35, 39),
                   (40, 45), (46, 51), (52, 58), (59, 66), (67, 76), (77, 86), (87, 98),
                   (99, 112)]


def test_t5_bucket_table():
  distance = np.arange(0, 400)
  buckets = positions.t5_relative_bucket(-distance)
  np.testing.assert_array_equal(buckets[:16], np.arange(16))
  for bucket, (low, high) in enumerate(_T5_LOG_BUCKETS, start=16):
    assert set(buckets[low:high + 1]) == {bucket}, (bucket, low, high)
  assert set(buckets[113:]) == {31}
  # Future keys fall into bucket 0 (they are always masked).
  assert positions.t5_relative_bucket(np.array([1, 5])).tolist() == [0, 0]


def test_relative_positions_align_last_queries_with_last_keys():
  rel = positions.relative_positions(2, 4)
  np.testing.assert_array_equal(rel, [[-2, -1, 0, 1], [-3, -2, -1, 0]])


def test_t5_bias_is_the_table_at_each_distance_bucket():
  bias_module = positions.T5RelativePositionBias(num_heads=2)
  bias = bias_module(4, 8).numpy()
  table = bias_module.rel_embedding.numpy()
  for i in range(4):
    for j in range(8):
      distance = max(i + 4 - j, 0)
      np.testing.assert_allclose(bias[:, i, j], table[:, min(distance, 15)])


def test_t5_table_initial_std():
  tf.random.set_seed(0)
  table = positions.T5RelativePositionBias(num_heads=512).rel_embedding.numpy()
  assert abs(table.std() - 1 / math.sqrt(32)) < 0.01


def test_fourier_bias_matches_the_formula():
  heads, window, size = 2, 8, 16
  module = positions.RelativeFourierPositions(heads, window, position_vector_size=size)
  rng = np.random.default_rng(0)
  matrix = rng.normal(size=(heads, size)).astype(np.float32)
  module.rotation_matrix.assign(matrix)
  bias = module(window, 2 * window).numpy()
  half = size // 2
  for h in range(heads):
    for i in range(window):
      for j in range(2 * window):
        theta = lambda pos: math.pi * pos / (2 * window) ** (np.arange(half) / half)
        delta = theta(j) - theta(i + window)
        want = np.sum(matrix[h, :half] * np.cos(delta) + matrix[h, half:] * np.sin(delta))
        np.testing.assert_allclose(bias[h, i, j], want, rtol=1e-4, atol=1e-4)


def test_fourier_bias_depends_only_on_distance():
  module = positions.RelativeFourierPositions(1, 8, position_vector_size=16)
  bias = module(8, 16).numpy()[0]
  # Same distance -> same bias.
  np.testing.assert_allclose(bias[0, 0], bias[3, 3], rtol=1e-6)


def test_rotary_matches_naive_rotation():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 1, 4)).astype(np.float32)
  pos = np.array([-2, 0, 5])
  got = positions.rotate_half_split(tf.constant(x), pos, 10000).numpy()
  for n, p in enumerate(pos):
    for m in range(2):
      theta = math.pi * p / 10000 ** (m / 2)
      a, b = x[n, 0, m], x[n, 0, m + 2]
      np.testing.assert_allclose(got[n, 0, m], a * math.cos(theta) - b * math.sin(theta),
                                 rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(got[n, 0, m + 2], a * math.sin(theta) + b * math.cos(theta),
                                 rtol=1e-5, atol=1e-6)


def test_rotary_logits_depend_only_on_distance():
  rng = np.random.default_rng(2)
  vector_q = rng.normal(size=(1, 1, 8)).astype(np.float32)
  vector_k = rng.normal(size=(1, 1, 8)).astype(np.float32)
  keys = tf.constant(np.repeat(vector_k, 8, axis=0))
  queries = tf.constant(np.repeat(vector_q, 4, axis=0))
  k, q = positions.rotate_keys_and_queries(keys, queries)
  logits = tf.einsum("qhd,khd->qk", q, k).numpy()
  # Query i sits at position i, key j at position j - 4: same distance, same logit.
  np.testing.assert_allclose(logits[0, 2], logits[1, 3], rtol=1e-5)
  np.testing.assert_allclose(logits[2, 0], logits[3, 1], rtol=1e-5)


def test_absolute_encoding_is_cosines_then_sines_with_pi():
  table = positions.absolute_position_encoding(3, 4).numpy()
  for pos in range(3):
    angles = [math.pi * pos / 10000 ** (m / 2) for m in range(2)]
    np.testing.assert_allclose(table[pos], np.cos(angles).tolist() + np.sin(angles).tolist(),
                               atol=1e-6)
