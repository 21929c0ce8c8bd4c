"""Curves read back from TensorBoard event files, and plotted."""

import subprocess
import sys

import pytest
import tensorflow as tf

from meliad_tf.training import plots
from meliad_tf.training import summaries


def write_run(workdir, values):
  writer = summaries.SummaryWriter(str(workdir))
  for step, value in values:
    writer.scalars("train", {"bits_per_token": value}, step)
  writer.text("train", "input", "text is not a scalar", 0)
  writer.flush()


def test_read_scalars_returns_what_the_trainer_wrote(tmp_path):
  write_run(tmp_path, [(0, 5.0), (10, 4.0), (20, 3.5)])
  assert plots.read_scalars(str(tmp_path)) == {
      "train/bits_per_token": [(0, 5.0), (10, 4.0), (20, 3.5)]}


def test_rewritten_steps_keep_the_last_value(tmp_path):
  write_run(tmp_path, [(0, 5.0), (10, 4.0)])
  write_run(tmp_path, [(10, 3.0)])
  assert plots.read_scalars(str(tmp_path))["train/bits_per_token"] == [(0, 5.0), (10, 3.0)]


def test_event_files_are_read_in_writing_order_not_name_order(tmp_path):
  for counter, value in ((9, 4.0), (10, 3.0)):
    write_run(tmp_path / str(counter), [(10, value)])
    (written,) = (tmp_path / str(counter)).glob("events.out.tfevents.*")
    written.rename(tmp_path / f"events.out.tfevents.1700000000.host.name.77.{counter}.v2")
  assert plots.read_scalars(str(tmp_path))["train/bits_per_token"] == [(10, 3.0)]


def test_runs_with_separate_metric_directories_read_with_the_directory_as_prefix(tmp_path):
  """As Meliad writes with use_separate_metric_directories: workdir/<mode>/events, bare tags."""
  for mode, values in (("train", [(0, 5.0), (10, 4.0)]), ("test", [(10, 4.5)])):
    writer = tf.summary.create_file_writer(str(tmp_path / mode))
    with writer.as_default():
      for step, value in values:
        tf.summary.scalar("loss", value, step=step)
    writer.close()
  assert plots.read_scalars(str(tmp_path)) == {"train/loss": [(0, 5.0), (10, 4.0)],
                                               "test/loss": [(10, 4.5)]}


def test_missing_event_files_are_reported(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    plots.read_scalars(str(tmp_path))


def test_meliad_plot_writes_a_png(tmp_path):
  write_run(tmp_path / "a", [(0, 5.0), (10, 4.0)])
  write_run(tmp_path / "b", [(0, 6.0), (10, 3.0)])
  output = tmp_path / "curves.png"
  subprocess.run([sys.executable, "-m", "meliad_tools.plot", f"--run=a:{tmp_path / 'a'}",
                  f"--run=b:{tmp_path / 'b'}", "--tags=train/bits_per_token",
                  f"--output={output}"], check=True, capture_output=True)
  assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
