"""The document source interface, and the stable-hash split shared by the file-based sources.

A source yields whole documents, `{"text": tf.string [], "document_id": tf.string []}`, for
a split, always in the same order. Two kinds exist because they shuffle differently:

* `IndexedSource`: the split's documents are known up front (files, directory trees, the
  Python standard library, synthetic text). The pipeline draws an exact random permutation of
  their indices per epoch and reads a document's text only in the stream that takes it.
* `StreamingSource`: documents can only be read in order (TFDS). The pipeline shuffles the
  records with a buffer of `shuffle_buffer_size` documents.
"""

import abc
import hashlib
from typing import Dict, Optional

import tensorflow as tf

# Buckets out of 100 of the stable hash of a document's name (train 90%, validation 5%, test 5%).
HASH_SPLITS = (("train", 90), ("validation", 5), ("test", 5))
SPLIT_NAMES = tuple(name for name, _ in HASH_SPLITS)


def hash_split(document_name: str) -> str:
  """The split of a document, from a hash of its name that is the same on every machine."""
  digest = hashlib.sha256(document_name.encode("utf-8")).digest()
  bucket = int.from_bytes(digest[:8], "big") % 100
  for split, share in HASH_SPLITS:
    if bucket < share:
      return split
    bucket -= share
  raise AssertionError("HASH_SPLITS must add up to 100")


def check_split(source_name: str, split: str, known=SPLIT_NAMES) -> None:
  if split not in known:
    raise ValueError(f"Unknown split {split!r} for source {source_name!r}; it has {', '.join(known)}.")


class Source(abc.ABC):
  """Documents of a corpus, per split, in a deterministic order.

  Attributes:
    name: names the source in logs and errors.
  """

  name: str

  @abc.abstractmethod
  def documents(self, split: str) -> tf.data.Dataset:
    """Every document of `split` once, in a fixed order.

    Returns:
      A finite dataset of {"text": tf.string [], "document_id": tf.string []}.
    """


class IndexedSource(Source):
  """A source whose documents are numbered 0..N-1 per split and read one at a time."""

  @abc.abstractmethod
  def num_documents(self, split: str) -> int:
    """N, the number of (non-empty) documents in `split`."""

  @abc.abstractmethod
  def read(self, split: str, index: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Reads document `index` (int64 scalar) of `split` inside the tf.data graph."""

  def documents(self, split):
    return tf.data.Dataset.range(self.num_documents(split)).map(lambda i: self.read(split, i))


class StreamingSource(Source):
  """A source read front to back; the pipeline shuffles it with a buffer.

  Attributes:
    shuffle_buffer_size: documents held by the training shuffle, per stream; each one is kept
      in memory and in iterator checkpoints.
  """

  shuffle_buffer_size: int

  def num_documents(self, split: str) -> Optional[int]:
    """N if known without reading the data, else None."""
    del split
    return None
