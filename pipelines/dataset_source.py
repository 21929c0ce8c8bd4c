"""A user's own `tf.data.Dataset` of documents as a source.

The dataset may yield strings (each one document) or dicts with "text" and, optionally,
"document_id". It can only be read in order, so the pipeline reads each split once, when the
split is first used, into a TFRecord file (in `cache_dir`, or in memory), and from then on reads
each document from there by index: one extra pass over the documents, and their size in memory
(or in `cache_dir`), buy random access, so that every epoch reads each document once.
"""

from typing import Dict, Mapping, Optional, Union

import tensorflow as tf

from pipelines import sources

Documents = Union[tf.data.Dataset, Mapping[str, tf.data.Dataset]]


class DatasetSource(sources.StreamingSource):
  """Documents from `tf.data.Dataset`s, one per split.

  Args:
    documents: a dataset of documents (the "train" split), or a mapping from split names to
      datasets. Elements are tf.string scalars, or dicts with a tf.string scalar "text" and
      optionally a tf.string scalar "document_id" (by default "<name>/<split>/<index>").
    name: names the source in logs, errors and default document names.
    cache_dir: where each split is copied when first used (any TensorFlow file system); None:
      TensorFlow's in-memory file system.
  """

  def __init__(self, documents: Documents, name: str = "dataset", cache_dir: Optional[str] = None):
    self.name = name
    self.cache_dir = cache_dir
    splits = documents if isinstance(documents, Mapping) else {"train": documents}
    self._splits: Dict[str, tf.data.Dataset] = {}
    for split, dataset in splits.items():
      if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(f"Split {split!r} of source {name!r} is a {type(dataset).__name__}, not a "
                         "tf.data.Dataset.")
      self._splits[split] = self._as_documents(split, dataset)

  def _as_documents(self, split, dataset):
    spec = dataset.element_spec
    text_spec = spec.get("text") if isinstance(spec, dict) else spec
    if not isinstance(text_spec, tf.TensorSpec) or text_spec.dtype != tf.string or text_spec.shape.rank != 0:
      raise ValueError(f"Split {split!r} of source {self.name!r} must hold tf.string scalars or dicts "
                       f"with a tf.string scalar 'text'; its elements are {spec}.")
    prefix = f"{self.name}/{split}/"
    if isinstance(spec, dict) and "document_id" in spec:
      return dataset.map(lambda d: {"text": d["text"], "document_id": d["document_id"]})
    text = (lambda d: d["text"]) if isinstance(spec, dict) else (lambda d: d)
    return dataset.enumerate().map(
        lambda i, d: {"text": text(d), "document_id": prefix + tf.strings.as_string(i)})

  def documents(self, split):
    sources.check_split(self.name, split, known=tuple(self._splits))
    return self._splits[split]
