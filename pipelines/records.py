"""Random access to the records of TFRecord files, on any file system TensorFlow reads.

TFRecord files are sequential: each record is [length: uint64][crc: uint32][data][crc: uint32],
with no index. `record_offsets` builds one by walking the headers: it seeks from header to
header and reads 12 bytes per record plus one byte to check the seek, so indexing costs one
small read per record, not a read of the data. `RecordIndex.record` then reads one record by
seeking straight to it, inside the tf.data graph (`TFRecordDatasetV2` with a byte offset and no
read-ahead buffer), so a pipeline reads exactly the records it uses.

`write_records` writes records and returns their offsets, for sources that turn a sequential
dataset into random-access files.
"""

import struct
from typing import List, Sequence, Tuple

import numpy as np
import tensorflow as tf
# The buffered stream under tf.io.gfile, with a buffer size of our choosing: gfile's own
# 512 kB read-ahead would read most of a corpus of books just to index it.
from tensorflow.python.lib.io import _pywrap_file_io  # pylint: disable=g-direct-tensorflow-import


_HEADER_BYTES = 12  # uint64 length + uint32 masked crc of the length
_FOOTER_BYTES = 4  # uint32 masked crc of the data


def record_offsets(path: str) -> np.ndarray:
  """int64 [records]: the byte offset of each record of the TFRecord file `path`.

  Raises:
    ValueError: if the file is not a sequence of TFRecord records.
  """
  size = tf.io.gfile.stat(path).length
  stream = _pywrap_file_io.BufferedInputStream(path, _HEADER_BYTES)
  offsets = []
  position = 0
  while position < size:
    stream.seek(position)
    header = stream.read(_HEADER_BYTES)
    if len(header) < _HEADER_BYTES:
      break
    (length,) = struct.unpack("<Q", header[:8])
    offsets.append(position)
    position += _HEADER_BYTES + length + _FOOTER_BYTES
  if position != size:
    raise ValueError(f"{path} is not a TFRecord file: its record headers lead to byte {position}, "
                     f"but it has {size} bytes.")
  return np.array(offsets, np.int64)


def write_records(path: str, records) -> np.ndarray:
  """Writes `records` (bytes) to a TFRecord file; returns their byte offsets (int64)."""
  offsets, position = [], 0
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      offsets.append(position)
      writer.write(record)
      position += _HEADER_BYTES + len(record) + _FOOTER_BYTES
  return np.array(offsets, np.int64)


class RecordIndex:
  """Records of several TFRecord files, numbered 0..N-1 in file order.

  Args:
    files: (path, offsets) per file, offsets from `record_offsets` or `write_records`, possibly
      a slice of them (the records kept, in order).
  """

  def __init__(self, files: Sequence[Tuple[str, np.ndarray]]):
    self.paths: List[str] = [path for path, _ in files]
    self.file_of = np.concatenate([np.full(len(offsets), i, np.int32)
                                   for i, (_, offsets) in enumerate(files)] or [np.zeros(0, np.int32)])
    self.offsets = np.concatenate([np.asarray(offsets, np.int64) for _, offsets in files]
                                  or [np.zeros(0, np.int64)])

    self._tensors = None

  def __len__(self):
    return len(self.offsets)

  def _tables(self):
    # Made once, eagerly, so that every stream's function captures the same tensors rather
    # than embedding a copy of the tables in its graph.
    if self._tensors is None:
      with tf.init_scope():
        self._tensors = (tf.constant(self.paths, tf.string), tf.constant(self.file_of),
                         tf.constant(self.offsets))
    return self._tensors

  def record(self, index: tf.Tensor) -> tf.data.Dataset:
    """A dataset of one element: record `index` (int64 scalar) as a tf.string scalar.

    A dataset rather than a tensor, so that a pipeline reads it with `flat_map`: unlike
    `get_single_element`, that keeps the pipeline free of stateful ops, so that its iterator
    can be checkpointed.
    """
    paths, file_of, offsets = self._tables()
    variant = tf.raw_ops.TFRecordDatasetV2(
        filenames=tf.reshape(tf.gather(paths, tf.gather(file_of, index)), [1]),
        compression_type="", buffer_size=tf.constant(0, tf.int64),
        byte_offsets=tf.reshape(tf.gather(offsets, index), [1]))
    return tf.data.experimental.from_variant(variant, tf.TensorSpec([], tf.string)).take(1)
