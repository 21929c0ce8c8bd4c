"""Learning-rate schedules and the trainer's warm-up rule, as Meliad's `optimizer_config.py` defines them.

Every schedule has the form `f(step, max_steps, **hyperparameters) -> lr` and is registered with gin under
Meliad's module name, so the option files' bindings (`optimizer_config.lr_cosine_decay.max_lr = ...`) and
references (`@optimizer_config.lr_rsqrt_decay`) work unchanged. The schedules are written with TF ops on a
float32 step, so they run eagerly, inside `tf.function` and under XLA; their hyperparameters are checked in
Python when the function is called, so a bad value fails at trace time with a `ValueError`, never inside a
compiled step. The arithmetic follows Meliad's jnp expressions operation for operation, in float32 as Meliad
computes them.

`learning_rate` composes a schedule with the trainer's warm-up, base rate and multiplier
(Meliad's `Trainer.learning_rate_schedule_fn`).
"""

import math
import numbers
from typing import Callable, Optional

import gin
import tensorflow as tf

Schedule = Callable[..., tf.Tensor]

# The rsqrt schedules never evaluate below this step: it bounds the rate at 1/sqrt(100) = 0.1 and keeps a
# run without warm-up away from a division by zero.
_RSQRT_MIN_STEP = 100.0


def _check_number(name: str, value, *, minimum: float, strict: bool) -> None:
  """Raises ValueError unless `value` is a Python or numpy real number above (or at) `minimum`."""
  if not isinstance(value, numbers.Real) or isinstance(value, bool):
    raise ValueError(f"{name} must be a number, got {value!r}")
  if value < minimum or (strict and value == minimum):
    relation = ">" if strict else ">="
    raise ValueError(f"{name} must be {relation} {minimum}, got {value!r}")


def _check_decay_range(max_lr: float, min_lr: float) -> None:
  """The decaying schedules go from max_lr down to min_lr; Meliad asserts max_lr > min_lr."""
  _check_number("min_lr", min_lr, minimum=0.0, strict=False)
  _check_number("max_lr", max_lr, minimum=0.0, strict=True)
  if not max_lr > min_lr:
    raise ValueError(f"max_lr must be greater than min_lr, got max_lr={max_lr!r}, min_lr={min_lr!r}")


def _halving_tail(step: tf.Tensor, max_steps: float, min_lr: float) -> tf.Tensor:
  """2 min_lr (1/2)^(step / max_steps): min_lr at max_steps, halving every further max_steps.

  Meliad writes this as `lr_exponential_decay(step, max_steps, max_lr=2 * min_lr, min_lr=min_lr)`; the ratio
  min_lr / (2 min_lr) is exactly 0.5, so the values are identical, and min_lr = 0 (which Meliad's assertion
  rejects) gives a zero tail instead of an error.
  """
  return (2.0 * min_lr) * tf.pow(tf.constant(0.5, tf.float32), step / max_steps)


@gin.configurable(module="optimizer_config")
def lr_constant(step, max_steps, learning_rate: float = 0.01) -> tf.Tensor:
  """The same learning rate at every step.

  Args:
    step: the training step, a float32 scalar tensor (or anything `tf.cast` accepts). Unused.
    max_steps: unused.
    learning_rate: the rate returned.

  Returns:
    A float32 scalar tensor.
  """
  del step, max_steps
  _check_number("learning_rate", learning_rate, minimum=0.0, strict=False)
  return tf.constant(learning_rate, tf.float32)


@gin.configurable(module="optimizer_config")
def lr_rsqrt_decay_std(step, max_steps, max_lr: Optional[float] = None) -> tf.Tensor:
  """The standard inverse square root schedule of the Memorizing and Block-Recurrent papers: 1/sqrt(step).

  The step is floored at 100, and max_steps is ignored. With 1000 warm-up steps the peak rate is
  1/sqrt(1000) ~= 0.0316.

  Args:
    step: the training step, float32 tensor of any shape (computed elementwise).
    max_steps: unused.
    max_lr: if given, the rate is clipped to it.

  Returns:
    float32 tensor of step's shape.
  """
  del max_steps
  if max_lr is not None:
    _check_number("max_lr", max_lr, minimum=0.0, strict=True)
  step = tf.maximum(tf.cast(step, tf.float32), _RSQRT_MIN_STEP)
  lrate = 1.0 / tf.sqrt(step)
  if max_lr is not None:
    lrate = tf.minimum(lrate, max_lr)
  return lrate


@gin.configurable(module="optimizer_config")
def lr_rsqrt_decay(step, max_steps, max_lr: float = 0.05, min_lr: float = 0.001) -> tf.Tensor:
  """Inverse square root decay scaled so that the rate is min_lr at max_steps: min_lr / sqrt(step / max_steps).

  The step is floored at 100 and the rate clipped to max_lr. With warm-up the peak is
  min_lr / sqrt(warmup_steps / max_steps), which can be below max_lr.

  Args:
    step: the training step, float32 tensor of any shape (computed elementwise).
    max_steps: the step at which the rate reaches min_lr; a positive Python number.
    max_lr: upper clip.
    min_lr: the rate at max_steps (and it keeps decaying beyond).

  Returns:
    float32 tensor of step's shape.
  """
  _check_number("max_steps", max_steps, minimum=0.0, strict=True)
  _check_decay_range(max_lr, min_lr)
  step = tf.maximum(tf.cast(step, tf.float32), _RSQRT_MIN_STEP)
  lrate = min_lr / tf.sqrt(step / float(max_steps))
  return tf.minimum(lrate, max_lr)


@gin.configurable(module="optimizer_config")
def lr_exponential_decay(step, max_steps, max_lr: float = 0.01, min_lr: float = 0.001) -> tf.Tensor:
  """Exponential decay max_lr (min_lr / max_lr)^(step / max_steps), continuing at the same rate after max_steps.

  Args:
    step: the training step, float32 tensor of any shape (computed elementwise).
    max_steps: the step at which the rate reaches min_lr; a positive Python number.
    max_lr: the rate at step 0.
    min_lr: the rate at max_steps.

  Returns:
    float32 tensor of step's shape.
  """
  _check_number("max_steps", max_steps, minimum=0.0, strict=True)
  _check_decay_range(max_lr, min_lr)
  step = tf.cast(step, tf.float32)
  return max_lr * tf.pow(tf.constant(min_lr / max_lr, tf.float32), step / float(max_steps))


@gin.configurable(module="optimizer_config")
def lr_linear_decay(step, max_steps, max_lr: float = 0.01, min_lr: float = 0.001,
                    decay_after: bool = True) -> tf.Tensor:
  """Linear decay from max_lr at step 0 to min_lr at max_steps.

  Args:
    step: the training step, float32 tensor of any shape (computed elementwise).
    max_steps: the step at which the rate reaches min_lr; a positive Python number.
    max_lr: the rate at step 0.
    min_lr: the rate at max_steps.
    decay_after: from max_steps on, continue with 2 min_lr (1/2)^(step / max_steps), which halves every
      max_steps; otherwise stay at min_lr.

  Returns:
    float32 tensor of step's shape.
  """
  _check_number("max_steps", max_steps, minimum=0.0, strict=True)
  _check_decay_range(max_lr, min_lr)
  step = tf.cast(step, tf.float32)
  max_steps = float(max_steps)
  lrate = min_lr + (max_lr - min_lr) * ((max_steps - step) / max_steps)
  lrate = tf.maximum(lrate, min_lr)
  if decay_after:
    lrate = tf.where(step < max_steps, lrate, _halving_tail(step, max_steps, min_lr))
  return lrate


@gin.configurable(module="optimizer_config")
def lr_cosine_decay(step, max_steps, max_lr: float = 0.01, min_lr: float = 0.001, decay_after: bool = True,
                    spike_steps: int = 0, spike_lr: float = 0.0) -> tf.Tensor:
  """Cosine decay from max_lr at step 0 to min_lr at max_steps (the Chinchilla schedule).

  lr = min_lr + (max_lr - min_lr) (1 + cos(pi min(step, max_steps) / max_steps)) / 2.

  Args:
    step: the training step, float32 tensor of any shape (computed elementwise).
    max_steps: the step at which the rate reaches min_lr; a positive Python number.
    max_lr: the rate at step 0.
    min_lr: the rate at max_steps.
    decay_after: from max_steps on, continue with 2 min_lr (1/2)^(step / max_steps), which halves every
      max_steps; otherwise stay at min_lr.
    spike_steps: when both this and spike_lr are positive, the rate is at least
      spike_lr (spike_steps - step) / spike_steps: a linear fall from spike_lr over the first spike_steps.
    spike_lr: the rate at the top of the spike; must exceed max_lr when the spike is on.

  Returns:
    float32 tensor of step's shape.
  """
  _check_number("max_steps", max_steps, minimum=0.0, strict=True)
  _check_decay_range(max_lr, min_lr)
  _check_number("spike_steps", spike_steps, minimum=0.0, strict=False)
  _check_number("spike_lr", spike_lr, minimum=0.0, strict=False)
  spike = spike_steps > 0 and spike_lr > 0.0
  if spike and not spike_lr > max_lr:
    raise ValueError(f"spike_lr must be greater than max_lr, got spike_lr={spike_lr!r}, max_lr={max_lr!r}")

  step = tf.cast(step, tf.float32)
  max_steps = float(max_steps)
  step_ramp = tf.minimum(step, max_steps) / max_steps  # 0 to 1
  lrate = (1.0 + tf.cos(math.pi * step_ramp)) * 0.5  # 1 to 0
  lrate = min_lr + lrate * (max_lr - min_lr)
  if spike:
    lrate = tf.maximum(lrate, spike_lr * ((spike_steps - step) / spike_steps))
  if decay_after:
    lrate = tf.where(step < max_steps, lrate, _halving_tail(step, max_steps, min_lr))
  return lrate


def learning_rate(step, schedule: Schedule, max_steps, warmup_steps, multiplier: float,
                  base_learning_rate: float) -> tf.Tensor:
  """The learning rate the optimizer receives at `step`: Meliad's `Trainer.learning_rate_schedule_fn`.

  lr = schedule(max(step, warmup_steps), max_steps) * base_learning_rate * min(step, warmup_steps) / warmup_steps
       * multiplier

  so the rate is exactly 0 at step 0, rises linearly to the schedule's warm-up-end value, and the schedule is
  held at that value during warm-up (which is what keeps the rsqrt schedules finite).

  With warmup_steps = 0 there is no ramp: the factor is 1 and the schedule is evaluated at the step itself, so
  the rate at step 0 is schedule(0), not 0. (Meliad divides 0 by 0 there and trains on NaN.)

  Args:
    step: the optimizer step (0 before the first update), a scalar tensor of any real dtype or a Python
      number; any shape is computed elementwise.
    schedule: a schedule function `f(step, max_steps) -> lr`, e.g. a gin-configured `lr_cosine_decay`.
    max_steps: the schedule's horizon (`max_scheduled_steps`, or `num_steps` when that is 0); a positive
      Python number.
    warmup_steps: length of the linear ramp; a non-negative Python number.
    multiplier: `learning_rate_multiplier`, a tuning knob independent of schedule and optimizer.
    base_learning_rate: the optimizer config's `learning_rate` (1.0 for Adafactor, 0.05 for Adam).

  Returns:
    float32 tensor of step's shape.
  """
  _check_number("max_steps", max_steps, minimum=0.0, strict=True)
  _check_number("warmup_steps", warmup_steps, minimum=0.0, strict=False)
  _check_number("multiplier", multiplier, minimum=0.0, strict=False)
  _check_number("base_learning_rate", base_learning_rate, minimum=0.0, strict=False)
  step = tf.cast(step, tf.float32)
  if warmup_steps > 0:
    warm = float(warmup_steps)
    ramp = tf.minimum(step, warm) / warm
    step = tf.maximum(step, warm)
  else:
    ramp = 1.0
  lrate = schedule(step, max_steps)
  return tf.cast(lrate * base_learning_rate * ramp * multiplier, tf.float32)
