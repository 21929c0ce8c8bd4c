"""The document source interface, and the stable-hash split shared by the file-based sources.

A source yields whole documents, `{"text": tf.string [], "document_id": tf.string []}`, for
a split, always in the same order. A source whose documents hold answers (tokens that only
long-range context predicts, such as the synthetic fact-recall values) adds `answers`
(`ANSWERS`), a tf.string of the text's length with byte 1 at the answers' bytes and 0
elsewhere; the pipeline then marks the answer tokens in its batches. The pipeline reads every document of a split from storage
once per epoch, however many streams share it, and keeps only positions (epoch, document
index, segment) in its iterator checkpoints; for that it needs random access to the documents:

* `IndexedSource`: the split's documents are numbered 0..N-1 and read one at a time inside the
  tf.data graph (files, directory trees, the Python standard library, synthetic text, TFDS
  datasets).
* `StreamingSource`: documents can only be read in order (a user's `tf.data.Dataset`). The
  pipeline reads each split once, when it is first used, into TFRecord files in
  `cache_dir` (TensorFlow's in-memory file system by default), and then reads them as an
  indexed source: one extra pass over the documents and their size in memory or storage.
"""

import abc
import hashlib
import re
import uuid
from typing import Dict, Optional

import tensorflow as tf

from pipelines import records as records_lib


# Buckets out of 100 of the stable hash of a document's name (train 90%, validation 5%, test 5%).
HASH_SPLITS = (("train", 90), ("validation", 5), ("test", 5))
# The optional document field marking the bytes of the answers (see the module docstring).
ANSWERS = "answers"
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
  """Raises ValueError naming the known splits if `split` is not one of them."""
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

  def document(self, split: str, index: tf.Tensor) -> tf.data.Dataset:
    """A dataset of one element, document `index` of `split`: what the pipeline reads.

    Sources that read through a dataset op override this rather than `read`, so that no
    stateful op (`get_single_element`) enters the pipeline.
    """
    return tf.data.Dataset.from_tensors(self.read(split, index))

  def documents(self, split):
    return tf.data.Dataset.range(self.num_documents(split)).flat_map(
        lambda i: self.document(split, i))


class StreamingSource(Source):
  """A source read front to back; the pipeline reads it once into random-access files.

  Attributes:
    cache_dir: where each split's documents are written when first used (any TensorFlow file
      system; None: a fresh folder of TensorFlow's in-memory file system, `ram://`).
  """

  cache_dir: Optional[str] = None

  def num_documents(self, split: str) -> Optional[int]:
    """N if known without reading the data, else None."""
    del split
    return None

  def indexed(self) -> IndexedSource:
    """The same documents with random access; each split is read when first used."""
    if getattr(self, "_indexed", None) is None:
      self._indexed = CachedDocuments(self, self.cache_dir)  # pylint: disable=attribute-defined-outside-init
    return self._indexed


def random_access(source: Source) -> IndexedSource:
  """`source` itself if indexed, else its documents read once into random-access files."""
  if isinstance(source, IndexedSource):
    return source
  if isinstance(source, StreamingSource):
    return source.indexed()
  raise TypeError(f"Source {getattr(source, 'name', source)!r} is neither an IndexedSource nor a "
                  "StreamingSource.")


_CACHE_FEATURES = {"text": tf.io.FixedLenFeature([], tf.string),
                   "document_id": tf.io.FixedLenFeature([], tf.string)}


class CachedDocuments(IndexedSource):
  """The documents of a sequential source, copied once per split into a TFRecord file.

  Args:
    source: the sequential source.
    cache_dir: folder of the copies; None: a fresh folder under `ram://`.
  """

  def __init__(self, source: Source, cache_dir: Optional[str] = None):
    self.name = source.name
    self.source = source
    self.cache_dir = cache_dir or f"ram://meliad-pipelines/{uuid.uuid4().hex}"
    self._splits: Dict[str, records_lib.RecordIndex] = {}

  def _split(self, split: str) -> records_lib.RecordIndex:
    if split not in self._splits:
      tf.io.gfile.makedirs(self.cache_dir)
      path = f"{self.cache_dir}/{re.sub(r'[^A-Za-z0-9_.-]', '_', self.name)}-{split}.tfrecord"

      def serialized():
        for document in self.source.documents(split).as_numpy_iterator():
          if not document["text"]:
            continue  # an empty document has no segment to train on
          features = {key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[document[key]]))
                      for key in ("text", "document_id")}
          yield tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()

      offsets = records_lib.write_records(path, serialized())
      self._splits[split] = records_lib.RecordIndex([(path, offsets)])
    return self._splits[split]

  def num_documents(self, split):
    return len(self._split(split))

  def document(self, split, index):
    return self._split(split).record(index).map(
        lambda record: tf.io.parse_single_example(record, _CACHE_FEATURES))

  def read(self, split, index):
    return self.document(split, index).get_single_element()
