"""One run per workdir: a second trainer refuses a held workdir and leaves it as it was."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from meliad_tf.training import checkpoints
from meliad_tf.training import workdir_lock


TINY = ["NUM_LAYERS = 1", "EMBED_DIM = 32", "NUM_HEADS = 2", "HEAD_DIM = 16", "MLP_DIM = 64",
        "Trainer.warmup_steps = 2", "Trainer.max_scheduled_steps = 100",
        "Trainer.status_every_steps = 0", "Trainer.print_input_every_steps = 0",
        "Trainer.generate_every_steps = 0", "Trainer.jit_compile = False",
        "Trainer.test_every_steps = 0"]


def _command(workdir, *params):
  return ([sys.executable, "-m", "meliad_tools.train", "--gin_file=base_htrans.gin",
           "--gin_file=size/tiny_test.gin", f"--workdir={workdir}"]
          + [f"--gin_param={p}" for p in TINY + list(params)])


def _checkpoint_files(workdir):
  """Path -> digest of every file under the checkpoint directory, including the temporary
  directory of a checkpoint whose writer was stopped in the middle."""
  directory = os.path.join(workdir, checkpoints.CHECKPOINT_DIRECTORY)
  result = {}
  for parent, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(parent, name)
      with open(path, "rb") as f:
        result[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return result


# Two training processes end to end (about 30 s); the lock's rules have quick tests below.
@pytest.mark.slow
def test_a_second_trainer_refuses_a_held_workdir_until_its_holder_is_gone(tmp_path):
  workdir = str(tmp_path / "workdir")
  environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  first = subprocess.Popen(_command(workdir, "Trainer.num_steps = 1000",
                                    "Trainer.checkpoint_every_steps = 2"),
                           env=environment, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 120
  while not checkpoints.latest_checkpoint(workdir):
    assert first.poll() is None and time.monotonic() < deadline
    time.sleep(0.05)
  first.send_signal(signal.SIGSTOP)  # Holds the lock, writes nothing while we look.
  try:
    before = _checkpoint_files(workdir)
    config = open(os.path.join(workdir, "config.gin")).read()
    second = subprocess.run(_command(workdir, "Trainer.num_steps = 3", "NUM_LAYERS = 2"),
                            env=environment, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1
    assert f"meliad-train: error: {workdir} is in use by run" in second.stderr
    assert f"pid {first.pid}" in second.stderr and "--force" in second.stderr
    assert _checkpoint_files(workdir) == before
    assert open(os.path.join(workdir, "config.gin")).read() == config
  finally:
    first.send_signal(signal.SIGKILL)
    first.send_signal(signal.SIGCONT)
    first.wait()
  # Its holder killed, the lock names a process of this host that no longer runs.
  resumed = subprocess.run(_command(workdir, "Trainer.num_steps = 6",
                                    "Trainer.checkpoint_every_steps = 2"),
                           env=dict(environment, TF_CPP_MIN_LOG_LEVEL="2"),
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "no longer runs" in resumed.stderr
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))


def _fake_holder(workdir, host, heartbeat_age):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w") as f:
    json.dump({"run": "other", "host": host, "pid": os.getpid(),
               "started": time.time() - heartbeat_age, "heartbeat": time.time() - heartbeat_age},
              f)


def test_a_stale_or_forced_lock_is_taken_over_and_a_fresh_one_is_not(tmp_path):
  workdir = str(tmp_path)
  _fake_holder(workdir, "elsewhere", heartbeat_age=5)
  with pytest.raises(workdir_lock.WorkdirLockedError, match="in use by run other"):
    workdir_lock.WorkdirLock(workdir, stale_seconds=60).acquire()
  for lock in (workdir_lock.WorkdirLock(workdir, stale_seconds=1),
               workdir_lock.WorkdirLock(workdir, force=True)):
    _fake_holder(workdir, "elsewhere", heartbeat_age=5)
    with lock:
      lock.check()
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))


def test_a_run_whose_lock_was_taken_over_stops_before_its_next_write(tmp_path):
  workdir = str(tmp_path)
  lock = workdir_lock.WorkdirLock(workdir, heartbeat_seconds=0.05)
  lock.acquire()
  _fake_holder(workdir, socket.gethostname(), heartbeat_age=0)
  time.sleep(0.2)  # The heartbeat sees it lost, and leaves the other's lock alone.
  with pytest.raises(workdir_lock.WorkdirLockedError, match="was taken over by run other"):
    lock.check()
  lock.release()
  assert json.load(open(os.path.join(workdir, workdir_lock.LOCK_FILE)))["run"] == "other"
