"""Dropout as Meliad applies it: masks shared across the batch, from stateless seeds.

Seeds are [2] int tensors derived from the step, so a step's randomness is a function of
the step number alone and a resumed run draws exactly the masks it would have drawn.
"""

import tensorflow as tf

DROPOUT_TILE_LENGTH = 128


def fold_in(seed, data):
  """A new seed from `seed` and an integer, for one named use of randomness."""
  return tf.random.experimental.stateless_fold_in(seed, data)


def keep_mask(shape, rate, seed, dtype):
  """Multiplier of 0 or 1/(1-rate) of the given shape."""
  keep_prob = 1.0 - rate
  keep = tf.random.stateless_uniform(shape, seed) < keep_prob
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
  return x * tf.tile(mask, [batch, length // tile, 1])
