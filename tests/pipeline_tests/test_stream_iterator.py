"""`StreamIterator`: restores equal the uninterrupted run, the streams' current documents come
from the table a restore fills in parallel, and older iterator states still restore."""

import numpy as np
import pytest
import tensorflow as tf

import pipelines
from pipeline_helpers import to_numpy


def _unigram_task(stdlib_source, sentencepiece_models):
  vocab = pipelines.SentencePieceVocabulary(sentencepiece_models["unigram_nfkc"])
  assert vocab.space_cut is None  # documents tokenized whole: what a restore tokenizes again
  return pipelines.Task("stdlib", stdlib_source, vocab)


def _dataset(task, replicas=1):
  return pipelines.streams.stream_batches(
      task.source, task.vocabulary, "train", sequence_length=16, batch_size=2, training=True,
      seed=3, replicas_per_pipeline=replicas)


def _assert_equal(expected, actual):
  assert len(expected) == len(actual)
  for a, b in zip(expected, actual):
    for key in a:
      np.testing.assert_array_equal(a[key], to_numpy(b)[key], err_msg=key)


def _mid_document_state(task, replicas=1, skip=23):
  """An iterator's bytes after `skip` batches, the next 12 batches, and its documents then."""
  iterator = pipelines.StreamIterator(_dataset(task, replicas))
  batches = [next(iterator) for _ in range(skip)]
  state = iterator.serialize()
  expected = [to_numpy(next(iterator)) for _ in range(12)]
  assert not expected[0]["start_of_sequence"].all()  # some stream is inside a document
  current = np.concatenate([b["document_index"].numpy() for b in batches[-replicas:]])
  return state, expected, current


@pytest.mark.parametrize("replicas", [1, 2])
def test_restore_equals_the_uninterrupted_run(stdlib_source, sentencepiece_models, replicas):
  task = _unigram_task(stdlib_source, sentencepiece_models)
  state, expected, _ = _mid_document_state(task, replicas)
  restored = pipelines.StreamIterator(_dataset(task, replicas))
  restored.deserialize(state)
  _assert_equal(expected, [next(restored) for _ in range(12)])


def test_a_checkpoint_of_it_restores(stdlib_source, sentencepiece_models, tmp_path):
  task = _unigram_task(stdlib_source, sentencepiece_models)
  iterator = pipelines.StreamIterator(_dataset(task))
  for _ in range(17):
    next(iterator)
  path = tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / "ckpt"))
  expected = [to_numpy(next(iterator)) for _ in range(12)]
  restored = pipelines.StreamIterator(_dataset(task))
  tf.train.Checkpoint(iterator=restored).read(path).assert_consumed()
  _assert_equal(expected, [next(restored) for _ in range(12)])


@pytest.mark.parametrize("replicas", [1, 2])
def test_the_restore_takes_the_current_documents_from_the_table(
    stdlib_source, sentencepiece_models, monkeypatch, replicas):
  task = _unigram_task(stdlib_source, sentencepiece_models)
  state, expected, current = _mid_document_state(task, replicas)
  filled = []
  fill = pipelines.resume.DocumentTokens.fill

  def recording_fill(self, indices):
    filled.append(sorted(set(indices.tolist())))
    fill(self, indices)

  monkeypatch.setattr(pipelines.resume.DocumentTokens, "fill", recording_fill)
  restored = pipelines.StreamIterator(_dataset(task, replicas))
  restored.deserialize(state)
  assert filled == [sorted(set(current.tolist()))]
  table = restored._tokens._table  # pylint: disable=protected-access
  assert int(table.size()) == len(filled[0])
  first = next(restored)
  # Emptied once the streams have their documents back.
  assert int(table.size()) == 0
  _assert_equal(expected, [first] + [next(restored) for _ in range(11)])

  # The tokens a restored stream continues with are the table's: tokens planted there show up.
  restored = pipelines.StreamIterator(_dataset(task, replicas))
  tokens = restored._tokens  # pylint: disable=protected-access
  planted = tf.io.serialize_tensor(tf.fill([10_000], 7)).numpy()
  monkeypatch.setattr(pipelines.resume.DocumentTokens, "fill", lambda self, indices: (
      self._table.insert(tf.constant(np.unique(indices).astype(np.int64)),  # pylint: disable=protected-access
                         tf.fill([len(np.unique(indices))], planted))))
  restored.deserialize(state)
  assert (to_numpy(next(restored))["targets"] == 7).any()
  assert tokens.in_use


def test_plain_iterator_states_restore(stdlib_source, sentencepiece_models):
  # What checkpoints of older versions hold: the bytes of a tf.data iterator's state.
  task = _unigram_task(stdlib_source, sentencepiece_models)
  plain = iter(_dataset(task))
  for _ in range(19):
    next(plain)
  state = tf.io.serialize_tensor(plain._serialize_to_tensors()["_STATE"]).numpy()  # pylint: disable=protected-access
  expected = [to_numpy(next(plain)) for _ in range(12)]
  restored = pipelines.StreamIterator(_dataset(task))
  restored.deserialize(state)
  _assert_equal(expected, [next(restored) for _ in range(12)])


def test_byte_vocabularies_and_other_datasets_need_no_table(stdlib_source):
  task = pipelines.Task("stdlib", stdlib_source, pipelines.ByteVocabulary())
  iterator = pipelines.StreamIterator(_dataset(task))
  assert iterator._tokens is None  # pylint: disable=protected-access
  for _ in range(9):
    next(iterator)
  state = iterator.serialize()
  expected = [to_numpy(next(iterator)) for _ in range(5)]
  restored = pipelines.StreamIterator(_dataset(task))
  restored.deserialize(state)
  _assert_equal(expected, [next(restored) for _ in range(5)])

  counter = pipelines.StreamIterator(tf.data.Dataset.range(10).map(lambda i: {"i": i}))
  next(counter)
  state = counter.serialize()
  restored = pipelines.StreamIterator(tf.data.Dataset.range(10).map(lambda i: {"i": i}))
  restored.deserialize(state)
  assert int(next(restored)["i"]) == 1


def test_streams_cut_at_spaces_fill_nothing(stdlib_source, sentencepiece_model):
  # A restore tokenizes only a piece of each such document again.
  task = pipelines.Task("stdlib", stdlib_source,
                        pipelines.SentencePieceVocabulary(sentencepiece_model))
  iterator = pipelines.StreamIterator(_dataset(task))
  for _ in range(9):
    next(iterator)
  state = iterator.serialize()
  expected = [to_numpy(next(iterator)) for _ in range(5)]
  restored = pipelines.StreamIterator(_dataset(task))
  assert not restored._tokens.in_use  # pylint: disable=protected-access
  restored.deserialize(state)
  assert int(restored._tokens._table.size()) == 0  # pylint: disable=protected-access
  _assert_equal(expected, [next(restored) for _ in range(5)])
