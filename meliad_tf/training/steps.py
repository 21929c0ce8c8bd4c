"""The compiled steps: how every step is compiled, and the training and test steps.

`compile_step` is the one way a step is compiled, for the trainer, the scoring module and
generation: an XLA program, or, when a memory is searched on the host (ScaNN, a Python call
that XLA cannot hold), XLA clusters around that call (`xla_around_host_calls`), or a plain
graph, or (for debugging) no compilation at all.

`TrainingSteps` builds, for a model, its optimizer and its per-stream states under a
tf.distribute strategy, the training function, which runs up to `steps_per_loop` steps per
call in a loop in the graph, and the test step. Each replica computes its streams'
gradients; gradients are averaged across replicas (Meliad's pmean), every replica uses the
same dropout seed, so N replicas compute what one device would on the same global batch.
A stop vote (the signals hosts received) is summed inside each training call, so that all
hosts learn of it after the same step.
"""

import signal

import numpy as np
import tensorflow as tf

from meliad_tf.layers import scopes
from meliad_tf.model import language_model
from meliad_tf.training import distribution
from meliad_tf.training import optimizer as optimizer_lib


# Batch fields the compiled steps take; the rest (document indices, epochs) stays on the host.
MODEL_INPUTS = ("targets", "start_of_sequence", "loss_mask", "num_chars", "answer_mask")
# A metric of every training step: 1.0 when its loss and gradients are all finite.
ALL_FINITE = "all_finite"
# The signals a host can vote for, in the order of the vote vector: SIGTERM wins over
# SIGINT when hosts received different ones, since a preemption is coming either way.
VOTED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def xla_around_host_calls(fn):
  """`fn`, with the ops it creates marked for XLA.

  XLA cannot compile a function that calls the host, so a step with a memory searched by
  ScaNN cannot be one XLA program. Under this scope TensorFlow's clustering pass compiles
  the ops on either side of the host call instead (the layers before the memory's search,
  those after it, the backward pass, the optimizer) as XLA clusters, and leaves out the
  host call (`tf.numpy_function`, which has no XLA kernel) for the graph to run between
  them.
  """

  def compiled_around_host_calls(*args, **kwargs):
    with tf.xla.experimental.jit_scope():
      return fn(*args, **kwargs)

  return compiled_around_host_calls


def compile_step(fn, jit_compile, calls_host=False, eager=False, input_signature=None):
  """`fn` compiled as a step.

  Args:
    fn: the step.
    jit_compile: compile with XLA (around the host call when `calls_host`).
    calls_host: the step calls the host (a memory searched by ScaNN).
    eager: no compilation (Trainer.trace_debug_mode).
    input_signature: as tf.function's.
  """
  if eager:
    return fn
  if jit_compile and calls_host:
    return tf.function(xla_around_host_calls(fn), input_signature=input_signature)
  return tf.function(fn, jit_compile=jit_compile, input_signature=input_signature)


@scopes.scoped("finite_check")
def _all_finite(loss, grads):
  """A bool scalar: the loss and every gradient are finite."""
  checks = [tf.reduce_all(tf.math.is_finite(loss))]
  checks += [tf.reduce_all(tf.math.is_finite(g)) for g in grads]
  return tf.reduce_all(tf.stack(checks))


def scalar_metrics(metrics):
  """The scalar metrics: the model also returns per-token losses and predictions when built
  with `output_token_losses` (for scoring), which summaries do not take."""
  return {key: value for key, value in metrics.items() if value.shape.rank == 0}


class TrainingSteps:
  """The compiled training loop and test step of one model.

  Args:
    model: a `DecoderOnlyLanguageModel`.
    optimizer: its built optimizer (slots for every trainable variable).
    strategy: the tf.distribute strategy the model and optimizer were built under.
    train_state, test_state: the streams' `StreamState` of each mode.
    learning_rate: optimizer step (int tensor) -> learning rate.
    random_seed: seed of the dropout masks, with the optimizer step.
    batch_size: B, streams per replica.
    steps_per_loop: training steps per call at most.
    skip_nonfinite_steps: a step whose loss or gradients are not finite leaves parameters,
      slots and state as they were.
    jit_compile: compile with XLA.
    eager: no compilation (debugging).
  """

  def __init__(self, model, optimizer, strategy, train_state, test_state, *, learning_rate,
               random_seed, batch_size, steps_per_loop=1, skip_nonfinite_steps=False,
               jit_compile=True, eager=False):
    self.model = model
    self.optimizer = optimizer
    self.strategy = strategy
    self.train_state = train_state
    self.test_state = test_state
    self.learning_rate = learning_rate
    self.random_seed = random_seed
    self.batch_size = batch_size
    self.steps_per_loop = steps_per_loop
    self.skip_nonfinite_steps = skip_nonfinite_steps
    self.params = list(model.trainable_variables)
    self.metric_keys = []
    calls_host = bool(model.decoder.host_search_layers)
    compile_fn = lambda f: compile_step(f, jit_compile, calls_host, eager)
    if strategy.num_replicas_in_sync == 1:
      # One program for the whole loop, optimizer included.
      self._forward_backward, self._evaluate, outer = (
          self._replica_forward_backward, self._replica_evaluate, compile_fn)
    else:
      # Each replica's pass is compiled; the all-reduce and the update run around it.
      self._forward_backward = compile_fn(self._replica_forward_backward)
      self._evaluate = compile_fn(self._replica_evaluate)
      outer = (lambda f: f) if eager else tf.function
    self.train_function = outer(self._train_loop)
    self.test_function = outer(self._test_step)

  def _dropout_seed(self, step):
    return tf.stack([tf.constant(self.random_seed, tf.int64), tf.cast(step, tf.int64)])

  def _replica_forward_backward(self, batch, seed):
    """One replica's gradients, metrics and its streams' new training state.

    Every replica gets the same dropout seed: Meliad's masks are shared by all streams,
    so with the same seed several replicas compute what one device would.
    """
    with tf.GradientTape() as tape:
      _, metrics, new_state = self.model(batch, self.train_state.read(), training=True,
                                         seed=seed)
      loss = metrics["loss"]
    grads = tape.gradient(loss, self.params)
    grads = [tf.zeros_like(p) if g is None else tf.convert_to_tensor(g)
             for g, p in zip(grads, self.params)]
    return grads, scalar_metrics(metrics), new_state

  def _store_train_state(self, new_state, all_finite):
    """Keeps the streams' new state; a skipped non-finite step keeps the old one (replica
    context)."""
    if self.skip_nonfinite_steps:
      new_state = tf.nest.map_structure(lambda new, old: tf.where(all_finite, new, old),
                                        new_state, self.train_state.read())
    self.train_state.assign(new_state)

  def _replica_evaluate(self, batch):
    _, metrics, new_state = self.model(batch, self.test_state.read(), training=False)
    self.test_state.assign(new_state)
    return scalar_metrics(metrics)

  def _train_step(self, batches, index):
    learning_rate = self.learning_rate(self.optimizer.iterations)
    seed = self._dropout_seed(self.optimizer.iterations)
    # A Python function around the compiled one: handed a tf.function directly,
    # MirroredStrategy traces it once and every replica then reads replica 0's state.
    grads, metrics, new_state = self.strategy.run(
        lambda b, s: self._forward_backward(tf.nest.map_structure(lambda x: x[index], b), s),
        (batches, seed))
    # Each replica's loss is the sum over its streams; gradients are averaged (pmean).
    # One reduction per gradient: MultiWorkerMirroredStrategy cannot reduce a list whose
    # tensors differ in rank in one call.
    grads = [self.strategy.reduce(tf.distribute.ReduceOp.MEAN, g, axis=None) for g in grads]
    metrics = self._reduce_metrics(metrics)
    # One decision for all replicas, so that a skipped step leaves every stream as it was.
    finite = _all_finite(metrics["loss"], grads)
    self.strategy.run(lambda s, f: self._store_train_state(s, f), (new_state, finite))
    self._apply_on_every_replica(grads, learning_rate,
                                 finite if self.skip_nonfinite_steps else None)
    return dict(metrics, learning_rate=learning_rate,
                **{ALL_FINITE: tf.cast(finite, tf.float32)})

  def _metrics_row(self, metrics):
    # The keys are known once the step is traced; the host reads the rows by them.
    self.metric_keys = sorted(metrics)
    return tf.stack([tf.cast(metrics[k], tf.float32) for k in self.metric_keys])

  def _train_loop(self, batches, num_steps, stop_votes):
    """Runs `num_steps` steps on `batches` (fields [steps_per_loop, B, ...]).

    Returns:
      ([steps_per_loop, len(metric_keys)] float32 rows of the steps' metrics, zero past
      `num_steps`; the stop votes [len(VOTED_SIGNALS)] summed over the replicas).
    """
    if self.steps_per_loop == 1:
      rows = self._metrics_row(self._train_step(batches, 0))[tf.newaxis]
    else:
      rows = tf.TensorArray(tf.float32, size=self.steps_per_loop)
      for index in tf.range(num_steps):
        rows = rows.write(index, self._metrics_row(self._train_step(batches, index)))
      rows = rows.stack()
    votes = self.strategy.reduce(tf.distribute.ReduceOp.SUM, stop_votes, axis=None)
    return rows, votes

  def _test_step(self, batch):
    return self._reduce_metrics(self.strategy.run(lambda b: self._evaluate(b), (batch,)))

  def _reduce_metrics(self, per_replica):
    """Counts add up across replicas; diagnostics are averaged."""
    return {key: self.strategy.reduce(
        tf.distribute.ReduceOp.MEAN if key.startswith(language_model.DIAGNOSTICS_PREFIX)
        else tf.distribute.ReduceOp.SUM, value, axis=None)
            for key, value in per_replica.items()}

  @scopes.scoped("optimizer")
  def _apply_on_every_replica(self, grads, learning_rate, all_finite=None):
    """The optimizer update, applied to each replica's copy of every parameter.

    With `all_finite` (a bool scalar) given, a step where it is False leaves the parameters
    and slots as they were; the step count moves on either way.
    """
    step = self.optimizer.iterations.read_value()
    for param, grad in zip(self.params, grads):
      slots = self.optimizer.slots_for(param)
      names = sorted(slots)

      def update(param_copy, grad, *slot_copies, names=names,
                 param_name=optimizer_lib.param_key(param)):
        old_slots = {name: slot.read_value() for name, slot in zip(names, slot_copies)}
        old_param = param_copy.read_value()
        new_param, new_slots = self.optimizer.update(old_param, grad, old_slots, step,
                                                     learning_rate, param_name=param_name)
        if all_finite is not None:
          new_param = tf.where(all_finite, new_param, old_param)
          new_slots = {name: tf.where(all_finite, new_slots[name], old_slots[name])
                       for name in names}
        param_copy.assign(new_param)
        for name, slot in zip(names, slot_copies):
          slot.assign(new_slots[name])

      self.strategy.extended.update(param, update, args=(grad, *[slots[n] for n in names]),
                                    group=False)
    self.optimizer.iterations.assign_add(1)

  # ---------------------------------------------------------------------------------------
  # Host side

  def model_inputs(self, host_batch):
    """A host batch's model inputs, split across this host's replicas."""
    inputs = {key: host_batch[key] for key in MODEL_INPUTS if key in host_batch}
    return distribution.split_streams(self.strategy, inputs, self.batch_size)

  def training_arguments(self, host_batches, stop_signal=None):
    """The arguments of `train_function` for 1 to `steps_per_loop` host batches.

    Args:
      host_batches: a list of this host's batches, one per step.
      stop_signal: a signal this host received, voted for inside the call (None: none).
    """
    num_steps = len(host_batches)
    if not 1 <= num_steps <= self.steps_per_loop:
      raise ValueError(f"{num_steps} batches for a loop of 1 to {self.steps_per_loop} steps")
    stacked = {}
    for key in MODEL_INPUTS:
      if key in host_batches[0]:
        values = [batch[key] for batch in host_batches]
        # The loop's inputs keep one shape; it never reads the padding.
        values += [tf.zeros_like(values[0])] * (self.steps_per_loop - num_steps)
        stacked[key] = tf.stack(values)
    votes = np.zeros([len(VOTED_SIGNALS)], np.float32)
    if stop_signal is not None:
      votes[VOTED_SIGNALS.index(stop_signal)] = 1.0
    return (distribution.split_streams(self.strategy, stacked, self.batch_size, axis=1),
            tf.constant(num_steps),
            distribution.on_every_replica(self.strategy, tf.constant(votes)))

  def train(self, host_batches, stop_signal=None):
    """Runs one training step per host batch in one call.

    Returns:
      (one dict of metric sums per step, the signal that some host voted for or None).
    """
    rows, votes = self.train_function(*self.training_arguments(host_batches, stop_signal))
    rows = rows.numpy()
    metrics = [dict(zip(self.metric_keys, rows[i])) for i in range(len(host_batches))]
    voted = next((s for s, v in zip(VOTED_SIGNALS, votes.numpy()) if v > 0), None)
    return metrics, voted

  def test(self, host_batch):
    """One test step on a host batch; returns its metric sums (tensors)."""
    return self.test_function(self.model_inputs(host_batch))
