"""Meliad's `text_dataset` entry points, gin-configurable under that module name.

`text_dataset.load_text_dataset.verbose`, `text_dataset.set_default_data_directory.directory_name`
and `text_dataset.get_loss_mask_tokens.*` in Meliad's gin files bind here unchanged.
"""

from typing import Optional, Union

import gin
import tensorflow as tf
from absl import logging

from pipelines import loss_mask
from pipelines import streams
from pipelines import tasks
from pipelines import tfds_source


@gin.configurable(module="text_dataset")
def set_default_data_directory(directory_name: Optional[str] = None) -> None:
  """Sets the TFDS data directory that tasks created afterwards read (e.g. PG19's).

  Args:
    directory_name: the directory; None keeps the current one.
  """
  if directory_name is not None:
    tfds_source.set_data_dir(directory_name)
    logging.info("TFDS data directory: %s", directory_name)


def _positive(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"load_text_dataset: {name} must be a positive integer, got {value!r}.")
  return value


@gin.configurable(module="text_dataset")
def load_text_dataset(task: Union[tasks.Task, str],
                      split: str = "train",
                      sequence_length: int = 512,
                      batch_size: int = 8,
                      training: bool = True,
                      seed: int = 42,
                      input_context: Optional[tf.distribute.InputContext] = None,
                      verbose: bool = False,
                      document_names: Optional[bool] = None,
                      iterator_layout: int = streams.ITERATOR_LAYOUT) -> tf.data.Dataset:
  """Batches of consecutive segments of long documents, one document stream per batch slot.

  See `pipelines.streams` for the order of documents and segments.

  Args:
    task: a `Task`, or a task name for `get_task`.
    split: the split to read ("train", "validation", "test").
    sequence_length: L, tokens per segment.
    batch_size: B, streams per replica.
    training: True for endless shuffled epochs; False for one ordered pass over the split that
      ends once every stream is done (finished streams get empty segments until then).
    seed: draws the per-epoch document order in training; the same seed gives the same batches.
    input_context: from `distribute_datasets_from_function`: documents are split between the
      input pipelines, and this pipeline feeds num_replicas_in_sync / num_input_pipelines
      replicas, emitting one batch per replica per step, in replica order.
    verbose: log the first characters of each document read.
    document_names: add `document_id`, each slot's document name (string [B]); None: in
      evaluation only, so that training batches hold numbers only.
    iterator_layout: the layout of the pipeline's operations (`streams.ITERATOR_LAYOUTS`); an
      older one restores an iterator checkpoint written by an older version.

  Returns:
    A dataset of dicts with static shapes: targets int32 [B, L], start_of_sequence bool [B],
    epoch int32 [B], loss_mask bool [B, L], num_chars int32 [B], nonzero_tokens int32 [B],
    document_index int32 [B] (the document's index in the split), document_id string [B]
    where names are asked for, and answer_mask bool [B, L] where the source marks answers
    (see `pipelines.streams`). `tf.train.Checkpoint(iterator=iter(dataset))` saves positions
    only (a few kB per stream) and restores into an iterator of a fresh call with
    the same arguments.
  """
  if isinstance(task, str):
    task = tasks.get_task(task)
  _positive("sequence_length", sequence_length)
  _positive("batch_size", batch_size)
  num_pipelines, pipeline_id, replicas = 1, 0, 1
  if input_context is not None:
    num_pipelines = input_context.num_input_pipelines
    pipeline_id = input_context.input_pipeline_id
    replicas = max(1, input_context.num_replicas_in_sync // num_pipelines)
  logging.info("Loading text data set %s, split=%s, shape=(%d, %d)", task.name, split, batch_size,
               sequence_length)
  return streams.stream_batches(
      task.source, task.vocabulary, split, sequence_length, batch_size, training, seed,
      num_input_pipelines=num_pipelines, input_pipeline_id=pipeline_id,
      replicas_per_pipeline=replicas, mask_tokens=loss_mask.get_loss_mask_tokens(split),
      verbose=verbose, document_names=not training if document_names is None else document_names,
      iterator_layout=iterator_layout)
