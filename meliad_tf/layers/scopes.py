"""Name scopes for the parts of the model, which the profiler groups a step's time by."""

import functools

import tensorflow as tf


# The scopes a profile groups time by; `scoped` refuses any other name.
SCOPES = ("embedding", "kvq", "attention", "scores", "softmax", "weighted_values", "memory",
          "reset", "search", "attend", "write", "recurrence", "cross_attention", "projection",
          "ffn", "dropout", "output", "loss", "optimizer", "finite_check")
# TensorFlow's prefix for the name scopes of gradient ops.
BACKWARD_PREFIX = "gradient_tape/"


def scoped(name):
  """Decorator: run the function under `tf.name_scope(name)`, a profile category."""
  if name not in SCOPES:
    raise ValueError(f"unknown profile scope {name!r}; known: {SCOPES}")

  def decorate(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      with tf.name_scope(name):
        return fn(*args, **kwargs)
    return wrapper

  return decorate
