"""The training loop: XLA-compiled steps, per-stream state, test cycles, checkpoints, summaries.

The loop follows Meliad's `Trainer.train`: a train step per iteration; every
`test_every_steps`, `num_test_steps` test steps on the test stream with its own
persistent state; a checkpoint every `checkpoint_every_steps` and at the end. A
checkpoint holds the parameters, the optimizer slots and step, both modes' per-stream
state and both data iterators, so a restarted run continues exactly where it stopped.
"""

import math
import os

from absl import logging
import gin
import numpy as np
import tensorflow as tf

import pipelines
from meliad_tf import checkpoints
from meliad_tf import distribution
from meliad_tf import model as model_lib
from meliad_tf import optimizer as optimizer_lib
from meliad_tf import schedules
from meliad_tf import state as state_lib
from meliad_tf import summaries

# Batch fields the compiled steps take; the rest (document ids, epochs) stays on the host.
MODEL_INPUTS = ("targets", "start_of_sequence", "loss_mask", "num_chars")


def should_run(step, every):
  """Meliad's schedule for periodic work: never at step 0, never when `every` is 0."""
  return step > 0 and every > 0 and step % every == 0


class NonFiniteLossError(RuntimeError):
  pass


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
    jit_compile: compile the steps with XLA.
    max_checkpoints_to_keep: Meliad keeps 1.
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
               max_checkpoints_to_keep=1):
    del rng_key_names, replicate_mode  # Dropout seeds are derived from (random_seed, step).
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

  # ---------------------------------------------------------------------------------------
  # Building

  def build(self, strategy=None):
    """Creates the model, optimizer, per-stream states, data iterators and step functions."""
    self.strategy = strategy or tf.distribute.get_strategy()
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
    # Calling the schedule once here puts its gin bindings in the operative config.
    self.learning_rate(tf.constant(0, tf.int64))
    self._build_steps()
    return self

  def _dataset(self, split, seed, context):
    return pipelines.load_text_dataset(
        self.task, split=split, sequence_length=self.sequence_length,
        batch_size=self.host_batch_size, training=True, seed=seed, input_context=context)

  def learning_rate(self, step):
    return schedules.learning_rate(step, self.learning_rate_schedule, self.max_scheduled_steps,
                                   self.warmup_steps, self.learning_rate_multiplier,
                                   self.optimizer_config.learning_rate)

  def _dropout_seed(self, step):
    return tf.stack([tf.constant(self.random_seed, tf.int64), tf.cast(step, tf.int64)])

  def _forward_backward(self, batch, seed):
    """One replica's gradients; stores its streams' new training state.

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
    self.train_state.assign(new_state)
    return grads, metrics

  def _evaluate(self, batch):
    _, metrics, new_state = self.model(batch, self.test_state.read(), training=False)
    self.test_state.assign(new_state)
    return metrics

  def _build_steps(self):
    compile_fn = ((lambda f: f) if self.trace_debug_mode
                  else (lambda f: tf.function(f, jit_compile=self.jit_compile)))
    if self.strategy.num_replicas_in_sync == 1:
      def train_step(batch):
        learning_rate = self.learning_rate(self.optimizer.iterations)
        grads, metrics = self._forward_backward(
            batch, self._dropout_seed(self.optimizer.iterations))
        self.optimizer.apply_gradients(grads, self.params, learning_rate)
        return dict(metrics, learning_rate=learning_rate)

      self._train_step = compile_fn(train_step)
      self._test_step = compile_fn(self._evaluate)
      return

    forward_backward = compile_fn(self._forward_backward)
    evaluate = compile_fn(self._evaluate)
    mean = tf.distribute.ReduceOp.MEAN

    def distributed_train_step(batch):
      learning_rate = self.learning_rate(self.optimizer.iterations)
      seed = self._dropout_seed(self.optimizer.iterations)
      # A Python function around the compiled one: handed a tf.function directly,
      # MirroredStrategy traces it once and every replica then reads replica 0's state.
      grads, metrics = self.strategy.run(lambda b, s: forward_backward(b, s), (batch, seed))
      # Each replica's loss is the sum over its streams; gradients are averaged (pmean).
      grads = self.strategy.reduce(mean, grads, axis=None)
      metrics = self._reduce_metrics(metrics)
      self._apply_on_every_replica(grads, learning_rate)
      return dict(metrics, learning_rate=learning_rate)

    def distributed_test_step(batch):
      return self._reduce_metrics(self.strategy.run(lambda b: evaluate(b), (batch,)))

    wrap = (lambda f: f) if self.trace_debug_mode else tf.function
    self._train_step = wrap(distributed_train_step)
    self._test_step = wrap(distributed_test_step)

  def _reduce_metrics(self, per_replica):
    """Counts add up across replicas; diagnostics are averaged."""
    return {key: self.strategy.reduce(
        tf.distribute.ReduceOp.MEAN if key.startswith(model_lib.DIAGNOSTICS_PREFIX)
        else tf.distribute.ReduceOp.SUM, value, axis=None)
            for key, value in per_replica.items()}

  def _apply_on_every_replica(self, grads, learning_rate):
    """The optimizer update, applied to each replica's copy of every parameter."""
    step = self.optimizer.iterations.read_value()
    for param, grad in zip(self.params, grads):
      slots = self.optimizer.slots_for(param)
      names = sorted(slots)

      def update(param_copy, grad, *slot_copies, names=names):
        new_param, new_slots = self.optimizer.update(
            param_copy.read_value(), grad,
            {name: slot.read_value() for name, slot in zip(names, slot_copies)},
            step, learning_rate)
        param_copy.assign(new_param)
        for name, slot in zip(names, slot_copies):
          slot.assign(new_slots[name])

      self.strategy.extended.update(param, update, args=(grad, *[slots[n] for n in names]),
                                    group=False)
    self.optimizer.iterations.assign_add(1)

  def _next_batch(self, iterator):
    host = next(iterator)
    inputs = {key: host[key] for key in MODEL_INPUTS if key in host}
    return host, distribution.split_streams(self.strategy, inputs, self.batch_size)

  # ---------------------------------------------------------------------------------------
  # Steps

  def train_step(self):
    """Runs one training step on the next batch; returns (host batch, metric sums)."""
    host, batch = self._next_batch(self.train_iterator)
    metrics = {k: v.numpy() for k, v in self._train_step(batch).items()}
    return host, metrics

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

    Args:
      workdir: checkpoints, TensorBoard summaries and config.gin ("" for none).
      load_dir: a workdir to start from when `workdir` has no checkpoint yet.
    """
    self.checkpoints = checkpoints.CheckpointKeeper(self, workdir, self.max_checkpoints_to_keep)
    if self.restore_checkpoints:
      self.checkpoints.restore(load_dir)
    if workdir:
      checkpoints.write_atomically(os.path.join(workdir, "config.gin"),
                                   gin.operative_config_str())
    writer = summaries.SummaryWriter(workdir, self.use_separate_metric_directories)
    self._log_start(workdir)
    tokens_per_step = self.global_batch_size * self.sequence_length
    progress = summaries.Progress(self.step, self.num_steps, tokens_per_step)
    accumulated = summaries.Accumulator()
    test_metrics, last_test_step = None, None
    while self.step < self.num_steps:
      step = self.step
      host, metrics = self.train_step()
      if not math.isfinite(float(metrics["loss"])):
        raise NonFiniteLossError(
            f"training loss is {metrics['loss']} at step {step}; stopping. The last good "
            f"checkpoint in {workdir or '(no workdir)'} is kept")
      accumulated.add(metrics)
      progress.update(step + 1)
      if should_run(step, self.status_every_steps) or step + 1 == self.num_steps:
        logging.info("%s", progress.line(accumulated.latest_summary()))
      if should_run(step, self.print_input_every_steps):
        writer.text("train", "input", self._decode_first_stream(host), step)
      if should_run(step, self.test_every_steps) and self.test_iterator is not None:
        test_metrics, last_test_step = self._test_and_log(writer, step), step
      is_last = step + 1 == self.num_steps
      if should_run(step, self.log_every_steps) or is_last:
        train_metrics = accumulated.flush()
        train_metrics["tokens_per_second"] = progress.tokens_per_second()
        writer.scalars("train", train_metrics, step)
      if should_run(step, self.parameter_metrics_every_steps):
        writer.parameter_statistics(self.model, step)
      if self.save_checkpoints and (should_run(step, self.checkpoint_every_steps) or is_last):
        self.checkpoints.save()
        if not self.parameter_metrics_every_steps:
          writer.parameter_statistics(self.model, step)
    # The result reflects the final parameters, as the main job reports it.
    final_step = self.step - 1
    if self.test_iterator is not None and final_step >= 0 and last_test_step != final_step:
      test_metrics = self._test_and_log(writer, final_step)
    writer.flush()
    return test_metrics

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

  def parameter_summary(self):
    """Name -> shape of every checkpointed variable, for compatibility checks."""
    shapes = {v.name: list(v.shape) for v in self.params}
    for mode in (self.train_state, self.test_state):
      for path, variable in _flatten_with_paths(mode.checkpointable.variables_by_name):
        shapes[f"state_{mode.name}/{path}"] = list(variable.shape)
    return shapes


def _flatten_with_paths(nested, prefix=""):
  for key in sorted(nested):
    value = nested[key]
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      yield from _flatten_with_paths(value, path + "/")
    else:
      yield path, value

