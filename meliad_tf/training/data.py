"""A training run's data on this host: the task's training and test iterators.

Each host reads its own share of the documents through its own pipeline
(`distribution.host_input_context`), one batch of all its streams at a time. The iterators'
positions go into the checkpoints (`checkpoints.DataPositions`), and `signature` says what
they read, so that a resume that would read other data is refused.
"""

from absl import logging
import tensorflow as tf

import pipelines
from meliad_tf.training import checkpoints
from meliad_tf.training import distribution


class DataError(ValueError):
  """The input pipeline failed on the data (an unreadable file, a byte it cannot encode)."""


class TrainingData:
  """The task's training and test iterators for this host, and what they read.

  Args:
    task_config: the model's TransformerTaskConfig (dataset, splits, segment length,
      streams per replica).
    strategy: the run's tf.distribute strategy.
    random_seed: the seed of the training data's order; the test data's is random_seed + 1.
    with_test: whether the run has test cycles (else there is no test iterator).
    embedding_rows: the rows of the model's embedding, which must hold every id of the
      task's vocabulary.
  Raises:
    ValueError: the task's vocabulary has more ids than the embedding has rows.
  """

  def __init__(self, task_config, strategy, random_seed, with_test, embedding_rows):
    self.task_config = task_config
    self.strategy = strategy
    self.random_seed = random_seed
    self.with_test = with_test
    self.global_batch_size = task_config.batch_size * strategy.num_replicas_in_sync
    self.host_batch_size = task_config.batch_size * distribution.local_replica_count(strategy)
    self.task = pipelines.get_task(task_config.dataset_name)
    vocab_size = self.task.vocabulary.vocab_size
    if vocab_size > embedding_rows:
      raise ValueError(
          f"the vocabulary of task {task_config.dataset_name!r} has {vocab_size} ids but "
          f"the embedding has {embedding_rows} rows "
          f"(TransformerTaskConfig.vocab_size / NUM_EMBEDDINGS); set NUM_EMBEDDINGS >= "
          f"{vocab_size}")
    self.input_context = distribution.host_input_context(strategy)
    self.iterator_layout = pipelines.streams.ITERATOR_LAYOUT
    self._make_iterators()

  def _make_iterators(self):
    config = self.task_config
    self.train_iterator = pipelines.StreamIterator(
        self._dataset(config.train_split, self.random_seed))
    self.test_iterator = (pipelines.StreamIterator(
        self._dataset(config.test_split, self.random_seed + 1)) if self.with_test else None)

  def _dataset(self, split, seed):
    return pipelines.load_text_dataset(
        self.task, split=split, sequence_length=self.task_config.sequence_length,
        batch_size=self.host_batch_size, training=True, seed=seed,
        input_context=self.input_context, iterator_layout=self.iterator_layout)

  def continue_saved_layout(self, workdir):
    """Rebuilds the iterators in the layout of `workdir`'s checkpoints where an older
    version wrote them, so that their saved positions restore (and the run goes on reading
    as it did)."""
    saved = checkpoints.saved_data_signature(workdir) if workdir else None
    if saved is None:
      return
    layout = saved.get("iterator_layout", 1)
    # An unknown layout is left to the signature check, which names it.
    if layout == self.iterator_layout or layout not in pipelines.streams.ITERATOR_LAYOUTS:
      return
    logging.info("the checkpoints in %s were written with data iterators of layout %d; this "
                 "run continues in that layout", workdir, layout)
    self.iterator_layout = layout
    self._make_iterators()

  def _read_batch(self, iterator, split):
    try:
      return next(iterator)
    except tf.errors.OpError as e:
      raise DataError(f"reading split {split!r} of task {self.task_config.dataset_name!r} "
                      f"failed: {without_graph_context(e.message)}") from e

  def next_training_batches(self, num_steps):
    """This host's next `num_steps` training batches."""
    return [self._read_batch(self.train_iterator, self.task_config.train_split)
            for _ in range(num_steps)]

  def next_test_batch(self):
    """This host's next test batch."""
    return self._read_batch(self.test_iterator, self.task_config.test_split)

  def signature(self):
    """What the checkpointed iterators read (`data_signature.json`); a resume must read the
    same."""
    config = self.task_config
    signature = {"dataset_name": config.dataset_name, "train_split": config.train_split,
                 "test_split": config.test_split, "sequence_length": config.sequence_length,
                 "global_batch_size": self.global_batch_size, "random_seed": self.random_seed}
    hosts = distribution.num_hosts(self.strategy)
    if hosts > 1:  # Each host's pipeline reads its own share of the documents.
      signature["input_pipelines"] = hosts
    if self.iterator_layout > 1:  # Signatures without it were written under layout 1.
      signature["iterator_layout"] = self.iterator_layout
    return signature


def without_graph_context(message):
  """A TensorFlow error message without the graph node lines it appends."""
  lines = [line for line in message.splitlines() if not line.strip().startswith("[[")]
  return " ".join(line.strip() for line in lines if line.strip())
