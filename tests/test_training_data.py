"""A training run's data: the iterators and their seeds, the signature a resume compares, the
layout of an older workdir's iterators, and the error a bad document gives."""

import json
import os

import gin
import numpy as np
import pytest
import tensorflow as tf

import pipelines
from meliad_tf.model import task_config as task_config_lib
from meliad_tf.training import checkpoints
from meliad_tf.training import data as data_lib
from meliad_tf.training import trainer as trainer_lib


OLD_WORKDIR = os.path.join(os.path.dirname(__file__), "data", "written_before_the_floors",
                           "workdir")
SEED = 7


@pytest.fixture(autouse=True)
def small_synthetic_documents():
  gin.parse_config(["pipelines.synthetic.num_documents = 6",
                    "pipelines.synthetic.num_eval_documents = 4",
                    "pipelines.synthetic.document_length = 300",
                    "pipelines.synthetic.num_facts = 2"])
  yield
  gin.clear_config()


def make_data(strategy=None, with_test=True, dataset_name="synthetic", batch_size=2,
              random_seed=SEED):
  config = task_config_lib.TransformerTaskConfig(dataset_name=dataset_name, sequence_length=32,
                                                 batch_size=batch_size)
  return data_lib.TrainingData(config, strategy or tf.distribute.get_strategy(), random_seed,
                               with_test=with_test, embedding_rows=259)


def reference_batches(split, seed, count, batch_size=2, iterator_layout=None):
  """The first `count` batches of the split, read by the pipelines themselves."""
  layout = {} if iterator_layout is None else {"iterator_layout": iterator_layout}
  dataset = pipelines.load_text_dataset(pipelines.get_task("synthetic"), split,
                                        sequence_length=32, batch_size=batch_size,
                                        training=True, seed=seed, **layout)
  return list(dataset.take(count))


def assert_same_batches(actual, expected):
  assert len(actual) == len(expected)
  for a, b in zip(actual, expected):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)


def test_the_signature_names_what_the_iterators_read():
  assert pipelines.streams.ITERATOR_LAYOUT > 1
  assert make_data().signature() == {
      "dataset_name": "synthetic", "train_split": "train", "test_split": "test",
      "sequence_length": 32, "global_batch_size": 2, "random_seed": SEED,
      "iterator_layout": pipelines.streams.ITERATOR_LAYOUT}


def test_the_replicas_of_one_host_share_its_pipeline():
  data = make_data(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
  assert (data.host_batch_size, data.global_batch_size) == (4, 4)
  # One host, one pipeline: the signature counts pipelines only where there are several.
  assert "input_pipelines" not in data.signature()
  assert data.signature()["global_batch_size"] == 4
  assert_same_batches(data.next_training_batches(2), reference_batches("train", SEED, 2, 4))


def test_training_and_test_data_follow_their_seeds():
  data = make_data()
  assert_same_batches(data.next_training_batches(3), reference_batches("train", SEED, 3))
  assert_same_batches([data.next_test_batch() for _ in range(2)],
                      reference_batches("test", SEED + 1, 2))
  assert make_data(with_test=False).test_iterator is None


def test_a_workdir_of_the_older_layout_is_continued_in_it(tmp_path):
  workdir = str(tmp_path)
  data = make_data()
  # What a version that had only layout 1 wrote: no layout in the signature, and the
  # iterators' positions in layout 1.
  saved = {k: v for k, v in data.signature().items() if k != "iterator_layout"}
  with open(os.path.join(workdir, checkpoints.DATA_SIGNATURE_FILE), "w") as f:
    json.dump(saved, f)
  older = iter(pipelines.load_text_dataset(pipelines.get_task("synthetic"), "train",
                                           sequence_length=32, batch_size=2, training=True,
                                           seed=SEED, iterator_layout=1))
  for _ in range(5):
    next(older)
  # The bytes the checkpoints of that version hold for it.
  position = tf.io.serialize_tensor(older._serialize_to_tensors()["_STATE"]).numpy()  # pylint: disable=protected-access
  expected = [next(older) for _ in range(4)]

  data.continue_saved_layout(workdir)
  assert data.iterator_layout == 1
  assert data.signature() == saved
  assert_same_batches([data.next_test_batch()],
                      reference_batches("test", SEED + 1, 1, iterator_layout=1))
  data.train_iterator.deserialize(position)
  assert_same_batches(data.next_training_batches(4), expected)


def test_the_signature_of_a_workdir_written_before_the_layouts_is_kept():
  with open(os.path.join(OLD_WORKDIR, checkpoints.DATA_SIGNATURE_FILE)) as f:
    saved = json.load(f)
  data = make_data(batch_size=saved["global_batch_size"], random_seed=saved["random_seed"])
  data.continue_saved_layout(OLD_WORKDIR)
  assert data.signature() == saved


@pytest.mark.parametrize("saved_layout", ["no workdir", "no signature", "current", 99])
def test_other_workdirs_leave_the_iterators_as_they_are(tmp_path, saved_layout):
  data = make_data()
  workdir = "" if saved_layout == "no workdir" else str(tmp_path)
  if saved_layout not in ("no workdir", "no signature"):
    layout = pipelines.streams.ITERATOR_LAYOUT if saved_layout == "current" else saved_layout
    with open(os.path.join(workdir, checkpoints.DATA_SIGNATURE_FILE), "w") as f:
      json.dump(dict(data.signature(), iterator_layout=layout), f)
  iterators = (data.train_iterator, data.test_iterator)
  data.continue_saved_layout(workdir)
  # An unknown layout is left for the signature check to name.
  assert data.iterator_layout == pipelines.streams.ITERATOR_LAYOUT
  assert (data.train_iterator, data.test_iterator) == iterators


def test_a_document_the_pipeline_cannot_read_is_a_data_error_naming_split_and_task(tmp_path):
  directory = tmp_path / "data"
  directory.mkdir()
  # A NUL byte past the first 8 KiB (where it would have marked the file as binary), which
  # the raw_bytes vocabulary cannot encode; a document of each split has one.
  splits = set()
  for index in range(200):
    name = f"doc{index}.txt"
    split = pipelines.sources.hash_split(name)
    if split in ("train", "test") and split not in splits:
      (directory / name).write_bytes(b"abc" * 3000 + b"\x00def\n")
      splits.add(split)
  assert splits == {"train", "test"}
  task = f"files_raw_bytes:{directory}/*.txt"
  data = make_data(dataset_name=task, batch_size=1)
  for split, read in (("train", lambda: data.next_training_batches(1)),
                      ("test", data.next_test_batch)):
    with pytest.raises(trainer_lib.DataError) as raised:
      read()
    message = str(raised.value)
    assert message.startswith(f"reading split {split!r} of task {task!r} failed: ")
    assert "cannot encode byte 0" in message
    assert "[[" not in message  # without the graph's node lines
    assert isinstance(raised.value.__cause__, tf.errors.OpError)


def test_a_vocabulary_larger_than_the_embedding_is_refused():
  config = task_config_lib.TransformerTaskConfig(dataset_name="synthetic_bytes")
  with pytest.raises(ValueError, match=r"the vocabulary of task 'synthetic_bytes' has 259 ids "
                                       r"but the embedding has 256 rows .*NUM_EMBEDDINGS >= 259"):
    data_lib.TrainingData(config, tf.distribute.get_strategy(), SEED, with_test=True,
                          embedding_rows=256)
