"""Stream invariants on every kind of source, checked against documents
rebuilt from the batches alone: each slot carries consecutive segments of one document, and every
document appears exactly once per epoch, in one slot, contiguous."""

import os
import sysconfig

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import pipelines
from pipeline_helpers import check_epochs, check_evaluation, epoch_order, reconstruct, take


BYTES = pipelines.ByteVocabulary()


def _with_header(relative, content):
  if content and not content.endswith(b"\n"):
    content += b"\n"
  return f"==> {relative} <==\n".encode() + content


def _glob_documents(directory, split):
  documents = {}
  for name in sorted(os.listdir(directory)):
    content = (directory / name).read_bytes()
    if content and pipelines.hash_split(name) == split:
      documents[name] = content
  return documents


def _tree_documents(root, split):
  documents = {}
  for entry in sorted(os.listdir(root)):
    if pipelines.hash_split(entry) != split:
      continue
    path = root / entry
    if path.is_file():
      documents[entry] = _with_header(entry, path.read_bytes())
      continue
    files = sorted(os.path.relpath(os.path.join(d, f), root)
                   for d, subdirs, fs in os.walk(path) if "/." not in d + "/"
                   for f in fs if not f.startswith("."))
    documents[entry] = b"".join(_with_header(f, (root / f).read_bytes()) for f in files)
  return documents


def _stdlib_documents(names, split):
  stdlib = sysconfig.get_paths()["stdlib"]
  documents = {}
  for name in names:
    if pipelines.hash_split(name) == split:
      with open(os.path.join(stdlib, name), "rb") as f:
        documents[name] = _with_header(name, f.read())
  return documents


def test_stdlib_streams_carry_each_module_once_per_epoch(stdlib_source, small_stdlib_modules):
  expected = _stdlib_documents(small_stdlib_modules, "train")
  task = pipelines.Task("stdlib", stdlib_source, BYTES)
  batches = take(pipelines.load_text_dataset(task, "train", sequence_length=128, batch_size=4, seed=7,
                                             document_names=True), 700)
  documents = check_epochs(batches, list(expected.values()), BYTES)
  # Each epoch has its own order.
  assert epoch_order(documents, 0) != epoch_order(documents, 1)
  assert {d.document_id.decode() for d in documents} == set(expected)


def test_stdlib_first_batch_starts_every_slot_and_segments_are_static(stdlib_source):
  task = pipelines.Task("stdlib", stdlib_source, BYTES)
  dataset = pipelines.load_text_dataset(task, "train", sequence_length=64, batch_size=3)
  shapes = {key: spec.shape.as_list() for key, spec in dataset.element_spec.items()}
  assert shapes == {"targets": [3, 64], "start_of_sequence": [3], "epoch": [3], "loss_mask": [3, 64],
                    "num_chars": [3], "nonzero_tokens": [3], "document_index": [3]}
  # Numbers only: what a TPU's infeed takes.
  assert all(spec.dtype in (tf.int32, tf.bool) for spec in dataset.element_spec.values())
  first, second = take(dataset, 2)
  assert first["start_of_sequence"].all() and not second["start_of_sequence"].any()
  assert (first["document_index"] == second["document_index"]).all()


def test_training_order_is_a_function_of_the_seed(stdlib_source):
  task = pipelines.Task("stdlib", stdlib_source, BYTES)

  def first_batches(seed):
    return take(pipelines.load_text_dataset(task, "train", sequence_length=64, batch_size=4, seed=seed), 5)

  same = [first_batches(3), first_batches(3)]
  for a, b in zip(*same):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other = first_batches(4)
  assert any((a["document_index"] != b["document_index"]).any() for a, b in zip(same[0], other))


def test_stdlib_evaluation_reads_each_module_once_then_pads_and_ends(stdlib_source, small_stdlib_modules):
  expected = _stdlib_documents(small_stdlib_modules, "test")
  task = pipelines.Task("stdlib", stdlib_source, BYTES)
  batches = take(pipelines.load_text_dataset(task, "test", sequence_length=64, batch_size=4,
                                             training=False), 10_000)
  check_evaluation(batches, list(expected.values()), BYTES)


def test_files_glob_streams(text_corpus):
  expected = _glob_documents(text_corpus, "train")
  task = pipelines.get_task(f"files_bytes:{text_corpus}/*.txt")
  batches = take(pipelines.load_text_dataset(task, "train", sequence_length=32, batch_size=4,
                                             document_names=True), 400)
  documents = check_epochs(batches, list(expected.values()), BYTES)
  assert {d.document_id.decode() for d in documents} == set(expected)


def test_files_glob_splits_partition_the_files(text_corpus):
  task = pipelines.get_task(f"files:{text_corpus}/*.txt")
  seen = []
  for split in ("train", "validation", "test"):
    if task.source.num_documents(split) == 0:
      continue
    batches = take(pipelines.load_text_dataset(task, split, sequence_length=32, batch_size=2,
                                               training=False), 10_000)
    check_evaluation(batches, list(_glob_documents(text_corpus, split).values()), BYTES)
    seen += [d.document_id.decode() for d in reconstruct(batches, ended=True)]
  # The empty file is skipped; every other file is in exactly one split.
  assert sorted(seen) == sorted(n for n in os.listdir(text_corpus) if n != "empty.txt")


def test_directory_tree_streams(tree_corpus):
  expected = _tree_documents(tree_corpus, "train")
  task = pipelines.get_task(f"tree_bytes:{tree_corpus}")
  batches = take(pipelines.load_text_dataset(task, "train", sequence_length=32, batch_size=4,
                                             document_names=True), 400)
  documents = check_epochs(batches, list(expected.values()), BYTES)
  assert {d.document_id.decode() for d in documents} == set(expected)
  assert not any(b".git" in d for d in expected.values())


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_tfds_streams_read_records_by_index(tfds_books, file_format):
  data_dir, texts = tfds_books(file_format)
  task = pipelines.Task("books", pipelines.TfdsSource("meliad_test_books", "book_text", id_feature="book_id",
                                                      directory=data_dir), BYTES)
  expected = [text for text in texts if text]  # the empty book has no segment
  batches = take(pipelines.load_text_dataset(task, "train", sequence_length=16, batch_size=3,
                                             document_names=True), 400)
  documents = check_epochs(batches, expected, BYTES)
  assert {int(d.document_id) for d in documents} == {i for i, text in enumerate(texts) if text}
  evaluation = take(pipelines.load_text_dataset(task, "train", sequence_length=16, batch_size=3,
                                                training=False), 10_000)
  check_evaluation(evaluation, expected, BYTES)


def test_tfds_split_slices_and_document_names_in_file_order(tfds_books):
  data_dir, texts = tfds_books("tfrecord")
  del texts
  source = pipelines.TfdsSource("meliad_test_books", "book_text", directory=data_dir)
  in_file_order = [record["book_text"] for record in tfds.builder("meliad_test_books", data_dir=data_dir)
                   .as_dataset(split="train", shuffle_files=False).as_numpy_iterator()]
  assert source.num_documents("train[2:7]") == 5
  documents = list(source.documents("train[2:7]").as_numpy_iterator())
  assert [d["text"] for d in documents] == in_file_order[2:7]
  assert documents[0]["document_id"] == b"meliad_test_books/train[2:7]/0"


def test_synthetic_streams():
  source = pipelines.SyntheticSource(num_documents=10, num_eval_documents=3, document_length=300,
                                     num_facts=2)
  task = pipelines.Task("synthetic", source, pipelines.RawByteVocabulary())
  expected = [source.generate("train", i) for i in range(10)]
  batches = take(pipelines.load_text_dataset(task, "train", sequence_length=64, batch_size=4), 200)
  check_epochs(batches, expected, task.vocabulary)
  evaluation = take(pipelines.load_text_dataset(task, "test", sequence_length=64, batch_size=4,
                                                training=False), 1000)
  check_evaluation(evaluation, [source.generate("test", i) for i in range(3)], task.vocabulary)


@pytest.mark.parametrize("model", ["bpe_identity_no_prefix", "bpe_identity_prefix", "bpe_nfkc_strip_prefix"])
@pytest.mark.parametrize("piece_bytes", [None, (16, 2)], ids=["pieces_of_64kB", "pieces_of_32B"])
def test_sentencepiece_streams_match_an_independent_tokenizer(
    stdlib_source, small_stdlib_modules, sentencepiece_models, monkeypatch, model, piece_bytes):
  """Whole documents tokenized by SentencePiece itself, whether the pipeline tokenizes them in
  one piece or in many, for each way of cutting (`Vocabulary.space_cut`)."""
  import sentencepiece  # pylint: disable=g-import-not-at-top
  if piece_bytes:
    monkeypatch.setattr(pipelines.streams, "CUT_BYTES", piece_bytes[0])
    monkeypatch.setattr(pipelines.streams, "PIECE_PARTS", piece_bytes[1])
  processor = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_models[model])
  expected = [processor.encode(text.decode("utf-8"))
              for text in _stdlib_documents(small_stdlib_modules, "test").values()]
  vocab = pipelines.SentencePieceVocabulary(sentencepiece_models[model])
  task = pipelines.Task("stdlib_tokens", stdlib_source, vocab)
  batches = take(pipelines.load_text_dataset(task, "test", sequence_length=64, batch_size=2,
                                             training=False), 10_000)
  documents = reconstruct(batches, ended=True)
  assert sorted(d.tokens for d in documents) == sorted(expected)
  if "identity" in model:  # (NFKC and its whitespace rules change the text they decode to)
    for d in documents:
      assert vocab.decode(d.tokens).encode() in _stdlib_documents(small_stdlib_modules, "test").values()
