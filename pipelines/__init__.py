"""tf.data pipelines for long-context language models: document sources, vocabularies, and
batches of ordered per-stream segments.

  task = pipelines.get_task("python_stdlib_bytes")
  ds = pipelines.load_text_dataset(task, split="train", sequence_length=512, batch_size=8)

Your own documents: a `Task` of a source (`DatasetSource` for a `tf.data.Dataset` of strings,
`TextFilesSource` for a glob or a list of files, `TfdsSource` for a TFDS dataset, or your own
`IndexedSource`) and a vocabulary; `register_task` names it for gin and the programs.

Importing the package registers its gin configurables: `text_dataset.load_text_dataset`,
`text_dataset.set_default_data_directory`, `text_dataset.get_loss_mask_tokens` (Meliad's names)
and `pipelines.synthetic`, `pipelines.python_stdlib`, `pipelines.text_files`,
`pipelines.directory_tree`, `pipelines.tfds_source`, `pipelines.sentencepiece_vocabulary`.
"""

from pipelines.dataset_source import DatasetSource
from pipelines.loss_mask import get_loss_mask_tokens
from pipelines.resume import StreamIterator
from pipelines.sources import IndexedSource, Source, StreamingSource, hash_split, random_access
from pipelines.synthetic import SyntheticSource
from pipelines.tasks import Task, get_task, is_source_name, make_source, register_task, task_names
from pipelines.text_dataset import load_text_dataset, set_default_data_directory
from pipelines.text_files import DirectoryTreeSource, PythonStdlibSource, TextFilesSource
from pipelines.tfds_source import TfdsSource
from pipelines.vocabularies import (ByteVocabulary, RawByteVocabulary, SentencePieceVocabulary,
                                    Vocabulary, make_vocabulary)

__all__ = [
    "ByteVocabulary", "DatasetSource", "DirectoryTreeSource", "IndexedSource",
    "PythonStdlibSource", "RawByteVocabulary", "SentencePieceVocabulary", "Source",
    "StreamIterator", "StreamingSource", "SyntheticSource", "Task", "TextFilesSource",
    "TfdsSource", "Vocabulary", "get_loss_mask_tokens", "get_task", "hash_split",
    "is_source_name", "load_text_dataset", "make_source", "make_vocabulary", "random_access",
    "register_task", "set_default_data_directory", "task_names",
]
