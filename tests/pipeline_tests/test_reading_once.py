"""Every document is read from storage once per epoch per input pipeline, whatever the number of
streams: measured as the bytes the process reads (/proc/self/io rchar) against the bytes of the
dataset's files, and for a sequential source as the passes made over it."""

import os

import numpy as np
import tensorflow as tf

import pipelines
from pipeline_helpers import complete_epochs, take


BYTES = pipelines.ByteVocabulary()


def _bytes_read():
  with open("/proc/self/io", encoding="ascii") as f:
    return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])


def _record_bytes(data_dir):
  return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(data_dir)
             for name in names if ".tfrecord-" in name)


def _long_books_task(data_dir):
  source = pipelines.TfdsSource("meliad_test_long_books", "book_text", directory=data_dir)
  return pipelines.Task("long_books", source, BYTES)


def test_an_evaluation_pass_reads_the_files_once_with_many_streams(tfds_long_books):
  data_dir, texts = tfds_long_books
  task = _long_books_task(data_dir)
  dataset = pipelines.load_text_dataset(task, "train", sequence_length=1024, batch_size=8, training=False)
  take(dataset, 1)  # builds the graphs (and imports what they need) before measuring
  dataset = pipelines.load_text_dataset(task, "train", sequence_length=1024, batch_size=8, training=False)
  before = _bytes_read()
  batches = take(dataset, 100_000)
  read = _bytes_read() - before
  assert sum(int(np.count_nonzero(b["targets"])) for b in batches) == sum(len(t) for t in texts)
  # 8 streams that each read the whole split would read 8 times the files.
  assert 1.0 <= read / _record_bytes(data_dir) < 1.1, read / _record_bytes(data_dir)


def test_training_reads_each_started_document_once(tfds_long_books):
  data_dir, _ = tfds_long_books
  files = sorted(os.path.join(root, name) for root, _, names in os.walk(data_dir)
                 for name in names if ".tfrecord-" in name)
  # Bytes of each record on disk: its data plus 16 bytes of length and checksums.
  record_bytes = [len(r) + 16 for r in tf.data.TFRecordDataset(files).as_numpy_iterator()]
  task = _long_books_task(data_dir)
  take(pipelines.load_text_dataset(task, "train", sequence_length=1024, batch_size=4), 1)
  dataset = pipelines.load_text_dataset(task, "train", sequence_length=1024, batch_size=4, seed=3)
  iterator = iter(dataset)
  before = _bytes_read()
  batches = [{key: value.numpy() for key, value in next(iterator).items()}]
  while len(complete_epochs(batches)) < 2:
    batches.append({key: value.numpy() for key, value in next(iterator).items()})
  read = _bytes_read() - before
  # The pipeline reads ahead: batches waiting in its prefetch buffer, and each stream's next
  # document; what it read ahead starts in the batches that follow.
  ahead = [{key: value.numpy() for key, value in next(iterator).items()} for _ in range(200)]

  def started_bytes(some_batches):
    started = [int(b["document_index"][slot]) for b in some_batches for slot in range(4)
               if b["start_of_sequence"][slot]]
    return sum(record_bytes[i] for i in started), len(started)

  low, count = started_bytes(batches)
  assert count >= 2 * len(record_bytes)
  high = started_bytes(batches + ahead)[0] + 4 * max(record_bytes)
  # A design where each of the 4 streams reads the whole split would read 4 times `low`.
  assert low <= read <= high < 2 * low, (low, read, high)


def test_a_dataset_of_strings_is_read_once_however_many_epochs():
  passes = []

  def documents():
    passes.append(1)
    for i in range(10):
      yield f"document {i} " + "text " * (7 * i + 3)

  dataset = tf.data.Dataset.from_generator(documents, output_signature=tf.TensorSpec([], tf.string))
  source = pipelines.DatasetSource(dataset, name="generated")
  task = pipelines.Task("generated", source, BYTES)
  batches = take(pipelines.load_text_dataset(task, "train", sequence_length=16, batch_size=3), 300)
  assert len(complete_epochs(batches)) >= 3
  assert len(passes) == 1
  # Evaluation on the same source reads the copy, not the dataset.
  take(pipelines.load_text_dataset(task, "train", sequence_length=16, batch_size=3, training=False), 1000)
  assert len(passes) == 1
