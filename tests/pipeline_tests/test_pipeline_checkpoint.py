"""A restored iterator yields exactly the batches the uninterrupted one would have, also when the
checkpoint falls in the middle of documents, and the checkpoint holds positions, not text."""

import numpy as np
import pytest
import tensorflow as tf

import pipelines
from pipeline_helpers import to_numpy


def _assert_resumes_exactly(dataset, tmp_path, skip, compare):
  iterator = iter(dataset)
  for _ in range(skip):
    next(iterator)
  path = tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / "ckpt"))
  uninterrupted = [to_numpy(next(iterator)) for _ in range(compare)]
  # The checkpoint is taken mid-document: some slot continues a document after it.
  assert not uninterrupted[0]["start_of_sequence"].all()

  restored = iter(dataset)
  tf.train.Checkpoint(iterator=restored).read(path).assert_consumed()
  resumed = [to_numpy(next(restored)) for _ in range(compare)]
  for a, b in zip(uninterrupted, resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_restored_iterator_resumes_mid_document_bytes(stdlib_source, tmp_path, training):
  task = pipelines.Task("stdlib", stdlib_source, pipelines.ByteVocabulary())
  split = "train" if training else "test"
  dataset = pipelines.load_text_dataset(task, split, sequence_length=64, batch_size=3, training=training)
  _assert_resumes_exactly(dataset, tmp_path, skip=23, compare=40)


def test_restored_iterator_resumes_across_epochs(tmp_path):
  source = pipelines.SyntheticSource(num_documents=6, document_length=200, num_facts=2)
  task = pipelines.Task("synthetic", source, pipelines.RawByteVocabulary())
  dataset = pipelines.load_text_dataset(task, "train", sequence_length=32, batch_size=2, seed=5)
  # 6 documents of ~7 segments over 2 slots: an epoch is ~21 batches, so this spans epochs 1-4.
  _assert_resumes_exactly(dataset, tmp_path, skip=30, compare=60)


@pytest.mark.parametrize("piece_bytes", [None, (16, 2)], ids=["pieces_of_64kB", "pieces_of_32B"])
def test_restored_iterator_resumes_mid_document_sentencepiece(stdlib_source, sentencepiece_model, tmp_path,
                                                              monkeypatch, piece_bytes):
  if piece_bytes:  # A restore in the middle of a piece, and of a segment spanning pieces.
    monkeypatch.setattr(pipelines.streams, "CUT_BYTES", piece_bytes[0])
    monkeypatch.setattr(pipelines.streams, "PIECE_PARTS", piece_bytes[1])
  vocab = pipelines.SentencePieceVocabulary(sentencepiece_model)
  assert vocab.space_cut
  task = pipelines.Task("stdlib", stdlib_source, vocab)
  dataset = pipelines.load_text_dataset(task, "train", sequence_length=32, batch_size=2)
  _assert_resumes_exactly(dataset, tmp_path, skip=17, compare=30)


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_restored_iterator_resumes_mid_document_tfds(tfds_books, tmp_path, file_format):
  data_dir, _ = tfds_books(file_format)
  task = pipelines.Task("books", pipelines.TfdsSource("meliad_test_books", "book_text", directory=data_dir),
                        pipelines.ByteVocabulary())
  dataset = pipelines.load_text_dataset(task, "train", sequence_length=16, batch_size=3, seed=2)
  _assert_resumes_exactly(dataset, tmp_path, skip=29, compare=50)


def test_restored_iterator_resumes_mid_document_from_a_dataset_of_strings(tmp_path):
  texts = [f"document {i}: " + "words " * (13 * i % 40 + 5) for i in range(12)]
  source = pipelines.DatasetSource(tf.data.Dataset.from_tensor_slices(texts), name="mine")
  task = pipelines.Task("mine", source, pipelines.ByteVocabulary())
  dataset = pipelines.load_text_dataset(task, "train", sequence_length=32, batch_size=3, seed=4)
  _assert_resumes_exactly(dataset, tmp_path, skip=37, compare=60)


def _checkpoint_bytes(dataset, skip, directory):
  iterator = iter(dataset)
  for _ in range(skip):
    next(iterator)
  tf.train.Checkpoint(iterator=iterator).write(str(directory / "ckpt"))
  return sum(path.stat().st_size for path in directory.iterdir())


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_iterator_checkpoint_holds_positions_not_text(tmp_path, training):
  # Documents of 2 kB and of 400 kB: the larger ones would add megabytes of buffered text and
  # tokens to a checkpoint that held them (each stream holds its current and next document).
  sizes = []
  for length in (2_000, 400_000):
    source = pipelines.SyntheticSource(num_documents=8, num_eval_documents=8, document_length=length,
                                       num_facts=2)
    task = pipelines.Task("synthetic", source, pipelines.RawByteVocabulary())
    dataset = pipelines.load_text_dataset(task, "train" if training else "test", sequence_length=128,
                                          batch_size=4, training=training)
    directory = tmp_path / f"{length}"
    directory.mkdir()
    sizes.append(_checkpoint_bytes(dataset, skip=5, directory=directory))
  assert sizes[1] < 64_000, sizes
  assert abs(sizes[1] - sizes[0]) < 1_000, sizes


def test_checkpoint_grows_by_under_3_kb_per_stream(stdlib_source, tmp_path):
  sizes = {}
  for batch_size in (2, 16):
    task = pipelines.Task("stdlib", stdlib_source, pipelines.ByteVocabulary())
    dataset = pipelines.load_text_dataset(task, "train", sequence_length=64, batch_size=batch_size)
    directory = tmp_path / f"{batch_size}"
    directory.mkdir()
    sizes[batch_size] = _checkpoint_bytes(dataset, skip=3, directory=directory)
  assert (sizes[16] - sizes[2]) / 14 < 3_000, sizes


def test_serialized_iterator_state_restores_into_a_fresh_pipeline(stdlib_source):
  # What the trainer gathers from each host: the iterator state as bytes.
  task = pipelines.Task("stdlib", stdlib_source, pipelines.ByteVocabulary())

  def dataset():
    return pipelines.load_text_dataset(task, "train", sequence_length=64, batch_size=3, seed=9)

  iterator = iter(dataset())
  for _ in range(11):
    next(iterator)
  state = tf.io.serialize_tensor(iterator._serialize_to_tensors()["_STATE"]).numpy()  # pylint: disable=protected-access
  assert len(state) < 10_000
  expected = [to_numpy(next(iterator)) for _ in range(20)]
  restored = iter(dataset())
  restored._restore_from_tensors({"_STATE": tf.io.parse_tensor(state, tf.variant)})  # pylint: disable=protected-access
  for a, b in zip(expected, [to_numpy(next(restored)) for _ in range(20)]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("layout", [1, 2, 3])
def test_older_iterator_layouts_read_the_same_batches_and_restore_their_own(
    tmp_path, stdlib_source, sentencepiece_model, monkeypatch, layout):
  # Layout 1 differs in bytes' documents (now cut in pieces), 2 in SentencePiece's, 3 in
  # working ahead by blocks rather than segments.
  monkeypatch.setattr(pipelines.streams, "PIECE_BYTES", 64)
  monkeypatch.setattr(pipelines.streams, "CUT_BYTES", 16)
  monkeypatch.setattr(pipelines.streams, "PIECE_PARTS", 2)
  if layout == 1:
    task = pipelines.Task("stdlib", stdlib_source, pipelines.ByteVocabulary())
  else:
    task = pipelines.Task("stdlib", stdlib_source, pipelines.SentencePieceVocabulary(sentencepiece_model))
  shape = dict(sequence_length=32, batch_size=2, seed=5)
  older = pipelines.load_text_dataset(task, "train", iterator_layout=layout, **shape)
  newer = pipelines.load_text_dataset(task, "train", **shape)
  for a, b in zip(older.take(30), newer.take(30)):
    for key in a:
      np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)
  _assert_resumes_exactly(older, tmp_path, skip=30, compare=20)
  # An iterator saved under the older layout does not fit the newer one.
  iterator = iter(older)
  next(iterator)
  path = tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / "older"))
  with pytest.raises((tf.errors.OpError, ValueError, AssertionError)):
    tf.train.Checkpoint(iterator=iter(newer)).read(path).assert_consumed()
  with pytest.raises(ValueError, match="iterator_layout must be one of"):
    pipelines.load_text_dataset(task, "train", iterator_layout=5, **shape)


def test_answers_are_marked_over_whole_documents_however_long(monkeypatch):
  """A document with answers is tokenized whole (a token's mark is that of the token after it),
  also where a byte vocabulary cuts other documents in pieces."""
  source = pipelines.SyntheticSource(num_documents=4, document_length=200, num_facts=2)
  task = pipelines.Task("synthetic", source, pipelines.RawByteVocabulary())
  shape = dict(sequence_length=32, batch_size=2, seed=5)
  whole = [to_numpy(b) for b in pipelines.load_text_dataset(task, "train", **shape).take(20)]
  monkeypatch.setattr(pipelines.streams, "PIECE_BYTES", 64)
  cut = [to_numpy(b) for b in pipelines.load_text_dataset(task, "train", **shape).take(20)]
  assert sum(b["answer_mask"].sum() for b in whole) > 0
  for a, b in zip(whole, cut):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
