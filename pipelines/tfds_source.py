"""TensorFlow Datasets as a document source: any text dataset by name and feature, e.g. PG19.

The dataset's records are read one at a time, each once per epoch, straight from TFDS's files:

* TFRecord files (what `tfds build` writes by default): the source indexes each file's record
  offsets when a split is first used (one 12-byte read per record, `records.record_offsets`),
  then the pipeline seeks to each record it reads. Works on every file system TensorFlow
  reads, buckets (`gs://`) included.
* ArrayRecord files (`tfds build --file_format=array_record`): records are read with the
  array_record library, through a Python call inside the tf.data graph. That library reads
  local files only.

Document i of a split is the split's i-th record in TFDS's file order (`shuffle_files=False`
order), the same on every run. Split names may be TFDS slices ("train[:1000]"). Datasets are
read from the TFDS data directory: the one given to `TfdsSource`, else the one set by
`set_default_data_directory` (the `--default_data_dir` flag), else TFDS's own default. Nothing
is downloaded: a dataset must be prepared there beforehand (`tfds build pg19 --data_dir=...`).
"""

from typing import Dict, Optional

import gin
import tensorflow as tf
import tensorflow_datasets as tfds

from pipelines import records as records_lib
from pipelines import sources

_default_data_dir: Optional[str] = None


def set_data_dir(directory: Optional[str]) -> None:
  """Sets the TFDS data directory used by sources created afterwards."""
  global _default_data_dir
  _default_data_dir = directory


def data_dir() -> Optional[str]:
  return _default_data_dir


class _ArrayRecordSplit:
  """Random access to one split's ArrayRecord records, by a Python call in the graph."""

  def __init__(self, instructions):
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    self._records = array_record_data_source.ArrayRecordDataSource(instructions)

  def __len__(self):
    return len(self._records)

  def record(self, index):
    def read(i):
      return self._records[int(i)]
    record = tf.py_function(read, [index], tf.string)
    record.set_shape([])
    return tf.data.Dataset.from_tensors(record)


@gin.configurable("tfds_source", module="pipelines")
class TfdsSource(sources.IndexedSource):
  """One document per record of a TFDS dataset: the text is one feature of the record.

  Args:
    name: the dataset as `tfds.builder` takes it: "pg19", "pg19:0.1.1", "wiki40b/en".
    feature: the text feature, e.g. "book_text".
    id_feature: a feature naming the record (e.g. "book_id"); None numbers records
      "<name>/<split>/<index>" in file order.
    directory: TFDS data directory; None uses `data_dir()`.
  """

  def __init__(self, name: str, feature: str, id_feature: Optional[str] = None,
               directory: Optional[str] = None):
    self.name = f"tfds:{name}:{feature}"
    self.feature = feature
    self.id_feature = id_feature
    self.directory = directory or data_dir()
    try:
      self._builder = tfds.builder(name, data_dir=self.directory)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(f"Unknown TFDS dataset {name!r} (no builder of that name is registered).") from e
    self._splits: Dict[str, object] = {}
    self._features = None

  def _check_features(self):
    if self._features is not None:
      return
    features = self._builder.info.features
    for key in (self.feature, self.id_feature):
      if key is not None and key not in features:
        raise ValueError(f"TFDS dataset {self._builder.name!r} has no feature {key!r}; "
                         f"it has {', '.join(sorted(features))}.")
    if features[self.feature].tf_dtype != tf.string:
      raise ValueError(f"Feature {self.feature!r} of TFDS dataset {self._builder.name!r} is not text "
                       f"({features[self.feature].tf_dtype.name}).")
    self._features = features

  def _split(self, split: str):
    """The split's records, indexed when first asked for."""
    if split in self._splits:
      return self._splits[split]
    if not self._builder.is_prepared():
      raise ValueError(
          f"TFDS dataset {self._builder.name!r} is not prepared in data directory "
          f"{self._builder.data_dir!r}; prepare it there (nothing is downloaded at run time) or set "
          "--default_data_dir.")
    self._check_features()
    try:
      instructions = self._builder.info.splits[split].file_instructions
    except (KeyError, ValueError) as e:
      raise ValueError(f"Split {split!r} of TFDS dataset {self._builder.name!r}: {e}") from e
    file_format = self._builder.info.file_format
    if file_format == tfds.core.FileFormat.TFRECORD:
      files = []
      for instruction in instructions:
        offsets = records_lib.record_offsets(instruction.filename)
        files.append((instruction.filename, offsets[instruction.skip:instruction.skip + instruction.take]))
      records = records_lib.RecordIndex(files)
    elif file_format == tfds.core.FileFormat.ARRAY_RECORD:
      remote = [i.filename for i in instructions if "://" in i.filename]
      if remote:
        raise ValueError(
            f"TFDS dataset {self._builder.name!r} is in ArrayRecord files at {remote[0]}, but the "
            "array_record library reads local files only; prepare it in TFRecord files (the "
            "default of `tfds build`) to read it from there.")
      records = _ArrayRecordSplit(instructions)
    else:
      raise ValueError(f"TFDS dataset {self._builder.name!r} is stored as {file_format.value}; "
                       "the pipelines read TFRecord and ArrayRecord files.")
    self._splits[split] = records
    return records

  def num_documents(self, split):
    return len(self._split(split))

  def document(self, split, index):
    records = self._split(split)
    features = self._features
    feature, id_feature = self.feature, self.id_feature
    prefix = f"{self._builder.name}/{split}/"

    def to_document(record):
      example = features.deserialize_example(record)
      if id_feature is None:
        document_id = prefix + tf.strings.as_string(index)
      else:
        document_id = example[id_feature]
        if document_id.dtype != tf.string:
          document_id = tf.strings.as_string(document_id)
      return {"text": example[feature], "document_id": document_id}

    return records.record(index).map(to_document)

  def read(self, split, index):
    return self.document(split, index).get_single_element()
