"""Reading TensorBoard scalars back from a workdir and plotting training curves."""

import os

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
import tensorflow as tf

from meliad_tf.common import storage


_EVENT_FILES = "events.out.tfevents.*"


def _event_files(workdir):
  """(tag prefix, path) of the event files of a run, in the order they were written.

  Scalars are under `workdir` with tags `<mode>/<name>`, or, written with
  `use_separate_metric_directories`, under `workdir/<mode>` with tags `<name>`.
  """
  found = [("", path) for path in tf.io.gfile.glob(os.path.join(workdir, _EVENT_FILES))]
  for path in tf.io.gfile.glob(os.path.join(workdir, "*", _EVENT_FILES)):
    found.append((os.path.basename(os.path.dirname(path)) + "/", path))
  return sorted(found, key=lambda item: _write_order(item[1]))


def read_scalars(workdir):
  """{tag: [(step, value), ...]} from every event file of a run (see `_event_files`).

  Raises:
    FileNotFoundError: if the workdir holds no event files.
  """
  files = _event_files(workdir)
  if not files:
    raise FileNotFoundError(f"no TensorBoard event files in {workdir} or its subdirectories")
  scalars = {}
  for prefix, path in files:
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name != "scalars":
          continue
        tag = value.tag if "/" in value.tag else prefix + value.tag
        scalars.setdefault(tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  # A resumed run may rewrite steps; the last value written for a step wins.
  return {tag: sorted(points.items()) for tag, points in scalars.items()}


def _write_order(path):
  """Event files in the order they were written: by creation second, then by the writer's
  counter (the name is events.out.tfevents.SECONDS.HOST.PID.COUNTER.v2; HOST may hold dots,
  and the counter has no leading zeros, so names alone sort 10 before 9)."""
  parts = os.path.basename(path).split(".")
  try:
    return int(parts[3]), int(parts[-2]), path
  except (IndexError, ValueError):
    return 0, 0, path


def parse_run(spec):
  """`LABEL:WORKDIR` or a bare `WORKDIR` -> (label, workdir).

  A bare workdir with a scheme (`gs://bucket/run`) is its own label, not label `gs`.
  """
  label, colon, workdir = spec.partition(":")
  if not colon or workdir.startswith("//"):
    return spec, spec
  return label, workdir


def plot_curves(runs, tags, output, title=None):
  """One panel per tag, one line per run.

  Args:
    runs: {label: workdir}.
    tags: scalar tags, e.g. ["train/bits_per_token", "test/bits_per_token"].
    output: PNG path (any filesystem).
  """
  figure, axes = pyplot.subplots(1, len(tags), figsize=(5 * len(tags), 3.6), squeeze=False)
  for index, (label, workdir) in enumerate(runs.items()):
    scalars = read_scalars(workdir)
    for axis, tag in zip(axes[0], tags):
      if tag in scalars:
        steps, values = zip(*scalars[tag])
        # One colour per run in every panel, also where another run lacks the tag.
        axis.plot(steps, values, marker=".", label=label, color=f"C{index % 10}")
  for axis, tag in zip(axes[0], tags):
    axis.set_title(tag)
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    axis.legend()
  if title:
    figure.suptitle(title)
  figure.tight_layout()
  storage.save_figure(figure, output, dpi=100)
  pyplot.close(figure)
