"""Checkpoints of a training run: what they hold, atomic writes, and compatibility checks.

A checkpoint holds the parameters, the optimizer (slots and step), both modes' per-stream
state and both data iterators. TensorFlow writes each checkpoint under a temporary name
and updates the `checkpoint` index last, so an interrupted save leaves the previous
checkpoint usable. Next to the checkpoints, `model_signature.json` records the name and
shape of every variable, so that a workdir written by another model is refused with a
message saying what differs instead of a restore error.
"""

import json
import os
import tempfile

from absl import logging
import tensorflow as tf

CHECKPOINT_DIRECTORY = "checkpoints"
SIGNATURE_FILE = "model_signature.json"


class IncompatibleCheckpointError(ValueError):
  pass


def write_atomically(path, text):
  """Writes a file through a temporary file in the same directory and a rename."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    with os.fdopen(descriptor, "w") as f:
      f.write(text)
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def latest_checkpoint(workdir):
  if not workdir:
    return None
  return tf.train.latest_checkpoint(os.path.join(workdir, CHECKPOINT_DIRECTORY))


def compare_signatures(saved, current, source):
  """Raises IncompatibleCheckpointError naming the variables whose shapes differ."""
  missing = sorted(set(saved) - set(current))
  extra = sorted(set(current) - set(saved))
  changed = sorted(k for k in set(saved) & set(current) if saved[k] != current[k])
  if not (missing or extra or changed):
    return
  lines = [f"the checkpoint in {source} was written by a different model:"]
  lines += [f"  {k}: checkpoint {saved[k]}, this configuration {current[k]}" for k in changed[:10]]
  lines += [f"  {k}: in the checkpoint only" for k in missing[:10]]
  lines += [f"  {k}: in this configuration only" for k in extra[:10]]
  lines.append("use another --workdir, or the gin configuration that wrote it "
               f"({os.path.join(source, 'config.gin')})")
  raise IncompatibleCheckpointError("\n".join(lines))


class CheckpointKeeper:
  """Saves and restores a trainer's state in `<workdir>/checkpoints`.

  Args:
    trainer: a built Trainer.
    workdir: where checkpoints go; "" disables saving.
    max_to_keep: how many checkpoints to keep (Meliad keeps 1).
  """

  def __init__(self, trainer, workdir, max_to_keep=1):
    self.trainer = trainer
    self.workdir = workdir
    parts = dict(model=trainer.model, optimizer=trainer.optimizer,
                 train_state=trainer.train_state.checkpointable,
                 test_state=trainer.test_state.checkpointable)
    parts["train_data"] = trainer.train_iterator
    if trainer.test_iterator is not None:
      parts["test_data"] = trainer.test_iterator
    self.checkpoint = tf.train.Checkpoint(**parts)
    self.manager = (tf.train.CheckpointManager(
        self.checkpoint, os.path.join(workdir, CHECKPOINT_DIRECTORY), max_to_keep,
        checkpoint_name="ckpt") if workdir else None)

  def _check_signature(self, directory):
    path = os.path.join(directory, SIGNATURE_FILE)
    if not tf.io.gfile.exists(path):
      return
    with tf.io.gfile.GFile(path) as f:
      saved = json.load(f)
    compare_signatures(saved, self.trainer.parameter_summary(), directory)

  def restore(self, load_dir=""):
    """Restores from the workdir's latest checkpoint, else from `load_dir`'s; True if any."""
    latest = latest_checkpoint(self.workdir)
    if latest:
      self._check_signature(self.workdir)
      self.checkpoint.restore(latest).assert_existing_objects_matched()
      logging.info("restored %s (step %d)", latest, self.trainer.step)
    elif load_dir:
      latest = latest_checkpoint(load_dir)
      if not latest:
        raise FileNotFoundError(f"--load_dir={load_dir} holds no checkpoint under "
                                f"{os.path.join(load_dir, CHECKPOINT_DIRECTORY)}")
      self._check_signature(load_dir)
      # A new run reads its own data from the start; only the model comes from load_dir.
      parts = dict(model=self.trainer.model, optimizer=self.trainer.optimizer)
      if self.trainer.restore_state_variables:
        parts.update(train_state=self.trainer.train_state.checkpointable,
                     test_state=self.trainer.test_state.checkpointable)
      tf.train.Checkpoint(**parts).restore(latest).expect_partial()
      logging.info("loaded %s (step %d)", latest, self.trainer.step)
    else:
      return False
    self.trainer.train_state.after_restore()
    self.trainer.test_state.after_restore()
    return True

  def save(self):
    """Writes a checkpoint numbered by the optimizer step (the next step to run)."""
    if self.manager is None:
      return None
    self.trainer.train_state.before_save()
    self.trainer.test_state.before_save()
    write_atomically(os.path.join(self.workdir, SIGNATURE_FILE),
                     json.dumps(self.trainer.parameter_summary(), indent=1, sort_keys=True))
    path = self.manager.save(checkpoint_number=self.trainer.step)
    logging.info("saved %s", path)
    return path
