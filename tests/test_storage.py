"""Every file on any filesystem: the storage helpers, and a whole cycle on `ram://`.

TensorFlow's in-memory filesystem stands for a bucket: its paths have a scheme, local-file
calls cannot open them, and it cannot rename a directory with its files, as GCS cannot. It
is private to one process, so the cycle (a vocabulary, training, a resume in a fresh
trainer, export, evaluation, generation, the run's plot) runs in this process, from a
working directory that must stay empty.
"""

import json
import os
import sysconfig
import uuid

from absl.testing import flagsaver
import gin
import pytest
import tensorflow as tf

from meliad_tf.common import storage
from meliad_tf.serving import export
from meliad_tf.training import checkpoints
from meliad_tf.training import gin_setup
from meliad_tf.training import plots
from meliad_tf.training import step_losses
from meliad_tf.training import trainer as trainer_lib
from meliad_tools import eval as eval_tool
from meliad_tools import export as export_tool
from meliad_tools import generate as generate_tool
from meliad_tools import plot as plot_tool
from meliad_tools import vocab as vocab_tool


PNG = b"\x89PNG\r\n\x1a\n"


def ram_directory():
  return f"ram://{uuid.uuid4().hex}"


def test_write_atomically_replaces_a_file_and_leaves_no_temporary_files():
  directory = ram_directory()
  path = f"{directory}/deep/er/file.txt"
  storage.write_atomically(path, "first")
  storage.write_atomically(path, b"second")
  assert storage.read_text(path) == "second"
  assert tf.io.gfile.listdir(f"{directory}/deep/er") == ["file.txt"]


def test_write_atomically_keeps_the_old_file_when_the_write_fails(tmp_path):
  target = tmp_path / "config.gin"
  target.write_text("old")
  (tmp_path / "blocker").write_text("a file where a directory should be")
  with pytest.raises(OSError, match="could not write .*blocker/x"):
    storage.write_atomically(str(tmp_path / "blocker" / "x"), "new")
  os.chmod(tmp_path, 0o500)
  try:
    if os.access(tmp_path, os.W_OK):  # root writes anyway
      pytest.skip("the directory stays writable for this user")
    with pytest.raises(OSError, match="could not write"):
      storage.write_atomically(str(target), "new")
  finally:
    os.chmod(tmp_path, 0o700)
  assert target.read_text() == "old"
  assert sorted(os.listdir(tmp_path)) == ["blocker", "config.gin"]


@pytest.mark.parametrize("kind", ["local", "ram"])
def test_publish_directory_moves_every_file_and_replaces_the_target(kind, tmp_path):
  root = str(tmp_path) if kind == "local" else ram_directory()
  target = f"{root}/model"
  for content in ("old", "new"):
    staging = storage.staging_directory(target)
    storage.write_atomically(f"{staging}/variables/v.index", content)
    storage.write_atomically(f"{staging}/saved_model.pb", content)
    storage.publish_directory(staging, target, last_file="saved_model.pb")
  assert storage.read_text(f"{target}/saved_model.pb") == "new"
  assert storage.read_text(f"{target}/variables/v.index") == "new"
  assert sorted(tf.io.gfile.listdir(root)) == ["model"]


def test_an_interrupted_move_leaves_no_saved_model_file(monkeypatch):
  """Where files move one by one, the file that makes a SavedModel moves last."""
  target = f"{ram_directory()}/model"
  staging = storage.staging_directory(target)
  for name in ("saved_model.pb", "assets/metadata.json", "variables/variables.index"):
    storage.write_atomically(f"{staging}/{name}", name)
  moved = []
  rename = tf.io.gfile.rename

  def rename_then_fail(source, destination, overwrite=False):
    if len(moved) == 2:
      raise tf.errors.UnavailableError(None, None, "connection lost")
    moved.append(destination)
    rename(source, destination, overwrite)

  monkeypatch.setattr(tf.io.gfile, "rename", rename_then_fail)
  with pytest.raises(tf.errors.UnavailableError):
    storage.publish_directory(staging, target, last_file="saved_model.pb")
  assert not tf.io.gfile.exists(f"{target}/saved_model.pb")
  with pytest.raises(ValueError, match="no saved_model.pb: .* an export into it was interrupted"):
    export.read_metadata(target)


def test_check_writable_refuses_a_directory_or_a_file_as_parent(tmp_path):
  (tmp_path / "file").write_text("x")
  storage.check_writable(str(tmp_path / "new" / "dirs" / "out.json"))
  storage.check_writable(f"{ram_directory()}/a/b/out.json")
  with pytest.raises(ValueError, match="is a file, not a directory"):
    storage.check_writable(str(tmp_path / "file" / "sub" / "out.json"))
  with pytest.raises(ValueError, match="is a directory"):
    storage.check_writable(str(tmp_path))


@pytest.mark.parametrize("spec, expected", [
    ("runs/xl", ("runs/xl", "runs/xl")),
    ("baseline:runs/xl", ("baseline", "runs/xl")),
    ("gs://bucket/run", ("gs://bucket/run", "gs://bucket/run")),
    ("memory:gs://bucket/run", ("memory", "gs://bucket/run")),
])
def test_a_run_label_is_split_off_before_a_scheme(spec, expected):
  assert plots.parse_run(spec) == expected


# The tiny model of the cycle: SentencePiece tokens of stdlib text files in ram://.
CYCLE_PARAMS = [
    "NUM_LAYERS = 1", "EMBED_DIM = 32", "NUM_HEADS = 2", "HEAD_DIM = 16", "MLP_DIM = 64",
    "NUM_EMBEDDINGS = 512", "TransformerTaskConfig.sequence_length = 32",
    "TransformerTaskConfig.batch_size = 2", "TransformerLayer.window_length = 16",
    "Trainer.warmup_steps = 1", "Trainer.max_scheduled_steps = 100",
    "Trainer.test_every_steps = 2", "Trainer.num_test_steps = 1", "Trainer.log_every_steps = 1",
    "Trainer.status_every_steps = 0", "Trainer.print_input_every_steps = 0",
    "Trainer.checkpoint_every_steps = 2", "Trainer.jit_compile = False",
    "Trainer.record_step_losses = True",
]


def _write_corpus(directory, count=40):
  """The first 1.5 kB of `count` standard-library modules, one text file each."""
  stdlib = sysconfig.get_paths()["stdlib"]
  names = sorted(n for n in os.listdir(stdlib) if n.endswith(".py"))[:count]
  for name in names:
    with open(os.path.join(stdlib, name), "rb") as f:
      storage.write_atomically(f"{directory}/{name}.txt", f.read(1500))


def _train(task, model_path, workdir, num_steps):
  gin.clear_config()
  gin_setup.parse(["base_htrans.gin", "size/tiny_test.gin"], CYCLE_PARAMS + [
      f"TransformerTaskConfig.dataset_name = '{task}'",
      f"pipelines.sentencepiece_vocabulary.model_path = '{model_path}'",
      f"Trainer.num_steps = {num_steps}"])
  try:
    trainer = trainer_lib.Trainer().build()
    trainer.train(workdir)
  finally:
    gin.clear_config()
  return trainer


def test_a_whole_cycle_on_the_in_memory_filesystem(tmp_path, monkeypatch, clean_gin, capsys):
  monkeypatch.chdir(tmp_path)
  root = ram_directory()
  _write_corpus(f"{root}/data")
  task = f"files_tokens:{root}/data/*.txt"

  with flagsaver.flagsaver(source=f"files:{root}/data/*.txt", split="train",
                           output=f"{root}/vocab/stdlib", vocab_size=500,
                           gin_param=[], default_data_dir=None):
    vocab_tool.main(["meliad-vocab"])
  model_path = f"{root}/vocab/stdlib.model"
  assert tf.io.gfile.exists(model_path) and tf.io.gfile.exists(f"{root}/vocab/stdlib.vocab")

  workdir = f"{root}/run"
  _train(task, model_path, workdir, num_steps=2)
  assert checkpoints.checkpoint_step(checkpoints.latest_checkpoint(workdir)) == 2
  resumed = _train(task, model_path, workdir, num_steps=4)
  assert resumed.step == 4
  losses = storage.read_text(f"{workdir}/{step_losses.FILE_NAME}").splitlines()
  assert [json.loads(line)["step"] for line in losses] == [0, 1, 2, 3]
  assert "files_tokens" in storage.read_text(f"{workdir}/config.gin")

  saved_model = f"{root}/exported/model"
  with flagsaver.flagsaver(workdir=workdir, load_dir="", output=saved_model, batch_size=0,
                           overwrite=False, jit_compile=False, gin_param=[]):
    export_tool.main(["meliad-export"])
  assert export.read_metadata(saved_model)["step"] == 4

  results = f"{root}/eval/results.json"
  with flagsaver.flagsaver(saved_model=saved_model, workdir="", load_dir="", source="",
                           split="train", max_documents=2, batch_size=0, bucket_tokens=0,
                           output=results, plot="", print_documents=20, progress=False,
                           jit_compile=False, gin_param=[], default_data_dir=None):
    eval_tool.main(["meliad-eval"])
  assert json.loads(storage.read_text(results))["aggregate"]["documents"] == 2
  assert storage.read_bytes(f"{root}/eval/results.png")[:8] == PNG

  storage.write_atomically(f"{root}/prompt.txt", "import os\n")
  with flagsaver.flagsaver(saved_model=saved_model, workdir="", load_dir="", prompt=None,
                           prompt_file=f"{root}/prompt.txt", prompt_source=None, max_length=5,
                           sampling="greedy", top_k=0, num_samples=1, batch_size=0,
                           gin_param=[]):
    generate_tool.main(["meliad-generate"])

  curves = f"{root}/plots/curves.png"
  with flagsaver.flagsaver(run=[f"tiny:{workdir}"], tags=["train/loss", "test/loss"],
                           output=curves, title=None):
    plot_tool.main(["meliad-plot"])
  assert storage.read_bytes(curves)[:8] == PNG
  capsys.readouterr()
  assert os.listdir(tmp_path) == []

