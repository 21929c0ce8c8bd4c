"""One training run per workdir: a lock file naming the run that holds it.

Two trainers writing one workdir would overwrite each other's checkpoints and config
without a word. A run (the chief, with several hosts) therefore holds
`<workdir>/meliad.lock`, a JSON file naming the run (a random id), its host and process, and
a heartbeat it refreshes while it lives. It works where `flock` does not (GCS has no
locks): the file is written, read back after a short wait, and read again before every
config and checkpoint write, so that of two runs that started together the one whose lock
was overwritten stops before it writes anything more.

A lock whose holder is gone can be taken over: automatically when it names a process of
this host that no longer runs (a killed run restarted on the same machine), or when its
heartbeat is older than `stale_seconds`, or by force (`meliad-train --force`).
"""

import json
import os
import socket
import threading
import time
import uuid

from absl import logging
import tensorflow as tf

from meliad_tf.common import storage


LOCK_FILE = "meliad.lock"


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir (or took it over from this one)."""


def _process_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process: alive.
    return True
  return True


class WorkdirLock:
  """The lock of one run on one workdir.

  Args:
    workdir: the run's workdir.
    force: take the lock over whoever holds it.
    stale_seconds: a holder whose heartbeat is older than this is taken to be gone.
    heartbeat_seconds: how often the holder refreshes its heartbeat.
    settle_seconds: the wait between writing the lock and reading it back.
  """

  def __init__(self, workdir, force=False, stale_seconds=600.0, heartbeat_seconds=60.0,
               settle_seconds=None):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.force = force
    self.stale_seconds = stale_seconds
    self.heartbeat_seconds = heartbeat_seconds
    # A bucket may take a moment to show another writer's object; a local disk does not.
    self.settle_seconds = (settle_seconds if settle_seconds is not None
                           else 2.0 if storage.has_scheme(workdir) else 0.05)
    self.record = {"run": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
    self._stop = threading.Event()
    self._thread = None

  def _read(self):
    try:
      return json.loads(storage.read_text(self.path))
    except (tf.errors.NotFoundError, ValueError, OSError):
      return None

  def _describe(self, holder, now):
    age = now - holder.get("heartbeat", 0)
    return (f"run {holder.get('run')} (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"started {time.ctime(holder.get('started', 0))}, last heartbeat {age:.0f} s ago)")

  def _write(self):
    self.record["heartbeat"] = time.time()
    storage.write_atomically(self.path, json.dumps(self.record))

  def acquire(self):
    """Takes the lock, or raises WorkdirLockedError naming its holder."""
    now = time.time()
    holder = self._read()
    if holder is not None and holder.get("run") != self.record["run"]:
      same_host = holder.get("host") == self.record["host"]
      if self.force:
        logging.warning("taking over %s from %s (--force)", self.path, self._describe(holder, now))
      elif same_host and not _process_alive(holder.get("pid", -1)):
        logging.warning("taking over %s: its holder, %s, no longer runs", self.path,
                        self._describe(holder, now))
      elif now - holder.get("heartbeat", 0) > self.stale_seconds:
        logging.warning("taking over %s: the heartbeat of %s is older than %d s", self.path,
                        self._describe(holder, now), self.stale_seconds)
      else:
        raise WorkdirLockedError(
            f"{os.path.dirname(self.path)} is in use by {self._describe(holder, now)}; nothing "
            "was written. Use another --workdir, wait for that run to end, or, if it is gone, "
            f"start with --force (a lock whose heartbeat is older than {self.stale_seconds:.0f} "
            "s is taken over by itself)")
    self.record["started"] = now
    self._write()
    time.sleep(self.settle_seconds)
    self.check()
    self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
    self._thread.start()

  def _beat(self):
    while not self._stop.wait(self.heartbeat_seconds):
      holder = self._read()
      if holder is None or holder.get("run") != self.record["run"]:
        return  # Lost: `check` says so before the next write.
      try:
        self._write()
      except OSError as e:
        logging.warning("could not refresh %s: %s", self.path, e)

  def check(self):
    """Raises WorkdirLockedError unless this run still holds the lock (before each write)."""
    holder = self._read()
    if holder is None or holder.get("run") != self.record["run"]:
      taker = self._describe(holder, time.time()) if holder else "someone who removed it"
      raise WorkdirLockedError(
          f"{os.path.dirname(self.path)} was taken over by {taker}; this run stops without "
          "writing anything more there")

  def release(self):
    """Stops the heartbeat and removes the lock, if this run still holds it."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    holder = self._read()
    if holder is not None and holder.get("run") == self.record["run"]:
      try:
        tf.io.gfile.remove(self.path)
      except tf.errors.OpError as e:
        logging.warning("could not remove %s: %s", self.path, e)

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc_info):
    self.release()
