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

import contextlib
import os
import re
import signal

from absl import logging
import gin
import numpy as np
import tensorflow as tf

from meliad_tf.common import storage
from meliad_tf.model import footprint
from meliad_tf.model import language_model as model_lib
from meliad_tf.training import checkpoints
from meliad_tf.training import data as data_lib
from meliad_tf.training import distribution
from meliad_tf.training import optimizer as optimizer_lib
from meliad_tf.training import schedules
from meliad_tf.training import state as state_lib
from meliad_tf.training import step_losses as step_losses_lib
from meliad_tf.training import steps as steps_lib
from meliad_tf.training import stopping
from meliad_tf.training import summaries
from meliad_tf.training import workdir_lock


def should_run(step, every):
  """Meliad's schedule for periodic work: never at step 0, never when `every` is 0."""
  return step > 0 and every > 0 and step % every == 0


class NonFiniteLossError(RuntimeError):
  """A training step's loss or gradients were not finite (Trainer.skip_nonfinite_steps off)."""


# Trainer.train raises it; named here beside the trainer's other errors.
DataError = data_lib.DataError


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
USER_ERRORS = (ValueError, OSError, NonFiniteLossError, WorkerLostError,
               workdir_lock.WorkdirLockedError)
# What a collective raises when a peer host is gone: the coordination service reports the
# missing heartbeats (Unavailable), or the peer's connection breaks (Aborted, Cancelled,
# DeadlineExceeded).
_PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.AbortedError,
                  tf.errors.CancelledError, tf.errors.DeadlineExceededError)

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
      backend), everything in them but the search (`steps.xla_around_host_calls`).
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
    max_consecutive_skipped_steps: with `skip_nonfinite_steps`, the run stops with
      NonFiniteLossError after this many skipped steps in a row (it no longer learns).
    workdir_lock_stale_seconds: another run's lock on the workdir whose heartbeat is older
      than this is taken over (see `workdir_lock`).
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
               steps_per_loop=1, max_consecutive_skipped_steps=10,
               workdir_lock_stale_seconds=600):
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
                        ("steps_per_loop", steps_per_loop),
                        ("max_consecutive_skipped_steps", max_consecutive_skipped_steps)):
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
    for name, value in (("steps_per_loop", steps_per_loop),
                        ("max_consecutive_skipped_steps", max_consecutive_skipped_steps)):
      if value < 1:
        raise ValueError(f"Trainer.{name} must be >= 1, got {value}")
    if not workdir_lock_stale_seconds > 0:
      raise ValueError(f"Trainer.workdir_lock_stale_seconds must be positive, got "
                       f"{workdir_lock_stale_seconds!r}")
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
    self.max_consecutive_skipped_steps = max_consecutive_skipped_steps
    self.workdir_lock_stale_seconds = workdir_lock_stale_seconds

  # ---------------------------------------------------------------------------------------
  # Building

  def build(self, strategy=None):
    """Creates the model, optimizer, per-stream states, data iterators and step functions."""
    self.strategy = strategy or tf.distribute.get_strategy()
    self.is_chief = distribution.is_chief(self.strategy)
    tf.random.set_seed(self.random_seed)
    with self.strategy.scope():
      self.model = self.model_definition()
    self._check_memory()
    with self.strategy.scope():
      self.optimizer = self.optimizer_config.create()
      self.params = list(self.model.trainable_variables)
      self.optimizer.build(self.params)
    self.task_config = self.model.task_config
    self.batch_size = self.task_config.batch_size
    self.sequence_length = self.task_config.sequence_length
    self.data = data_lib.TrainingData(
        self.task_config, self.strategy, self.random_seed,
        with_test=bool(self.num_test_steps and self.test_every_steps),
        embedding_rows=self.model.vocab_size)
    self.train_state = state_lib.StreamState(self.model.state_spec, self.batch_size,
                                             self.strategy, "train")
    self.test_state = state_lib.StreamState(self.model.state_spec, self.batch_size,
                                            self.strategy, "test")
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
    self.steps = steps_lib.TrainingSteps(
        self.model, self.optimizer, self.strategy, self.train_state, self.test_state,
        learning_rate=self.learning_rate, random_seed=self.random_seed,
        batch_size=self.batch_size, steps_per_loop=self.steps_per_loop,
        skip_nonfinite_steps=self.skip_nonfinite_steps, jit_compile=self.jit_compile,
        eager=self.trace_debug_mode)
    return self

  def _check_memory(self):
    """Refuses, before the optimizer, the states and the data are made, a configuration
    whose training needs more memory than the host has (checked where the steps run on the
    host's CPU; an accelerator's memory is its own)."""
    if tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
      return
    config = self.model.task_config
    host_streams = config.batch_size * distribution.local_replica_count(self.strategy)
    needed = footprint.training_footprint(self.model, host_streams, config.sequence_length)
    available = footprint.available_host_bytes()
    if available is not None and needed.total > available:
      raise ValueError(
          f"training this configuration needs {needed.describe()} with "
          f"{host_streams} streams of {config.sequence_length} tokens "
          f"(TransformerTaskConfig.batch_size, sequence_length), but this machine has "
          f"{available / 2**30:.3g} GiB of memory available; use smaller sizes")

  @property
  def calls_host(self):
    """True when a memory layer searches on the host, so a step cannot be one XLA program."""
    return bool(self.model.decoder.host_search_layers)

  def learning_rate(self, step):
    return schedules.learning_rate(step, self.learning_rate_schedule, self.max_scheduled_steps,
                                   self.warmup_steps, self.learning_rate_multiplier,
                                   self.optimizer_config.learning_rate)

  # ---------------------------------------------------------------------------------------
  # Steps

  def train_steps(self, num_steps, stop_signal=None):
    """Runs `num_steps` (at most `steps_per_loop`) training steps in one call.

    Args:
      num_steps: 1 to `steps_per_loop`.
      stop_signal: a signal this host received, voted for inside the call (None: none).
    Returns:
      (the host batches, one dict of metric sums per step, and the signal that some host
      voted for, or None).
    """
    if not 1 <= num_steps <= self.steps_per_loop:
      raise ValueError(f"num_steps must be in [1, {self.steps_per_loop}], got {num_steps}")
    hosts = self.data.next_training_batches(num_steps)
    metrics, voted = self.steps.train(hosts, stop_signal)
    return hosts, metrics, voted

  def train_step(self):
    """Runs one training step on the next batch; returns (host batch, metric sums)."""
    hosts, metrics, _ = self.train_steps(1)
    return hosts[0], metrics[0]

  def test_cycle(self):
    """Runs `num_test_steps` test steps; returns the metrics summed over them."""
    totals = {}
    for _ in range(self.num_test_steps):
      for key, value in self.steps.test(self.data.next_test_batch()).items():
        totals[key] = totals.get(key, 0.0) + float(value.numpy())
    return totals

  @property
  def step(self):
    return int(self.optimizer.iterations.numpy())

  # ---------------------------------------------------------------------------------------
  # The loop

  def train(self, workdir, load_dir="", force=False):
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
      force: take the workdir's lock over from another run (one that is gone).
    Raises:
      NonFiniteLossError: a step's loss or gradients were not finite and
        `skip_nonfinite_steps` is off; nothing is saved after the last good step.
      TrainingInterrupted: after SIGTERM or SIGINT, once the checkpoint is written.
      DataError: the input pipeline failed on the data.
      WorkerLostError: another host stopped answering.
      workdir_lock.WorkdirLockedError: another run holds the workdir (or took it over).
      checkpoints.IncompatibleCheckpointError, checkpoints.UnreadableCheckpointError: the
        workdir (or load_dir) holds a checkpoint this run cannot continue from.
      checkpoints.CheckpointWriteError: a checkpoint could not be written; the previous
        one is intact.
    """
    if workdir and tf.io.gfile.exists(workdir) and not tf.io.gfile.isdir(workdir):
      raise ValueError(f"the workdir {workdir} is a file, not a directory")
    try:
      return self._train(workdir, load_dir, force)
    except _PEER_FAILURES as e:
      if distribution.num_hosts(self.strategy) == 1:
        raise
      raise WorkerLostError(
          f"lost contact with another host of the cluster at step {self.step}: "
          f"{data_lib.without_graph_context(e.message).split('. ')[0]}. Start every host "
          "again with the same command to continue from the last checkpoint") from e

  def _train(self, workdir, load_dir, force):
    # Only the chief writes the workdir (and holds its lock); the other hosts read it.
    own_workdir = workdir if self.is_chief else ""
    if not workdir and self.is_chief:
      logging.warning("no --workdir: nothing of this run (checkpoints, summaries, config) "
                      "will be saved")
    lock = (workdir_lock.WorkdirLock(own_workdir, force=force,
                                     stale_seconds=self.workdir_lock_stale_seconds)
            if own_workdir else contextlib.nullcontext())
    with lock, stopping.StopRequests() as stop_requests:
      guard = lock.check if own_workdir else None
      self.checkpoints = self.checkpoint_keeper(workdir, guard=guard)
      if self.restore_checkpoints:
        self.checkpoints.restore(load_dir)
      if own_workdir:
        config_path = os.path.join(own_workdir, "config.gin")
        self._warn_if_the_schedule_moves(config_path)
        guard()
        storage.write_atomically(config_path, gin.operative_config_str())
      losses_path = (os.path.join(own_workdir, step_losses_lib.FILE_NAME)
                     if own_workdir and self.record_step_losses else "")
      with step_losses_lib.StepLossLog(losses_path, self.step) as step_losses:
        try:
          return self._train_loop(own_workdir, stop_requests, step_losses)
        except summaries.SummaryWriteError as e:
          raise summaries.SummaryWriteError(f"{e}. {self._save_after_failure()}") from e

  def _save_after_failure(self):
    """Saves a checkpoint after a failure that left the state sound; says what became of it."""
    if not self.save_checkpoints or distribution.num_hosts(self.strategy) > 1:
      # With several hosts the others are already in the next step's collectives.
      return self._last_checkpoint_note()
    try:
      path = self.checkpoints.save()
    except checkpoints.CheckpointWriteError as e:
      return f"The checkpoint could not be saved either: {e}"
    return (f"Saved {path}; make room and run the same command to continue" if path
            else "Nothing was saved (no workdir)")

  def _warn_if_the_schedule_moves(self, config_path):
    """Warns when a resumed run's learning-rate horizon differs from the one its steps so far
    followed (Trainer.max_scheduled_steps, or num_steps when 0)."""
    if not self.step or not tf.io.gfile.exists(config_path):
      return
    text = storage.read_text(config_path)
    settings = {name: int(value) for name, value in re.findall(
        r"^Trainer\.(num_steps|max_scheduled_steps) = (\d+)$", text, re.MULTILINE)}
    if "num_steps" not in settings:
      return
    horizon = settings.get("max_scheduled_steps") or settings["num_steps"]
    if horizon != self.max_scheduled_steps:
      logging.warning(
          "the learning-rate schedule's horizon was %d steps for the %d steps already run and "
          "is %d from now on (Trainer.max_scheduled_steps, or Trainer.num_steps when it is "
          "0): the schedule jumps at step %d. Set Trainer.max_scheduled_steps = %d to keep "
          "it", horizon, self.step, self.max_scheduled_steps, self.step, horizon)

  def _periodic_work_after(self, step):
    """Whether summaries, a test cycle or a checkpoint come after training step `step`."""
    periods = [self.print_input_every_steps, self.log_every_steps,
               self.parameter_metrics_every_steps]
    if self.data.with_test:
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
    if self.step == 0:
      writer.run_record(gin.operative_config_str(), self.hyperparameters())
    tokens_per_step = self.data.global_batch_size * self.sequence_length
    progress = summaries.Progress(self.step, self.num_steps, tokens_per_step)
    accumulated = summaries.Accumulator()
    test_metrics, last_test_step = None, None
    skipped_steps = skipped_in_a_row = 0
    while self.step < self.num_steps:
      first = self.step
      hosts, metrics, voted = self.train_steps(self._steps_in_next_call(first),
                                               stop_requests.signal_number)
      for step, step_metrics in enumerate(metrics, start=first):
        finite = bool(step_metrics.pop(steps_lib.ALL_FINITE))
        step_losses.write(step, step_metrics["loss"] if finite else None,
                          skipped=not finite and self.skip_nonfinite_steps)
        if finite:
          accumulated.add(step_metrics)
          skipped_in_a_row = 0
        elif self.skip_nonfinite_steps:
          skipped_steps += 1
          skipped_in_a_row += 1
          logging.warning("step %d skipped: the training loss (%s) or a gradient is not "
                          "finite", step, step_metrics["loss"])
          if skipped_in_a_row >= self.max_consecutive_skipped_steps:
            raise NonFiniteLossError(
                f"the last {skipped_in_a_row} steps, up to step {step}, were all skipped "
                "(their loss or gradients were not finite): the run no longer learns; "
                f"stopping. {self._last_checkpoint_note()} Lower the learning rate, or raise "
                "Trainer.max_consecutive_skipped_steps")
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
      if should_run(step, self.test_every_steps) and self.data.with_test:
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
    if self.data.with_test and final_step >= 0 and last_test_step != final_step:
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
    return self.data.task.vocabulary.decode([int(t) for t in tokens if t > 0])

  def _log_start(self, workdir):
    num_params = sum(int(np.prod(v.shape)) for v in self.params)
    embedding = int(np.prod(self.model.decoder.embedding.shape))
    logging.info("model: %d parameters (%d without the embedding); %d replica(s), "
                 "%d streams of %d tokens per step; starting at step %d of %d",
                 num_params, num_params - embedding, self.strategy.num_replicas_in_sync,
                 self.data.global_batch_size, self.sequence_length, self.step, self.num_steps)
    if self.print_variables:
      for v in self.params:
        logging.info("  %s %s", v.name, v.shape)
    if workdir:
      logging.info("TensorBoard: tensorboard --logdir=%s", workdir)

  def checkpoint_keeper(self, workdir, max_to_keep=None, guard=None):
    """A `CheckpointKeeper` of this run's checkpoints in `workdir`.

    Args:
      workdir: the run's workdir ("" for none).
      max_to_keep: checkpoints kept; None: Trainer.max_checkpoints_to_keep.
      guard: see `CheckpointKeeper`.
    """
    self.data.continue_saved_layout(workdir)
    contents = checkpoints.Contents(
        strategy=self.strategy, model=self.model, optimizer=self.optimizer,
        train_state=self.train_state, test_state=self.test_state,
        train_iterator=self.data.train_iterator, test_iterator=self.data.test_iterator,
        parameter_summary=self.parameter_summary, data_signature=self.data.signature,
        restore_state_variables=self.restore_state_variables)
    return checkpoints.CheckpointKeeper(contents, workdir,
                                        max_to_keep or self.max_checkpoints_to_keep, guard)

  def hyperparameters(self):
    """The run's main settings, for TensorBoard's HParams dashboard."""
    stack = self.model.decoder
    layer = stack.layers[0]
    values = {
        "dataset": self.task_config.dataset_name, "num_layers": stack.num_layers,
        "embed_dim": stack.embedding_size, "num_heads": layer.num_heads,
        "head_dim": layer.head_size, "window_length": layer.window_length,
        "sequence_length": self.sequence_length,
        "global_batch_size": self.data.global_batch_size,
        "num_steps": self.num_steps, "warmup_steps": self.warmup_steps,
        "learning_rate_schedule": getattr(self.learning_rate_schedule, "__name__",
                                          str(self.learning_rate_schedule)),
        "learning_rate_multiplier": float(self.learning_rate_multiplier),
        "memory_layers": str(list(stack.memory_layer_indices)),
        "recurrent_layers": str(list(stack.recurrent_layer_indices)),
        "dtype": stack.dtype.name, "random_seed": self.random_seed,
    }
    return values

  def parameter_summary(self):
    """Name -> shape of every checkpointed variable, for compatibility checks."""
    shapes = {v.name: list(v.shape) for v in self.params}
    for mode in (self.train_state, self.test_state):
      for path, variable in _flatten_with_paths(mode.checkpointable.variables_by_name):
        shapes[f"state_{mode.mode}/{path}"] = list(variable.shape)
    return shapes


def _flatten_with_paths(nested, prefix=""):
  for key in sorted(nested):
    value = nested[key]
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      yield from _flatten_with_paths(value, path + "/")
    else:
      yield path, value

