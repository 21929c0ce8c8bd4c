"""Adafactor and Adam against naive float64 numpy transcriptions of Flax's updates.

The implementations compute in float32; every comparison with a float64 reference uses rtol 1e-5 plus an
absolute floor of 1e-6 of the array's largest magnitude (float32 rounding of near-zero entries).
"""

import gin
import numpy as np
import pytest
import tensorflow as tf

from meliad_tf.training import optimizer
from meliad_tf.training import schedules


RTOL = 1e-5
ATOL_FRACTION = 1e-6

# Learning rates for successive steps; a zero step still moves the statistics and the momentum.
LEARNING_RATES = [0.01, 0.02, 0.015, 0.0, 0.01, 0.005]


def assert_close(actual, desired, what=""):
  desired = np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=RTOL, atol=ATOL_FRACTION * np.max(np.abs(desired)),
                             err_msg=what)


# ---- Naive references, written from the spec rather than from the implementation. ----

def reference_adafactor(param, grads, learning_rates, *, first_step=0, beta1=0.9, decay_rate=0.8, step_offset=0,
                        clipping_threshold=1.0, weight_decay_rate=None, multiply_by_parameter_scale=True,
                        factored=True, min_dim_size_to_factor=128, epsilon1=1e-30, epsilon2=1e-3):
  """Flax Adafactor in float64, step by step.

  The factored second moment is computed in the Adafactor paper's form, the rank-one estimate
  V[i, j] = R[i] C[j] / mean(R), on a view of the gradient whose last two axes are (d1, d0).

  Returns:
    (params after each step, final slots in Flax's layout, whether any step clipped).
  """
  p = np.asarray(param, np.float64)
  shape, ndim = p.shape, p.ndim
  # Axes ordered by (size, position): the last is the largest (d0), the one before it d1.
  by_size = sorted(range(ndim), key=lambda axis: (shape[axis], axis))
  is_factored = factored and ndim >= 2 and shape[by_size[-2]] >= min_dim_size_to_factor
  if is_factored:
    d1, d0 = by_size[-2], by_size[-1]
    others = [axis for axis in range(ndim) if axis not in (d0, d1)]
    view = others + [d1, d0]
    unview = list(np.argsort(view))
    others_shape = [shape[axis] for axis in others]
    r = np.zeros(others_shape + [shape[d1]])
    c = np.zeros(others_shape + [shape[d0]])
  else:
    v = np.zeros(shape)
  m = np.zeros(shape)
  history, clipped = [], False
  for i, (g, lr) in enumerate(zip(grads, learning_rates)):
    t = first_step + i
    beta2 = 1.0 - (t - step_offset + 1.0) ** (-decay_rate)
    g = np.asarray(g, np.float64)
    g2 = g ** 2 + epsilon1
    if is_factored:
      g_view, g2_view = g.transpose(view), g2.transpose(view)
      r = beta2 * r + (1 - beta2) * g2_view.mean(axis=-1)
      c = beta2 * c + (1 - beta2) * g2_view.mean(axis=-2)
      v_hat = r[..., :, None] * c[..., None, :] / r.mean(axis=-1)[..., None, None]
      y = (g_view / np.sqrt(v_hat)).transpose(unview)
    else:
      v = beta2 * v + (1 - beta2) * g2
      y = g / np.sqrt(v)
    rms = np.sqrt(np.mean(y ** 2))
    if clipping_threshold is not None and rms > clipping_threshold:
      y = y * clipping_threshold / rms
      clipped = True
    scale = lr * max(np.sqrt(np.mean(p ** 2)), epsilon2) if multiply_by_parameter_scale else lr
    u = scale * y
    if beta1 is not None:
      m = beta1 * m + (1 - beta1) * u
      u = m
    p = p - u if weight_decay_rate is None else (1 - weight_decay_rate) * p - u
    history.append(p)

  if is_factored:
    # Flax keeps v_row = shape without d0 and v_col = shape without d1, axes in their original order.
    slots = {"v_row": np.moveaxis(r, -1, [a for a in range(ndim) if a != d0].index(d1)),
             "v_col": np.moveaxis(c, -1, [a for a in range(ndim) if a != d1].index(d0))}
  else:
    slots = {"v": v}
  if beta1 is not None:
    slots["m"] = m
  return history, slots, clipped


def reference_adam(param, grads, learning_rates, *, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
  """Flax Adam in float64: bias-corrected moments, eps outside the root, decay lr * wd * old param."""
  p = np.asarray(param, np.float64)
  m, v = np.zeros_like(p), np.zeros_like(p)
  history = []
  for t, (g, lr) in enumerate(zip(grads, learning_rates)):
    g = np.asarray(g, np.float64)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1 ** (t + 1))
    v_hat = v / (1 - beta2 ** (t + 1))
    p = p - lr * m_hat / (np.sqrt(v_hat) + eps) - lr * weight_decay * p
    history.append(p)
  return history, {"grad_ema": m, "grad_sq_ema": v}


# ---- Test problems. ----

def _case(name, shape, seed, *, zero_init=False, growth=1.0):
  """A parameter and one gradient per step, all float32 so both sides start from the same numbers.

  Gradients are normal times log-normal, so rows and columns differ and factoring matters; `growth`
  multiplies them by growth^t at step t.
  """
  rng = np.random.default_rng(seed)
  init = np.zeros(shape, np.float32) if zero_init else rng.standard_normal(shape).astype(np.float32)
  grads = [(rng.standard_normal(shape) * np.exp(rng.standard_normal(shape)) * growth ** t).astype(np.float32)
           for t in range(len(LEARNING_RATES))]
  return name, init, grads


ADAFACTOR_CASES = [
    _case("factored_256x130", (256, 130), 0),
    _case("factored_130x256", (130, 256), 1),
    _case("factored_3d", (136, 3, 160), 2),
    _case("unfactored_8x32", (8, 32), 3),
    _case("vector", (64,), 4),
    _case("scalar_like", (1,), 5),
    _case("zero_init", (32,), 6, zero_init=True),
    _case("clipped", (16, 16), 7, growth=10.0),
]


def _run(opt, cases, mode, first_step=0):
  """Applies every case's gradients step by step; returns {name: [param after each step]} and the variables."""
  params = [tf.Variable(init, name=name) for name, init, _ in cases]
  opt.build(params)
  opt.iterations.assign(first_step)

  def step(grads, lr):
    opt.apply_gradients(grads, params, lr)

  if mode != "eager":
    step = tf.function(step, jit_compile=(mode == "xla"))
  history = {name: [] for name, _, _ in cases}
  for t, lr in enumerate(LEARNING_RATES):
    step([tf.constant(grads[t]) for _, _, grads in cases], tf.constant(lr, tf.float32))
    for (name, _, _), param in zip(cases, params):
      history[name].append(param.numpy())
  return history, params


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_adafactor_matches_reference(mode):
  opt = optimizer.FlaxAdafactorConfig().create()
  history, params = _run(opt, ADAFACTOR_CASES, mode)
  assert opt.iterations.numpy() == len(LEARNING_RATES)
  for (name, init, grads), param in zip(ADAFACTOR_CASES, params):
    want_history, want_slots, clipped = reference_adafactor(init, grads, LEARNING_RATES)
    if name == "clipped":
      assert clipped  # the gradient grows 10x a step, outrunning the second moment
    for t, (got, want) in enumerate(zip(history[name], want_history)):
      assert_close(got, want, f"{name} param after step {t}")
    slots = opt.slots_for(param)
    assert sorted(slots) == sorted(want_slots), name
    for slot, want in want_slots.items():
      assert slots[slot].shape == want.shape, (name, slot)
      assert_close(slots[slot].numpy(), want, f"{name} slot {slot}")


def test_adafactor_non_default_hyperparameters_match_reference():
  hparams = dict(beta1=None, decay_rate=0.5, step_offset=2, clipping_threshold=None, weight_decay_rate=0.01,
                 multiply_by_parameter_scale=False, min_dim_size_to_factor=8, epsilon1=1e-20)
  cases = [c for c in ADAFACTOR_CASES if c[0] in ("unfactored_8x32", "vector", "clipped")]
  opt = optimizer.Adafactor(**hparams)
  history, params = _run(opt, cases, "xla", first_step=3)
  assert opt.iterations.numpy() == 3 + len(LEARNING_RATES)
  for (name, init, grads), param in zip(cases, params):
    want_history, want_slots, _ = reference_adafactor(init, grads, LEARNING_RATES, first_step=3, **hparams)
    assert_close(history[name][-1], want_history[-1], name)
    slots = opt.slots_for(param)
    assert sorted(slots) == sorted(want_slots), name  # no momentum slot without beta1
    for slot, want in want_slots.items():
      assert_close(slots[slot].numpy(), want, f"{name} slot {slot}")


def test_zero_initialised_parameter_moves_at_the_epsilon2_floor():
  # First step: beta2 = 0 so |Y| = 1 elementwise, and the step is lr * 1e-3 * (1 - beta1).
  param = tf.Variable(tf.zeros([32]), name="external_memory_bias")
  opt = optimizer.Adafactor(beta1=0.9)
  opt.build([param])
  opt.apply_gradients([tf.fill([32], 3.0)], [param], tf.constant(0.5))
  np.testing.assert_allclose(param.numpy(), -0.5 * 1e-3 * 0.1, rtol=1e-6)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_unscaled_parameters_take_steps_of_the_learning_rate(mode):
  """The gates named by `unscaled_parameters` move as with multiply_by_parameter_scale off; the
  rest as before."""
  cases = [("layer_1/external_memory_bias", *ADAFACTOR_CASES[6][1:]),  # zero-initialised
           ("layer_1/mlp/gate_bias", *ADAFACTOR_CASES[4][1:]),
           ("layer_1/mlp/kernel", *ADAFACTOR_CASES[0][1:])]
  opt = optimizer.FlaxAdafactorConfig(
      unscaled_parameters=("external_memory_bias", "gate_bias")).create()
  history, _ = _run(opt, cases, mode)
  for name, init, grads in cases:
    unscaled = not name.endswith("kernel")
    want, _, _ = reference_adafactor(init, grads, LEARNING_RATES,
                                     multiply_by_parameter_scale=not unscaled)
    for t, (got, expected) in enumerate(zip(history[name], want)):
      assert_close(got, expected, f"{name} after step {t}")
  # Unscaled, the zero-initialised gate moves 1000 times further than at the epsilon2 floor.
  scaled, _, _ = reference_adafactor(cases[0][1], cases[0][2], LEARNING_RATES)
  np.testing.assert_allclose(history[cases[0][0]][-1], 1000 * scaled[-1], rtol=1e-4)


def test_unscaled_parameters_that_match_nothing_or_do_not_parse_are_refused():
  kernel = tf.Variable(tf.ones([3]), name="layer_0/kernel")
  with pytest.raises(ValueError, match=r"unscaled_parameters \['gate_bias'\] match no parameter"):
    optimizer.Adafactor(unscaled_parameters=("gate_bias",)).build([kernel])
  with pytest.raises(ValueError, match=r"'\(' is not a regular expression"):
    optimizer.Adafactor(unscaled_parameters=("(",))


@pytest.mark.parametrize("shape,dims", [
    ((256, 130), (1, 0)),
    ((130, 256), (0, 1)),
    ((256, 256), (0, 1)),  # a tie: the later axis is d0, as a stable argsort orders them
    ((136, 3, 160), (0, 2)),
    ((512, 127), None),  # second-largest dimension below 128
    ((8, 32), None),
    ((4096,), None),
])
def test_factored_dims_follow_flax(shape, dims):
  assert optimizer.Adafactor().factored_dims(shape) == dims


def test_factored_slots_have_flax_shapes():
  params = [tf.Variable(tf.zeros(s), name=f"p{i}") for i, s in enumerate([(512, 1024), (136, 3, 160), (8, 32)])]
  opt = optimizer.Adafactor(beta1=0.9)
  opt.build(params)
  shapes = [{k: tuple(v.shape) for k, v in opt.slots_for(p).items()} for p in params]
  assert shapes == [
      {"v_row": (512,), "v_col": (1024,), "m": (512, 1024)},
      {"v_row": (136, 3), "v_col": (3, 160), "m": (136, 3, 160)},
      {"v": (8, 32), "m": (8, 32)},
  ]
  assert opt.slots_for(params[0])["v_row"].name == "p0/v_row:0"
  assert all(not v.trainable for p in params for v in opt.slots_for(p).values())


@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_matches_reference(mode, weight_decay):
  cases = [c for c in ADAFACTOR_CASES if c[0] in ("factored_256x130", "unfactored_8x32", "vector", "zero_init")]
  opt = optimizer.Adam(beta1=0.9, beta2=0.98, weight_decay=weight_decay)
  history, params = _run(opt, cases, mode)
  for (name, init, grads), param in zip(cases, params):
    want_history, want_slots = reference_adam(init, grads, LEARNING_RATES, beta1=0.9, beta2=0.98,
                                              weight_decay=weight_decay)
    for t, (got, want) in enumerate(zip(history[name], want_history)):
      assert_close(got, want, f"{name} param after step {t}")
    for slot, want in want_slots.items():
      assert_close(opt.slots_for(param)[slot].numpy(), want, f"{name} slot {slot}")


@pytest.mark.parametrize("make", [lambda: optimizer.Adafactor(beta1=0.9), lambda: optimizer.Adam()],
                         ids=["adafactor", "adam"])
def test_update_equals_apply_gradients(make):
  _, init, grads = ADAFACTOR_CASES[0]
  opt = make()
  param = tf.Variable(init, name="kernel")
  opt.build([param])
  opt.apply_gradients([grads[0]], [param], tf.constant(0.01))  # non-zero slots and step 1
  slots = opt.slots_for(param)
  want_param, want_slots = opt.update(param.numpy(), grads[1], {k: v.numpy() for k, v in slots.items()},
                                      tf.constant(1, tf.int64), tf.constant(0.02))
  opt.apply_gradients([grads[1]], [param], tf.constant(0.02))
  np.testing.assert_array_equal(param.numpy(), want_param.numpy())
  for k, v in slots.items():
    np.testing.assert_array_equal(v.numpy(), want_slots[k].numpy())


def _make_params(fill=None):
  """Two named parameters; `fill` overrides their values (a restore must replace them)."""
  rng = np.random.default_rng(11)
  values = [rng.standard_normal((256, 130)).astype(np.float32), rng.standard_normal((64,)).astype(np.float32)]
  return [tf.Variable(v if fill is None else np.full_like(v, fill), name=n)
          for v, n in zip(values, ["decoder/mlp/kernel", "decoder/norm/scale"])]


def _gradients(step):
  rng = np.random.default_rng(100 + step)
  return [tf.constant(rng.standard_normal((256, 130)), tf.float32),
          tf.constant(rng.standard_normal((64,)), tf.float32)]


@pytest.mark.parametrize("build_before_restore", [True, False])
def test_checkpoint_round_trip_continues_identically(tmp_path, build_before_restore):
  params = _make_params()
  opt = optimizer.FlaxAdafactorConfig().create()
  opt.build(params)
  for step in range(3):
    opt.apply_gradients(_gradients(step), params, tf.constant(0.01))
  path = tf.train.Checkpoint(params=params, optimizer=opt).write(str(tmp_path / "ckpt"))
  for step in range(3, 6):
    opt.apply_gradients(_gradients(step), params, tf.constant(0.01))

  restored_params = _make_params(fill=0.0)
  restored = optimizer.FlaxAdafactorConfig().create()
  checkpoint = tf.train.Checkpoint(params=restored_params, optimizer=restored)
  # Slots are found by parameter name, so building in another order restores the same state.
  if build_before_restore:
    restored.build(restored_params[::-1])
    checkpoint.read(path).assert_consumed()
  else:
    status = checkpoint.read(path)
    restored.build(restored_params[::-1])  # slots created after the read are restored as they appear
    status.assert_consumed()
  assert restored.iterations.numpy() == 3
  for step in range(3, 6):
    restored.apply_gradients(_gradients(step), restored_params, tf.constant(0.01))

  assert restored.iterations.numpy() == opt.iterations.numpy() == 6
  for p, q in zip(params, restored_params):
    np.testing.assert_array_equal(q.numpy(), p.numpy())
    for name, slot in opt.slots_for(p).items():
      np.testing.assert_array_equal(restored.slots_for(q)[name].numpy(), slot.numpy())


def test_checkpoint_names_slots_by_parameter(tmp_path):
  params = _make_params()
  opt = optimizer.FlaxAdafactorConfig().create()
  opt.build(params)
  path = tf.train.Checkpoint(optimizer=opt).write(str(tmp_path / "ckpt"))
  names = {name for name, _ in tf.train.list_variables(path)}
  assert "optimizer/iterations/.ATTRIBUTES/VARIABLE_VALUE" in names
  assert "optimizer/_slots/decoder.Smlp.Skernel/v_row/.ATTRIBUTES/VARIABLE_VALUE" in names
  assert "optimizer/_slots/decoder.Snorm.Sscale/m/.ATTRIBUTES/VARIABLE_VALUE" in names


def test_none_and_sparse_gradients():
  table = tf.Variable(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32), name="embedding")
  unused = tf.Variable(tf.ones([4]), name="unused")
  opt = optimizer.Adafactor(beta1=0.9)
  opt.build([table, unused])
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(tf.gather(table, [1, 3, 3]))
  sparse, none = tape.gradient(loss, [table, unused])
  assert isinstance(sparse, tf.IndexedSlices) and none is None

  dense_table = tf.Variable(table.numpy(), name="dense/embedding")
  dense_unused = tf.Variable(unused.numpy(), name="dense/unused")
  reference = optimizer.Adafactor(beta1=0.9)
  reference.build([dense_table, dense_unused])
  for _ in range(2):
    opt.apply_gradients([sparse, none], [table, unused], tf.constant(0.1))
    reference.apply_gradients([tf.convert_to_tensor(sparse), tf.zeros([4])], [dense_table, dense_unused],
                              tf.constant(0.1))
  np.testing.assert_array_equal(table.numpy(), dense_table.numpy())
  np.testing.assert_array_equal(unused.numpy(), dense_unused.numpy())


def test_usage_errors():
  a, b = tf.Variable(tf.ones([3]), name="same"), tf.Variable(tf.ones([3]), name="same")
  with pytest.raises(ValueError, match="unique"):
    optimizer.Adafactor().build([a, b])
  with pytest.raises(ValueError, match="float32"):
    optimizer.Adafactor().build([tf.Variable(tf.ones([3], tf.float64), name="double")])
  opt = optimizer.Adafactor()
  with pytest.raises(ValueError, match="build"):
    opt.apply_gradients([tf.ones([3])], [a], 0.1)
  opt.build([a])
  with pytest.raises(ValueError, match="learning_rate"):
    opt.apply_gradients([tf.ones([3])], [a])
  with pytest.raises(KeyError, match="build"):
    opt.slots_for(tf.Variable(tf.ones([3]), name="other"))
  with pytest.raises(ValueError, match="gradients"):
    opt.apply_gradients([tf.ones([3]), tf.ones([3])], [a], 0.1)


def test_constructor_learning_rate_is_the_default_step_size():
  a, b = tf.Variable(tf.ones([3]), name="a"), tf.Variable(tf.ones([3]), name="b")
  with_default, explicit = optimizer.Adam(learning_rate=0.1), optimizer.Adam()
  with_default.build([a])
  explicit.build([b])
  with_default.apply_gradients([tf.ones([3])], [a])
  explicit.apply_gradients([tf.ones([3])], [b], tf.constant(0.1))
  np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.fixture
def clean_gin():
  yield
  gin.clear_config()


@gin.configurable("test_optimizer_trainer")
def _fake_trainer(optimizer_factory=None, learning_rate_schedule=None):
  return optimizer_factory, learning_rate_schedule


def test_gin_configs_use_meliads_names(clean_gin):
  del clean_gin
  gin.parse_config("""
      test_optimizer_trainer.optimizer_factory = @optimizer_config.FlaxAdafactorConfig()
      test_optimizer_trainer.learning_rate_schedule = @optimizer_config.lr_cosine_decay
      optimizer_config.FlaxAdafactorConfig.learning_rate = 1.0
      optimizer_config.FlaxAdafactorConfig.beta1 = 0.9
      optimizer_config.AdamConfig.learning_rate = 0.05
      optimizer_config.AdamConfig.beta1 = 0.9
      optimizer_config.AdamConfig.beta2 = 0.98
      optimizer_config.AdamConfig.weight_decay_rate = 0.0
      optimizer_config.FlaxAdafactorConfig.step_offset = 5
      optimizer_config.AdafactorConfig.decay_rate = 0.7
  """)
  factory, schedule = _fake_trainer()
  assert factory == optimizer.FlaxAdafactorConfig(learning_rate=1.0, beta1=0.9, step_offset=5)
  assert schedule is schedules.lr_cosine_decay
  adafactor = factory.create()
  assert isinstance(adafactor, optimizer.Adafactor)
  assert (adafactor.beta1, adafactor.decay_rate, adafactor.clipping_threshold, adafactor.epsilon2) == (
      0.9, 0.8, 1.0, 1e-3)
  assert adafactor.learning_rate is None  # the scheduled rate is passed on every step
  adam = optimizer.AdamConfig().create()
  assert (adam.beta1, adam.beta2, adam.eps, adam.weight_decay) == (0.9, 0.98, 1e-8, 0.0)
  # The later name is bound on its own: neither name's bindings leak into the other.
  later = optimizer.AdafactorConfig().create()
  assert (later.decay_rate, later.step_offset) == (0.7, 0)
  assert optimizer.FlaxAdafactorConfig().decay_rate == 0.8


def test_mirrored_strategy_slots_and_replica_updates():
  devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
  assert len(devices) == 2, "tests/conftest.py splits the CPU into two logical devices"
  rng = np.random.default_rng(0)
  inits = [rng.standard_normal((256, 130)).astype(np.float32), rng.standard_normal(8).astype(np.float32)]
  grads = [tf.constant(rng.standard_normal(i.shape), tf.float32) for i in inits]
  names = ["mirrored/kernel", "mirrored/scale"]

  strategy = tf.distribute.MirroredStrategy(devices)
  with strategy.scope():
    params = [tf.Variable(i, name=n) for i, n in zip(inits, names)]
    opt = optimizer.Adafactor(beta1=0.9)
    opt.build(params)
    cross_params = [tf.Variable(i, name="cross/" + n) for i, n in zip(inits, names)]
    cross = optimizer.Adafactor(beta1=0.9)
    cross.build(cross_params)
  assert all(isinstance(s, tf.distribute.DistributedValues) for p in params for s in opt.slots_for(p).values())
  assert isinstance(opt.iterations, tf.distribute.DistributedValues)

  # The shell a trainer writes: each replica updates its own copy of a parameter and of its slots.
  @tf.function
  def replica_step(lr):
    step = opt.iterations.read_value()

    def apply(param, grad):
      slots = opt.slots_for(param)  # param is one replica's component, named ".../replica_1" on the second
      new_param, new_slots = opt.update(param, grad, {k: v.read_value() for k, v in slots.items()}, step, lr)
      for k, v in new_slots.items():
        slots[k].assign(v)
      return param.assign(new_param)

    for param, grad in zip(params, grads):
      strategy.extended.update(param, apply, args=(grad,))
    opt.iterations.assign_add(1)

  plain_params = [tf.Variable(i, name=n) for i, n in zip(inits, names)]
  plain = optimizer.Adafactor(beta1=0.9)
  plain.build(plain_params)
  for lr in (0.01, 0.02, 0.005):
    replica_step(tf.constant(lr))
    cross.apply_gradients(grads, cross_params, tf.constant(lr))  # apply_gradients in cross-replica context
    plain.apply_gradients(grads, plain_params, tf.constant(lr))

  assert opt.iterations.numpy() == cross.iterations.numpy() == 3
  for p, c, q in zip(params, cross_params, plain_params):
    for replica in p.values + c.values:
      np.testing.assert_allclose(replica.numpy(), q.numpy(), rtol=1e-6, atol=1e-7)
    for k, want in plain.slots_for(q).items():
      for replica in opt.slots_for(p)[k].values + cross.slots_for(c)[k].values:
        np.testing.assert_allclose(replica.numpy(), want.numpy(), rtol=1e-6, atol=1e-7)
