"""Position encodings: T5 relative bias, Fourier relative bias, rotary, absolute sinusoids.

Relative positions follow Meliad's convention: `rel[i, j] = j - i - offset` with
`offset = num_keys - num_queries`, which lines the *last* queries up with the last keys
(T5 lines up the first ones; with an XL cache that would be off by W).
"""

import math

import numpy as np
import tensorflow as tf


T5_NUM_BUCKETS = 32
T5_MAX_DISTANCE = 128


def relative_positions(num_queries, num_keys, offset=None):
  """`rel[i, j] = j - i - offset` as a numpy int32 array of shape [num_queries, num_keys]."""
  if offset is None:
    offset = num_keys - num_queries
  query_index = np.arange(num_queries, dtype=np.int32)[:, None]
  key_index = np.arange(num_keys, dtype=np.int32)[None, :]
  return key_index - query_index - offset


def t5_relative_bucket(rel, num_buckets=T5_NUM_BUCKETS, max_distance=T5_MAX_DISTANCE):
  """Unidirectional T5 buckets of relative positions (numpy; future keys fall in bucket 0).

  Distances below `num_buckets // 2` get their own bucket; larger ones share
  logarithmically wider buckets up to `max_distance`, beyond which all share the last.
  The float32 epsilon and truncating cast reproduce Meliad's table exactly.
  """
  distance = np.maximum(-np.asarray(rel), 0)
  max_exact = num_buckets // 2
  eps = np.finfo(np.float32).eps
  scaled = (np.log(distance.astype(np.float32) / max_exact + eps)
            / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  large = max_exact + scaled.astype(np.int32)
  large = np.minimum(large, num_buckets - 1)
  return np.where(distance < max_exact, distance, large).astype(np.int32)


class T5RelativePositionBias(tf.Module):
  """Learned bias per head and distance bucket; each layer owns its own table.

  Args:
    num_heads: H.
  """

  def __init__(self, num_heads, name="relative_positions"):
    super().__init__(name=name)
    self.num_heads = num_heads
    with self.name_scope:
      # Flax's default embedding init: normal with std 1/sqrt(fan_in), fan_in = 32 here.
      self.rel_embedding = tf.Variable(
          tf.random.normal([num_heads, T5_NUM_BUCKETS], stddev=1.0 / math.sqrt(T5_NUM_BUCKETS)),
          name="rel_embedding")

  def __call__(self, num_queries, num_keys, offset=None):
    """Returns the bias [H, num_queries, num_keys] in float32."""
    buckets = t5_relative_bucket(relative_positions(num_queries, num_keys, offset))
    return tf.gather(self.rel_embedding, buckets, axis=1)


def sinusoids(positions, num_features, max_wavelength):
  """Meliad's sinusoid table: angle = pi * pos / wavelength_m, cosines then sines.

  Args:
    positions: float array-like [N].
    num_features: even feature size F; wavelengths are max_wavelength^(m / (F/2)).
  Returns:
    float32 tensor [N, F]: F/2 cosines followed by F/2 sines (not interleaved).
  """
  half = num_features // 2
  wavelengths = np.power(float(max_wavelength), np.arange(half, dtype=np.float64) / half)
  angles = math.pi * np.asarray(positions, np.float64)[:, None] / wavelengths[None, :]
  return tf.constant(np.concatenate([np.cos(angles), np.sin(angles)], axis=-1), tf.float32)


def absolute_position_encoding(num_positions, num_features, offset=0, max_wavelength=10000):
  """Absolute sinusoids [num_positions, num_features] added to the embeddings.

  A `max_wavelength` of 0 means 2 * num_positions, as in Meliad.
  """
  if max_wavelength == 0:
    max_wavelength = 2 * num_positions
  return sinusoids(np.arange(offset, offset + num_positions), num_features, max_wavelength)


class RelativeFourierPositions(tf.Module):
  """Fourier relative bias: each query's (cos, sin) pairs rotated by a learned complex weight.

  `bias[h, i, j] = sum_m a[h, m] cos(t_m(key_j) - t_m(query_i)) + b[h, m] sin(...)`,
  with t_m(pos) = pi * pos / (2 W)^(m / (P/2)).

  Args:
    num_heads: H.
    max_number_of_keys: W, which sets the longest wavelength to 2 W.
    position_vector_size: P (even).
  """

  def __init__(self, num_heads, max_number_of_keys, position_vector_size=128,
               name="relative_positions"):
    super().__init__(name=name)
    self.max_number_of_keys = max_number_of_keys
    self.position_vector_size = position_vector_size
    half = position_vector_size // 2
    initial = np.concatenate([np.full([num_heads, half], 2.0 / position_vector_size),
                              np.zeros([num_heads, half])], axis=-1)
    with self.name_scope:
      self.rotation_matrix = tf.Variable(tf.constant(initial, tf.float32), name="rotation_matrix")

  def __call__(self, num_queries, num_keys, offset=None):
    """Returns the bias [H, num_queries, num_keys] in float32."""
    if offset is None:
      offset = num_keys - num_queries
    half = self.position_vector_size // 2
    wavelength = 2 * self.max_number_of_keys
    keys = sinusoids(np.arange(num_keys), self.position_vector_size, wavelength)
    queries = sinusoids(np.arange(offset, offset + num_queries), self.position_vector_size,
                        wavelength)
    a, b = self.rotation_matrix[:, :half], self.rotation_matrix[:, half:]
    q_cos, q_sin = queries[:, :half], queries[:, half:]
    # Rotating the query pair by (a + ib) and dotting with the key pair gives
    # a cos(k - q) + b sin(k - q) summed over frequencies.
    rotated_cos = a[:, None, :] * q_cos[None] - b[:, None, :] * q_sin[None]  # [H, nq, P/2]
    rotated_sin = b[:, None, :] * q_cos[None] + a[:, None, :] * q_sin[None]
    k_cos, k_sin = keys[:, :half], keys[:, half:]
    return (tf.einsum("hqm,km->hqk", rotated_cos, k_cos)
            + tf.einsum("hqm,km->hqk", rotated_sin, k_sin))


def _rotary_table(positions, head_size, max_wavelength, dtype):
  """(cos, sin) [N, 1, d/2] of the rotary angles pi * pos / max_wavelength^(m / (d/2))."""
  half = head_size // 2
  wavelengths = np.power(float(max_wavelength), np.arange(half, dtype=np.float64) / half)
  angles = math.pi * np.asarray(positions, np.float64)[:, None] / wavelengths[None, :]
  return (tf.constant(np.cos(angles)[:, None, :], dtype),
          tf.constant(np.sin(angles)[:, None, :], dtype))


def _rotate(x, cos, sin):
  half = x.shape[-1] // 2
  first, second = x[..., :half], x[..., half:]
  return tf.concat([first * cos - second * sin, first * sin + second * cos], axis=-1)


def rotate_half_split(x, positions, max_wavelength=10000):
  """Rotary rotation of x [..., N, H, d] by angles pi * pos / max_wavelength^(m / (d/2)).

  The head dimension is split into halves (x, y), not interleaved:
  x' = x cos - y sin, y' = x sin + y cos.
  """
  return _rotate(x, *_rotary_table(positions, x.shape[-1], max_wavelength, x.dtype))


def rotate_at(x, position, num_positions, max_wavelength=10000):
  """`rotate_half_split` of each row of x [B, n, H, d] at a position known only at run time.

  Args:
    x: [B, n, H, d]; all n vectors of row b are rotated by the same angle.
    position: int32 [B], each in [0, num_positions).
    num_positions: how many positions the table holds.
  Returns:
    [B, n, H, d], exactly the values `rotate_half_split` gives at those positions (the same
    table, gathered).
  """
  cos, sin = _rotary_table(np.arange(num_positions), x.shape[-1], max_wavelength, x.dtype)
  return _rotate(x, tf.gather(cos, position)[:, None], tf.gather(sin, position)[:, None])


def rotate_keys_and_queries(keys, queries, max_wavelength=10000, offset=None):
  """RoPE for keys [..., nk, H, d] at positions -offset..nk-offset-1 and queries [..., nq, H, d] at 0..nq-1."""
  num_keys, num_queries = keys.shape[-3], queries.shape[-3]
  if offset is None:
    offset = num_keys - num_queries
  rotated_keys = rotate_half_split(keys, np.arange(-offset, num_keys - offset), max_wavelength)
  rotated_queries = rotate_half_split(queries, np.arange(num_queries), max_wavelength)
  return rotated_keys, rotated_queries
