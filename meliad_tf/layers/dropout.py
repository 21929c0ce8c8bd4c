"""Dropout as Meliad applies it: masks shared across the batch, from per-step seeds.

Random bits come from a counter-based hash (the MurmurHash3 finaliser) of the element
index and a [2] seed. TensorFlow's stateless generators give different numbers in graph
mode and under XLA for the same seed and algorithm (checked on TF 2.20's CPU kernels);
with plain integer operations, graph mode, XLA and every device draw identical masks, so
runs compare exactly across them and a resumed run draws exactly the masks it would have.
A step's seed is (random_seed, step), so randomness is a function of the step alone.
Hand-written rather than `tf.nn.experimental.stateless_dropout` for that reason.
"""

import numpy as np
import tensorflow as tf


DROPOUT_TILE_LENGTH = 128
_GOLDEN_RATIO = 0x9E3779B9


def _mix(h):
  """MurmurHash3's 32-bit finaliser: every input bit affects every output bit."""
  h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))
  h *= tf.constant(0x85EBCA6B, tf.uint32)
  h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 13))
  h *= tf.constant(0xC2B2AE35, tf.uint32)
  return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))


def _key(seed):
  """Any integer [2] seed as two uint32 words."""
  seed = tf.convert_to_tensor(seed)
  if seed.dtype == tf.uint32:
    return seed
  low_bits = tf.bitwise.bitwise_and(tf.cast(seed, tf.int64), 0xFFFFFFFF)
  return tf.cast(low_bits, tf.uint32)


def fold_in(seed, data):
  """A new seed from `seed` and an integer, for one named use of randomness."""
  key = _key(seed)
  salt = _mix(tf.constant(data % (1 << 32), tf.uint32) + tf.constant(_GOLDEN_RATIO, tf.uint32))
  return tf.stack([_mix(tf.bitwise.bitwise_xor(key[0], salt)), _mix(key[1] + salt)])


def uniform(shape, seed):
  """Floats in [0, 1) of the given static shape, a pure function of (shape, seed)."""
  key = _key(seed)
  index = tf.cast(tf.range(int(np.prod(shape)), dtype=tf.int32), tf.uint32)
  bits = _mix(_mix(tf.bitwise.bitwise_xor(index, key[0])) + key[1])
  # The top 24 bits fill a float32 mantissa exactly.
  values = tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) * (1.0 / (1 << 24))
  return tf.reshape(values, shape)


def check_rate(name, rate):
  """Raises ValueError unless `rate` (the gin parameter `name`) is a number in [0, 1)."""
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
    raise ValueError(f"{name} must be a number in [0, 1), got {rate!r}")


def keep_mask(shape, rate, seed, dtype):
  """Multiplier of 0 or 1/(1-rate) of the given shape."""
  keep_prob = 1.0 - rate
  with tf.name_scope("dropout"):
    keep = uniform(shape, seed) < keep_prob
    return tf.cast(keep, dtype) / tf.cast(keep_prob, dtype)


def tiled_dropout(x, rate, seed, tile_length=DROPOUT_TILE_LENGTH):
  """Dropout on x [B, N, E] with one [1, tile_length, E] mask tiled over batch and sequence.

  A sequence shorter than the tile uses a tile of its own length (Meliad would refuse it).

  Raises:
    ValueError: if N is longer than the tile and not a multiple of it.
  """
  if rate == 0.0:
    return x
  batch, length, features = x.shape.as_list()
  tile = min(tile_length, length)
  if length % tile:
    raise ValueError(
        f"tiled dropout needs the sequence length ({length}) to be a multiple of {tile_length}; "
        "set the dropout rates to 0 or use a multiple of 128 tokens")
  mask = keep_mask([1, tile, features], rate, seed, x.dtype)
  with tf.name_scope("dropout"):
    return x * tf.tile(mask, [batch, length // tile, 1])
