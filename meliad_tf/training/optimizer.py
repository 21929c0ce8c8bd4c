"""Flax's Adafactor and Adam re-written as tf.Modules, and Meliad's gin-configurable optimizer configs.

Meliad trains with the deprecated `flax.optim.Adafactor` (not optax, not Keras), whose update differs from every
TF Adafactor: the second-moment decay 1 - (t+1)^-0.8, the parameter-scale step size, the update clip by RMS and
momentum applied to the already-scaled update. Both optimizers here transcribe the Flax code operation for
operation in float32.

An optimizer is used in two layers:

* `update(param, grad, slots, step, learning_rate) -> (new_param, new_slots)` is the per-parameter maths on
  tensors, with no variables. A distribution-aware shell (the trainer's `strategy.extended.update`) calls it
  on each replica's copy.
* `build(params)` creates the slot variables and `apply_gradients(grads, params, learning_rate)` reads them,
  calls `update` and writes params, slots and `iterations` back; it runs eagerly, in `tf.function` and under
  `jit_compile=True`, in the default strategy or in a strategy's cross-replica context.

Hand-written rather than Keras' or optax's Adafactor, which differ from Flax's in every one of those points: a
faithful optimizer is what makes a converted Meliad checkpoint continue as Meliad would.

One option goes beyond Flax, off by default: `unscaled_parameters` names parameters whose step is not multiplied
by their RMS. Meliad's memory gate, a per-head bias initialised to 0, sits at Adafactor's RMS floor of 1e-3, so
it moves by about learning_rate x 1e-3 per step, in Meliad as here; the recurrent gates' biases, initialised
N(0, 0.1), by about learning_rate x 0.1.

Slots are keyed by the parameter's name, so a `tf.train.Checkpoint(optimizer=opt)` restores them into a fresh
optimizer built over the same parameters in any order. A slot variable is named `<param name>/<slot>`, e.g.
`decoder/layer_0/mlp/kernel/v_row`. Slots that a parameter does not use are not created (Flax stores them as
zeros of shape (1,); nothing reads them).
"""

import dataclasses
import re
from typing import Dict, Optional, Sequence, Tuple

import gin
import numpy as np
import tensorflow as tf

from meliad_tf.layers import scopes

Slots = Dict[str, tf.Tensor]


def param_key(param: tf.Variable) -> str:
  """The name that identifies `param`'s slots: its variable name without the ':0' suffix.

  Inside `strategy.extended.update` the function sees a replica's component variable, whose name carries a
  replica suffix; its slots are those of the distributed variable it belongs to. TF exposes that link only
  through `_distributed_container` (set on the variable or on its handle), which is what Keras reads too.
  """
  if not isinstance(param, tf.distribute.DistributedValues):
    for owner in (param, getattr(param, "handle", None)):
      container = getattr(owner, "_distributed_container", None)
      if container is not None and container() is not None:
        param = container()
        break
  name = param.name
  return name[:-2] if name.endswith(":0") else name


class Optimizer(tf.Module):
  """Slot bookkeeping shared by Adafactor and Adam; subclasses supply `_slot_shapes` and `update`.

  Attributes:
    iterations: int64 scalar variable, the optimizer step t: 0 before the first update, incremented by each
      `apply_gradients`. Flax's `optimizer.state.step`.
  """

  def __init__(self, learning_rate: Optional[float], name: str):
    super().__init__(name=name)
    self.learning_rate = learning_rate
    self.iterations: Optional[tf.Variable] = None
    # param key -> slot name -> variable. tf.Module tracks the nested dicts, so a checkpoint names each slot
    # by its param key and slot name.
    self._slots: Dict[str, Dict[str, tf.Variable]] = {}

  def _slot_shapes(self, shape: Tuple[int, ...]) -> Dict[str, Tuple[int, ...]]:
    """Maps slot name to slot shape for a parameter of this shape."""
    raise NotImplementedError

  def update(self, param_value, grad, slot_values: Slots, step, learning_rate,
             param_name: str = "") -> Tuple[tf.Tensor, Slots]:
    """One optimizer step for one parameter, on tensors.

    Args:
      param_value: float32 tensor (or variable, read once), the parameter before the step.
      grad: its gradient, same shape; cast to float32.
      slot_values: slot name -> float32 tensor, the slots before the step (the keys `slots_for` returns).
      step: the optimizer step t before this update (0 for the first), any real dtype.
      learning_rate: float32 scalar, the step size for this update.
      param_name: the parameter's `param_key`, for options that apply to some parameters only.

    Returns:
      (new_param, new_slots): float32 tensors of the same shapes.
    """
    raise NotImplementedError

  def build(self, params: Sequence[tf.Variable]) -> None:
    """Creates `iterations` (once) and the slots of every parameter not built before.

    Call it eagerly, before the first `apply_gradients`; inside a `tf.distribute` strategy scope the slots
    are created on the devices of their parameters (mirrored when the parameters are).

    Args:
      params: float32 variables with unique names.

    Raises:
      ValueError: a parameter is not float32, or two parameters share a name.
    """
    keys = [param_key(p) for p in params]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
      raise ValueError(f"{type(self).__name__}.build needs unique parameter names; repeated: {duplicates}")
    if self.iterations is None:
      self.iterations = tf.Variable(
          0, dtype=tf.int64, trainable=False, name="iterations",
          # A replica-context increment by the trainer counts once, as Keras' iterations does.
          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    strategy = tf.distribute.get_strategy()
    for key, param in zip(keys, params):
      if key in self._slots:
        continue
      if param.dtype != tf.float32:
        raise ValueError(f"{type(self).__name__} keeps float32 parameters; {key} is {param.dtype.name}")
      with strategy.extended.colocate_vars_with(param):
        self._slots[key] = {
            slot: tf.Variable(tf.zeros(shape, tf.float32), trainable=False, name=f"{key}/{slot}")
            for slot, shape in self._slot_shapes(tuple(param.shape)).items()
        }

  def slots_for(self, param: tf.Variable) -> Dict[str, tf.Variable]:
    """The slot variables of one parameter (or of the distributed variable a replica's component belongs to)."""
    key = param_key(param)
    if key not in self._slots:
      raise KeyError(f"{type(self).__name__} has no slots for {key}; call build() with it first")
    return self._slots[key]

  @scopes.scoped("optimizer")
  def apply_gradients(self, grads, params: Sequence[tf.Variable], learning_rate=None) -> None:
    """Updates `params` and their slots in place and increments `iterations`.

    Args:
      grads: one gradient per parameter. An `IndexedSlices` (from an embedding gather) is made dense, because
        Adafactor's statistics need the whole gradient. None is taken as zeros, as JAX differentiates an unused
        parameter: its momentum still moves it and its second moments still decay.
      params: the built variables, in the order of `grads`.
      learning_rate: float32 scalar; when None, the constructor's `learning_rate` (as Flax's
        `apply_gradient(..., learning_rate=lr)` overrides the hyper-parameter).

    Raises:
      ValueError: lengths differ, or no learning rate is given anywhere.
    """
    if len(grads) != len(params):
      raise ValueError(f"got {len(grads)} gradients for {len(params)} parameters")
    if learning_rate is None:
      if self.learning_rate is None:
        raise ValueError(f"{type(self).__name__}.apply_gradients needs a learning_rate")
      learning_rate = self.learning_rate
    if self.iterations is None:
      raise ValueError(f"{type(self).__name__}.build must be called before apply_gradients")
    learning_rate = tf.cast(learning_rate, tf.float32)
    step = self.iterations.read_value()
    for grad, param in zip(grads, params):
      slots = self.slots_for(param)
      grad = tf.zeros_like(param) if grad is None else tf.convert_to_tensor(grad)
      new_param, new_slots = self.update(
          param.read_value(), grad, {k: v.read_value() for k, v in slots.items()}, step, learning_rate,
          param_name=param_key(param))
      param.assign(new_param)
      for slot, value in new_slots.items():
        slots[slot].assign(value)
    self.iterations.assign_add(1)


class Adafactor(Optimizer):
  """Flax's `optim.Adafactor` (flax.optim, 2021), defaults included.

  For a parameter P with gradient G at optimizer step t:
    beta2 = 1 - (t - step_offset + 1)^-decay_rate             (0 at t = 0: the first step uses G^2 as it is)
    scale = learning_rate * max(RMS(P), epsilon2)              (learning_rate alone without parameter scale)
    G2 = G^2 + epsilon1
    factored:   v_row = beta2 v_row + (1 - beta2) mean(G2, d0);  v_col = beta2 v_col + (1 - beta2) mean(G2, d1)
                Y = G (v_row / mean(v_row over d1))^-1/2 v_col^-1/2
    otherwise:  v = beta2 v + (1 - beta2) G2;  Y = G v^-1/2
    Y = Y / max(1, RMS(Y) / clipping_threshold)
    U = scale Y;  with beta1: m = beta1 m + (1 - beta1) U and U = m
    (scale = learning_rate alone for a parameter named by `unscaled_parameters`)
    P = P - U,  or (1 - weight_decay_rate) P - U with weight decay (not scaled by the learning rate)

  A parameter is factored when it has >= 2 dimensions and its second-largest dimension is
  >= min_dim_size_to_factor; d0 is the largest axis and d1 the second-largest, by a stable argsort of the
  shape (so of two equal sizes the later axis is d0). v_row has P's shape without d0, v_col without d1.

  Slots: `v_row` and `v_col` (factored) or `v`, plus `m` when beta1 is not None.
  """

  def __init__(self,
               learning_rate: Optional[float] = None,
               factored: bool = True,
               multiply_by_parameter_scale: bool = True,
               beta1: Optional[float] = None,
               decay_rate: float = 0.8,
               step_offset: int = 0,
               clipping_threshold: Optional[float] = 1.0,
               weight_decay_rate: Optional[float] = None,
               min_dim_size_to_factor: int = 128,
               epsilon1: float = 1e-30,
               epsilon2: float = 1e-3,
               unscaled_parameters: Sequence[str] = (),
               name: str = "adafactor"):
    """Records the hyper-parameters (Flax's names and defaults).

    Args:
      learning_rate: step size used when `apply_gradients` gets none; Meliad always passes the scheduled rate.
      factored: use the factored second moment for large matrices.
      multiply_by_parameter_scale: scale the step by the parameter's RMS (floored at epsilon2).
      beta1: momentum coefficient; None for no momentum (and no `m` slot).
      decay_rate: exponent of the second-moment decay schedule.
      step_offset: subtracted from the step in that schedule (for fine-tuning).
      clipping_threshold: RMS bound of the unscaled update; None for no clipping.
      weight_decay_rate: per-step multiplicative decay of the parameter; None for none.
      min_dim_size_to_factor: the second-largest dimension must be at least this to factor.
      epsilon1: added to the squared gradient.
      epsilon2: floor of the parameter RMS in the step size.
      unscaled_parameters: regular expressions; a parameter whose `param_key` one of them matches
        (`re.search`) takes steps of learning_rate x Y, not multiplied by its RMS. Not in Flax; empty by
        default. `build` raises ValueError when they match no parameter.
      name: module name.
    """
    super().__init__(learning_rate, name)
    self.unscaled_parameters = tuple(unscaled_parameters)
    self._unscaled_patterns = []
    for pattern in self.unscaled_parameters:
      try:
        self._unscaled_patterns.append(re.compile(pattern))
      except re.error as e:
        raise ValueError(f"Adafactor.unscaled_parameters: {pattern!r} is not a regular expression: {e}") from e
    self.factored = factored
    self.multiply_by_parameter_scale = multiply_by_parameter_scale
    self.beta1 = beta1
    self.decay_rate = decay_rate
    self.step_offset = step_offset
    self.clipping_threshold = clipping_threshold
    self.weight_decay_rate = weight_decay_rate
    self.min_dim_size_to_factor = min_dim_size_to_factor
    self.epsilon1 = epsilon1
    self.epsilon2 = epsilon2

  def scales_by_parameter(self, param_name: str) -> bool:
    """Whether the step of the parameter named `param_name` is multiplied by its RMS."""
    return self.multiply_by_parameter_scale and not any(
        pattern.search(param_name) for pattern in self._unscaled_patterns)

  def build(self, params: Sequence[tf.Variable]) -> None:
    super().build(params)
    if self._unscaled_patterns:
      names = [param_key(p) for p in params]
      if not any(not self.scales_by_parameter(name) for name in names):
        raise ValueError(
            f"Adafactor.unscaled_parameters {list(self.unscaled_parameters)} match no parameter of the model "
            f"(named like {names[0]!r}); the gates are named external_memory_bias (memory), gate_bias "
            "(recurrent, gate type 'bias'), forget_gate/ and input_gate/ (gate type 'lstm')")

  def factored_dims(self, shape: Sequence[int]) -> Optional[Tuple[int, int]]:
    """(d1, d0): the second-largest and largest axes of a factored parameter, or None when it is not factored.

    Flax uses `numpy.argsort`, which was stable for short shapes when Flax was written; newer numpy may sort
    ties in either order, so the sort is made stable explicitly.
    """
    if not self.factored or len(shape) < 2:
      return None
    sorted_dims = np.argsort(shape, kind="stable")
    if shape[sorted_dims[-2]] < self.min_dim_size_to_factor:
      return None
    return int(sorted_dims[-2]), int(sorted_dims[-1])

  def _slot_shapes(self, shape):
    dims = self.factored_dims(shape)
    if dims is None:
      shapes = {"v": shape}
    else:
      d1, d0 = dims
      shapes = {"v_row": tuple(np.delete(shape, d0)), "v_col": tuple(np.delete(shape, d1))}
    if self.beta1 is not None:
      shapes["m"] = shape
    return shapes

  def update(self, param_value, grad, slot_values, step, learning_rate, param_name=""):
    """One Adafactor step for one parameter, on tensors; see `Optimizer.update` and the class docstring."""
    param = tf.convert_to_tensor(param_value, tf.float32)
    grad = tf.cast(grad, tf.float32)
    t = tf.cast(step, tf.float32) - self.step_offset + 1.0
    decay = 1.0 - tf.pow(t, -self.decay_rate)
    mixing = 1.0 - decay
    update_scale = tf.cast(learning_rate, tf.float32)
    if self.scales_by_parameter(param_name):
      update_scale *= tf.maximum(tf.sqrt(tf.reduce_mean(param * param)), self.epsilon2)

    new_slots = {}
    grad_sqr = grad * grad + self.epsilon1
    dims = self.factored_dims(param.shape)
    if dims is not None:
      d1, d0 = dims
      v_row = decay * slot_values["v_row"] + mixing * tf.reduce_mean(grad_sqr, axis=d0)
      v_col = decay * slot_values["v_col"] + mixing * tf.reduce_mean(grad_sqr, axis=d1)
      new_slots["v_row"], new_slots["v_col"] = v_row, v_col
      reduced_d1 = d1 - 1 if d1 > d0 else d1  # d1's axis in v_row, which lacks d0
      row_col_mean = tf.reduce_mean(v_row, axis=reduced_d1, keepdims=True)
      row_factor = tf.math.rsqrt(v_row / row_col_mean)
      col_factor = tf.math.rsqrt(v_col)
      y = grad * tf.expand_dims(row_factor, axis=d0) * tf.expand_dims(col_factor, axis=d1)
    else:
      v = decay * slot_values["v"] + mixing * grad_sqr
      new_slots["v"] = v
      y = grad * tf.math.rsqrt(v)

    if self.clipping_threshold is not None:
      y /= tf.maximum(1.0, tf.sqrt(tf.reduce_mean(y * y)) / self.clipping_threshold)

    subtrahend = update_scale * y
    if self.beta1 is not None:
      subtrahend = self.beta1 * slot_values["m"] + (1.0 - self.beta1) * subtrahend
      new_slots["m"] = subtrahend

    if self.weight_decay_rate is not None:
      new_param = (1.0 - self.weight_decay_rate) * param - subtrahend
    else:
      new_param = param - subtrahend
    return new_param, new_slots


class Adam(Optimizer):
  """Flax's `optim.Adam` (flax.optim, 2021), defaults included.

  At optimizer step t, with n = t + 1:
    grad_ema = beta1 grad_ema + (1 - beta1) G;  grad_sq_ema = beta2 grad_sq_ema + (1 - beta2) G^2
    P = P - lr (grad_ema / (1 - beta1^n)) / (sqrt(grad_sq_ema / (1 - beta2^n)) + eps) - lr weight_decay P_old

  eps is added outside the square root, and the weight decay is decoupled (AdamW style), proportional to the
  learning rate and to the parameter before the step.

  Slots: `grad_ema` and `grad_sq_ema` (Flax's names), both of the parameter's shape.
  """

  def __init__(self,
               learning_rate: Optional[float] = None,
               beta1: float = 0.9,
               beta2: float = 0.999,
               eps: float = 1e-8,
               weight_decay: float = 0.0,
               name: str = "adam"):
    """Records the hyper-parameters (Flax's names and defaults).

    Args:
      learning_rate: step size used when `apply_gradients` gets none.
      beta1: decay of the gradient average.
      beta2: decay of the squared-gradient average.
      eps: added to the root of the corrected squared-gradient average.
      weight_decay: decoupled decay, relative to the learning rate.
      name: module name.
    """
    super().__init__(learning_rate, name)
    self.beta1 = beta1
    self.beta2 = beta2
    self.eps = eps
    self.weight_decay = weight_decay

  def _slot_shapes(self, shape):
    return {"grad_ema": shape, "grad_sq_ema": shape}

  def update(self, param_value, grad, slot_values, step, learning_rate, param_name=""):
    """One Adam step for one parameter, on tensors; see `Optimizer.update` and the class docstring."""
    del param_name  # every parameter is updated alike
    param = tf.convert_to_tensor(param_value, tf.float32)
    grad = tf.cast(grad, tf.float32)
    learning_rate = tf.cast(learning_rate, tf.float32)
    grad_ema = self.beta1 * slot_values["grad_ema"] + (1.0 - self.beta1) * grad
    grad_sq_ema = self.beta2 * slot_values["grad_sq_ema"] + (1.0 - self.beta2) * tf.square(grad)
    n = tf.cast(step, tf.float32) + 1.0
    grad_ema_corr = grad_ema / (1.0 - tf.pow(self.beta1, n))
    grad_sq_ema_corr = grad_sq_ema / (1.0 - tf.pow(self.beta2, n))
    denom = tf.sqrt(grad_sq_ema_corr) + self.eps
    new_param = param - learning_rate * grad_ema_corr / denom
    new_param -= learning_rate * self.weight_decay * param
    return new_param, {"grad_ema": grad_ema, "grad_sq_ema": grad_sq_ema}


@gin.configurable(module="optimizer_config")
@dataclasses.dataclass(frozen=True)
class FlaxAdafactorConfig:
  """Meliad's default optimizer: Flax Adafactor with momentum 0.9 and every other Flax default.

  Attributes:
    learning_rate: the base rate that multiplies the schedule (see `schedules.learning_rate`); it is not given
      to the optimizer, which receives the full scheduled rate on every step, as in Meliad.
    beta1, factored, multiply_by_parameter_scale, decay_rate, step_offset, clipping_threshold,
      weight_decay_rate, min_dim_size_to_factor, epsilon1, epsilon2: as in `Adafactor`.
    unscaled_parameters: as in `Adafactor` (not in Meliad; empty by default).
      `options/gates_unscaled.gin` names the memory and recurrent gates.
  """
  learning_rate: float = 1.0
  beta1: Optional[float] = 0.9
  factored: bool = True
  multiply_by_parameter_scale: bool = True
  decay_rate: float = 0.8
  step_offset: int = 0
  clipping_threshold: Optional[float] = 1.0
  weight_decay_rate: Optional[float] = None
  min_dim_size_to_factor: int = 128
  epsilon1: float = 1e-30
  epsilon2: float = 1e-3
  unscaled_parameters: Tuple[str, ...] = ()

  def create(self) -> Adafactor:
    """A new, unbuilt Adafactor with these hyper-parameters."""
    return Adafactor(
        factored=self.factored,
        multiply_by_parameter_scale=self.multiply_by_parameter_scale,
        beta1=self.beta1,
        decay_rate=self.decay_rate,
        step_offset=self.step_offset,
        clipping_threshold=self.clipping_threshold,
        weight_decay_rate=self.weight_decay_rate,
        min_dim_size_to_factor=self.min_dim_size_to_factor,
        epsilon1=self.epsilon1,
        epsilon2=self.epsilon2,
        unscaled_parameters=self.unscaled_parameters)


@gin.configurable(module="optimizer_config")
@dataclasses.dataclass(frozen=True)
class AdafactorConfig(FlaxAdafactorConfig):
  """`FlaxAdafactorConfig` under the name later Meliad versions use; bound separately in gin."""


@gin.configurable(module="optimizer_config")
@dataclasses.dataclass(frozen=True)
class AdamConfig:
  """Meliad's alternative optimizer (no gin file selects it): Flax Adam.

  Attributes:
    learning_rate: the base rate that multiplies the schedule; Adam does not scale by the parameter, so it
      wants a smaller one than Adafactor.
    beta1: decay of the gradient average.
    beta2: decay of the squared-gradient average.
    weight_decay_rate: decoupled weight decay relative to the learning rate (Flax Adam's `weight_decay`).
    eps: Flax Adam's epsilon, which Meliad leaves at its default.
  """
  learning_rate: float = 0.05
  beta1: float = 0.9
  beta2: float = 0.98
  weight_decay_rate: float = 0.0
  eps: float = 1e-8

  def create(self) -> Adam:
    """A new, unbuilt Adam with these hyper-parameters."""
    return Adam(beta1=self.beta1, beta2=self.beta2, eps=self.eps, weight_decay=self.weight_decay_rate)
