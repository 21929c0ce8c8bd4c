"""Several hosts: two `meliad-train` worker processes on 127.0.0.1 (MultiWorkerMirroredStrategy
from TF_CONFIG, one CPU device each).

* The two hosts together compute what one process computes with MirroredStrategy over two
  logical devices on the same global batch: losses, parameters and every stream's state.
* Only the chief writes the workdir: the other worker sees it read-only (a read-only bind
  mount in a mount namespace of its own, where the machine allows one).
* A worker killed with SIGKILL makes the other stop with an error within 60 s; both started
  again continue with the losses of the uninterrupted run, each host's data position restored.
* SIGTERM to one worker gives one checkpoint, and both exit with 143.
* The data signature the chief writes counts the two hosts' input pipelines.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import gin
import numpy as np
import pytest
import tensorflow as tf

import pipelines
from meliad_tf.training import checkpoints
from meliad_tf.training import gin_setup
from meliad_tf.training import step_losses
from meliad_tf.training import trainer as trainer_lib


PARAMS = ["NUM_LAYERS = 1", "EMBED_DIM = 32", "NUM_HEADS = 2", "HEAD_DIM = 16", "MLP_DIM = 64",
          "TransformerTaskConfig.batch_size = 1", "Trainer.warmup_steps = 2",
          "Trainer.max_scheduled_steps = 100", "Trainer.status_every_steps = 0",
          "Trainer.print_input_every_steps = 0", "Trainer.generate_every_steps = 0",
          "Trainer.jit_compile = False", "Trainer.record_step_losses = True",
          "Trainer.test_every_steps = 4", "Trainer.num_test_steps = 2",
          "Trainer.log_every_steps = 2"]
NUM_STEPS = 12


def _free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def _can_mount_read_only(directory):
  probe = subprocess.run(
      ["unshare", "--mount", "sh", "-c", f"mount --bind -o ro '{directory}' '{directory}'"],
      capture_output=True, check=False) if shutil.which("unshare") else None
  return probe is not None and probe.returncode == 0


class Cluster:
  """Two worker processes of one training run, their logs beside the workdir."""

  def __init__(self, workdir, num_steps, checkpoint_every_steps, read_only_worker=False):
    self.workdir = workdir
    os.makedirs(workdir, exist_ok=True)
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    params = PARAMS + [f"Trainer.num_steps = {num_steps}",
                       f"Trainer.checkpoint_every_steps = {checkpoint_every_steps}"]
    command = [sys.executable, "-m", "meliad_tools.train", "--strategy=multi_worker",
               "--gin_file=base_htrans.gin", "--gin_file=size/tiny_test.gin",
               f"--workdir={workdir}"] + [f"--gin_param={p}" for p in params]
    self.read_only_worker = read_only_worker and _can_mount_read_only(workdir)
    self.processes, self.logs = [], []
    for index in range(2):
      environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
          {"cluster": cluster, "task": {"type": "worker", "index": index}}))
      argv = command
      if index == 1 and self.read_only_worker:
        argv = ["unshare", "--mount", "sh", "-c",
                f"mount --bind -o ro '{workdir}' '{workdir}' && exec \"$@\"", "worker"] + command
      log = f"{workdir}.worker{index}.{len(self.logs) // 2}.log"
      self.logs.append(log)
      with open(log, "w") as f:
        self.processes.append(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                               env=environment))
    self.logs = self.logs[-2:]

  def wait(self, timeout):
    return [p.wait(timeout=timeout) for p in self.processes]

  def log(self, index):
    with open(self.logs[index]) as f:
      return f.read()


def read_step_losses(workdir):
  path = os.path.join(workdir, step_losses.FILE_NAME)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().splitlines()
  return [json.loads(line) for line in lines if line.endswith("}")]


def checkpoint_tensors(workdir):
  reader = tf.compat.v1.train.NewCheckpointReader(checkpoints.latest_checkpoint(workdir))
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
          if name.startswith(("model/", "train_state/", "test_state/"))}


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("two_workers") / "workdir")
  cluster = Cluster(workdir, NUM_STEPS, checkpoint_every_steps=4, read_only_worker=True)
  codes = cluster.wait(timeout=600)
  assert codes == [0, 0], cluster.log(0)[-3000:] + cluster.log(1)[-3000:]
  return workdir, cluster


def test_two_hosts_compute_what_one_mirrored_process_does(two_worker_run, tmp_path):
  workdir, _ = two_worker_run
  gin.clear_config()
  gin_setup.parse(["base_htrans.gin", "size/tiny_test.gin"],
                  PARAMS + [f"Trainer.num_steps = {NUM_STEPS}", "Trainer.checkpoint_every_steps = 4"])
  try:
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    trainer_lib.Trainer().build(strategy).train(str(tmp_path))
  finally:
    gin.clear_config()
  hosts = [record["loss"] for record in read_step_losses(workdir)]
  one_process = [record["loss"] for record in read_step_losses(str(tmp_path))]
  assert len(hosts) == NUM_STEPS
  np.testing.assert_allclose(hosts, one_process, rtol=1e-5)
  expected = checkpoint_tensors(str(tmp_path))
  actual = checkpoint_tensors(workdir)
  assert sorted(actual) == sorted(expected)
  assert any(name.startswith("train_state/") for name in actual)
  for name, value in expected.items():
    np.testing.assert_allclose(actual[name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_only_the_chief_writes_the_workdir(two_worker_run):
  workdir, cluster = two_worker_run
  names = sorted(os.listdir(workdir))
  events = [name for name in names if name.startswith("events.out.tfevents.")]
  assert len(events) == 1 and f".{cluster.processes[0].pid}." in events[0]
  assert [name for name in names if name not in events] == [
      "checkpoints", "config.gin", checkpoints.DATA_SIGNATURE_FILE, checkpoints.SIGNATURE_FILE,
      step_losses.FILE_NAME]
  assert "TensorBoard logs" in cluster.log(0) and "TensorBoard logs" not in cluster.log(1)
  if not cluster.read_only_worker:
    pytest.skip("no mount namespace here: the other worker's view was not read-only")


def test_the_data_signature_counts_the_hosts_pipelines(two_worker_run):
  workdir, _ = two_worker_run
  with open(os.path.join(workdir, checkpoints.DATA_SIGNATURE_FILE)) as f:
    signature = json.load(f)
  assert signature == {
      "dataset_name": "synthetic", "train_split": "train", "test_split": "test",
      "sequence_length": 256, "global_batch_size": 2, "random_seed": 42, "input_pipelines": 2,
      "iterator_layout": pipelines.streams.ITERATOR_LAYOUT}


def _wait_for_steps(workdir, count, cluster, deadline):
  while len(read_step_losses(workdir)) < count:
    assert time.monotonic() < deadline, cluster.log(0)[-3000:]
    assert all(p.poll() is None for p in cluster.processes), cluster.log(0)[-3000:]
    time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_worker_stops_the_other_and_a_restart_continues(two_worker_run, tmp_path):
  reference_dir, _ = two_worker_run
  workdir = str(tmp_path / "workdir")
  cluster = Cluster(workdir, NUM_STEPS, checkpoint_every_steps=4)
  _wait_for_steps(workdir, 6, cluster, time.monotonic() + 300)
  cluster.processes[1].send_signal(signal.SIGKILL)
  killed_at = time.monotonic()
  code = cluster.processes[0].wait(timeout=90)
  stopped_after = time.monotonic() - killed_at
  cluster.processes[1].wait()
  assert code != 0 and stopped_after < 60, (code, stopped_after)
  assert "lost contact with another host" in cluster.log(0)
  recorded_before = read_step_losses(workdir)

  restarted = Cluster(workdir, NUM_STEPS, checkpoint_every_steps=4)
  assert restarted.wait(timeout=600) == [0, 0], restarted.log(0)[-3000:]
  expected = {r["step"]: r["loss"] for r in read_step_losses(reference_dir)}
  final = read_step_losses(workdir)
  assert [r["step"] for r in final] == list(range(NUM_STEPS))
  for record in final + recorded_before:
    np.testing.assert_allclose(record["loss"], expected[record["step"]], rtol=1e-6,
                               err_msg=str(record))
  print(f"the other worker stopped {stopped_after:.1f} s after the kill")


@pytest.mark.slow
def test_sigterm_to_one_worker_gives_one_checkpoint_and_both_exit_143(tmp_path):
  workdir = str(tmp_path / "workdir")
  cluster = Cluster(workdir, num_steps=1000, checkpoint_every_steps=500)
  _wait_for_steps(workdir, 3, cluster, time.monotonic() + 300)
  cluster.processes[1].send_signal(signal.SIGTERM)
  assert cluster.wait(timeout=60) == [143, 143], cluster.log(0)[-3000:]
  steps_done = len(read_step_losses(workdir))
  directory = os.path.join(workdir, checkpoints.CHECKPOINT_DIRECTORY)
  assert sorted(n for n in os.listdir(directory) if n.endswith(".index")) == [
      f"ckpt-{steps_done}.index"]
  assert f"stopped by SIGTERM on another host before step {steps_done}" in cluster.log(0)
  assert f"stopped by SIGTERM before step {steps_done}" in cluster.log(1)
