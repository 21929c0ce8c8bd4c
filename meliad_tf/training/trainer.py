"""The training loop: XLA-compiled steps, per-stream state, test cycles, checkpoints, summaries.

The loop follows Meliad's `Trainer.train`: a train step per iteration; every
`test_every_steps`, `num_test_steps` test steps on the test stream with its own
persistent state; a checkpoint every `checkpoint_every_steps` and at the end. A
checkpoint holds the parameters, the optimizer slots and step, both modes' per-stream
state and both data iterators, so a run killed at any moment and started again with the
same command continues from its last checkpoint with the losses of a run never interrupted.
SIGTERM (a preemption notice) and SIGINT stop the loop at the next step boundary, after a
checkpoint. A non-finite loss stops the run before anything more is saved, or with
`skip_nonfinite_steps` leaves that step without effect.

Each call of the compiled training function runs up to `steps_per_loop` steps in a loop
(what keeps a TPU busy); a call ends early where periodic work is due, so summaries, test
cycles and checkpoints come at the same steps whatever `steps_per_loop` is.

Several hosts (MultiWorkerMirroredStrategy): every host runs this loop on its own streams;
the chief alone writes the workdir (config, summaries, step losses, checkpoints). A signal
on any host is voted inside the next training call, so that every host stops after the
same step and the checkpoint they save together is consistent. A host that dies makes the
others' next collective fail (TensorFlow's coordination service notices the missing
heartbeats within seconds), and they stop with `WorkerLostError`.
"""

import json
import os
import signal
import threading

from absl import logging
import gin
import numpy as np
import tensorflow as tf

import pipelines
from meliad_tf.training import checkpoints
from meliad_tf.training import distribution
from meliad_tf.model import language_model as model_lib
from meliad_tf.training import optimizer as optimizer_lib
from meliad_tf.layers import scopes
from meliad_tf.training import schedules
from meliad_tf.training import state as state_lib
from meliad_tf.common import storage
from meliad_tf.training import summaries

# Batch fields the compiled steps take; the rest (document ids, epochs) stays on the host.
MODEL_INPUTS = ("targets", "start_of_sequence", "loss_mask", "num_chars", "answer_mask")


def should_run(step, every):
  """Meliad's schedule for periodic work: never at step 0, never when `every` is 0."""
  return step > 0 and every > 0 and step % every == 0


# A metric of every training step: 1.0 when its loss and gradients are all finite.
ALL_FINITE = "all_finite"
# Per-step training losses, JSON lines in the workdir (Trainer.record_step_losses).
STEP_LOSSES_FILE = "step_losses.jsonl"


def xla_around_host_calls(fn):
  """`fn`, with the ops it creates marked for XLA.

  XLA cannot compile a function that calls the host, so a step with a memory searched by
  ScaNN cannot be one XLA program. Under this scope TensorFlow's clustering pass compiles
  the ops on either side of the host call instead (the layers before the memory's search,
  those after it, the backward pass, the optimizer) as XLA clusters, and leaves out the
  host call (`tf.numpy_function`, which has no XLA kernel) for the graph to run between
  them.
  """

  def compiled_around_host_calls(*args):
    with tf.xla.experimental.jit_scope():
      return fn(*args)

  return compiled_around_host_calls


@scopes.scoped("finite_check")
def _all_finite(loss, grads):
  """A bool scalar: the loss and every gradient are finite."""
  checks = [tf.reduce_all(tf.math.is_finite(loss))]
  checks += [tf.reduce_all(tf.math.is_finite(g)) for g in grads]
  return tf.reduce_all(tf.stack(checks))


class NonFiniteLossError(RuntimeError):
  """A training step's loss or gradients were not finite (Trainer.skip_nonfinite_steps off)."""


class DataError(ValueError):
  """The input pipeline failed on the data (an unreadable file, a byte it cannot encode)."""


class TrainingInterrupted(Exception):
  """SIGTERM or SIGINT stopped the run at a step boundary, after a checkpoint.

  Attributes:
    signal_number: the signal received, by this host or another one (meliad-train exits
      with 128 + it).
  """

  def __init__(self, message, signal_number):
    super().__init__(message)
    self.signal_number = signal_number


class WorkerLostError(RuntimeError):
  """Another host of the cluster stopped answering (it died, or its network did)."""


# What bad input (configuration, data, workdir, disk) raises from Trainer.build and
# Trainer.train; meliad-train prints their message without a traceback.
USER_ERRORS = (ValueError, OSError, NonFiniteLossError, WorkerLostError)
# What a collective raises when a peer host is gone: the coordination service reports the
# missing heartbeats (Unavailable), or the peer's connection breaks (Aborted, Cancelled,
# DeadlineExceeded).
_PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.AbortedError,
                  tf.errors.CancelledError, tf.errors.DeadlineExceededError)
# The signals a host can vote for, in the order of the vote vector: SIGTERM wins over
# SIGINT when hosts received different ones, since a preemption is coming either way.
_VOTED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@gin.configurable(module="training_loop")
class Trainer:
  """Meliad's trainer, with its gin names.

  Args:
    model_definition: builds the model (gin: DecoderOnlyLanguageModel).
    num_steps: training steps in all (the step count continues across restarts).
    status_every_steps: progress line on the log every N steps.
    log_every_steps: TensorBoard training scalars every N steps.
    test_every_steps, num_test_steps: a test cycle of N steps every M training steps.
    generate_every_steps: sampling during training; only 0 is supported here (generation
      is a tool of its own).
    print_input_every_steps: write the decoded input of stream 0 as a text summary.
    parameter_metrics_every_steps: parameter mean and std summaries (0: at checkpoints).
    checkpoint_every_steps: checkpoint period (and always at the end).
    save_checkpoints, restore_checkpoints: as in Meliad.
    restore_state_variables: restore the caches/states/memories with the parameters.
    use_separate_metric_directories: one TensorBoard directory per mode.
    optimizer_factory: an optimizer config with `create()` and `learning_rate`.
    learning_rate_schedule: a schedule function (gin: lr_cosine_decay).
    max_scheduled_steps: the schedule's horizon; 0 means num_steps.
    warmup_steps: linear warm-up from a learning rate of 0.
    learning_rate_multiplier: scales the schedule.
    rng_key_names: accepted for compatibility; dropout seeds derive from random_seed.
    random_seed: seed of the initialisation, the data order and the dropout masks.
    replicate_mode: accepted for compatibility (replication follows the strategy).
    trace_debug_mode: run the steps eagerly, without tf.function, for debugging.
    print_variables: log every parameter's name and shape at start.
    jit_compile: compile the steps with XLA; with a memory searched on the host (the scann
      backend), everything in them but the search (`xla_around_host_calls`).
    max_checkpoints_to_keep: Meliad keeps 1; with more, a restore falls back to an older
      checkpoint when the newest cannot be read.
    skip_nonfinite_steps: a step whose loss or gradients are not finite leaves the
      parameters, optimizer slots and per-stream state as they were (the step count and
      the data move on) and is counted in `train/skipped_steps`; off, such a step stops
      the run with NonFiniteLossError before anything is saved.
    record_step_losses: append every step's training loss to `<workdir>/step_losses.jsonl`
      as `{"step": s, "loss": x}` (null and `"skipped": true` for a skipped step). A
      restarted run first drops the records of the steps it repeats (those after its
      checkpoint). On a local disk each record is flushed as it is written; on other
      filesystems (a bucket) at checkpoints and at the end.
    steps_per_loop: training steps per call of the compiled training function (a loop in
      the graph, as Orbit's `use_tf_while_loop`); fewer where periodic work comes sooner.
  """

  def __init__(self, model_definition=model_lib.DecoderOnlyLanguageModel, num_steps=250_000,
               status_every_steps=10, log_every_steps=1000, test_every_steps=1000,
               num_test_steps=400, generate_every_steps=0, print_input_every_steps=5000,
               parameter_metrics_every_steps=0, checkpoint_every_steps=5000,
               save_checkpoints=True, restore_checkpoints=True, restore_state_variables=True,
               use_separate_metric_directories=False, optimizer_factory=None,
               learning_rate_schedule=schedules.lr_cosine_decay, max_scheduled_steps=0,
               warmup_steps=1000, learning_rate_multiplier=1.0,
               rng_key_names=("dropout", "sample"), random_seed=42, replicate_mode=True,
               trace_debug_mode=False, print_variables=False, jit_compile=True,
               max_checkpoints_to_keep=1, skip_nonfinite_steps=False, record_step_losses=False,
               steps_per_loop=1):
    del rng_key_names, replicate_mode  # Dropout seeds are derived from (random_seed, step).
    for name, value in (("num_steps", num_steps), ("num_test_steps", num_test_steps),
                        ("status_every_steps", status_every_steps),
                        ("log_every_steps", log_every_steps),
                        ("test_every_steps", test_every_steps),
                        ("checkpoint_every_steps", checkpoint_every_steps),
                        ("print_input_every_steps", print_input_every_steps),
                        ("parameter_metrics_every_steps", parameter_metrics_every_steps),
                        ("random_seed", random_seed),
                        ("max_checkpoints_to_keep", max_checkpoints_to_keep),
                        ("steps_per_loop", steps_per_loop)):
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Trainer.{name} must be an integer, got {value!r}")
    for name, value in (("num_steps", num_steps), ("num_test_steps", num_test_steps)):
      if value < 0:
        raise ValueError(f"Trainer.{name} must be >= 0, got {value}")
    for name, value in (("status_every_steps", status_every_steps),
                        ("log_every_steps", log_every_steps),
                        ("test_every_steps", test_every_steps),
                        ("checkpoint_every_steps", checkpoint_every_steps),
                        ("print_input_every_steps", print_input_every_steps),
                        ("parameter_metrics_every_steps", parameter_metrics_every_steps)):
      if value < 0:
        raise ValueError(f"Trainer.{name} must be >= 0 (0 turns it off), got {value}")
    if generate_every_steps:
      logging.info("Trainer.generate_every_steps = %d is ignored: sample text with "
                   "meliad-generate instead", generate_every_steps)
    if max_checkpoints_to_keep < 1:
      raise ValueError(f"Trainer.max_checkpoints_to_keep must be >= 1, got "
                       f"{max_checkpoints_to_keep}")
    if steps_per_loop < 1:
      raise ValueError(f"Trainer.steps_per_loop must be >= 1, got {steps_per_loop}")
    self.model_definition = model_definition
    self.num_steps = num_steps
    self.status_every_steps = status_every_steps
    self.log_every_steps = log_every_steps
    self.test_every_steps = test_every_steps
    self.num_test_steps = num_test_steps
    self.print_input_every_steps = print_input_every_steps
    self.parameter_metrics_every_steps = parameter_metrics_every_steps
    self.checkpoint_every_steps = checkpoint_every_steps
    self.save_checkpoints = save_checkpoints
    self.restore_checkpoints = restore_checkpoints
    self.restore_state_variables = restore_state_variables
    self.use_separate_metric_directories = use_separate_metric_directories
    self.optimizer_config = optimizer_factory or optimizer_lib.FlaxAdafactorConfig()
    self.learning_rate_schedule = learning_rate_schedule
    self.max_scheduled_steps = max_scheduled_steps or num_steps
    self.warmup_steps = warmup_steps
    self.learning_rate_multiplier = learning_rate_multiplier
    self.random_seed = random_seed
    self.trace_debug_mode = trace_debug_mode
    self.print_variables = print_variables
    self.jit_compile = jit_compile and not trace_debug_mode
    self.max_checkpoints_to_keep = max_checkpoints_to_keep
    self.skip_nonfinite_steps = skip_nonfinite_steps
    self.record_step_losses = record_step_losses
    self.steps_per_loop = steps_per_loop

  # ---------------------------------------------------------------------------------------
  # Building

  def build(self, strategy=None):
    """Creates the model, optimizer, per-stream states, data iterators and step functions."""
    self.strategy = strategy or tf.distribute.get_strategy()
    self.is_chief = distribution.is_chief(self.strategy)
    tf.random.set_seed(self.random_seed)
    with self.strategy.scope():
      self.model = self.model_definition()
      self.optimizer = self.optimizer_config.create()
      self.params = list(self.model.trainable_variables)
      self.optimizer.build(self.params)
    self.task_config = self.model.task_config
    self.batch_size = self.task_config.batch_size
    self.sequence_length = self.task_config.sequence_length
    self.global_batch_size = self.batch_size * self.strategy.num_replicas_in_sync
    self.host_batch_size = self.batch_size * distribution.local_replica_count(self.strategy)
    self.task = pipelines.get_task(self.task_config.dataset_name)
    vocab_size = self.task.vocabulary.vocab_size
    if vocab_size > self.model.vocab_size:
      raise ValueError(
          f"the vocabulary of task {self.task_config.dataset_name!r} has {vocab_size} ids but "
          f"the embedding has {self.model.vocab_size} rows "
          f"(TransformerTaskConfig.vocab_size / NUM_EMBEDDINGS); set NUM_EMBEDDINGS >= "
          f"{vocab_size}")
    self.train_state = state_lib.StreamState(self.model.state_spec, self.batch_size,
                                             self.strategy, "train")
    self.test_state = state_lib.StreamState(self.model.state_spec, self.batch_size,
                                            self.strategy, "test")
    context = distribution.host_input_context(self.strategy)
    self.train_iterator = iter(self._dataset(self.task_config.train_split, self.random_seed,
                                             context))
    self.test_iterator = (iter(self._dataset(self.task_config.test_split, self.random_seed + 1,
                                             context))
                          if self.num_test_steps and self.test_every_steps else None)
    if (self.steps_per_loop > 1 and self.calls_host and self.jit_compile
        and self.strategy.num_replicas_in_sync > 1):
      # TensorFlow's clustering around the host call fails inside a loop over several
      # replicas (it merges the replicas' ops into one cluster); the host call costs a
      # round trip every step anyway.
      raise ValueError(
          f"Trainer.steps_per_loop = {self.steps_per_loop} is not supported with "
          f"{', '.join(self.model.decoder.host_search_layers)} searching their memory on the "
          "host (memory_on_tpu_factory.backend = 'scann') on several replicas with XLA; use "
          "Trainer.steps_per_loop = 1")
    # Calling the schedule once here puts its gin bindings in the operative config.
    self.learning_rate(tf.constant(0, tf.int64))
    self._build_steps()
    return self

  def _dataset(self, split, seed, context):
    return pipelines.load_text_dataset(
        self.task, split=split, sequence_length=self.sequence_length,
        batch_size=self.host_batch_size, training=True, seed=seed, input_context=context)

  @property
  def calls_host(self):
    """True when a memory layer searches on the host, so a step cannot be one XLA program."""
    return bool(self.model.decoder.host_search_layers)

  def learning_rate(self, step):
    return schedules.learning_rate(step, self.learning_rate_schedule, self.max_scheduled_steps,
                                   self.warmup_steps, self.learning_rate_multiplier,
                                   self.optimizer_config.learning_rate)

  def _dropout_seed(self, step):
    return tf.stack([tf.constant(self.random_seed, tf.int64), tf.cast(step, tf.int64)])

  def _forward_backward(self, batch, seed):
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
    return grads, _scalars(metrics), new_state

  def _store_train_state(self, new_state, all_finite):
    """Keeps the streams' new state; a skipped non-finite step keeps the old one (replica
    context)."""
    if self.skip_nonfinite_steps:
      new_state = tf.nest.map_structure(lambda new, old: tf.where(all_finite, new, old),
                                        new_state, self.train_state.read())
    self.train_state.assign(new_state)

  def _evaluate(self, batch):
    _, metrics, new_state = self.model(batch, self.test_state.read(), training=False)
    self.test_state.assign(new_state)
    return _scalars(metrics)

  def _build_steps(self):
    if self.trace_debug_mode:
      compile_fn = lambda f: f
    elif self.jit_compile and self.calls_host:
      compile_fn = lambda f: tf.function(xla_around_host_calls(f))
    else:
      compile_fn = lambda f: tf.function(f, jit_compile=self.jit_compile)
    if self.strategy.num_replicas_in_sync == 1:
      # One program for the whole loop, optimizer included.
      forward_backward, evaluate, outer = self._forward_backward, self._evaluate, compile_fn
    else:
      # Each replica's pass is compiled; the all-reduce and the update run around it.
      forward_backward = compile_fn(self._forward_backward)
      evaluate = compile_fn(self._evaluate)
      outer = (lambda f: f) if self.trace_debug_mode else tf.function

    def train_step(batches, index):
      learning_rate = self.learning_rate(self.optimizer.iterations)
      seed = self._dropout_seed(self.optimizer.iterations)
      # A Python function around the compiled one: handed a tf.function directly,
      # MirroredStrategy traces it once and every replica then reads replica 0's state.
      grads, metrics, new_state = self.strategy.run(
          lambda b, s: forward_backward(tf.nest.map_structure(lambda x: x[index], b), s),
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

    def metrics_row(metrics):
      # The keys are known once the step is traced; the host reads the rows by them.
      self.metric_keys = sorted(metrics)
      return tf.stack([tf.cast(metrics[k], tf.float32) for k in self.metric_keys])

    def train_steps(batches, num_steps, stop_votes):
      """Runs `num_steps` steps on `batches` (fields [steps_per_loop, B, ...]).

      Returns:
        ([steps_per_loop, len(metric_keys)] float32 rows of the steps' metrics, zero past
        `num_steps`; the stop votes [len(_VOTED_SIGNALS)] summed over the replicas).
      """
      if self.steps_per_loop == 1:
        rows = metrics_row(train_step(batches, 0))[tf.newaxis]
      else:
        rows = tf.TensorArray(tf.float32, size=self.steps_per_loop)
        for index in tf.range(num_steps):
          rows = rows.write(index, metrics_row(train_step(batches, index)))
        rows = rows.stack()
      votes = self.strategy.reduce(tf.distribute.ReduceOp.SUM, stop_votes, axis=None)
      return rows, votes

    def test_step(batch):
      return self._reduce_metrics(self.strategy.run(lambda b: evaluate(b), (batch,)))

    self._train_steps = outer(train_steps)
    self._test_step = outer(test_step)

  def _reduce_metrics(self, per_replica):
    """Counts add up across replicas; diagnostics are averaged."""
    return {key: self.strategy.reduce(
        tf.distribute.ReduceOp.MEAN if key.startswith(model_lib.DIAGNOSTICS_PREFIX)
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

  def _read_batch(self, iterator):
    try:
      return next(iterator)
    except tf.errors.OpError as e:
      split = (self.task_config.train_split if iterator is self.train_iterator
               else self.task_config.test_split)
      raise DataError(f"reading split {split!r} of task {self.task_config.dataset_name!r} "
                      f"failed: {_without_graph_context(e.message)}") from e

  def _next_batch(self, iterator):
    """The next host batch, and its model inputs split across the local replicas."""
    host = self._read_batch(iterator)
    inputs = {key: host[key] for key in MODEL_INPUTS if key in host}
    return host, distribution.split_streams(self.strategy, inputs, self.batch_size)

  # ---------------------------------------------------------------------------------------
  # Steps

  @property
  def train_function(self):
    """The compiled training loop: (batches, num_steps, stop votes) -> (metric rows, votes)."""
    return self._train_steps

  def train_call_arguments(self, num_steps, stop_signal=None):
    """Reads `num_steps` host batches; returns them and the arguments of `train_function`.

    Args:
      num_steps: 1 to `steps_per_loop`.
      stop_signal: a signal this host received, voted for inside the call (None: none).
    """
    if not 1 <= num_steps <= self.steps_per_loop:
      raise ValueError(f"num_steps must be in [1, {self.steps_per_loop}], got {num_steps}")
    hosts = [self._read_batch(self.train_iterator) for _ in range(num_steps)]
    stacked = {}
    for key in MODEL_INPUTS:
      if key in hosts[0]:
        values = [host[key] for host in hosts]
        # The loop's inputs keep one shape; it never reads the padding.
        values += [tf.zeros_like(values[0])] * (self.steps_per_loop - num_steps)
        stacked[key] = tf.stack(values)
    votes = np.zeros([len(_VOTED_SIGNALS)], np.float32)
    if stop_signal is not None:
      votes[_VOTED_SIGNALS.index(stop_signal)] = 1.0
    return hosts, (distribution.split_streams(self.strategy, stacked, self.batch_size, axis=1),
                   tf.constant(num_steps),
                   distribution.on_every_replica(self.strategy, tf.constant(votes)))

  def train_steps(self, num_steps, stop_signal=None):
    """Runs `num_steps` training steps in one call of the compiled loop.

    Args:
      num_steps: 1 to `steps_per_loop`.
      stop_signal: a signal this host received, voted for inside the call (None: none).
    Returns:
      (the host batches, one dict of metric sums per step, and the signal that some host
      voted for, or None).
    """
    hosts, arguments = self.train_call_arguments(num_steps, stop_signal)
    rows, votes = self._train_steps(*arguments)
    rows = rows.numpy()
    metrics = [dict(zip(self.metric_keys, rows[i])) for i in range(num_steps)]
    voted = next((s for s, v in zip(_VOTED_SIGNALS, votes.numpy()) if v > 0), None)
    return hosts, metrics, voted

  def train_step(self):
    """Runs one training step on the next batch; returns (host batch, metric sums)."""
    hosts, metrics, _ = self.train_steps(1)
    return hosts[0], metrics[0]

  def test_cycle(self):
    """Runs `num_test_steps` test steps; returns the metrics summed over them."""
    totals = {}
    for _ in range(self.num_test_steps):
      _, batch = self._next_batch(self.test_iterator)
      for key, value in self._test_step(batch).items():
        totals[key] = totals.get(key, 0.0) + float(value.numpy())
    return totals

  @property
  def step(self):
    return int(self.optimizer.iterations.numpy())

  # ---------------------------------------------------------------------------------------
  # The loop

  def train(self, workdir, load_dir=""):
    """Trains to `num_steps`; returns the metrics of the last test cycle (or None).

    SIGTERM (a preemption notice) or SIGINT stops the run at the next step boundary: it
    saves a checkpoint there and raises TrainingInterrupted; a second signal acts at once.
    Signals are caught only when `train` runs in the main thread. With several hosts,
    every host calls `train` with the same arguments, and a signal to any of them stops
    them all after the same step.

    Args:
      workdir: checkpoints, TensorBoard summaries and config.gin ("" for none); any
        filesystem TensorFlow reads (`gs://...`). With several hosts, storage they share.
      load_dir: a workdir to start from when `workdir` has no checkpoint yet.
    Raises:
      NonFiniteLossError: a step's loss or gradients were not finite and
        `skip_nonfinite_steps` is off; nothing is saved after the last good step.
      TrainingInterrupted: after SIGTERM or SIGINT, once the checkpoint is written.
      DataError: the input pipeline failed on the data.
      WorkerLostError: another host stopped answering.
      checkpoints.IncompatibleCheckpointError, checkpoints.UnreadableCheckpointError: the
        workdir (or load_dir) holds a checkpoint this run cannot continue from.
      checkpoints.CheckpointWriteError: a checkpoint could not be written; the previous
        one is intact.
    """
    if workdir and tf.io.gfile.exists(workdir) and not tf.io.gfile.isdir(workdir):
      raise ValueError(f"the workdir {workdir} is a file, not a directory")
    try:
      return self._train(workdir, load_dir)
    except _PEER_FAILURES as e:
      if distribution.num_hosts(self.strategy) == 1:
        raise
      raise WorkerLostError(
          f"lost contact with another host of the cluster at step {self.step}: "
          f"{_without_graph_context(e.message).split('. ')[0]}. Start every host again with "
          "the same command to continue from the last checkpoint") from e

  def _train(self, workdir, load_dir):
    self.checkpoints = checkpoints.CheckpointKeeper(self, workdir, self.max_checkpoints_to_keep)
    # Only the chief writes the workdir; the other hosts read its checkpoints.
    own_workdir = workdir if self.is_chief else ""
    with _StopRequests() as stop_requests:
      if self.restore_checkpoints:
        self.checkpoints.restore(load_dir)
      if own_workdir:
        storage.write_atomically(os.path.join(own_workdir, "config.gin"),
                                 gin.operative_config_str())
      losses_path = (os.path.join(own_workdir, STEP_LOSSES_FILE)
                     if own_workdir and self.record_step_losses else "")
      with _StepLossLog(losses_path, self.step) as step_losses:
        return self._train_loop(own_workdir, stop_requests, step_losses)

  def _periodic_work_after(self, step):
    """Whether summaries, a test cycle or a checkpoint come after training step `step`."""
    periods = [self.print_input_every_steps, self.log_every_steps,
               self.parameter_metrics_every_steps]
    if self.test_iterator is not None:
      periods.append(self.test_every_steps)
    if self.save_checkpoints:
      periods.append(self.checkpoint_every_steps)
    return any(should_run(step, every) for every in periods)

  def _steps_in_next_call(self, step):
    """Steps from `step` to the next one after which periodic work comes, at most
    `steps_per_loop` and never past `num_steps`."""
    last = min(self.num_steps, step + self.steps_per_loop) - 1
    return next(s for s in range(step, last + 1)
                if s == last or self._periodic_work_after(s)) - step + 1

  def _train_loop(self, workdir, stop_requests, step_losses):
    writer = summaries.SummaryWriter(workdir, self.use_separate_metric_directories)
    self._log_start(workdir)
    tokens_per_step = self.global_batch_size * self.sequence_length
    progress = summaries.Progress(self.step, self.num_steps, tokens_per_step)
    accumulated = summaries.Accumulator()
    test_metrics, last_test_step = None, None
    skipped_steps = 0
    while self.step < self.num_steps:
      first = self.step
      hosts, metrics, voted = self.train_steps(self._steps_in_next_call(first),
                                               stop_requests.signal_number)
      for step, step_metrics in enumerate(metrics, start=first):
        finite = bool(step_metrics.pop(ALL_FINITE))
        step_losses.write(step, step_metrics["loss"] if finite else None,
                          skipped=not finite and self.skip_nonfinite_steps)
        if finite:
          accumulated.add(step_metrics)
        elif self.skip_nonfinite_steps:
          skipped_steps += 1
          logging.warning("step %d skipped: the training loss (%s) or a gradient is not "
                          "finite", step, step_metrics["loss"])
        else:
          raise NonFiniteLossError(
              f"the training loss ({step_metrics['loss']}) or a gradient is not finite at "
              f"step {step}; stopping. {self._last_checkpoint_note()} To skip such steps "
              "instead, set Trainer.skip_nonfinite_steps = True")
      step = self.step - 1
      progress.update(step + 1)
      is_last = step + 1 == self.num_steps
      if is_last or any(should_run(s, self.status_every_steps) for s in range(first, step + 1)):
        logging.info("%s", progress.line(accumulated.latest_summary() if accumulated.last
                                         else {}))
      if should_run(step, self.print_input_every_steps):
        writer.text("train", "input", self._decode_first_stream(hosts[-1]), step)
      if should_run(step, self.test_every_steps) and self.test_iterator is not None:
        test_metrics, last_test_step = self._test_and_log(writer, step), step
      if should_run(step, self.log_every_steps) or is_last:
        train_metrics = accumulated.flush() if accumulated.steps else {}
        train_metrics["tokens_per_second"] = progress.tokens_per_second()
        if self.skip_nonfinite_steps:
          train_metrics["skipped_steps"] = skipped_steps
          skipped_steps = 0
        writer.scalars("train", train_metrics, step)
      if should_run(step, self.parameter_metrics_every_steps):
        writer.parameter_statistics(self.model, step)
      if self.save_checkpoints and (should_run(step, self.checkpoint_every_steps) or is_last):
        # The log first: killed in between, the log holds steps that the restart truncates,
        # never a gap before the checkpoint.
        step_losses.flush()
        self.checkpoints.save()
        if not self.parameter_metrics_every_steps:
          writer.parameter_statistics(self.model, step)
      if voted is not None:
        self._stop(voted, stop_requests.signal_number is None, writer, step_losses)
    # The result reflects the final parameters, as the main job reports it.
    final_step = self.step - 1
    if self.test_iterator is not None and final_step >= 0 and last_test_step != final_step:
      test_metrics = self._test_and_log(writer, final_step)
    writer.flush()
    return test_metrics

  def _last_checkpoint_note(self):
    latest = self.checkpoints.manager and self.checkpoints.manager.latest_checkpoint
    if latest:
      return f"The last good checkpoint, {latest}, is kept."
    return "No checkpoint was written."

  def _stop(self, signal_number, on_another_host, writer, step_losses):
    """Saves a checkpoint at this step boundary and raises TrainingInterrupted."""
    step_losses.flush()
    path = self.checkpoints.save() if self.save_checkpoints else None
    writer.flush()
    outcome = (f"checkpoint {path} holds it; run the same command to continue" if path else
               "nothing was saved (no workdir, or Trainer.save_checkpoints = False)")
    where = " on another host" if on_another_host else ""
    raise TrainingInterrupted(
        f"stopped by {signal.Signals(signal_number).name}{where} before step {self.step}: "
        f"{outcome}", signal_number)

  def _test_and_log(self, writer, step):
    metrics = model_lib.summarize(self.test_cycle(), self.num_test_steps)
    writer.scalars("test", metrics, step)
    logging.info("test at step %d: %s", step, summaries.format_metrics(metrics))
    return metrics

  def _decode_first_stream(self, host):
    tokens = np.asarray(host["targets"])[0]
    return self.task.vocabulary.decode([int(t) for t in tokens if t > 0])

  def _log_start(self, workdir):
    num_params = sum(int(np.prod(v.shape)) for v in self.params)
    embedding = int(np.prod(self.model.decoder.embedding.shape))
    logging.info("model: %d parameters (%d without the embedding); %d replica(s), "
                 "%d streams of %d tokens per step; starting at step %d of %d",
                 num_params, num_params - embedding, self.strategy.num_replicas_in_sync,
                 self.global_batch_size, self.sequence_length, self.step, self.num_steps)
    if self.print_variables:
      for v in self.params:
        logging.info("  %s %s", v.name, v.shape)
    if workdir:
      logging.info("TensorBoard: tensorboard --logdir=%s", workdir)

  def data_signature(self):
    """What the checkpointed data iterators read; a resume must read the same."""
    config = self.task_config
    signature = {"dataset_name": config.dataset_name, "train_split": config.train_split,
                 "test_split": config.test_split, "sequence_length": self.sequence_length,
                 "global_batch_size": self.global_batch_size, "random_seed": self.random_seed}
    hosts = distribution.num_hosts(self.strategy)
    if hosts > 1:  # Each host's pipeline reads its own share of the documents.
      signature["input_pipelines"] = hosts
    return signature

  def parameter_summary(self):
    """Name -> shape of every checkpointed variable, for compatibility checks."""
    shapes = {v.name: list(v.shape) for v in self.params}
    for mode in (self.train_state, self.test_state):
      for path, variable in _flatten_with_paths(mode.checkpointable.variables_by_name):
        shapes[f"state_{mode.name}/{path}"] = list(variable.shape)
    return shapes


def _scalars(metrics):
  """The scalar metrics: the model also returns per-token losses and predictions when built
  with `output_token_losses` (for scoring), which summaries do not take."""
  return {key: value for key, value in metrics.items() if value.shape.rank == 0}


def _without_graph_context(message):
  """A TensorFlow error message without the graph node lines it appends."""
  lines = [line for line in message.splitlines() if not line.strip().startswith("[[")]
  return " ".join(line.strip() for line in lines if line.strip())


class _StopRequests:
  """While active (in the main thread), SIGTERM and SIGINT ask the loop to stop.

  The first signal is recorded and the previous handlers come back, so that a second one
  acts at once (SIGTERM ends the process, SIGINT raises KeyboardInterrupt).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_number = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def _handle(self, signal_number, frame):
    del frame
    self.signal_number = signal_number
    self._restore_handlers()
    logging.warning("received %s: stopping at the next step boundary, after a checkpoint "
                    "(send it again to stop at once)", signal.Signals(signal_number).name)

  def _restore_handlers(self):
    for signal_number, handler in self._previous.items():
      # None: a handler not installed from Python; the default is the closest stand-in.
      signal.signal(signal_number, signal.SIG_DFL if handler is None else handler)
    self._previous = {}

  def __exit__(self, *exc_info):
    self._restore_handlers()


class _StepLossLog:
  """`{"step": s, "loss": x}` per training step, in a JSON-lines file.

  Opening the log keeps only the records of the steps before `first_step`, the step the
  run continues from: a restarted run repeats the steps after its checkpoint, and a killed
  one may have left a partial last line. On a local disk records are appended and each is
  flushed as it is written. Other filesystems cannot append in place (a GCS object is
  written whole), so there the log is kept in memory and rewritten, atomically, at
  checkpoints and at the end. With no path, nothing is written.
  """

  def __init__(self, path, first_step):
    self.path = path
    self.first_step = first_step
    self.append_in_place = not storage.has_scheme(path)
    self._records = []
    self._file = None

  def __enter__(self):
    if self.path:
      kept = self._records_before(self.first_step)
      if self.append_in_place:
        self._file = tf.io.gfile.GFile(self.path, "a")
      else:
        self._records = kept
    return self

  def _records_before(self, step):
    """The file's complete records of the steps before `step`; rewrites it if it held more."""
    if not tf.io.gfile.exists(self.path):
      return []
    lines = storage.read_text(self.path).splitlines(keepends=True)
    kept = []
    for line in lines:
      try:
        record = json.loads(line)
      except ValueError:  # the partial last line of a killed run
        break
      if not line.endswith("\n") or record["step"] >= step:
        break
      kept.append(line)
    if len(kept) < len(lines):
      storage.write_atomically(self.path, "".join(kept))
    return kept

  def write(self, step, loss, skipped=False):
    """Records one step; `loss` None for a non-finite one."""
    if not self.path:
      return
    record = {"step": step, "loss": None if loss is None else float(loss)}
    if skipped:
      record["skipped"] = True
    line = json.dumps(record) + "\n"
    if self.append_in_place:
      self._file.write(line)
      self._file.flush()
    else:
      self._records.append(line)

  def flush(self):
    if self.path and not self.append_in_place:
      storage.write_atomically(self.path, "".join(self._records))

  def __exit__(self, *exc_info):
    if self._file is not None:
      self._file.close()
    self.flush()


def _flatten_with_paths(nested, prefix=""):
  for key in sorted(nested):
    value = nested[key]
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      yield from _flatten_with_paths(value, path + "/")
    else:
      yield path, value

