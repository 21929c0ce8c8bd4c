"""Checkpoints of a training run: what they hold, crash safety, and compatibility checks.

A checkpoint holds the parameters, the optimizer (slots and step), both modes' per-stream
state and both data iterators. TensorFlow writes a checkpoint's files under a temporary
directory, moves them to `ckpt-<step>.*`, and only then rewrites the `checkpoint` index
(atomically, by a rename), so a crash at any moment leaves the index pointing at complete
checkpoints. What a crash can leave next to them is garbage: a `ckpt-<n>_temp` directory, a
`checkpoint.tmp<hex>` file, or `ckpt-<n>.*` files the index does not list; a restore removes
those. A crash during the very first save can leave complete files and no index at all; a
restore then takes the newest readable checkpoint files.

A restore tries the indexed checkpoints newest first and falls back to an older one (with a
warning) when the newest cannot be read; with `max_to_keep = 1` (Meliad's setting) there is
no older one, and the error says so. Before restoring, the run is compared with
`model_signature.json` (the name and shape of every variable) and `data_signature.json`
(what the data iterators read), where present, and with the variables the checkpoint itself
records, so that a workdir written by another model or for other data is refused with a
message saying what differs.

Several hosts. Only the chief writes: the signature files and the checkpoint. Every host
takes part in gathering what it holds: the per-stream state of every replica, and every
host's position in its data iterators (`DataPositions`); every host restores from the
chief's checkpoint, so the workdir must be storage they all read (a bucket).
"""
import collections
import dataclasses
import json
import os
import re
import typing

from absl import logging
import tensorflow as tf

from meliad_tf.common import storage
from meliad_tf.training import distribution


CHECKPOINT_DIRECTORY = "checkpoints"
CHECKPOINT_NAME = "ckpt"
SIGNATURE_FILE = "model_signature.json"
DATA_SIGNATURE_FILE = "data_signature.json"
INDEX_FILE = "checkpoint"  # TensorFlow's name for the list of checkpoints in a directory

_CHECKPOINT_FILE = re.compile(CHECKPOINT_NAME + r"-(\d+)\.(index|data-\d+-of-\d+)$")
# What an interrupted write leaves: TensorFlow's directory of a checkpoint being written,
# and its temporary copy of the index (renamed into place when complete).
_TEMPORARY_FILE = re.compile(CHECKPOINT_NAME + r"-\d+_temp$|" + INDEX_FILE + r"\.tmp[0-9a-f]+$")
_VARIABLE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# How older checkpoints held a data iterator: the iterator itself.
_ITERATOR_SUFFIX = "/.ATTRIBUTES/ITERATOR_STATE"
# What TensorFlow raises for a checkpoint it cannot read: a missing or damaged file
# (OpError: NotFound, DataLoss, ...) or a data file shorter than its index says (IndexError).
_UNREADABLE = (tf.errors.OpError, IndexError)


class IncompatibleCheckpointError(ValueError):
  """The checkpoint was written by another model, or reads other data."""


class UnreadableCheckpointError(OSError):
  """No checkpoint of a directory can be read."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, ...); the previous one is intact."""


def latest_checkpoint(workdir):
  if not workdir:
    return None
  return tf.train.latest_checkpoint(os.path.join(workdir, CHECKPOINT_DIRECTORY))


def checkpoint_step(path):
  """The step number in a checkpoint path `.../ckpt-<step>`."""
  return int(path.rsplit("-", 1)[1])


def checkpoint_candidates(directory):
  """The checkpoints a restore tries, newest first, and whether the index lists them.

  Normally these are the checkpoints the index file lists. Without an index file, they are
  the complete-looking checkpoints by step: a run killed during its first checkpoint write,
  after the files were complete but before the index was written, leaves one, and so does
  copying checkpoint files without their index.

  Returns:
    (paths, indexed).
  Raises:
    UnreadableCheckpointError: the index file exists but cannot be parsed.
  """
  if not tf.io.gfile.isdir(directory):
    return [], False
  state = tf.train.get_checkpoint_state(directory)
  if state is not None and state.model_checkpoint_path:
    newest = state.model_checkpoint_path
    return [newest] + [p for p in reversed(state.all_model_checkpoint_paths) if p != newest], True
  if tf.io.gfile.exists(os.path.join(directory, INDEX_FILE)):
    raise UnreadableCheckpointError(
        f"the checkpoint index {os.path.join(directory, INDEX_FILE)} is damaged. Rewrite it "
        f"naming the checkpoint to continue from, e.g.\n"
        f"  echo 'model_checkpoint_path: \"{CHECKPOINT_NAME}-1000\"' > "
        f"{os.path.join(directory, INDEX_FILE)}\n"
        f"or move {directory} aside to start afresh")
  steps = sorted({int(m.group(1)) for m in map(_CHECKPOINT_FILE.match, _listdir(directory))
                  if m and m.group(2) == "index"}, reverse=True)
  return [os.path.join(directory, f"{CHECKPOINT_NAME}-{step}") for step in steps], False


def _listdir(directory):
  return [name.rstrip("/") for name in tf.io.gfile.listdir(directory)]


def remove_unfinished_writes(directory, indexed=None):
  """Removes what interrupted saves left: temporary directories, and, given the paths the
  index lists, the checkpoint files it does not list."""
  keep = {os.path.basename(p) for p in indexed or ()}
  for name in _listdir(directory):
    path = os.path.join(directory, name)
    if _TEMPORARY_FILE.match(name):
      logging.warning("removing %s, left by an interrupted checkpoint write", path)
      if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
      else:
        tf.io.gfile.remove(path)
      continue
    match = _CHECKPOINT_FILE.match(name)
    if indexed is not None and match and f"{CHECKPOINT_NAME}-{match.group(1)}" not in keep:
      logging.warning("removing %s: the checkpoint index does not list it (an interrupted "
                      "checkpoint write or deletion left it)", path)
      tf.io.gfile.remove(path)


def compare_signatures(saved, current, source):
  """Raises IncompatibleCheckpointError naming the entries whose values differ."""
  missing = sorted(set(saved) - set(current))
  extra = sorted(set(current) - set(saved))
  changed = sorted(k for k in set(saved) & set(current) if saved[k] != current[k])
  if not (missing or extra or changed):
    return
  lines = [f"the checkpoint in {source} was written by a different model:"]
  lines += [f"  {k}: checkpoint {saved[k]}, this configuration {current[k]}" for k in changed[:10]]
  lines += [f"  {k}: in the checkpoint only" for k in missing[:10]]
  lines += [f"  {k}: in this configuration only" for k in extra[:10]]
  hidden = sum(max(0, len(group) - 10) for group in (changed, missing, extra))
  if hidden:
    lines.append(f"  ... and {hidden} more")
  lines.append("use another --workdir, or the gin configuration that wrote it "
               f"({os.path.join(source, 'config.gin')})")
  raise IncompatibleCheckpointError("\n".join(lines))


def _escape(name):
  """A child's name as TensorFlow writes it in checkpoint keys."""
  return name.replace(".", "..").replace("/", ".S")


def variable_shapes(root):
  """Checkpoint key (without the attribute suffix) -> shape of every variable under `root`.

  The keys are the ones `tf.train.Checkpoint(root).write` would use: the shortest path of
  attribute names from the root, as TensorFlow's object graph finds it.
  """
  view = tf.train.TrackableView(root)
  shapes = {}
  seen = {id(root)}
  queue = collections.deque([(root, "")])
  while queue:
    parent, path = queue.popleft()
    for name, child in view.children(parent).items():
      if id(child) in seen:
        continue
      seen.add(id(child))
      child_path = f"{path}/{_escape(name)}" if path else _escape(name)
      if isinstance(child, tf.Variable):
        shapes[child_path] = list(child.shape)
      queue.append((child, child_path))
  return shapes


def saved_variable_shapes(path, parts):
  """Checkpoint key -> shape of the variables a checkpoint holds under the given parts."""
  return {key[:-len(_VARIABLE_SUFFIX)]: shape for key, shape in _saved_shapes(path).items()
          if key.endswith(_VARIABLE_SUFFIX) and key.split("/", 1)[0] in parts}


def _saved_shapes(path):
  """Key -> shape of every tensor in the checkpoint `path`.

  `tf.train.list_variables` is not used: it takes `path` for a directory wherever the
  filesystem says `ckpt-<n>` is one, as the in-memory filesystem does when files start
  with that name.
  """
  return tf.compat.v1.train.NewCheckpointReader(path).get_variable_to_shape_map()


def _first_line(error):
  message = getattr(error, "message", None) or str(error)
  return message.strip().splitlines()[0] if message.strip() else type(error).__name__


def saved_data_signature(workdir):
  """The `data_signature.json` of `workdir`'s checkpoints, or None where there is none."""
  return _read_json(os.path.join(workdir, DATA_SIGNATURE_FILE))


def _read_json(path):
  """The JSON object in `path`, or None when it is missing or damaged (with a warning)."""
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      value = json.load(f)
  except ValueError as e:
    logging.warning("%s is not valid JSON (%s); checking the checkpoint's own variable list "
                    "instead. The next checkpoint rewrites it.", path, e)
    return None
  return value if isinstance(value, dict) else None


class DataPositions:
  """Every host's position in one of its data iterators, as the chief's checkpoint holds it.

  A tf.data iterator saves its position only from the process that runs it, and with
  several hosts only the chief writes the checkpoint. So before a save each host serializes
  its iterator's state to bytes (a small record of positions for the pipelines' iterators),
  the bytes are gathered from every host, and `variable` holds one string per host; after a
  restore each host takes its own string back into its iterator.

  Args:
    iterator: this host's `pipelines.StreamIterator` (whose bytes hold its streams' current
      documents too, which a restore tokenizes in parallel; it also takes the bytes of a plain
      tf.data iterator's state, as older versions saved).
    strategy: the strategy whose hosts take part.
  """

  def __init__(self, iterator, strategy):
    self.iterator = iterator
    self.strategy = strategy
    self.variable = tf.Variable([b""] * distribution.num_hosts(strategy), trainable=False,
                                dtype=tf.string)

  def before_save(self):
    """Gathers every host's iterator state (a collective: every host calls it)."""
    self.variable.assign(distribution.gather_host_bytes(self.strategy, self.iterator.serialize()))

  def after_restore(self):
    """Moves this host's restored position into its iterator."""
    self.iterator.deserialize(self.variable[distribution.host_index(self.strategy)].numpy())


@dataclasses.dataclass
class Contents:
  """What a training run's checkpoint holds, and what its compatibility checks compare.

  Attributes:
    strategy: the tf.distribute strategy of the run.
    model, optimizer: their variables (the optimizer's slots and step).
    train_state, test_state: the `StreamState` of each mode.
    train_iterator, test_iterator: this host's data iterators (test: None without test
      cycles).
    parameter_summary: () -> {name: shape} of every variable (`model_signature.json`).
    data_signature: () -> what the data iterators read (`data_signature.json`).
    restore_state_variables: a run started from another workdir (`load_dir`) also takes
      its per-stream state.
  """
  strategy: tf.distribute.Strategy
  model: tf.Module
  optimizer: tf.Module
  train_state: typing.Any
  test_state: typing.Any
  train_iterator: typing.Any
  test_iterator: typing.Any
  parameter_summary: typing.Callable[[], dict]
  data_signature: typing.Callable[[], dict]
  restore_state_variables: bool = True

  @property
  def step(self):
    return int(self.optimizer.iterations.numpy())


class CheckpointKeeper:
  """Saves and restores a training run's `Contents` in `<workdir>/checkpoints`.

  Args:
    contents: what the checkpoints hold.
    workdir: where checkpoints go; "" disables saving.
    max_to_keep: how many checkpoints to keep (Meliad keeps 1); more lets a restore fall
      back to an older one when the newest is unreadable.
    guard: called before anything is written (raises to stop the write), e.g. the check
      that this run still holds the workdir's lock.
  """

  def __init__(self, contents, workdir, max_to_keep=1, guard=None):
    self.contents = contents
    self.guard = guard
    self.workdir = workdir
    self.is_chief = distribution.is_chief(contents.strategy)
    self.directory = os.path.join(workdir, CHECKPOINT_DIRECTORY) if workdir else ""
    self.data = {"train_data": DataPositions(contents.train_iterator, contents.strategy)}
    if contents.test_iterator is not None:
      self.data["test_data"] = DataPositions(contents.test_iterator, contents.strategy)
    # The step of the newest checkpoint written or restored, the same on every host.
    self.saved_step = None
    self.checkpoint = tf.train.Checkpoint(**self._parts(data=True))
    self.manager = (tf.train.CheckpointManager(self.checkpoint, self.directory, max_to_keep,
                                               checkpoint_name=CHECKPOINT_NAME)
                    if workdir else None)

  def _parts(self, data, states=True):
    """The objects a checkpoint holds, by name (the top level of its keys)."""
    contents = self.contents
    parts = dict(model=contents.model, optimizer=contents.optimizer)
    if states:
      parts.update(train_state=contents.train_state.checkpointable,
                   test_state=contents.test_state.checkpointable)
    if data:
      parts.update({name: positions.variable for name, positions in self.data.items()})
    return parts

  def restore(self, load_dir=""):
    """Restores from the workdir's newest readable checkpoint, else from `load_dir`'s.

    Returns:
      True if a checkpoint was restored.
    Raises:
      IncompatibleCheckpointError: the checkpoint belongs to another model or other data.
      UnreadableCheckpointError: no checkpoint the index lists can be read.
      FileNotFoundError: `load_dir` holds no checkpoint.
    """
    restored = False
    if self.directory:
      paths, indexed = checkpoint_candidates(self.directory)
      if self.is_chief and tf.io.gfile.isdir(self.directory):
        if self.guard is not None:
          self.guard()
        remove_unfinished_writes(self.directory, paths if indexed else None)
      if paths:
        self._check_signature_files(self.workdir, resume=True)
        restored = self._restore_newest_readable(self.workdir, paths, resume=True,
                                                 indexed=indexed)
    if not restored and load_dir:
      load_paths, indexed = checkpoint_candidates(os.path.join(load_dir, CHECKPOINT_DIRECTORY))
      if not load_paths:
        raise FileNotFoundError(f"--load_dir={load_dir} holds no checkpoint under "
                                f"{os.path.join(load_dir, CHECKPOINT_DIRECTORY)}")
      self._check_signature_files(load_dir, resume=False)
      restored = self._restore_newest_readable(load_dir, load_paths, resume=False,
                                               indexed=indexed)
      if not restored:
        raise UnreadableCheckpointError(f"--load_dir={load_dir}: none of its checkpoint files "
                                        "can be read (see the warning above)")
    if restored:
      self.contents.train_state.after_restore()
      self.contents.test_state.after_restore()
    return restored

  def _check_signature_files(self, workdir, resume):
    """Compares the run with the signature files next to the checkpoints, where present.

    A resume continues the data iterators, so the data settings must match too; a new run
    from `load_dir` takes the parameters (and the per-stream state if
    `restore_state_variables`) and reads its own data.
    """
    saved = _read_json(os.path.join(workdir, SIGNATURE_FILE))
    if saved is not None:
      current = self.contents.parameter_summary()
      if not (resume or self.contents.restore_state_variables):
        saved = {k: v for k, v in saved.items() if not k.startswith("state_")}
        current = {k: v for k, v in current.items() if not k.startswith("state_")}
      compare_signatures(saved, current, workdir)
    saved_data = _read_json(os.path.join(workdir, DATA_SIGNATURE_FILE))
    if resume and saved_data is not None:
      try:
        compare_signatures(saved_data, self.contents.data_signature(), workdir)
      except IncompatibleCheckpointError as e:
        raise IncompatibleCheckpointError(
            f"{e}\nthe checkpoint's data iterators read other data; to train this model on new "
            f"data, start a new --workdir with --load_dir={workdir}") from None

  def _restore_newest_readable(self, workdir, paths, resume, indexed):
    """Restores the first readable checkpoint of `paths`; False if none is and `indexed`
    is False (unlisted files may be an unfinished write)."""
    failures = []
    for path in paths:
      try:
        self._restore_one(workdir, path, resume)
      except _UNREADABLE as e:
        failures.append(f"  {path}: {_first_line(e)}")
        continue
      if failures:
        logging.warning("could not read the newest checkpoint(s):\n%s\nrestored the older %s "
                        "instead", "\n".join(failures), path)
      if not indexed:
        logging.warning("restored %s, which no checkpoint index lists (a run stopped before "
                        "writing the index, or files copied without it)", path)
      logging.info("%s %s (step %d)", "restored" if resume else "loaded", path,
                   self.contents.step)
      return True
    if not indexed:
      logging.warning("no checkpoint index in %s, and its checkpoint files cannot be read "
                      "(an interrupted first write):\n%s", os.path.dirname(paths[0]),
                      "\n".join(failures))
      return False
    hint = ("with Trainer.max_checkpoints_to_keep = 1 (Meliad's setting) there is no older "
            "checkpoint to fall back to; keep more with Trainer.max_checkpoints_to_keep = 2"
            if len(paths) == 1 else "no listed checkpoint is readable")
    raise UnreadableCheckpointError(
        f"cannot read the checkpoint(s) in {os.path.join(workdir, CHECKPOINT_DIRECTORY)}:\n"
        + "\n".join(failures) + f"\n{hint}. Restore the directory from a backup, or move it "
        "aside to start afresh (the checkpoint files were left as they are)")

  def _restore_one(self, workdir, path, resume):
    """Checks one checkpoint's variables against the run, then restores it."""
    saved_keys = set(_saved_shapes(path))
    saved_parts = {key.split("/", 1)[0] for key in saved_keys}
    parts = self._parts(data=resume, states=resume or self.contents.restore_state_variables)
    positions = []
    for name in self.data if resume else ():
      if name not in saved_parts:
        # A run that had no test cycles saved no test iterator: the test stream then starts
        # from its beginning.
        logging.info("%s holds no %s iterator; that stream starts afresh", path, name)
        del parts[name]
      elif f"{name}{_ITERATOR_SUFFIX}" in saved_keys:
        raise IncompatibleCheckpointError(
            f"{path} holds its data position in the layout of an older meliad-tf, whose "
            f"pipelines this one cannot continue; start a new --workdir with "
            f"--load_dir={workdir} (the parameters, optimizer and step carry over)")
      else:
        positions.append(self.data[name])
    checkpoint = tf.train.Checkpoint(**parts)
    compare_signatures(saved_variable_shapes(path, parts), variable_shapes(checkpoint),
                       workdir)
    status = checkpoint.restore(path)
    if resume:
      status.assert_existing_objects_matched()
    else:
      status.expect_partial()
    for position in positions:
      position.after_restore()
    self.saved_step = self.contents.step

  def save(self):
    """Writes a checkpoint numbered by the optimizer step (the next step to run).

    With several hosts every host calls it at the same step: they all gather what the
    checkpoint holds, and the chief writes it.

    Returns:
      The checkpoint path; None without a workdir. A checkpoint of this step that already
      exists is kept as it is.
    Raises:
      CheckpointWriteError: the write failed; its partial files are removed and the
        previous checkpoint is left as it was.
    """
    if self.manager is None:
      return None
    step = self.contents.step
    path = os.path.join(self.directory, f"{CHECKPOINT_NAME}-{step}")
    if self.saved_step == step:
      return path
    latest = self.manager.latest_checkpoint
    self.contents.train_state.before_save()
    self.contents.test_state.before_save()
    for positions in self.data.values():
      positions.before_save()
    if not self.is_chief:
      self.saved_step = step
      return path
    if self.guard is not None:
      self.guard()
    try:
      storage.write_atomically(
          os.path.join(self.workdir, SIGNATURE_FILE),
          json.dumps(self.contents.parameter_summary(), indent=1, sort_keys=True))
      storage.write_atomically(
          os.path.join(self.workdir, DATA_SIGNATURE_FILE),
          json.dumps(self.contents.data_signature(), indent=1, sort_keys=True))
      path = self.manager.save(checkpoint_number=step)
    except (tf.errors.OpError, OSError) as e:
      self._remove_partial_write(step)
      raise CheckpointWriteError(
          f"could not write the checkpoint of step {step} in {self.directory}: "
          f"{_first_line(e)}. The previous checkpoint ({latest or 'none'}) is intact; make "
          f"room and run the same command again to continue from it") from e
    self.saved_step = step
    logging.info("saved %s", path)
    return path

  def _remove_partial_write(self, step):
    name = f"{CHECKPOINT_NAME}-{step}"
    for entry in _listdir(self.directory):
      path = os.path.join(self.directory, entry)
      try:
        if entry == f"{name}_temp":
          tf.io.gfile.rmtree(path)
        elif entry.startswith(name + "."):
          tf.io.gfile.remove(path)
      except tf.errors.OpError as e:
        logging.warning("could not remove %s: %s", path, _first_line(e))
