"""TensorBoard scalars with Meliad's names, metric accumulation between flushes, progress."""

import functools
import os
import time

import numpy as np
from tensorboard.plugins.hparams import api as hparams_api
import tensorflow as tf

from meliad_tf.model import language_model as model_lib


class SummaryWriteError(OSError):
  """TensorBoard's event file could not be written (a full disk, ...)."""


def _reporting_write_errors(method):
  """TensorFlow's errors of an event file write (which may surface at any later call, as
  events are buffered) as a SummaryWriteError naming the directory."""

  @functools.wraps(method)
  def wrapper(self, *args, **kwargs):
    try:
      return method(self, *args, **kwargs)
    except tf.errors.OpError as e:
      reason = e.message.strip().splitlines()[0] if e.message.strip() else type(e).__name__
      raise SummaryWriteError(f"could not write TensorBoard events in {self.workdir}: "
                              f"{reason}") from e

  return wrapper


class SummaryWriter:
  """Scalars under `<mode>/<name>` in one directory, or one directory per mode.

  With no workdir, summaries go nowhere (the progress log still shows them). Write errors
  are raised as SummaryWriteError.
  """

  def __init__(self, workdir, separate_directories=False):
    self.workdir = workdir
    self.separate_directories = separate_directories
    self._writers = {}

  def _writer(self, mode):
    if not self.workdir:
      return None
    key = mode if self.separate_directories else ""
    if key not in self._writers:
      self._writers[key] = tf.summary.create_file_writer(os.path.join(self.workdir, key))
    return self._writers[key]

  def _name(self, mode, name):
    return name if self.separate_directories else f"{mode}/{name}"

  @_reporting_write_errors
  def scalars(self, mode, metrics, step):
    writer = self._writer(mode)
    if writer is None:
      return
    with writer.as_default():
      for name, value in metrics.items():
        tf.summary.scalar(self._name(mode, name), float(value), step=step)

  @_reporting_write_errors
  def text(self, mode, name, text, step):
    writer = self._writer(mode)
    if writer is None:
      return
    with writer.as_default():
      tf.summary.text(self._name(mode, name), text, step=step)

  @_reporting_write_errors
  def run_record(self, config_text, hyperparameters):
    """The operative gin configuration as the text summary `config` (as Meliad writes it),
    and the hyperparameters for TensorBoard's HParams dashboard, at step 0."""
    writer = self._writer("")
    if writer is None:
      return
    with writer.as_default():
      # Markdown: a code block keeps the configuration's lines as they are.
      tf.summary.text("config", "```\n" + config_text + "\n```", step=0)
      hparams_api.hparams(hyperparameters)

  @_reporting_write_errors
  def parameter_statistics(self, model, step):
    """Mean and standard deviation of every parameter, under params/."""
    writer = self._writer("params")
    if writer is None:
      return
    with writer.as_default():
      for variable in model.trainable_variables:
        name = variable.name.split(":")[0]
        value = variable.numpy()
        tf.summary.scalar(f"params/{name}/mean", float(value.mean()), step=step)
        tf.summary.scalar(f"params/{name}/std", float(value.std()), step=step)

  @_reporting_write_errors
  def flush(self):
    for writer in self._writers.values():
      writer.flush()


class Accumulator:
  """Sums metric counts over the steps between two TensorBoard flushes.

  `loss` is the mean over steps of each step's summed loss (`model.summarize`); per-token
  and per-byte figures are weighted by tokens and bytes; diagnostics (keys starting with
  "diagnostics/") are averaged over steps.
  """

  def __init__(self):
    self._reset()

  def _reset(self):
    self.sums = {}
    self.steps = 0
    self.last = {}

  def add(self, metrics):
    self.steps += 1
    self.last = metrics
    for key, value in metrics.items():
      if key != "learning_rate":
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

  def latest_summary(self):
    return self._summary({k: v for k, v in self.last.items() if k != "learning_rate"}, 1)

  def _summary(self, sums, steps):
    result = model_lib.summarize(sums, steps)
    if "learning_rate" in self.last:
      result["learning_rate"] = float(self.last["learning_rate"])
    return result

  @_reporting_write_errors
  def flush(self):
    result = self._summary(self.sums, self.steps)
    self._reset()
    return result


class Progress:
  """Steps, tokens per second and the time left, measured over the recent steps."""

  def __init__(self, start_step, num_steps, tokens_per_step, window=20):
    self.num_steps = num_steps
    self.tokens_per_step = tokens_per_step
    self.window = window
    self.times = [(start_step, time.monotonic())]

  def update(self, step):
    self.times = (self.times + [(step, time.monotonic())])[-self.window:]

  def seconds_per_step(self):
    # The first interval includes compiling the step; leave it out once others exist.
    times = self.times[1:] if len(self.times) > 2 else self.times
    (first_step, first_time), (last_step, last_time) = times[0], times[-1]
    if last_step == first_step:
      return float("nan")
    return (last_time - first_time) / (last_step - first_step)

  def tokens_per_second(self):
    return self.tokens_per_step / self.seconds_per_step()

  def line(self, metrics):
    step = self.times[-1][0]
    seconds = self.seconds_per_step()
    eta = format_duration(seconds * (self.num_steps - step)) if np.isfinite(seconds) else "?"
    parts = [f"step {step}/{self.num_steps}", format_metrics(metrics),
             f"{self.tokens_per_step / seconds:,.0f} tokens/s" if np.isfinite(seconds) else "",
             f"{seconds:.3f} s/step" if np.isfinite(seconds) else "", f"ETA {eta}"]
    return " | ".join(p for p in parts if p)


def format_metrics(metrics):
  keys = (("nats_per_token", "loss/token {:.4f}"), ("bits_per_token", "bits/token {:.4f}"),
          ("bits_per_char", "bits/byte {:.4f}"), ("accuracy", "accuracy {:.3f}"),
          ("answer_bits_per_token", "answer bits/token {:.4f}"),
          ("learning_rate", "lr {:.2e}"))
  return " ".join(fmt.format(metrics[key]) for key, fmt in keys if key in metrics)


def format_duration(seconds):
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
