"""Kill and resume with the workdir in a bucket, through TensorFlow's own gs:// client.

`gcs_emulator.py` serves GCS on 127.0.0.1 in a namespace of its own; this module's scenario
runs inside it: an uninterrupted `meliad-train` run and one killed twice with SIGKILL (each
time soon after a checkpoint reached the bucket), both with `--workdir=gs://bucket/...`. The
killed run, started again each time, must finish with the uninterrupted run's step losses and
final checkpoint. Nothing may be written on the local disk where the runs start.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest


HERE = os.path.dirname(os.path.abspath(__file__))
PARAMS = ["NUM_LAYERS = 1", "EMBED_DIM = 32", "NUM_HEADS = 2", "HEAD_DIM = 16", "MLP_DIM = 64",
          "Trainer.warmup_steps = 2", "Trainer.max_scheduled_steps = 100",
          "Trainer.status_every_steps = 0", "Trainer.print_input_every_steps = 0",
          "Trainer.generate_every_steps = 0", "Trainer.jit_compile = False",
          "Trainer.record_step_losses = True", "Trainer.num_steps = 12",
          "Trainer.checkpoint_every_steps = 3", "Trainer.test_every_steps = 4",
          "Trainer.num_test_steps = 2", "Trainer.log_every_steps = 3"]


def _command(workdir):
  return ([sys.executable, "-m", "meliad_tools.train", "--gin_file=base_htrans.gin",
           "--gin_file=size/tiny_test.gin", f"--workdir={workdir}"]
          + [f"--gin_param={p}" for p in PARAMS])


def scenario(output):
  """Runs inside the emulator's namespace; writes what it saw to `output` (JSON)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from meliad_tf.training import checkpoints  # pylint: disable=import-outside-toplevel

  rng = random.Random(int(os.environ.get("MELIAD_RESUME_SEED", random.randrange(1 << 30))))
  environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  reference = subprocess.Popen(_command("gs://bucket/reference"), env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  killed_dir = "gs://bucket/killed"
  kills = []
  while True:
    process = subprocess.Popen(_command(killed_dir), env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if len(kills) == 2:
      log = process.communicate(timeout=600)[0].decode()
      break
    seen = checkpoints.latest_checkpoint(killed_dir)
    # The emulator (unlike GCS) can show an object half-written, which reads as no index.
    while process.poll() is None and checkpoints.latest_checkpoint(killed_dir) in (seen, None):
      time.sleep(0.2)
    time.sleep(rng.uniform(0.0, 2.0))
    process.send_signal(signal.SIGKILL)
    process.wait()
    kills.append(checkpoints.latest_checkpoint(killed_dir))
  reference.wait(timeout=600)

  def losses(workdir):
    with tf.io.gfile.GFile(f"{workdir}/step_losses.jsonl") as f:
      return [json.loads(line) for line in f.read().splitlines()]

  def tensors(workdir):
    reader = tf.compat.v1.train.NewCheckpointReader(checkpoints.latest_checkpoint(workdir))
    return {name: reader.get_tensor(name).tolist()
            for name in reader.get_variable_to_shape_map()
            if name.startswith(("model/", "optimizer/", "train_state/", "test_state/"))}

  result = {"returncodes": [reference.returncode, process.returncode], "kills": kills,
            "log": log[-3000:], "reference": losses("gs://bucket/reference"),
            "killed": losses(killed_dir), "files": sorted(tf.io.gfile.listdir(killed_dir)),
            "reference_checkpoint": tensors("gs://bucket/reference"),
            "killed_checkpoint": tensors(killed_dir)}
  with open(output, "w") as f:
    json.dump(result, f)


def _namespaces_available():
  if not (shutil.which("unshare") and shutil.which("openssl") and shutil.which("ip")):
    return False
  probe = subprocess.run(["unshare", "--mount", "--net", "true"], check=False,
                         capture_output=True)
  return probe.returncode == 0


@pytest.mark.slow
def test_a_run_in_a_bucket_killed_twice_resumes_with_identical_losses(tmp_path):
  pytest.importorskip("gcp_storage_emulator")
  if not _namespaces_available():
    pytest.skip("needs unshare (mount and network namespaces, as root), openssl and ip")
  output = tmp_path / "result.json"
  runs = tmp_path / "cwd"
  runs.mkdir()
  subprocess.run(["unshare", "--mount", "--net", sys.executable,
                  os.path.join(HERE, "gcs_emulator.py"), sys.executable, __file__, str(output)],
                 cwd=runs, check=True, timeout=1500)
  result = json.loads(output.read_text())
  assert result["returncodes"] == [0, 0], result["log"]
  assert len(result["kills"]) == 2 and all(result["kills"]), result["kills"]
  assert [r["step"] for r in result["killed"]] == list(range(12))
  assert result["killed"] == result["reference"]
  assert sorted(result["killed_checkpoint"]) == sorted(result["reference_checkpoint"])
  for name, value in result["reference_checkpoint"].items():
    np.testing.assert_array_equal(result["killed_checkpoint"][name], value, err_msg=name)
  assert {"checkpoints", "config.gin", "step_losses.jsonl"} <= set(
      name.rstrip("/") for name in result["files"])
  assert os.listdir(runs) == []


if __name__ == "__main__":
  sys.path.insert(0, HERE)
  scenario(sys.argv[1])
