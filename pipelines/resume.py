"""A stream iterator that restores quickly: its streams' current documents are tokenized in
parallel before the restore.

A restored pipeline iterator (see `pipelines.streams`) tokenizes again the document each stream
is in where documents are tokenized whole (SentencePiece models not cut at spaces), and tf.data
restores the streams one after another. At 64 streams of books that is the 64 current books
tokenized on one thread. `StreamIterator` saves, beside the pipeline's positions, the index of
the document each stream was last in; before a restore it reads and tokenizes those documents
in parallel into `DocumentTokens`, a table that the pipeline looks up before it tokenizes a
document, so the restore itself only copies tokens. The table is emptied when the first batch
after the restore has been read. The batches are the same with or without the table.
"""

import collections
from typing import Optional

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import types_pb2

from pipelines import sources as sources_lib
from pipelines import vocabularies

# The attribute of a `streams.stream_batches` dataset that holds its `DocumentTokens`.
DOCUMENT_TOKENS_ATTRIBUTE = "_meliad_document_tokens"


class DocumentTokens:
  """Whole-document tokens of some documents of one split, by document index, for a restore.

  Args:
    source: the pipeline's random-access source.
    split: the split the pipeline reads.
    vocab: the pipeline's vocabulary (not one token per byte: those need no table).
    batches_per_step: consecutive batches that hold one segment of every stream of the
      pipeline (its replicas per pipeline).
  """

  def __init__(self, source: sources_lib.IndexedSource, split: str,
               vocab: vocabularies.Vocabulary, batches_per_step: int):
    self.source = source
    self.split = split
    self.vocab = vocab
    self.batches_per_step = batches_per_step
    # Set while the pipeline is built, where some stream tokenizes documents whole.
    self.in_use = False
    self._table = tf.lookup.experimental.MutableHashTable(tf.int64, tf.string, default_value="")
    self._filled = np.zeros([0], np.int64)

  def encode(self, document) -> tf.Tensor:
    """int32 [num_tokens], the tokens of a whole document (in the pipeline's graph)."""
    self.in_use = True
    serialized = self._table.lookup(tf.cast(document["document_index"], tf.int64))

    def parse():
      tokens = tf.io.parse_tensor(serialized, tf.int32)
      tokens.set_shape([None])
      return tokens

    # A serialized tensor, even an empty one, is never the empty string.
    return tf.cond(tf.strings.length(serialized) > 0, parse, lambda: self._tokenize(document))

  def _tokenize(self, document) -> tf.Tensor:
    return self.vocab.encode_tf(document["text"], document["document_id"], self.source.name)

  def fill(self, document_indices: np.ndarray) -> None:
    """Reads and tokenizes the documents (indices < 0 are none) in parallel into the table."""
    indices = np.unique(document_indices[document_indices >= 0]).astype(np.int64)
    if not self.in_use or indices.size == 0:
      return

    def tokenize(index):
      return self.source.document(self.split, index).map(
          lambda document: (index, tf.io.serialize_tensor(self._tokenize(document))))

    keys, values = [], []
    tokenized = tf.data.Dataset.from_tensor_slices(indices).interleave(
        tokenize, cycle_length=tf.data.AUTOTUNE, num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False)
    for index, serialized in tokenized:
      keys.append(index)
      values.append(serialized)
    self._table.insert(tf.stack(keys), tf.stack(values))
    self._filled = indices

  def empty(self) -> None:
    if self._filled.size:
      self._table.remove(tf.constant(self._filled))
      self._filled = np.zeros([0], np.int64)


class StreamIterator(tf.train.experimental.PythonState):
  """An iterator over a `load_text_dataset` dataset whose checkpoint restores quickly.

  Use it where `iter(dataset)` would go; `tf.train.Checkpoint(iterator=StreamIterator(ds))`
  saves and restores it. `serialize()` is its position as bytes: the pipeline's positions and
  the documents its streams are in. `deserialize` also takes the bytes of
  `tf.io.serialize_tensor` of a plain iterator's state (its `_serialize_to_tensors` value).

  Args:
    dataset: from `load_text_dataset` or `streams.stream_batches`; any other dataset works
      too, and restores at tf.data's own speed.
  """

  def __init__(self, dataset: tf.data.Dataset):
    self._iterator = iter(dataset)
    self._tokens: Optional[DocumentTokens] = getattr(dataset, DOCUMENT_TOKENS_ATTRIBUTE, None)
    self._recent = collections.deque(
        maxlen=self._tokens.batches_per_step if self._tokens else 1)
    self._empty_after_next = False

  @property
  def element_spec(self):
    return self._iterator.element_spec

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._iterator)
    if self._tokens is not None:
      self._recent.append(batch["document_index"].numpy().reshape([-1]))
      if self._empty_after_next:
        self._tokens.empty()
        self._empty_after_next = False
    return batch

  def _iterator_state(self) -> tf.Tensor:
    (state,) = self._iterator._serialize_to_tensors().values()  # pylint: disable=protected-access
    return state

  def serialize(self) -> bytes:
    documents = (np.concatenate(list(self._recent)) if self._recent else np.zeros([0], np.int32))
    return tf.io.serialize_tensor(tf.constant([
        tf.io.serialize_tensor(self._iterator_state()).numpy(),
        tf.io.serialize_tensor(tf.constant(documents, tf.int32)).numpy()])).numpy()

  def deserialize(self, data: bytes) -> None:
    if tensor_pb2.TensorProto.FromString(data).dtype == types_pb2.DT_VARIANT:  # a plain iterator's state
      state, documents = data, np.zeros([0], np.int32)
    else:
      state, documents = tf.io.parse_tensor(data, tf.string).numpy()
      documents = tf.io.parse_tensor(documents, tf.int32).numpy()
    if self._tokens is not None:
      self._tokens.fill(documents)
      self._empty_after_next = True
    (name,) = self._iterator._serialize_to_tensors()  # pylint: disable=protected-access
    self._iterator._restore_from_tensors(  # pylint: disable=protected-access
        {name: tf.io.parse_tensor(state, tf.variant)})
    self._recent.clear()
    self._recent.append(documents)
