"""Meliad's LayerNorm, which as configured (no mean, no bias) is an RMS norm."""

import gin
import tensorflow as tf

from meliad_tf import initializers


@gin.configurable(module="nn_components")
class LayerNorm(tf.Module):
  """`y = x * rsqrt(mean(x^2) + eps) * scale`, statistics in float32.

  Args:
    num_features: size of the last axis.
    use_scale: learn a per-feature scale (initialised to ones).
    use_bias: learn a per-feature bias (initialised to zeros).
    use_mean: subtract the mean first (a classic LayerNorm).
    epsilon: added to the mean square.
    dtype: output dtype.
  """

  def __init__(self, num_features, use_scale=True, use_bias=False, use_mean=False,
               epsilon=1e-6, dtype="float32", name=None):
    super().__init__(name=name)
    self.use_mean = use_mean
    self.epsilon = epsilon
    self.dtype = initializers.as_dtype(dtype)
    with self.name_scope:
      self.scale = tf.Variable(tf.ones([num_features]), name="scale") if use_scale else None
      self.bias = tf.Variable(tf.zeros([num_features]), name="bias") if use_bias else None

  def __call__(self, x):
    x = tf.cast(x, tf.float32)
    if self.use_mean:
      x -= tf.reduce_mean(x, axis=-1, keepdims=True)
    y = x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + self.epsilon)
    if self.scale is not None:
      y *= self.scale
    if self.bias is not None:
      y += self.bias
    return tf.cast(y, self.dtype)
