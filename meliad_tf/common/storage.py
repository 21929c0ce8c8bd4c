"""Files on any filesystem TensorFlow reads: local paths, `gs://` buckets, `ram://`.

Every file the library and its tools read or write goes through `tf.io.gfile` (here, or TF
ops that take any path), so workdirs, exports, vocabularies and data may live in a bucket.

Crash safety. Nothing a later run trusts may ever be half-written, also where renaming is
not atomic:

* A single file (`write_atomically`) is written under a temporary name beside the target,
  then renamed over it. On a local disk rename(2) is atomic. On GCS an object becomes
  visible only once its upload has completed, and a rename is a server-side copy of that
  complete object followed by a delete, so a reader sees the old contents or the new ones,
  never a part. TensorFlow's in-memory filesystem renames a file in one step.
* A directory (`publish_directory`) is built under a temporary name, then moved into place.
  On a local disk that is one atomic rename. Elsewhere (GCS has no directories, only
  objects named by prefix; `ram://` does not move a directory's files with it) the files are
  moved one by one, and the file that makes the directory usable (a SavedModel's
  `saved_model.pb`) is moved last: an interrupted move leaves a directory without it, which
  TensorFlow and this library refuse to load, and which the next attempt replaces.
"""

import io
import os
import uuid

import tensorflow as tf


def has_scheme(path):
  """True for `gs://...`, `ram://...` and other non-local paths."""
  return "://" in path


def absolute(path):
  """`path` made absolute if it is a local path; other filesystems' paths are absolute."""
  return path if has_scheme(path) else os.path.abspath(path)


def parent(path):
  """The directory holding `path` (for `gs://bucket/run/file`, `gs://bucket/run`)."""
  return os.path.dirname(absolute(path).rstrip("/"))


def _message(error):
  return getattr(error, "message", None) or getattr(error, "strerror", None) or str(error)


def _temporary_sibling(path, kind):
  return os.path.join(parent(path), f".{os.path.basename(path.rstrip('/'))}.{kind}-{uuid.uuid4().hex}")


def _remove_quietly(path):
  try:
    if tf.io.gfile.isdir(path):
      tf.io.gfile.rmtree(path)
    elif tf.io.gfile.exists(path):
      tf.io.gfile.remove(path)
  except tf.errors.OpError:
    pass


def write_atomically(path, contents):
  """Writes `contents` (str or bytes) to `path` through a temporary file and a rename.

  Missing parent directories are created.

  Raises:
    OSError: naming `path` (a full disk, no permission, ...); the previous file, if any,
      is left as it was.
  """
  data = contents.encode("utf-8") if isinstance(contents, str) else contents
  temporary = _temporary_sibling(path, "tmp")
  try:
    tf.io.gfile.makedirs(parent(path))
    with tf.io.gfile.GFile(temporary, "wb") as f:
      f.write(data)
    tf.io.gfile.rename(temporary, path, overwrite=True)
  except (tf.errors.OpError, OSError) as e:
    # TensorFlow's message starts with the temporary file's path, which means nothing here.
    reason = _message(e).removeprefix(f"{temporary}; ")
    raise OSError(f"could not write {path}: {reason}") from e
  finally:
    _remove_quietly(temporary)


def check_writable(path):
  """Raises ValueError if a file cannot go at `path`: it names a directory, or one of its
  parents is a file. Missing parents are fine (they are created on writing)."""
  if tf.io.gfile.isdir(path):
    raise ValueError(f"{path} is a directory")
  directory = parent(path)
  while directory and not tf.io.gfile.exists(directory):
    above = parent(directory)
    if above == directory:
      return
    directory = above
  if directory and not tf.io.gfile.isdir(directory):
    raise ValueError(f"{directory} is a file, not a directory")


def read_text(path):
  with tf.io.gfile.GFile(path, "r") as f:
    return f.read()


def read_bytes(path):
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


def save_figure(figure, path, **kwargs):
  """Saves a matplotlib figure as PNG at `path` (any filesystem), atomically."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", **kwargs)
  write_atomically(path, buffer.getvalue())


def staging_directory(target):
  """A new, empty directory beside `target` to build it in before `publish_directory`."""
  staging = _temporary_sibling(target, "staging")
  tf.io.gfile.makedirs(staging)
  return staging


def remove_directory(path):
  """Removes a directory tree, ignoring one that is already gone."""
  _remove_quietly(path)


def _relative_files(directory):
  """Paths of every file under `directory`, relative to it."""
  found = []
  for root, _, files in tf.io.gfile.walk(directory):
    relative_root = os.path.relpath(root, directory) if root != directory else ""
    found += [os.path.join(relative_root, name) for name in files]
  return found


def publish_directory(staging, target, last_file):
  """Moves the directory `staging` to `target`, replacing `target` if it exists.

  Args:
    staging: a complete directory (from `staging_directory`).
    target: where it goes.
    last_file: the path, relative to the directory, of the file whose presence makes the
      directory usable; where the move is not one atomic rename it is moved last, and an
      existing `target` loses it first.
  """
  if not has_scheme(target):
    if tf.io.gfile.exists(target):
      # Moved aside rather than deleted first, so that the target is missing only for the
      # moment between two renames.
      old = _temporary_sibling(target, "old")
      tf.io.gfile.rename(target, old)
      tf.io.gfile.rename(staging, target)
      _remove_quietly(old)
    else:
      tf.io.gfile.rename(staging, target)
    return
  if tf.io.gfile.exists(target):
    _remove_quietly(os.path.join(target, last_file))
    _remove_quietly(target)
  files = sorted(_relative_files(staging), key=lambda name: name == last_file)
  if last_file not in files:
    raise ValueError(f"{staging} holds no {last_file}")
  for name in files:
    destination = os.path.join(target, name)
    tf.io.gfile.makedirs(parent(destination))
    tf.io.gfile.rename(os.path.join(staging, name), destination, overwrite=True)
  _remove_quietly(staging)
