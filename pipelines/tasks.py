"""Tasks: a named pair of a document source and a vocabulary, as Meliad's `dataset_name`.

Registered names:

* synthetic: fact-recall documents (`pipelines.synthetic.*`), raw_bytes (256 ids, Meliad's
  base NUM_EMBEDDINGS); synthetic_bytes: the same with bytes (259 ids).
* python_stdlib_bytes, python_stdlib_tokens: the running Python's standard library.
* pg19_bytes, pg19_tokens: TFDS pg19:0.1.1, feature book_text (Meliad's NUM_EMBEDDINGS 260 and
  32128, the latter for T5's SentencePiece model).
* files_bytes, files_tokens: a glob, `pipelines.text_files.pattern`.
* tree_bytes, tree_tokens: a directory, `pipelines.directory_tree.directory`.

`_bytes` tasks use the byte vocabulary; `_tokens` tasks SentencePiece, with the model file from
`pipelines.sentencepiece_vocabulary.model_path`.

Names with an argument, `<kind>[_<vocabulary>]:<argument>`, where the vocabulary is `bytes`
(the default), `raw_bytes` or `tokens`:

  files_bytes:/data/books/*.txt    tree_tokens:/src/repositories    tfds:NAME:FEATURE
  tfds_tokens:wiki40b/en:text      tfds_bytes:pg19:0.1.1:book_text

For tfds the argument is the dataset as `tfds.builder` takes it, then ":" and the text feature
(the feature follows the last colon, so a version may be part of the name).

`register_task` adds a name of your own, with your source and vocabulary; a module that
registers tasks and is imported from a gin file (`import my_tasks`) makes them known to
meliad-train and meliad-eval (the import is kept in the run's config.gin).
"""

import dataclasses
from typing import Callable, Dict, Optional, Tuple, Union

from pipelines import sources
from pipelines import synthetic
from pipelines import text_files
from pipelines import tfds_source
from pipelines import vocabularies


@dataclasses.dataclass(frozen=True)
class Task:
  """What a model reads: documents from `source`, tokenized by `vocabulary`."""
  name: str
  source: sources.Source
  vocabulary: vocabularies.Vocabulary


_VOCABULARIES: Dict[str, Callable[[], vocabularies.Vocabulary]] = {
    "bytes": vocabularies.ByteVocabulary,
    "raw_bytes": vocabularies.RawByteVocabulary,
    "tokens": vocabularies.SentencePieceVocabulary,  # the model path comes from gin
}


def _pg19():
  return tfds_source.TfdsSource("pg19:0.1.1", "book_text", id_feature="book_id")


# name -> (source factory, vocabulary name); factories read their settings from gin.
_TASKS: Dict[str, Tuple[Callable[[], sources.Source], str]] = {
    "synthetic": (synthetic.SyntheticSource, "raw_bytes"),
    "synthetic_bytes": (synthetic.SyntheticSource, "bytes"),
    "python_stdlib_bytes": (text_files.PythonStdlibSource, "bytes"),
    "python_stdlib_tokens": (text_files.PythonStdlibSource, "tokens"),
    "pg19_bytes": (_pg19, "bytes"),
    "pg19_tokens": (_pg19, "tokens"),
    "files_bytes": (text_files.TextFilesSource, "bytes"),
    "files_tokens": (text_files.TextFilesSource, "tokens"),
    "tree_bytes": (text_files.DirectoryTreeSource, "bytes"),
    "tree_tokens": (text_files.DirectoryTreeSource, "tokens"),
}

_ARGUMENT_KINDS = ("files", "tree", "tfds")

# name -> (source factory, vocabulary factory), from register_task.
_USER_TASKS: Dict[str, Tuple[Callable[[], sources.Source], Callable[[], vocabularies.Vocabulary]]] = {}


def task_names():
  """The registered task names (names with an argument come on top, see the module docstring)."""
  return sorted(list(_TASKS) + list(_USER_TASKS))


def register_task(name: str,
                  source: Union[sources.Source, Callable[[], sources.Source]],
                  vocabulary: Union[str, vocabularies.Vocabulary,
                                    Callable[[], vocabularies.Vocabulary]] = "bytes") -> None:
  """Makes `get_task(name)` (so gin's `TransformerTaskConfig.dataset_name`) return your task.

  Args:
    name: the task name; not a built-in one nor of the form kind:argument. Registering a name
      again replaces the earlier registration.
    source: a `Source`, or a function returning one, called each time the task is asked for
      (so gin bindings made later still apply).
    vocabulary: "bytes", "raw_bytes", "tokens" (SentencePiece, the model from gin), a
      `Vocabulary`, or a function returning one.
  """
  if not name or ":" in name or name in _TASKS:
    raise ValueError(f"Cannot register task {name!r}: the name is empty, has a colon, or is built in.")
  if isinstance(vocabulary, str):
    if vocabulary not in _VOCABULARIES:
      raise ValueError(f"register_task({name!r}): unknown vocabulary {vocabulary!r}; use "
                       f"{', '.join(_VOCABULARIES)}, a Vocabulary or a function returning one.")
    make_vocabulary = _VOCABULARIES[vocabulary]
  elif isinstance(vocabulary, vocabularies.Vocabulary):
    make_vocabulary = lambda: vocabulary
  else:
    make_vocabulary = vocabulary
  make_source = (lambda: source) if isinstance(source, sources.Source) else source
  _USER_TASKS[name] = (make_source, make_vocabulary)


def _source_with_argument(kind: str, argument: str) -> sources.Source:
  if not argument:
    raise ValueError(f"Source {kind!r} needs an argument: {kind}:...")
  if kind == "files":
    return text_files.TextFilesSource(pattern=argument)
  if kind == "tree":
    return text_files.DirectoryTreeSource(directory=argument)
  name, _, feature = argument.rpartition(":")
  if not name or not feature:
    raise ValueError(f"A TFDS source is written tfds:NAME:FEATURE, got 'tfds:{argument}'.")
  return tfds_source.TfdsSource(name, feature)


def is_source_name(spec: str) -> bool:
  """Whether `spec` is a source short name (which `make_source` takes) rather than a task name."""
  kind, colon, _ = spec.partition(":")
  return spec in ("python_stdlib", "synthetic") or bool(colon and kind in _ARGUMENT_KINDS)


def make_source(spec: str) -> sources.Source:
  """A source from its short name: python_stdlib, synthetic, files:GLOB, tree:DIR, tfds:NAME:FEATURE."""
  if spec == "python_stdlib":
    return text_files.PythonStdlibSource()
  if spec == "synthetic":
    return synthetic.SyntheticSource()
  if is_source_name(spec):
    kind, _, argument = spec.partition(":")
    return _source_with_argument(kind, argument)
  raise ValueError(f"Unknown source {spec!r}: use python_stdlib, synthetic, files:GLOB, tree:DIR or "
                   "tfds:NAME:FEATURE.")


def get_task(name: str, vocabulary: Optional[vocabularies.Vocabulary] = None) -> Task:
  """The task called `name` (see the module docstring).

  Args:
    name: a registered task name or `<kind>[_<vocabulary>]:<argument>`.
    vocabulary: replaces the task's own vocabulary (which is then not built).

  Raises:
    ValueError: for an unknown name (the message lists the known ones) or a bad setting.
  """
  # The vocabulary is built first: a missing model file is reported before a corpus is listed.
  if name in _TASKS:
    make, vocab = _TASKS[name]
    vocabulary = vocabulary or _VOCABULARIES[vocab]()
    return Task(name, make(), vocabulary)
  if name in _USER_TASKS:
    make, make_vocabulary = _USER_TASKS[name]
    vocabulary = vocabulary or make_vocabulary()
    return Task(name, make(), vocabulary)
  prefix, colon, argument = name.partition(":")
  kind, _, vocab = prefix.partition("_")
  if colon and kind in _ARGUMENT_KINDS and (vocab or "bytes") in _VOCABULARIES:
    vocabulary = vocabulary or _VOCABULARIES[vocab or "bytes"]()
    return Task(name, _source_with_argument(kind, argument), vocabulary)
  raise ValueError(
      f"Unknown task {name!r}. Known tasks: {', '.join(task_names())}; or "
      "<files|tree|tfds>[_bytes|_raw_bytes|_tokens]:ARGUMENT, e.g. files_bytes:/data/*.txt, "
      "tree_tokens:/src, tfds:NAME:FEATURE.")
