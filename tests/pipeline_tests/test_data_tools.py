"""meliad-data, meliad-vocab and the task gin files."""

import json
import os
import pathlib

import gin
import numpy as np
import pytest
from absl import app
from absl import flags
from absl.testing import flagsaver

import meliad_configs
import pipelines
from meliad_tools import data as data_tool
from meliad_tools import vocab as vocab_tool
from pipeline_helpers import check_epochs


TASK_GIN_DIR = pathlib.Path(meliad_configs.__file__).parent / "tasks"


@pytest.fixture(autouse=True)
def parsed_flags():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver():
    yield


def test_meliad_data_dump_reconstructs_the_documents(tmp_path, text_corpus, capsys):
  dump = tmp_path / "batches.jsonl"
  with flagsaver.flagsaver(source=f"files:{text_corpus}/*.txt", batch_size=3, sequence_length=32,
                           num_batches=300, dump=str(dump), seed=1):
    data_tool.main(["meliad-data"])
  printed = capsys.readouterr().out
  assert "slot 0 doc=" in printed and "start=True" in printed
  rows = [json.loads(line) for line in dump.read_text().splitlines()]
  assert len(rows) == 300
  doc_key = next(key for key in rows[0] if "doc" in key)
  batches = [{("document_id" if key == doc_key else key): np.array(row[key])
              for key in row if key != "step"} for row in rows]
  expected = [(text_corpus / name).read_bytes() for name in sorted(os.listdir(text_corpus))
              if (text_corpus / name).stat().st_size and pipelines.hash_split(name) == "train"]
  check_epochs(batches, expected, pipelines.ByteVocabulary(), min_epochs=1)


@pytest.mark.parametrize("overrides, message", [
    (dict(source="files:/nonexistent/*.txt"), "matches no files"),
    (dict(source="tree:/nonexistent"), "does not exist"),
    (dict(source="nope"), "Unknown task 'nope'"),
    (dict(source="tfds:no_such_dataset_xyz:text"), "Unknown TFDS dataset"),
    (dict(sequence_length=0), "--sequence_length must be positive"),
    (dict(batch_size=0), "--batch_size must be positive"),
    (dict(vocab="/nonexistent/x.model"), "/nonexistent/x.model.*does not exist"),
    (dict(dump="/dev/null/dir/batches.jsonl"), "--dump=/dev/null/dir/batches.jsonl: /dev/null is a file"),
])
def test_meliad_data_rejects_bad_flags_before_work(overrides, message):
  settings = dict(source="synthetic", batch_size=2, sequence_length=16, num_batches=1)
  settings.update(overrides)
  with flagsaver.flagsaver(**settings):
    with pytest.raises(app.UsageError, match=message):
      data_tool.main(["meliad-data"])


def test_meliad_data_rejects_a_file_that_is_not_sentencepiece(tmp_path):
  bogus = tmp_path / "bogus.model"
  bogus.write_text("hello")
  with flagsaver.flagsaver(source="synthetic", vocab=str(bogus), num_batches=1):
    with pytest.raises(app.UsageError, match="bogus.model.*is not a SentencePiece model"):
      data_tool.main(["meliad-data"])


def test_meliad_vocab_trains_a_model_with_pad_zero(tmp_path):
  output = tmp_path / "stdlib"
  with flagsaver.flagsaver(source="python_stdlib", split="test", vocab_size=600, model_type="unigram",
                           output=str(output), max_documents=3):
    vocab_tool.main(["meliad-vocab"])
  assert sorted(os.listdir(tmp_path)) == ["stdlib.model", "stdlib.vocab"]  # no staging leftovers
  vocab = pipelines.SentencePieceVocabulary(str(output) + ".model")
  assert vocab.vocab_size == 600
  assert vocab._processor.pad_id() == 0  # pylint: disable=protected-access
  assert len((tmp_path / "stdlib.vocab").read_text().splitlines()) == 600
  text = "for i in range(10):\n    print(i)\n"
  assert vocab.decode(vocab.encode(text)) == text


@pytest.mark.parametrize("overrides, message", [
    (dict(output=None), "--output is required"),
    (dict(output="/dev/null/dir/model"), "--output=/dev/null/dir/model: /dev/null is a file"),
    (dict(source="files:/nonexistent/*.txt"), "matches no files"),
    (dict(split="dev"), "Unknown split 'dev'"),
])
def test_meliad_vocab_rejects_bad_flags(tmp_path, overrides, message):
  settings = dict(source="synthetic", output=str(tmp_path / "m"), vocab_size=300)
  settings.update(overrides)
  with flagsaver.flagsaver(**settings):
    with pytest.raises(app.UsageError, match=message):
      vocab_tool.main(["meliad-vocab"])


@pytest.mark.parametrize("name, dataset_name, num_embeddings", [
    ("pg19_bytes", "pg19_bytes", 260),
    ("pg19_tokens", "pg19_tokens", 32128),
    ("python_stdlib_bytes", "python_stdlib_bytes", 260),
    ("synthetic_bytes", "synthetic_bytes", 260),
    ("files_bytes", "files_bytes", 260),
    ("tree_bytes", "tree_bytes", 260),
])
def test_task_gin_files_name_known_tasks(name, dataset_name, num_embeddings):
  from meliad_tf.model import task_config  # pylint: disable=g-import-not-at-top,unused-import
  text = (TASK_GIN_DIR / f"{name}.gin").read_text()
  # training_loop.Trainer is registered by the trainer; until it is, only its binding is skipped.
  try:
    gin.parse_config(text)
  except ValueError as e:
    if "training_loop.Trainer" not in str(e):
      raise
    gin.clear_config()
    gin.parse_config(text, skip_unknown=["training_loop.Trainer"])
  assert gin.query_parameter("decoder_stack.TransformerTaskConfig.dataset_name") == dataset_name
  assert gin.query_parameter("%NUM_EMBEDDINGS") == num_embeddings
  assert dataset_name in pipelines.task_names()
  vocab = {"bytes": pipelines.ByteVocabulary(), "tokens": None}[dataset_name.rsplit("_", 1)[1]]
  if vocab is not None:
    assert vocab.vocab_size <= num_embeddings


def test_verbose_logs_the_start_of_each_document(capfd):
  dataset = pipelines.load_text_dataset("synthetic", "train", sequence_length=64, batch_size=2,
                                        verbose=True)
  next(iter(dataset))
  assert 'reading document "synthetic/train/' in capfd.readouterr().err
