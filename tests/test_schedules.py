"""The learning-rate schedules against a plain-Python transcription of Meliad's formulas."""

import math

import gin
import numpy as np
import pytest
import tensorflow as tf

from meliad_tf.training import schedules


MAX_STEPS = 10_000

# float32 schedule arithmetic against float64 formulas.
RTOL = 1e-5


# ---- The formulas, transcribed from the spec in plain Python (float64). ----

def ref_constant(step, max_steps, learning_rate=0.01):
  return learning_rate


def ref_rsqrt_decay_std(step, max_steps, max_lr=None):
  lr = 1.0 / math.sqrt(max(step, 100))
  return lr if max_lr is None else min(lr, max_lr)


def ref_rsqrt_decay(step, max_steps, max_lr=0.05, min_lr=0.001):
  return min(max_lr, min_lr / math.sqrt(max(step, 100) / max_steps))


def ref_exponential_decay(step, max_steps, max_lr=0.01, min_lr=0.001):
  return max_lr * (min_lr / max_lr) ** (step / max_steps)


def ref_linear_decay(step, max_steps, max_lr=0.01, min_lr=0.001, decay_after=True):
  if decay_after and step >= max_steps:
    return 2 * min_lr * 0.5 ** (step / max_steps)
  return max(min_lr, min_lr + (max_lr - min_lr) * (max_steps - step) / max_steps)


def ref_cosine_decay(step, max_steps, max_lr=0.01, min_lr=0.001, decay_after=True, spike_steps=0, spike_lr=0.0):
  if decay_after and step >= max_steps:
    return 2 * min_lr * 0.5 ** (step / max_steps)
  r = min(step, max_steps) / max_steps
  lr = min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * r)) / 2
  if spike_steps > 0 and spike_lr > 0:
    lr = max(lr, spike_lr * (spike_steps - step) / spike_steps)
  return lr


def ref_learning_rate(step, schedule, max_steps, warmup_steps, multiplier, base_learning_rate):
  if warmup_steps > 0:
    ramp = min(step, warmup_steps) / warmup_steps
    step = max(step, warmup_steps)
  else:
    ramp = 1.0
  return schedule(step, max_steps) * base_learning_rate * ramp * multiplier


# (name, implementation, reference, hyperparameters): Meliad's defaults and the option files' bindings.
SCHEDULES = [
    ("constant", schedules.lr_constant, ref_constant, {}),
    ("rsqrt_std", schedules.lr_rsqrt_decay_std, ref_rsqrt_decay_std, {}),
    ("rsqrt_std_clipped", schedules.lr_rsqrt_decay_std, ref_rsqrt_decay_std, {"max_lr": 0.02}),
    ("rsqrt", schedules.lr_rsqrt_decay, ref_rsqrt_decay, {"max_lr": 0.05, "min_lr": 0.001}),
    ("exponential", schedules.lr_exponential_decay, ref_exponential_decay, {}),
    ("linear", schedules.lr_linear_decay, ref_linear_decay, {}),
    ("linear_no_tail", schedules.lr_linear_decay, ref_linear_decay, {"decay_after": False}),
    ("cosine", schedules.lr_cosine_decay, ref_cosine_decay, {}),
    ("cosine_no_tail", schedules.lr_cosine_decay, ref_cosine_decay, {"decay_after": False}),
    ("cosine_spike", schedules.lr_cosine_decay, ref_cosine_decay, {"spike_steps": 2_000, "spike_lr": 0.04}),
]
SCHEDULE_IDS = [s[0] for s in SCHEDULES]

# Step 0, inside the rsqrt floor, warm-up, mid-decay, around max_steps, and several max_steps beyond.
STEPS = [0, 1, 10, 50, 99, 100, 101, 500, 999, 1000, 1001, 1999, 2000, 2001, 3333, 5000, 9999, 10_000, 10_001,
         15_000, 20_000, 30_000, 100_000]


def _bind(fn, hparams):
  return lambda step, max_steps: fn(step, max_steps, **hparams)


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  gin.clear_config()


@pytest.mark.parametrize("name,fn,ref,hparams", SCHEDULES, ids=SCHEDULE_IDS)
def test_schedule_matches_formula(name, fn, ref, hparams):
  del name
  got = fn(tf.constant(STEPS, tf.float32), MAX_STEPS, **hparams).numpy()
  want = [ref(s, MAX_STEPS, **hparams) for s in STEPS]
  assert got.dtype == np.float32
  np.testing.assert_allclose(np.broadcast_to(got, (len(STEPS),)), want, rtol=RTOL)


@pytest.mark.parametrize("warmup_steps", [0, 1, 100, 1000])
@pytest.mark.parametrize("name,fn,ref,hparams", SCHEDULES, ids=SCHEDULE_IDS)
def test_learning_rate_matches_formula(name, fn, ref, hparams, warmup_steps):
  del name
  got = schedules.learning_rate(tf.constant(STEPS, tf.float32), _bind(fn, hparams), MAX_STEPS, warmup_steps,
                                multiplier=0.5, base_learning_rate=2.0).numpy()
  want = [ref_learning_rate(s, _bind(ref, hparams), MAX_STEPS, warmup_steps, 0.5, 2.0) for s in STEPS]
  np.testing.assert_allclose(got, want, rtol=RTOL)


@pytest.mark.parametrize("name,fn,ref,hparams", SCHEDULES, ids=SCHEDULE_IDS)
def test_rate_is_exactly_zero_at_step_zero(name, fn, ref, hparams):
  del name, ref
  lr = schedules.learning_rate(tf.constant(0.0), _bind(fn, hparams), MAX_STEPS, 1000, 1.0, 1.0)
  assert lr.numpy() == 0.0


def test_warmup_ramps_linearly_to_the_frozen_schedule_value():
  warm = 1000
  at_end = schedules.lr_cosine_decay(tf.constant(float(warm)), MAX_STEPS).numpy()
  steps = tf.constant([0.0, 1.0, 250.0, 500.0, 999.0, 1000.0])
  got = schedules.learning_rate(steps, schedules.lr_cosine_decay, MAX_STEPS, warm, 1.0, 1.0).numpy()
  np.testing.assert_allclose(got, at_end * steps.numpy() / warm, rtol=1e-6)
  assert got[-1] == at_end  # the full scheduled value, unscaled, once warm-up ends


def test_rates_at_and_beyond_max_steps_halve_every_max_steps():
  steps = tf.constant([MAX_STEPS * k for k in (1.0, 2.0, 3.0, 5.0)])
  for fn in (schedules.lr_cosine_decay, schedules.lr_linear_decay):
    got = fn(steps, MAX_STEPS, max_lr=0.01, min_lr=0.001).numpy()
    np.testing.assert_allclose(got, [0.001, 0.0005, 0.00025, 0.0000625], rtol=1e-6)
    flat = fn(steps, MAX_STEPS, max_lr=0.01, min_lr=0.001, decay_after=False).numpy()
    np.testing.assert_allclose(flat, 0.001, rtol=1e-6)


def test_tail_is_continuous_at_max_steps():
  for fn in (schedules.lr_cosine_decay, schedules.lr_linear_decay):
    before, at, after = fn(tf.constant([MAX_STEPS - 1.0, MAX_STEPS, MAX_STEPS + 1.0]), MAX_STEPS).numpy()
    assert before >= at >= after
    np.testing.assert_allclose([before, after], at, rtol=1e-3)  # one step moves linear decay by 0.09%


def test_rsqrt_schedules_floor_the_step_at_100():
  steps = tf.constant([0.0, 1.0, 37.0, 99.0, 100.0])
  std = schedules.lr_rsqrt_decay_std(steps, MAX_STEPS).numpy()
  np.testing.assert_allclose(std, 0.1, rtol=1e-6)
  scaled = schedules.lr_rsqrt_decay(steps, MAX_STEPS, max_lr=1.0, min_lr=0.001).numpy()
  np.testing.assert_allclose(scaled, 0.001 / math.sqrt(100 / MAX_STEPS), rtol=1e-6)
  # And without warm-up the composed rate stays finite at step 0.
  lr0 = schedules.learning_rate(tf.constant(0.0), schedules.lr_rsqrt_decay_std, MAX_STEPS, 0, 1.0, 1.0)
  assert lr0.numpy() == pytest.approx(0.1)


def test_rsqrt_std_peak_after_1000_warmup_steps():
  lr = schedules.learning_rate(tf.constant(1000.0), schedules.lr_rsqrt_decay_std, MAX_STEPS, 1000, 1.0, 1.0)
  assert lr.numpy() == pytest.approx(1 / math.sqrt(1000), rel=1e-6)


def test_spike_falls_linearly_from_spike_lr_then_yields_to_cosine():
  spike = {"spike_steps": 10_000, "spike_lr": 0.04}
  steps = tf.constant([0.0, 2_000.0, 5_000.0, 9_000.0, 10_000.0, 20_000.0])
  got = schedules.lr_cosine_decay(steps, 100_000, **spike).numpy()
  plain = schedules.lr_cosine_decay(steps, 100_000).numpy()
  np.testing.assert_allclose(got[:3], [0.04, 0.032, 0.02], rtol=1e-6)
  np.testing.assert_allclose(got[3:], plain[3:], rtol=1e-6)  # below the cosine from about step 7,500


def test_multiplier_and_base_rate_scale_the_rate():
  step = tf.constant(4321.0)
  one = schedules.learning_rate(step, schedules.lr_cosine_decay, MAX_STEPS, 1000, 1.0, 1.0).numpy()
  scaled = schedules.learning_rate(step, schedules.lr_cosine_decay, MAX_STEPS, 1000, 2.0, 0.5).numpy()
  doubled = schedules.learning_rate(step, schedules.lr_cosine_decay, MAX_STEPS, 1000, 2.0, 1.0).numpy()
  assert scaled == pytest.approx(one, rel=1e-6)
  assert doubled == pytest.approx(2 * one, rel=1e-6)


def test_no_warmup_means_no_ramp():
  got = schedules.learning_rate(tf.constant([0.0, 10.0]), schedules.lr_cosine_decay, MAX_STEPS, 0, 1.0, 1.0)
  want = schedules.lr_cosine_decay(tf.constant([0.0, 10.0]), MAX_STEPS)
  np.testing.assert_array_equal(got.numpy(), want.numpy())
  assert got.numpy()[0] == pytest.approx(0.01)


def test_integer_steps_are_accepted():
  from_int = schedules.learning_rate(tf.constant(1234, tf.int64), schedules.lr_cosine_decay, MAX_STEPS, 100, 1.0,
                                     1.0)
  from_float = schedules.learning_rate(tf.constant(1234.0), schedules.lr_cosine_decay, MAX_STEPS, 100, 1.0, 1.0)
  assert from_int.dtype == tf.float32
  assert from_int.numpy() == from_float.numpy()


@pytest.mark.parametrize("name,fn,ref,hparams", SCHEDULES, ids=SCHEDULE_IDS)
def test_runs_under_xla_and_agrees_with_eager(name, fn, ref, hparams):
  del name, ref
  schedule = _bind(fn, hparams)

  @tf.function(jit_compile=True)
  def compiled(step):
    return schedules.learning_rate(step, schedule, MAX_STEPS, 1000, 1.0, 1.0)

  for step in (0.0, 500.0, 1000.0, 7000.0, 10_000.0, 25_000.0):
    eager = schedules.learning_rate(tf.constant(step), schedule, MAX_STEPS, 1000, 1.0, 1.0).numpy()
    np.testing.assert_allclose(compiled(tf.constant(step)).numpy(), eager, rtol=1e-6)


@pytest.mark.parametrize("call,parameter", [
    (lambda: schedules.lr_cosine_decay(0.0, MAX_STEPS, max_lr=0.001, min_lr=0.01), "max_lr"),
    (lambda: schedules.lr_linear_decay(0.0, MAX_STEPS, max_lr=0.01, min_lr=0.01), "max_lr"),
    (lambda: schedules.lr_exponential_decay(0.0, MAX_STEPS, max_lr=0.01, min_lr=-0.001), "min_lr"),
    (lambda: schedules.lr_rsqrt_decay(0.0, MAX_STEPS, max_lr=0.0001, min_lr=0.001), "max_lr"),
    (lambda: schedules.lr_rsqrt_decay_std(0.0, MAX_STEPS, max_lr=0.0), "max_lr"),
    (lambda: schedules.lr_cosine_decay(0.0, 0), "max_steps"),
    (lambda: schedules.lr_linear_decay(0.0, -5), "max_steps"),
    (lambda: schedules.lr_rsqrt_decay(0.0, 0), "max_steps"),
    (lambda: schedules.lr_cosine_decay(0.0, MAX_STEPS, spike_steps=100, spike_lr=0.005), "spike_lr"),
    (lambda: schedules.lr_cosine_decay(0.0, MAX_STEPS, spike_steps=-1), "spike_steps"),
    (lambda: schedules.lr_constant(0.0, MAX_STEPS, learning_rate=-1.0), "learning_rate"),
    (lambda: schedules.learning_rate(0.0, schedules.lr_cosine_decay, 0, 10, 1.0, 1.0), "max_steps"),
    (lambda: schedules.learning_rate(0.0, schedules.lr_cosine_decay, MAX_STEPS, -1, 1.0, 1.0), "warmup_steps"),
    (lambda: schedules.learning_rate(0.0, schedules.lr_cosine_decay, MAX_STEPS, None, 1.0, 1.0), "warmup_steps"),
    (lambda: schedules.learning_rate(0.0, schedules.lr_cosine_decay, MAX_STEPS, 10, -1.0, 1.0), "multiplier"),
])
def test_bad_hyperparameters_raise_value_error_naming_them(call, parameter):
  with pytest.raises(ValueError, match=parameter):
    call()


def test_bad_hyperparameters_fail_when_traced_not_when_run():
  @tf.function(jit_compile=True)
  def compiled(step):
    return schedules.learning_rate(step, schedules.lr_cosine_decay, MAX_STEPS, -1, 1.0, 1.0)

  with pytest.raises(ValueError, match="warmup_steps"):
    compiled(tf.constant(1.0))


def test_gin_bindings_use_meliads_names():
  gin.parse_config("""
      optimizer_config.lr_cosine_decay.max_lr = 0.02
      optimizer_config.lr_cosine_decay.min_lr = 0.002
      optimizer_config.lr_cosine_decay.spike_steps = 1000
      optimizer_config.lr_cosine_decay.spike_lr = 0.04
      optimizer_config.lr_rsqrt_decay.max_lr = 0.05
      optimizer_config.lr_rsqrt_decay.min_lr = 0.001
      optimizer_config.lr_rsqrt_decay_std.max_lr = None
      optimizer_config.lr_linear_decay.decay_after = False
      optimizer_config.lr_exponential_decay.min_lr = 0.0005
      optimizer_config.lr_constant.learning_rate = 0.3
  """)
  step = tf.constant(500.0)
  assert schedules.lr_cosine_decay(step, MAX_STEPS).numpy() == pytest.approx(0.04 * 0.5, rel=1e-6)
  assert schedules.lr_cosine_decay(tf.constant(float(MAX_STEPS)), MAX_STEPS).numpy() == pytest.approx(0.002)
  assert schedules.lr_linear_decay(tf.constant(2.0 * MAX_STEPS), MAX_STEPS).numpy() == pytest.approx(0.001)
  assert schedules.lr_exponential_decay(tf.constant(float(MAX_STEPS)), MAX_STEPS).numpy() == pytest.approx(0.0005)
  assert schedules.lr_constant(step, MAX_STEPS).numpy() == pytest.approx(0.3)
  for name in ("lr_constant", "lr_rsqrt_decay", "lr_rsqrt_decay_std", "lr_cosine_decay", "lr_linear_decay",
               "lr_exponential_decay"):
    assert gin.get_configurable(f"optimizer_config.{name}") is getattr(schedules, name)
