"""The training loss of every step, in a JSON-lines file of the workdir."""

import json

import tensorflow as tf

from meliad_tf.common import storage


# The file's name in the workdir (Trainer.record_step_losses).
FILE_NAME = "step_losses.jsonl"


class StepLossLog:
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
