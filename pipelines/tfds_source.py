"""TensorFlow Datasets as a document source: any text dataset by name and feature, e.g. PG19.

Records are read in the dataset's own file order (`shuffle_files=False`), so the split's order
is the same on every run; the training pipeline shuffles them with a buffer (see
`sources.StreamingSource`). Datasets are read from the TFDS data directory: the one given to
`TfdsSource`, else the one set by `set_default_data_directory` (the `--default_data_dir` flag),
else TFDS's own default. Nothing is downloaded: a dataset must be prepared there beforehand
(`tfds build pg19 --data_dir=...`).
"""

from typing import Optional

import gin
import tensorflow as tf
import tensorflow_datasets as tfds

from pipelines import sources

_default_data_dir: Optional[str] = None


def set_data_dir(directory: Optional[str]) -> None:
  """Sets the TFDS data directory used by sources created afterwards."""
  global _default_data_dir
  _default_data_dir = directory


def data_dir() -> Optional[str]:
  return _default_data_dir


@gin.configurable("tfds_source", module="pipelines")
class TfdsSource(sources.StreamingSource):
  """One document per record of a TFDS dataset: the text is one feature of the record.

  Args:
    name: the dataset as `tfds.builder` takes it: "pg19", "pg19:0.1.1", "wiki40b/en".
    feature: the text feature, e.g. "book_text".
    id_feature: a feature naming the record (e.g. "book_id"); None numbers records
      "<name>/<split>/<index>" in file order.
    directory: TFDS data directory; None uses `data_dir()`.
    shuffle_buffer_size: documents held by each stream's training shuffle.
  """

  def __init__(self, name: str, feature: str, id_feature: Optional[str] = None,
               directory: Optional[str] = None, shuffle_buffer_size: int = 64):
    if shuffle_buffer_size <= 0:
      raise ValueError("pipelines.tfds_source.shuffle_buffer_size must be positive, got "
                       f"{shuffle_buffer_size}.")
    self.name = f"tfds:{name}:{feature}"
    self.feature = feature
    self.id_feature = id_feature
    self.shuffle_buffer_size = shuffle_buffer_size
    self.directory = directory or data_dir()
    try:
      self._builder = tfds.builder(name, data_dir=self.directory)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(f"Unknown TFDS dataset {name!r} (no builder of that name is registered).") from e

  def _records(self, split: str) -> tf.data.Dataset:
    try:
      records = self._builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError as e:  # TFDS asserts when the data was never prepared
      raise ValueError(
          f"TFDS dataset {self._builder.name!r} is not prepared in data directory "
          f"{self._builder.data_dir!r}; prepare it there (nothing is downloaded at run time) or set "
          "--default_data_dir.") from e
    except ValueError as e:
      raise ValueError(f"Split {split!r} of TFDS dataset {self._builder.name!r}: {e}") from e
    spec = records.element_spec
    for key in (self.feature, self.id_feature):
      if key is not None and key not in spec:
        raise ValueError(f"TFDS dataset {self._builder.name!r} has no feature {key!r}; "
                         f"it has {', '.join(sorted(spec))}.")
    if spec[self.feature].dtype != tf.string:
      raise ValueError(f"Feature {self.feature!r} of TFDS dataset {self._builder.name!r} is not text "
                       f"({spec[self.feature].dtype.name}).")
    return records

  def documents(self, split):
    records = self._records(split)
    feature, id_feature = self.feature, self.id_feature
    if id_feature is not None:
      def to_document(record):
        doc_id = record[id_feature]
        if doc_id.dtype != tf.string:
          doc_id = tf.strings.as_string(doc_id)
        return {"text": record[feature], "document_id": doc_id}
      return records.map(to_document)
    prefix = f"{self._builder.name}/{split}/"
    return records.enumerate().map(
        lambda i, record: {"text": record[feature], "document_id": prefix + tf.strings.as_string(i)})

  def num_documents(self, split):
    try:
      return self._builder.info.splits[split].num_examples
    except (KeyError, ValueError):  # info of an unprepared or mocked dataset has no splits
      return None
