"""Parameter initialisers matching Flax's defaults as Meliad configures them.

Draws use TensorFlow's global seed (`tf.random.set_seed`), so a model built after
setting the seed is reproducible.
"""

import math

import tensorflow as tf


# Standard deviation of a unit normal truncated to [-2, 2]; dividing by it keeps the
# requested variance after truncation, as variance_scaling(truncated_normal) does.
_TRUNCATED_NORMAL_STDDEV = 0.87962566103423978


def variance_scaling(shape, scale=1.0, fan_in=None):
  """Truncated normal with variance scale / fan_in; fan_in defaults to shape[0]."""
  fan_in = shape[0] if fan_in is None else fan_in
  stddev = math.sqrt(scale / fan_in) / _TRUNCATED_NORMAL_STDDEV
  return tf.random.truncated_normal(shape, stddev=stddev)


def normal(shape, stddev):
  return tf.random.normal(shape, stddev=stddev)


def as_dtype(dtype):
  """Accepts "float32", "bfloat16", "float16" or a tf.DType."""
  try:
    return tf.as_dtype(dtype)
  except TypeError as e:
    raise ValueError(f"unknown dtype {dtype!r}; use 'float32' or 'bfloat16'") from e
