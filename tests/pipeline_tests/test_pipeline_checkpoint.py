"""A restored iterator yields exactly the batches the uninterrupted one would have (DESIGN.md §5
item 5), also when the checkpoint falls in the middle of documents."""

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


def test_restored_iterator_resumes_mid_document_sentencepiece(stdlib_source, sentencepiece_model, tmp_path):
  task = pipelines.Task("stdlib", stdlib_source, pipelines.SentencePieceVocabulary(sentencepiece_model))
  dataset = pipelines.load_text_dataset(task, "train", sequence_length=32, batch_size=2)
  _assert_resumes_exactly(dataset, tmp_path, skip=17, compare=30)
