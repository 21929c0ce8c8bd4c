"""Meliad's LayerNorm, which as configured (no mean, no bias) is an RMS norm."""

import gin
import tensorflow as tf

from meliad_tf.layers import initializers


@gin.configurable(module="nn_components")
class LayerNorm(tf.Module):
  """`y = x * rsqrt(mean(x^2) + eps) * scale`, statistics in float32.

  Args:
    num_features: size of the last axis.
    use_scale: learn a per-feature scale (initialised to ones).
    use_bias: learn a per-feature bias (initialised to zeros).
    use_mean: subtract the mean first (a classic LayerNorm).
    use_scalar_scale_bias: learn one scale and one bias shared by all features (shape [1])
      instead of one per feature.
    enable_layernorm: False makes the norm the identity, with no parameters.
    epsilon: added to the mean square.
    dtype: output dtype.
  """

  def __init__(self, num_features, use_scale=True, use_bias=False, use_mean=False,
               use_scalar_scale_bias=False, enable_layernorm=True, epsilon=1e-6,
               dtype="float32", name=None):
    super().__init__(name=name)
    self.use_mean = use_mean
    self.enable_layernorm = enable_layernorm
    self.epsilon = epsilon
    self.dtype = initializers.as_dtype(dtype)
    width = 1 if use_scalar_scale_bias else num_features
    with self.name_scope:
      enabled = enable_layernorm
      self.scale = (tf.Variable(tf.ones([width]), name="scale") if enabled and use_scale
                    else None)
      self.bias = (tf.Variable(tf.zeros([width]), name="bias") if enabled and use_bias
                   else None)

  def __call__(self, x):
    if not self.enable_layernorm:
      return tf.cast(x, self.dtype)
    x = tf.cast(x, tf.float32)
    if self.use_mean:
      x -= tf.reduce_mean(x, axis=-1, keepdims=True)
    y = x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + self.epsilon)
    if self.scale is not None:
      y *= self.scale
    if self.bias is not None:
      y += self.bias
    return tf.cast(y, self.dtype)
