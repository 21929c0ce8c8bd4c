"""Every row of docs/bad_inputs.md: the message the user gets, and nothing of theirs damaged.

Each row's ID names its test here (`test_<id>`). The rows run what meliad-train runs, in this
process (parse the gin files and bindings, build the Trainer, train), and assert the error
is one meliad-train prints without a traceback (`trainer.USER_ERRORS`), its message, and
that the files the user had (a workdir with checkpoints, a load_dir, the data) are byte for
byte as before and their checkpoints still restore. The `cli_` rows run meliad-train itself.
"""

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl.testing import flagsaver
import gin
import numpy as np
import pytest
import sentencepiece
import tensorflow as tf

import pipelines
from meliad_tf.serving import export
from meliad_tf.training import checkpoints
from meliad_tf.training import gin_setup
from meliad_tf.training import step_losses
from meliad_tf.training import steps
from meliad_tf.training import trainer as trainer_lib
from meliad_tf.training import workdir_lock
from meliad_tf.serving import generation
from meliad_tools import export as export_tool
from meliad_tools import generate as generate_tool


FILES = ["base_htrans.gin", "size/tiny_test.gin"]
TINY = ["NUM_LAYERS = 1", "EMBED_DIM = 32", "NUM_HEADS = 2", "HEAD_DIM = 16", "MLP_DIM = 64",
        "Trainer.warmup_steps = 2", "Trainer.max_scheduled_steps = 100",
        "Trainer.status_every_steps = 0", "Trainer.log_every_steps = 0",
        "Trainer.print_input_every_steps = 0", "Trainer.generate_every_steps = 0",
        "Trainer.test_every_steps = 0", "Trainer.jit_compile = False"]
# The run whose workdir the user has: three steps, checkpoints ckpt-2 and ckpt-3 (Meliad
# saves after every step but the first, numbered by the next step to run).
SAVED = ["Trainer.num_steps = 3", "Trainer.checkpoint_every_steps = 1",
         "Trainer.max_checkpoints_to_keep = 2"]
# Text files as the byte-level tasks read them (NUM_EMBEDDINGS must hold the 259 byte ids).
BYTES = ["NUM_EMBEDDINGS = 259"]
DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "bad_inputs.md")


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  gin.clear_config()


def configure(*params, files=FILES):
  gin.clear_config()
  gin_setup.parse(files, TINY + list(params))


def run_training(*params, workdir="", load_dir="", files=FILES):
  """What meliad-train does after parsing its flags."""
  configure(*params, files=files)
  return trainer_lib.Trainer().build().train(workdir, load_dir)


def expect_error(pattern, *params, workdir="", load_dir="", files=FILES):
  """Runs training; asserts it fails with a user error whose message matches `pattern`."""
  with pytest.raises(trainer_lib.USER_ERRORS) as info:
    run_training(*params, workdir=workdir, load_dir=load_dir, files=files)
  assert re.search(pattern, str(info.value), re.DOTALL), str(info.value)
  return str(info.value)


def snapshot(directory):
  """Relative path -> SHA-256 of every file under `directory` (a link: its target)."""
  result = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      if os.path.islink(path):
        result[os.path.relpath(path, directory)] = "-> " + os.readlink(path)
        continue
      with open(path, "rb") as f:
        result[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return result


def restored_step(workdir, *params):
  """Builds the saved run's trainer and restores `workdir`; returns its step."""
  configure(*SAVED, *params)
  trainer = trainer_lib.Trainer().build()
  assert trainer.checkpoint_keeper(workdir, 2).restore()
  return trainer.step


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A workdir with ckpt-2 and ckpt-3 of a three-step run."""
  workdir = str(tmp_path_factory.mktemp("saved") / "workdir")
  run_training(*SAVED, workdir=workdir)
  gin.clear_config()
  return workdir


@pytest.fixture
def workdir(saved_run, tmp_path):
  """A copy of the saved run, to damage or protect."""
  copy = str(tmp_path / "workdir")
  shutil.copytree(saved_run, copy)
  return copy


def _checkpoint_dir(workdir):
  return os.path.join(workdir, checkpoints.CHECKPOINT_DIRECTORY)


def write_documents(directory, contents, split="train"):
  """Writes each text (bytes) to a file whose name the hash split sends to `split`."""
  os.makedirs(directory, exist_ok=True)
  index = 0
  for content in contents:
    while pipelines.sources.hash_split(f"doc{index}.txt") != split:
      index += 1
    with open(os.path.join(directory, f"doc{index}.txt"), "wb") as f:
      f.write(content)
    index += 1
  return directory


# ---------------------------------------------------------------------------------------
# Configuration: gin files, bindings, flags

def test_gin_unknown_parameter(workdir):
  before = snapshot(workdir)
  expect_error("Configurable 'Trainer' doesn't have a parameter named 'num_step'",
               "Trainer.num_step = 5", workdir=workdir)
  assert snapshot(workdir) == before


def test_gin_unknown_configurable(workdir):
  before = snapshot(workdir)
  expect_error("No configurable matching 'Trainr'", "Trainr.num_steps = 5", workdir=workdir)
  assert snapshot(workdir) == before


def test_gin_missing_file(workdir):
  before = snapshot(workdir)
  expect_error(r"Unable to open file: size/tiny\.gin", workdir=workdir,
               files=["base_htrans.gin", "size/tiny.gin"])
  assert snapshot(workdir) == before


def test_gin_syntax_error_in_binding(workdir):
  before = snapshot(workdir)
  expect_error(r"gin syntax error in --gin_param 'Trainer.num_steps = ', line 1: "
               r"Unable to parse value", "Trainer.num_steps = ", workdir=workdir)
  assert snapshot(workdir) == before


def test_gin_syntax_error_in_file(workdir, tmp_path):
  bad = tmp_path / "mine.gin"
  bad.write_text("include 'base_htrans.gin'\nTrainer.num_steps = (\n")
  before = snapshot(workdir)
  expect_error(f"gin syntax error in gin file {bad}, line 3: EOF in multi-line statement",
               workdir=workdir, files=[str(bad)])
  assert snapshot(workdir) == before


def test_gin_wrong_type(workdir):
  before = snapshot(workdir)
  expect_error("Trainer.num_steps must be an integer, got 'ten'", "Trainer.num_steps = 'ten'",
               workdir=workdir)
  assert snapshot(workdir) == before


def test_gin_wrong_type_in_task(workdir):
  before = snapshot(workdir)
  expect_error("TransformerTaskConfig.batch_size must be a positive integer, got 2.5",
               "TransformerTaskConfig.batch_size = 2.5", workdir=workdir)
  assert snapshot(workdir) == before


def test_negative_num_steps(workdir):
  before = snapshot(workdir)
  expect_error("Trainer.num_steps must be >= 0, got -1", "Trainer.num_steps = -1",
               workdir=workdir)
  assert snapshot(workdir) == before


def test_negative_period(workdir):
  before = snapshot(workdir)
  expect_error(r"Trainer.checkpoint_every_steps must be >= 0 \(0 turns it off\), got -5",
               "Trainer.checkpoint_every_steps = -5", workdir=workdir)
  assert snapshot(workdir) == before


def test_no_checkpoints_kept(workdir):
  before = snapshot(workdir)
  expect_error("Trainer.max_checkpoints_to_keep must be >= 1, got 0",
               "Trainer.max_checkpoints_to_keep = 0", workdir=workdir)
  assert snapshot(workdir) == before


def test_steps_per_loop_zero(workdir):
  before = snapshot(workdir)
  expect_error("Trainer.steps_per_loop must be >= 1, got 0", "Trainer.steps_per_loop = 0",
               workdir=workdir)
  assert snapshot(workdir) == before


def test_segment_not_a_multiple_of_window(workdir):
  before = snapshot(workdir)
  expect_error(r"the segment length \(TransformerTaskConfig.sequence_length = 200\) must be a "
               r"multiple of the window \(TransformerLayer.window_length = 128\)",
               "TransformerTaskConfig.sequence_length = 200", workdir=workdir)
  assert snapshot(workdir) == before


def test_window_without_xl_cache(workdir):
  before = snapshot(workdir)
  expect_error(r"without the XL architecture .* window \(TransformerLayer.window_length = "
               r"128\) must equal the segment length \(256\)",
               "TransformerLayer.use_long_xl_architecture = False", workdir=workdir)
  assert snapshot(workdir) == before


def test_zero_sizes(workdir):
  before = snapshot(workdir)
  expect_error(r"TransformerBase.head_size \(HEAD_DIM\) must be a positive integer, got 0",
               "HEAD_DIM = 0", workdir=workdir)
  expect_error(r"DecoderStack.num_layers \(NUM_LAYERS\) must be a positive integer, got 0",
               "NUM_LAYERS = 0", workdir=workdir)
  expect_error("TransformerLayer.window_length must be a positive integer, got 0",
               "TransformerLayer.window_length = 0", workdir=workdir)
  assert snapshot(workdir) == before


def test_dropout_rate_out_of_range(workdir):
  before = snapshot(workdir)
  expect_error(r"DecoderStack.final_dropout_rate \(DROPOUT_RATE\) must be a number in "
               r"\[0, 1\), got 1.5", "DROPOUT_RATE = 1.5", workdir=workdir)
  assert snapshot(workdir) == before


def test_unknown_position_type(workdir):
  before = snapshot(workdir)
  expect_error("TransformerLayer.relative_position_type must be one of .*got 't6'",
               "TransformerLayer.relative_position_type = 't6'", workdir=workdir)
  assert snapshot(workdir) == before


def test_unknown_dtype(workdir):
  before = snapshot(workdir)
  expect_error("unknown dtype 'float17'; use 'float32' or 'bfloat16'", "DTYPE = 'float17'",
               workdir=workdir)
  assert snapshot(workdir) == before


def test_schedule_out_of_range(workdir):
  before = snapshot(workdir)
  expect_error("max_lr must be greater than min_lr, got max_lr=0.0001, min_lr=0.001",
               "lr_cosine_decay.max_lr = 0.0001", workdir=workdir)
  assert snapshot(workdir) == before


# The Memorizing Transformer on the tiny model: its one layer has the memory.
MEMORY_FILES = FILES + ["options/external_memory_8k.gin"]
MEMORY = ["DecoderStack.memory_layer_indices = (0,)", "TransformerLayer.memory_num_neighbors = 8"]


def test_memory_not_a_multiple_of_segment(workdir):
  before = snapshot(workdir)
  expect_error(r"memory_factory.memory_on_tpu_factory.database_size \(N = 1000\) must be a "
               r"multiple of the segment length \(TransformerTaskConfig.sequence_length = 256\)",
               *MEMORY, "memory_on_tpu_factory.database_size = 1000", workdir=workdir,
               files=MEMORY_FILES)
  assert snapshot(workdir) == before


def test_memory_not_a_multiple_of_k(workdir):
  before = snapshot(workdir)
  expect_error(r"database_size \(N = 8192\) must be a multiple of "
               r"TransformerLayer.memory_num_neighbors \(K = 100\) for the bucketed backend",
               *MEMORY, "TransformerLayer.memory_num_neighbors = 100", workdir=workdir,
               files=MEMORY_FILES)
  assert snapshot(workdir) == before


def test_k_larger_than_memory(workdir):
  before = snapshot(workdir)
  expect_error(r"TransformerLayer.memory_num_neighbors \(K = 16384\) cannot exceed "
               r"memory_factory.memory_on_tpu_factory.database_size \(N = 8192\)",
               *MEMORY, "TransformerLayer.memory_num_neighbors = 16384", workdir=workdir,
               files=MEMORY_FILES)
  assert snapshot(workdir) == before


def test_memory_heads_mismatch(workdir):
  before = snapshot(workdir)
  expect_error(r"memory_on_tpu_factory.num_heads \(NUM_MEMORY_HEADS = 4\) must equal the "
               r"memory layer's TransformerLayer.num_heads \(2\)", *MEMORY,
               "NUM_MEMORY_HEADS = 4", workdir=workdir, files=MEMORY_FILES)
  assert snapshot(workdir) == before


def test_memory_key_size_mismatch(workdir):
  before = snapshot(workdir)
  expect_error(r"memory_on_tpu_factory.key_size \(MEMORY_HEAD_DIM = 8\) must equal the memory "
               r"layer's TransformerLayer.head_size \(16\)", *MEMORY, "MEMORY_HEAD_DIM = 8",
               workdir=workdir, files=MEMORY_FILES)
  assert snapshot(workdir) == before


# ---------------------------------------------------------------------------------------
# Data

def test_unknown_task(workdir):
  before = snapshot(workdir)
  expect_error("Unknown task 'pg20_bytes'. Known tasks: .*pg19_bytes",
               "TransformerTaskConfig.dataset_name = 'pg20_bytes'", workdir=workdir)
  assert snapshot(workdir) == before


def test_glob_matches_nothing(tmp_path):
  expect_error(f"The file pattern '{tmp_path}/\\*.txt' matches no files",
               f"TransformerTaskConfig.dataset_name = 'files_bytes:{tmp_path}/*.txt'", *BYTES)


def test_empty_data_files(tmp_path):
  data = write_documents(str(tmp_path / "data"), [b""] * 6)
  before = snapshot(data)
  expect_error(f"Split 'train' of source 'files:{data}/\\*.txt' has no documents",
               f"TransformerTaskConfig.dataset_name = 'files_bytes:{data}/*.txt'", *BYTES)
  assert snapshot(data) == before


def test_unreadable_data_file(tmp_path):
  data = write_documents(str(tmp_path / "data"), [b"some text\n"] * 4)
  os.symlink(str(tmp_path / "gone.txt"), os.path.join(data, "link.txt"))
  before = snapshot(data)
  expect_error(f"cannot read {data}/link.txt: .*No such file or directory",
               f"TransformerTaskConfig.dataset_name = 'files_bytes:{data}/*.txt'", *BYTES)
  assert snapshot(data) == before


def test_byte_zero_under_raw_bytes(tmp_path):
  # Past the first 8 KiB, where a NUL byte would have marked the file as binary.
  data = write_documents(str(tmp_path / "data"), [b"abc" * 3000 + b"\x00def\n"] * 3)
  before = snapshot(data)
  configure(f"TransformerTaskConfig.dataset_name = 'files_raw_bytes:{data}/*.txt'",
            "Trainer.num_steps = 1")
  trainer = trainer_lib.Trainer().build()
  with pytest.raises(trainer_lib.DataError, match=(
      "reading split 'train' of task 'files_raw_bytes:.*' failed: .*The raw_bytes vocabulary "
      "cannot encode byte 0 .*Use the bytes vocabulary for this source")):
    trainer.train("")
  assert snapshot(data) == before


def test_undecodable_text_with_bytes(tmp_path):
  texts = [b"caf\xe9 \xff\xfe ok\n", b"\x80\x81 plain\n"]
  data = write_documents(str(tmp_path / "data"), texts)
  before = snapshot(data)
  task = pipelines.get_task(f"files_bytes:{data}/*.txt")
  batch = next(iter(pipelines.load_text_dataset(task, "train", sequence_length=16,
                                                batch_size=2, training=False)))
  got = sorted(task.vocabulary.decode_bytes(row) for row in batch["targets"].numpy().tolist())
  assert got == sorted(texts)
  assert snapshot(data) == before


def test_undecodable_text_with_sentencepiece(tmp_path, capfd):
  prefix = str(tmp_path / "sp")
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(["some plain text to learn pieces from\n"] * 50),
      model_prefix=prefix, vocab_size=300, hard_vocab_limit=False, model_type="bpe", pad_id=0,
      eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="identity", byte_fallback=True,
      minloglevel=2)
  data = write_documents(str(tmp_path / "data"), [b"plain \xff\xfe text\n"])
  before = snapshot(data)
  gin.bind_parameter("pipelines.sentencepiece_vocabulary.model_path", prefix + ".model")
  task = pipelines.get_task(f"files_tokens:{data}/*.txt")
  batch = next(iter(pipelines.load_text_dataset(task, "train", sequence_length=32,
                                                batch_size=1, training=False)))
  assert "\ufffd" in task.vocabulary.decode(batch["targets"].numpy()[0].tolist())
  assert re.search(r"replaced 2 undecodable byte sequences with U\+FFFD in document \"doc\d+",
                   capfd.readouterr().err)
  assert snapshot(data) == before


def test_huge_single_line_file(tmp_path):
  """Tokenized in pieces of whole segments (bounded memory), read back as one document."""
  line = bytes(np.random.default_rng(0).integers(33, 127, size=(5 << 19) + 77, dtype=np.uint8))
  data = write_documents(str(tmp_path / "data"), [line])  # 2.5 MiB, no newline: 3 pieces
  before = snapshot(data)
  task = pipelines.get_task(f"files_bytes:{data}/*.txt")
  batches = list(pipelines.load_text_dataset(task, "train", sequence_length=4096,
                                             batch_size=1, training=False))
  starts = [bool(batch["start_of_sequence"][0]) for batch in batches]
  assert starts == [True] + [False] * (len(batches) - 1)
  tokens = np.concatenate([batch["targets"][0] for batch in batches])
  assert task.vocabulary.decode_bytes(tokens.tolist()) == line
  assert snapshot(data) == before


def test_vocabulary_larger_than_embedding(workdir):
  before = snapshot(workdir)
  expect_error(r"the vocabulary of task 'synthetic_bytes' has 259 ids but the embedding has "
               r"256 rows .*set NUM_EMBEDDINGS >= 259",
               "TransformerTaskConfig.dataset_name = 'synthetic_bytes'", workdir=workdir)
  assert snapshot(workdir) == before


def test_sentencepiece_model_missing(tmp_path):
  expect_error(f"SentencePiece model file '{tmp_path}/none.model' does not exist",
               "TransformerTaskConfig.dataset_name = 'python_stdlib_tokens'",
               f"pipelines.sentencepiece_vocabulary.model_path = '{tmp_path}/none.model'")


def test_sentencepiece_model_damaged(tmp_path):
  model = tmp_path / "bad.model"
  model.write_bytes(b"not a model at all")
  expect_error(f"'{model}' is not a SentencePiece model",
               "TransformerTaskConfig.dataset_name = 'python_stdlib_tokens'",
               f"pipelines.sentencepiece_vocabulary.model_path = '{model}'")
  assert model.read_bytes() == b"not a model at all"


def test_more_streams_than_documents(tmp_path):
  data = write_documents(str(tmp_path / "data"), [b"one document\n"] * 3)
  expect_error(r"has 3 documents, fewer than its 8 streams",
               f"TransformerTaskConfig.dataset_name = 'files_bytes:{data}/*.txt'",
               "TransformerTaskConfig.batch_size = 8", *BYTES)


def test_unknown_split():
  expect_error("Unknown split 'dev' for source 'synthetic'; it has train, validation, test",
               "TransformerTaskConfig.train_split = 'dev'")


# ---------------------------------------------------------------------------------------
# Workdirs and checkpoints

def test_workdir_of_another_model(workdir):
  before = snapshot(workdir)
  expect_error(r"written by a different model:\n  model/decoder_stack/embedding:0: checkpoint "
               r"\[256, 32\], this configuration \[256, 48\]", *SAVED, "EMBED_DIM = 48",
               workdir=workdir)
  assert snapshot(workdir) == before
  assert restored_step(workdir) == 3


def test_workdir_of_a_deeper_model(workdir):
  before = snapshot(workdir)
  expect_error(r"model/decoder_stack/layer_1/.*: in this configuration only", *SAVED,
               "NUM_LAYERS = 2", workdir=workdir)
  assert snapshot(workdir) == before


def test_workdir_of_another_family(workdir):
  before = snapshot(workdir)
  expect_error(r"layer_0/external_memory_bias:0: in this configuration only.*"
               r"state_train/layer_0/memory/keys: in this configuration only", *SAVED, *MEMORY,
               workdir=workdir, files=MEMORY_FILES)
  assert snapshot(workdir) == before


def test_workdir_without_signature_file(workdir):
  os.remove(os.path.join(workdir, checkpoints.SIGNATURE_FILE))
  before = snapshot(workdir)
  expect_error(r"different model:\n  model/decoder/embedding: checkpoint \[256, 32\], this "
               r"configuration \[256, 48\]", *SAVED, "EMBED_DIM = 48", workdir=workdir)
  assert snapshot(workdir) == before


def test_damaged_signature_file(workdir, caplog):
  with open(os.path.join(workdir, checkpoints.SIGNATURE_FILE), "w") as f:
    f.write("{not json")
  before = snapshot(_checkpoint_dir(workdir))
  run_training(*SAVED, workdir=workdir)  # Nothing left to train: it restores and stops.
  assert "model_signature.json is not valid JSON" in caplog.text
  assert snapshot(_checkpoint_dir(workdir)) == before
  assert restored_step(workdir) == 3


def test_resume_with_other_data(workdir):
  before = snapshot(workdir)
  expect_error(r"sequence_length: checkpoint 256, this configuration 384.*start a new "
               r"--workdir with --load_dir=", *SAVED,
               "TransformerTaskConfig.sequence_length = 384", workdir=workdir)
  assert snapshot(workdir) == before


def test_resume_with_test_cycles_added(workdir):
  before = snapshot(_checkpoint_dir(workdir))
  metrics = run_training(*SAVED, "Trainer.test_every_steps = 1", "Trainer.num_test_steps = 1",
                         workdir=workdir)
  assert metrics["token_count"] > 0
  assert snapshot(_checkpoint_dir(workdir)) == before


def test_checkpoint_of_an_older_layout(workdir):
  """A checkpoint that holds the data iterator itself, as older versions wrote it."""
  configure(*SAVED)
  trainer = trainer_lib.Trainer().build()
  old = tf.train.Checkpoint(model=trainer.model, optimizer=trainer.optimizer,
                            train_state=trainer.train_state.checkpointable,
                            test_state=trainer.test_state.checkpointable,
                            train_data=trainer.data.train_iterator._iterator)  # pylint: disable=protected-access
  tf.train.CheckpointManager(old, _checkpoint_dir(workdir), 2,
                             checkpoint_name=checkpoints.CHECKPOINT_NAME).save(4)
  before = snapshot(workdir)
  expect_error(r"ckpt-4 holds its data position in the layout of an older meliad-tf.*start a "
               r"new --workdir with --load_dir=", *SAVED, "Trainer.num_steps = 5",
               workdir=workdir)
  assert snapshot(workdir) == before


def _damage(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def test_newest_checkpoint_unreadable(workdir, caplog):
  _damage(os.path.join(_checkpoint_dir(workdir), "ckpt-3.data-00000-of-00001"))
  before = snapshot(_checkpoint_dir(workdir))
  assert restored_step(workdir) == 2
  assert re.search(r"could not read the newest checkpoint.*ckpt-3: Read less bytes than "
                   r"requested.*restored the older .*ckpt-2 instead", caplog.text, re.DOTALL)
  assert snapshot(_checkpoint_dir(workdir)) == before


def _keep_only_newest(workdir):
  """Makes the workdir one written with max_checkpoints_to_keep = 1."""
  directory = _checkpoint_dir(workdir)
  for name in os.listdir(directory):
    if name.startswith("ckpt-2."):
      os.remove(os.path.join(directory, name))
  tf.compat.v1.train.update_checkpoint_state(directory, os.path.join(directory, "ckpt-3"))


def test_only_checkpoint_unreadable(workdir):
  _keep_only_newest(workdir)
  _damage(os.path.join(_checkpoint_dir(workdir), "ckpt-3.data-00000-of-00001"))
  before = snapshot(workdir)
  expect_error(r"cannot read the checkpoint\(s\) in .*ckpt-3: .*with "
               r"Trainer.max_checkpoints_to_keep = 1 \(Meliad's setting\) there is no older "
               r"checkpoint to fall back to", *SAVED, workdir=workdir)
  assert snapshot(workdir) == before


def test_checkpoint_files_missing(workdir):
  _keep_only_newest(workdir)
  for name in os.listdir(_checkpoint_dir(workdir)):
    if name.startswith("ckpt-3."):
      os.remove(os.path.join(_checkpoint_dir(workdir), name))
  before = snapshot(workdir)
  expect_error(r"cannot read the checkpoint\(s\).*ckpt-3: .*Failed to find any matching files",
               *SAVED, workdir=workdir)
  assert snapshot(workdir) == before


def test_checkpoint_index_damaged(workdir):
  with open(os.path.join(_checkpoint_dir(workdir), "checkpoint"), "w") as f:
    f.write("model_checkpoint_path: ckpt-2 {{{\n")
  before = snapshot(workdir)
  expect_error(r"the checkpoint index .*checkpoint is damaged. Rewrite it", *SAVED,
               workdir=workdir)
  assert snapshot(workdir) == before


def test_interrupted_checkpoint_write(workdir):
  directory = _checkpoint_dir(workdir)
  before = snapshot(directory)
  # What a run killed while saving step 4 leaves, at its various moments.
  os.makedirs(os.path.join(directory, "ckpt-4_temp"))
  with open(os.path.join(directory, "ckpt-4_temp", "part-00000-of-00001.index"), "wb") as f:
    f.write(b"partial")
  shutil.copy(os.path.join(directory, "ckpt-3.index"), os.path.join(directory, "ckpt-4.index"))
  with open(os.path.join(directory, "checkpoint.tmp0123abcd"), "w") as f:
    f.write("model_checkpoint_path: ")
  assert restored_step(workdir) == 3
  assert snapshot(directory) == before


def test_first_checkpoint_write_interrupted(workdir, caplog):
  # Killed after the files of its first checkpoint were complete, before the index.
  directory = _checkpoint_dir(workdir)
  os.remove(os.path.join(directory, "checkpoint"))
  before = snapshot(directory)
  assert restored_step(workdir) == 3
  assert "which no checkpoint index lists" in caplog.text
  assert snapshot(directory) == before


def test_load_dir_without_checkpoint(tmp_path):
  (tmp_path / "empty").mkdir()
  expect_error(f"--load_dir={tmp_path}/empty holds no checkpoint under {tmp_path}/empty/"
               "checkpoints", workdir=str(tmp_path / "new"), load_dir=str(tmp_path / "empty"))


def test_load_dir_of_another_model(workdir, tmp_path):
  before = snapshot(workdir)
  expect_error(r"embedding:0: checkpoint \[256, 32\], this configuration \[256, 48\]",
               "EMBED_DIM = 48", "Trainer.num_steps = 3", workdir=str(tmp_path / "new"),
               load_dir=workdir)
  assert snapshot(workdir) == before


def test_workdir_is_a_file(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("my notes")
  expect_error(f"the workdir {path} is a file, not a directory", workdir=str(path))
  assert path.read_text() == "my notes"


class _FileSizeLimit:
  """Writes past `limit` bytes fail with EFBIG, as on a full disk (RLIMIT_FSIZE)."""

  def __init__(self, limit):
    self.limit = limit

  def __enter__(self):
    self._handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    self._limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self._limits[1]))

  def __exit__(self, *exc_info):
    resource.setrlimit(resource.RLIMIT_FSIZE, self._limits)
    signal.signal(signal.SIGXFSZ, self._handler)


def test_disk_full_while_writing_a_checkpoint(workdir):
  before = snapshot(_checkpoint_dir(workdir))
  configure("Trainer.num_steps = 4", "Trainer.checkpoint_every_steps = 1",
            "Trainer.max_checkpoints_to_keep = 2")
  trainer = trainer_lib.Trainer().build()
  # The data file of a checkpoint is ~0.5 MB; everything else stays under 64 KB.
  with _FileSizeLimit(64 << 10), pytest.raises(checkpoints.CheckpointWriteError, match=(
      r"could not write the checkpoint of step 4 in .*: .*File too large.*The previous "
      r"checkpoint \(.*ckpt-3\) is intact")):
    trainer.train(workdir)
  assert snapshot(_checkpoint_dir(workdir)) == before
  assert restored_step(workdir) == 3


def test_disk_full_while_writing_the_config(workdir):
  before = snapshot(workdir)
  configure(*SAVED)
  trainer = trainer_lib.Trainer().build()
  with _FileSizeLimit(4096), pytest.raises(OSError, match=(
      f"could not write {workdir}/config.gin: File too large")):
    trainer.train(workdir)
  assert snapshot(workdir) == before


# ---------------------------------------------------------------------------------------
# Training numerics

# Step 1 runs at this multiple of the learning rate: its update scales every parameter
# into the 1e26 range and step 2's loss overflows to NaN.
HUGE_LEARNING_RATE = "Trainer.learning_rate_multiplier = 1e30"


def test_nonfinite_loss_stops_the_run(tmp_path):
  workdir = str(tmp_path / "workdir")
  expect_error(r"the training loss \(nan\) or a gradient is not finite at step 2; stopping. "
               r"The last good checkpoint, .*ckpt-2, is kept.*Trainer.skip_nonfinite_steps",
               HUGE_LEARNING_RATE, "Trainer.num_steps = 5", "Trainer.checkpoint_every_steps = 1",
               workdir=workdir)
  assert checkpoints.checkpoint_step(checkpoints.latest_checkpoint(workdir)) == 2
  reader = tf.train.load_checkpoint(checkpoints.latest_checkpoint(workdir))
  for name in reader.get_variable_to_shape_map():
    if name.startswith("model/"):
      assert np.isfinite(reader.get_tensor(name)).all(), name


@pytest.mark.parametrize("shell", ["graph", pytest.param("xla", marks=pytest.mark.slow),
                                   pytest.param("mirrored", marks=pytest.mark.slow)])
def test_nonfinite_loss_skipped(shell, tmp_path):
  configure(HUGE_LEARNING_RATE, "Trainer.skip_nonfinite_steps = True",
            f"Trainer.jit_compile = {shell == 'xla'}")
  strategy = (tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if shell == "mirrored"
              else None)
  trainer = trainer_lib.Trainer().build(strategy)
  for _ in range(2):
    trainer.train_step()

  def parameters_slots_and_state():
    variables = trainer.params + [v for v in trainer.optimizer.variables if v.dtype == tf.float32]
    return [v.numpy() for v in variables], trainer.train_state.values()

  before = parameters_slots_and_state()
  _, metrics = trainer.train_step()
  assert metrics[steps.ALL_FINITE] == 0.0
  after = parameters_slots_and_state()
  tf.nest.map_structure(np.testing.assert_array_equal, after, before)
  for param in trainer.params:
    assert np.isfinite(param.numpy()).all()
  assert trainer.step == 3
  if shell != "graph":
    return

  workdir = str(tmp_path / "workdir")
  run_training(HUGE_LEARNING_RATE, "Trainer.num_steps = 4", "Trainer.log_every_steps = 1",
               "Trainer.skip_nonfinite_steps = True", "Trainer.record_step_losses = True",
               workdir=workdir)
  with open(os.path.join(workdir, step_losses.FILE_NAME)) as f:
    records = [json.loads(line) for line in f]
  assert [r.get("skipped", False) for r in records] == [False, False, True, True]
  skipped = {}
  for event_file in tf.io.gfile.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(event_file):
      for value in event.summary.value:
        if value.tag == "train/skipped_steps":
          skipped[event.step] = float(tf.make_ndarray(value.tensor))
  assert skipped == {1: 0.0, 2: 1.0, 3: 1.0}


# ---------------------------------------------------------------------------------------
# SavedModels: meliad-export and the exported signatures

@pytest.fixture(scope="module")
def exported(saved_run, tmp_path_factory):
  """The saved run exported as a SavedModel (B = 1, L = 256, V = 256)."""
  directory = str(tmp_path_factory.mktemp("exported") / "model")
  handle = export.open_model(workdir=saved_run)
  export.export(handle.module, directory, vocabulary=handle.vocabulary,
                config_text=handle.config_text, task_name=handle.metadata["task"],
                step=handle.metadata["step"])
  gin.clear_config()
  return directory


TOKENS = tf.constant([[(7 * i) % 200 + 3 for i in range(256)]], tf.int32)
STARTS = tf.constant([True])


def _assert_signature_error(exported, error, pattern, *arguments):
  """Calls `score` with bad arguments, then checks the model still scores as a fresh one."""
  before = snapshot(exported)
  model = tf.saved_model.load(exported)
  with pytest.raises(error, match=pattern):
    model.score(*arguments)
  fresh = tf.saved_model.load(exported)
  expected = fresh.score(TOKENS, STARTS)["log_probs"]
  np.testing.assert_array_equal(model.score(TOKENS, STARTS)["log_probs"], expected)
  assert snapshot(exported) == before


def test_saved_model_wrong_dtype(exported):
  _assert_signature_error(exported, TypeError, r"dtype=tf.int64.*to TensorSpec\(shape=\(1, "
                          r"256\), dtype=tf.int32, name='tokens'\)",
                          tf.cast(TOKENS, tf.int64), STARTS)


def test_saved_model_wrong_shape(exported):
  _assert_signature_error(exported, TypeError, r"shape=\(1, 257\).*to TensorSpec\(shape=\(1, "
                          r"256\), dtype=tf.int32, name='tokens'\)",
                          tf.concat([TOKENS, TOKENS[:, :1]], axis=1), STARTS)


def test_saved_model_token_out_of_range(exported):
  _assert_signature_error(exported, tf.errors.InvalidArgumentError,
                          r"score: token ids must be in \[0, 256\), ids of the vocabulary",
                          tf.fill([1, 256], 300), STARTS)


def test_export_over_an_existing_directory(exported, saved_run):
  before = snapshot(exported)
  handle = export.open_model(workdir=saved_run)
  with pytest.raises(export.ExportError, match=f"{exported} already exists; remove it or pass "
                     "--overwrite"):
    export.export(handle.module, exported, vocabulary=handle.vocabulary,
                  config_text=handle.config_text, task_name=handle.metadata["task"],
                  step=handle.metadata["step"])
  assert snapshot(exported) == before


def test_disk_full_while_exporting(exported, saved_run, tmp_path):
  target = str(tmp_path / "model")
  shutil.copytree(exported, target)
  before = snapshot(str(tmp_path))
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(workdir=saved_run, load_dir="", output=target, overwrite=True,
                           jit_compile=False, batch_size=0, gin_param=[]):
    with _FileSizeLimit(64 << 10), pytest.raises(app.UsageError, match=(
        f"could not write the SavedModel {target}: .*File too large.*; {target} was left as "
        "it was")):
      export_tool.main(["meliad-export"])
  assert snapshot(str(tmp_path)) == before


def test_generate_length_too_large(exported):
  """Refused before any work: by the signature before it allocates or decodes anything, by
  meliad-generate before it loads the model."""
  before = snapshot(exported)
  model = tf.saved_model.load(exported)
  prompt, lengths = tf.constant([[70, 71]]), tf.constant([2])
  sampling = (tf.constant(0.0), tf.constant(0), tf.constant([0, 0], tf.int64))
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  with pytest.raises(tf.errors.InvalidArgumentError, match=(
      r"generate: max_length must be <= 1048576 \(the most one call generates per stream\)")):
    model.generate(prompt, lengths, tf.constant(1_000_000_000), *sampling)
  # A billion tokens per stream would take 4 GB for the tokens alone.
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib < (256 << 10)
  assert generation.MAX_LENGTH == 1048576
  fresh = tf.saved_model.load(exported)
  np.testing.assert_array_equal(
      model.generate(prompt, lengths, tf.constant(5), *sampling)["tokens"],
      fresh.generate(prompt, lengths, tf.constant(5), *sampling)["tokens"])
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(saved_model=exported, workdir="", load_dir="", prompt="abc",
                           prompt_file=None, prompt_source=None, max_length=1_000_000_000,
                           sampling="greedy", top_k=0, num_samples=1, batch_size=0):
    with pytest.raises(app.UsageError, match=(
        r"--max_length must be <= 1048576 \(the most one call generates per stream\), got "
        "1000000000")):
      generate_tool.main(["meliad-generate"])
  assert snapshot(exported) == before


# ---------------------------------------------------------------------------------------
# meliad-train itself: exit status 1, the message, no traceback

CLI_CASES = {
    "cli_gin_typo": (["--gin_param=Trainer.num_step = 5"],
                     "meliad-train: error: Configurable 'Trainer' doesn't have a parameter "
                     "named 'num_step'"),
    "cli_unexpected_argument": (["extra"], "unexpected arguments: ['extra']"),
    "cli_unknown_strategy": (["--strategy=tpu2"], "flag --strategy=tpu2: value should be one of"),
    "cli_missing_search_path": (["--gin_search_paths=/no/such/dir"],
                                "meliad-train: error: --gin_search_paths: /no/such/dir is "
                                "not a directory"),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
  """Runs every CLI case at once (each process mostly imports TensorFlow)."""
  workdir = str(tmp_path_factory.mktemp("cli") / "workdir")
  processes = {
      name: subprocess.Popen(
          [sys.executable, "-m", "meliad_tools.train", "--gin_file=base_htrans.gin",
           "--gin_file=size/tiny_test.gin", f"--workdir={workdir}"] + args,
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
      for name, (args, _) in CLI_CASES.items()}
  results = {name: (p.wait(timeout=300), p.stdout.read()) for name, p in processes.items()}
  assert not os.path.exists(workdir)
  return results


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_cli(name, cli_results):
  status, output = cli_results[name]
  assert status == 1, output
  assert CLI_CASES[name][1] in output, output
  assert "Traceback" not in output, output


# ---------------------------------------------------------------------------------------

def test_table_rows_and_tests_match():
  with open(DOC) as f:
    ids = re.findall(r"^\| `([a-z0-9_]+)` \|", f.read(), re.MULTILINE)
  assert len(ids) == len(set(ids)) and len(ids) >= 30, ids
  tests = {name[len("test_"):] for name in globals() if name.startswith("test_")}
  tests.discard("cli")
  tests.discard("table_rows_and_tests_match")
  assert set(ids) == tests | set(CLI_CASES)


def test_all_steps_skipped(tmp_path):
  """A run whose every step is skipped no longer learns: it stops with an error."""
  workdir = str(tmp_path / "workdir")
  expect_error(r"the last 3 steps, up to step 4, were all skipped .* the run no longer learns; "
               r"stopping. The last good checkpoint, .*ckpt-4, is kept",
               HUGE_LEARNING_RATE, "Trainer.skip_nonfinite_steps = True",
               "Trainer.max_consecutive_skipped_steps = 3", "Trainer.num_steps = 30",
               "Trainer.checkpoint_every_steps = 1", workdir=workdir)
  # Skipped steps leave the parameters as they were: the checkpoint holds finite ones.
  reader = tf.train.load_checkpoint(checkpoints.latest_checkpoint(workdir))
  for name in reader.get_variable_to_shape_map():
    if name.startswith("model/"):
      assert np.isfinite(reader.get_tensor(name)).all(), name


def test_gin_file_includes_itself(workdir, tmp_path):
  looping = tmp_path / "loop.gin"
  looping.write_text(f"include '{looping}'\nTrainer.num_steps = 5\n")
  before = snapshot(workdir)
  expect_error(f"gin file {looping} includes itself, directly or through the files it "
               "includes", workdir=workdir, files=[str(looping)])
  assert snapshot(workdir) == before


@pytest.mark.parametrize("binding", ["TransformerTaskConfig.sequence_length = 1000000000",
                                     "TransformerTaskConfig.batch_size = 1000000"])
def test_sizes_too_large_for_memory(binding, workdir):
  before = snapshot(workdir)
  expect_error(r"training this configuration needs about [0-9.e+]+ GiB \(parameters .*, "
               r"activations .*\) .* but this machine has [0-9.]+ GiB of memory available",
               binding, workdir=workdir)
  assert snapshot(workdir) == before


def test_no_workdir(caplog):
  caplog.set_level("WARNING")
  run_training("Trainer.num_steps = 1")
  assert "no --workdir: nothing of this run (checkpoints, summaries, config) will be saved" in (
      caplog.text)


def test_events_disk_full(tmp_path, monkeypatch):
  """The event file's disk fills (a stub): the run says so and saves a checkpoint."""
  workdir = str(tmp_path / "workdir")
  scalar = tf.summary.scalar

  def full_after_two_steps(name, data, step=None, **kwargs):
    if step is not None and step >= 2:
      raise tf.errors.ResourceExhaustedError(
          None, None, f"{workdir}/events.out.tfevents.1; No space left on device")
    return scalar(name, data, step=step, **kwargs)

  monkeypatch.setattr(tf.summary, "scalar", full_after_two_steps)
  expect_error(rf"could not write TensorBoard events in {workdir}: .*No space left on device. "
               rf"Saved {workdir}/checkpoints/ckpt-3; make room and run the same command",
               "Trainer.num_steps = 10", "Trainer.log_every_steps = 1",
               "Trainer.checkpoint_every_steps = 100", workdir=workdir)
  assert checkpoints.checkpoint_step(checkpoints.latest_checkpoint(workdir)) == 3


def test_resume_with_another_num_steps(workdir, caplog):
  """The schedule's horizon follows num_steps unless max_scheduled_steps is set: it moves."""
  caplog.set_level("WARNING")
  run_training("Trainer.num_steps = 5", "Trainer.checkpoint_every_steps = 1",
               "Trainer.max_checkpoints_to_keep = 2", "Trainer.max_scheduled_steps = 0",
               workdir=workdir)
  assert ("the learning-rate schedule's horizon was 100 steps for the 3 steps already run "
          "and is 5 from now on") in caplog.text


def test_workdir_in_use(workdir):
  """Another run, on another host, holds the workdir's lock and is alive (a fresh heartbeat)."""
  holder = {"run": "f00d", "host": "elsewhere", "pid": 1, "started": time.time(),
            "heartbeat": time.time()}
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w") as f:
    json.dump(holder, f)
  before = snapshot(workdir)
  expect_error(r"is in use by run f00d \(host elsewhere, pid 1, .*last heartbeat \d+ s ago\); "
               r"nothing was written.*start with --force", *SAVED, "Trainer.num_steps = 5",
               workdir=workdir)
  assert snapshot(workdir) == before


def test_binary_files_in_a_glob(tmp_path, caplog):
  """A glob that also catches binary files: they are skipped, by name, and the text read."""
  texts = [b"print('hello')\n", b"import os\n", b"x = 1\n"]
  data = write_documents(str(tmp_path / "data"), texts)
  for name in ("image.png", "module.pyc"):
    with open(os.path.join(data, name), "wb") as f:
      f.write(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10)
  caplog.set_level("WARNING")
  source = pipelines.make_source(f"files:{data}/*")
  assert "skipped 2 binary files (a NUL byte in their first 8192 bytes): image.png, module.pyc" in (
      caplog.text)
  names = [n for split in ("train", "validation", "test") for n in source.document_names(split)]
  assert len(names) == len(texts) and not any(n.endswith((".png", ".pyc")) for n in names)
