"""Sources read from files: a glob of text files, a directory tree, the Python standard library.

File lists and sizes are taken once at construction (through tf.io.gfile, so remote file systems
work too); file contents are read inside the tf.data graph, only by the stream that takes the
document. Splits: a document goes to train, validation or test by a stable hash of its name
(90/5/5, `sources.hash_split`), so the assignment is the same on every machine and does not
move when other documents are added or removed. Empty documents are skipped and counted in the
log.

Document layout for trees: the files of a document are concatenated in sorted order of their
paths, each preceded by the header line `==> relative/path <==` (as `head` prints several
files); a file that does not end in a newline gets one, so that headers start their own line.
"""

import fnmatch
import os
import sysconfig
from typing import Dict, List, Optional, Sequence, Tuple, Union

import gin
import numpy as np
import tensorflow as tf
from absl import logging

from pipelines import sources


_GLOB_CHARS = frozenset("*?[")


def _header(relative_path: str) -> str:
  return f"==> {relative_path} <==\n"


class _FileDocuments(sources.IndexedSource):
  """Documents made of one or more files each, split by the hash of the document name.

  Subclasses list the documents as (name, [(relative path, absolute path), ...]).
  """

  def __init__(self, name: str, documents: Sequence[Tuple[str, Sequence[Tuple[str, str]]]],
               with_headers: bool, max_documents: Optional[int] = None):
    if max_documents is not None and max_documents <= 0:
      raise ValueError(f"max_documents must be positive, got {max_documents} (source {name!r}).")
    self.name = name
    self._with_headers = with_headers
    by_split: Dict[str, List] = {split: [] for split in sources.SPLIT_NAMES}
    skipped, binary = [], []
    for doc_name, files in sorted(documents):
      if sum(_file_size(name, path) for _, path in files) == 0:
        skipped.append(doc_name)
        continue
      text_files = [(relative, path) for relative, path in files if not _looks_binary(path)]
      binary += [relative for relative, _ in files if (relative, _) not in text_files]
      if not text_files:
        continue
      by_split[sources.hash_split(doc_name)].append((doc_name, text_files))
    if skipped:
      logging.warning("Source %s: skipped %d empty documents: %s", name, len(skipped),
                      ", ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else ""))
    if binary:
      logging.warning("Source %s: skipped %d binary files (a NUL byte in their first %d bytes): "
                      "%s", name, len(binary), _SNIFF_BYTES,
                      ", ".join(binary[:20]) + (" ..." if len(binary) > 20 else ""))
    logging.info("Source %s: %s documents.", name,
                 ", ".join(f"{split} {len(docs)}" for split, docs in by_split.items()))
    self._splits = {split: self._tables(docs[:max_documents]) for split, docs in by_split.items()}

  @staticmethod
  def _tables(docs):
    """Flat tables of one split: names, file paths and headers, and row splits from names to files."""
    names = [name for name, _ in docs]
    paths = [path for _, files in docs for _, path in files]
    headers = [_header(rel) for _, files in docs for rel, _ in files]
    row_splits = np.cumsum([0] + [len(files) for _, files in docs]).astype(np.int64)
    return names, paths, headers, row_splits

  def document_names(self, split: str) -> List[str]:
    sources.check_split(self.name, split)
    return list(self._splits[split][0])

  def num_documents(self, split):
    sources.check_split(self.name, split)
    return len(self._splits[split][0])

  def read(self, split, index):
    names, paths, headers, row_splits = self._splits[split]
    row_splits = tf.constant(row_splits)
    begin, end = row_splits[index], row_splits[index + 1]
    file_paths = tf.constant(paths, tf.string)[begin:end]
    contents = tf.map_fn(tf.io.read_file, file_paths, fn_output_signature=tf.string)
    if self._with_headers:
      ends_line = tf.strings.regex_full_match(contents, r"(?s)(.*\n)?")
      contents = tf.where(ends_line, contents, contents + "\n")
      file_headers = tf.constant(headers, tf.string)[begin:end]
      contents = tf.stack([file_headers, contents], axis=1)  # [files, 2]
    return {"text": tf.strings.reduce_join(contents),
            "document_id": tf.gather(tf.constant(names, tf.string), index)}


# Bytes read from the start of each file to tell text from binary data, as `grep` does.
_SNIFF_BYTES = 8192


def _looks_binary(path: str) -> bool:
  """Whether a file holds a NUL byte early on: binary data (images, archives, compiled code)
  that a glob or a tree caught along with the text."""
  with tf.io.gfile.GFile(path, "rb") as f:
    return b"\0" in f.read(_SNIFF_BYTES)


def _file_size(source_name: str, path: str) -> int:
  try:
    return tf.io.gfile.stat(path).length
  except tf.errors.OpError as e:  # a dangling link, a file removed while listing, ...
    raise ValueError(f"Source {source_name!r} cannot read {path}: {e.message}") from e


def _static_prefix(pattern: str) -> str:
  """The directory part of a glob pattern before its first wildcard."""
  parts = pattern.split("/")
  fixed = []
  for part in parts[:-1]:
    if _GLOB_CHARS & set(part):
      break
    fixed.append(part)
  return "/".join(fixed)


@gin.configurable("text_files", module="pipelines")
class TextFilesSource(_FileDocuments):
  """One document per file, matched by a glob pattern or listed; the file is the document, unchanged.

  For a pattern, the document name (and hash-split key) is the path relative to the pattern's
  directory before its first wildcard, e.g. "a/b.txt" for pattern "/data/books/*/*.txt"; for a
  list, it is the path as listed.

  Args:
    pattern: glob pattern (gin: `pipelines.text_files.pattern`), or a list of file paths.
  """

  def __init__(self, pattern: Optional[Union[str, Sequence[str]]] = None):
    if not pattern:
      raise ValueError("No file pattern given: bind pipelines.text_files.pattern = '/path/*.txt' in gin "
                       "(or use the source 'files:/path/*.txt').")
    if not isinstance(pattern, str):
      paths = list(pattern)
      missing = [path for path in paths if not tf.io.gfile.exists(path)]
      if missing:
        raise ValueError(f"Text files source: {missing[0]} does not exist"
                         + (f" (nor {len(missing) - 1} other listed files)." if len(missing) > 1 else "."))
      if len(set(paths)) != len(paths):
        raise ValueError("Text files source: a file is listed twice.")
      super().__init__(f"files:{paths[0]}" + (f" and {len(paths) - 1} more" if len(paths) > 1 else ""),
                       [(path, [(path, path)]) for path in paths], with_headers=False)
      return
    paths = [p for p in sorted(tf.io.gfile.glob(pattern)) if not tf.io.gfile.isdir(p)]
    if not paths:
      raise ValueError(f"The file pattern {pattern!r} matches no files.")
    prefix = _static_prefix(pattern)
    documents = []
    for path in paths:
      relative = os.path.relpath(path, prefix) if prefix else path
      documents.append((relative, [(relative, path)]))
    super().__init__(f"files:{pattern}", documents, with_headers=False)


def _walk_files(top: str, file_patterns: Sequence[str], exclude_dirs: Sequence[str]):
  """Relative paths of the files under `top`, sorted, skipping hidden and excluded entries."""
  found = []
  for directory, subdirs, files in tf.io.gfile.walk(top):
    # Pruning in place stops the walk from descending (as os.walk).
    subdirs[:] = [d for d in subdirs
                  if not d.startswith(".") and not any(fnmatch.fnmatch(d, x) for x in exclude_dirs)]
    for name in files:
      if name.startswith("."):
        continue
      if file_patterns and not any(fnmatch.fnmatch(name, p) for p in file_patterns):
        continue
      found.append(os.path.relpath(os.path.join(directory, name), top))
  return sorted(found)


def _tree_documents(directory: str, file_patterns: Sequence[str], exclude_dirs: Sequence[str],
                    include: Sequence[str]):
  """(name, files) for each top-level entry of `directory`: a file, or a folder's files."""
  documents = []
  for entry in sorted(tf.io.gfile.listdir(directory)):
    entry = entry.rstrip("/")
    if entry.startswith(".") or (include and not any(fnmatch.fnmatch(entry, p) for p in include)):
      continue
    path = os.path.join(directory, entry)
    if tf.io.gfile.isdir(path):
      if any(fnmatch.fnmatch(entry, x) for x in exclude_dirs):
        continue
      files = [os.path.join(entry, f) for f in _walk_files(path, file_patterns, exclude_dirs)]
    elif not file_patterns or any(fnmatch.fnmatch(entry, p) for p in file_patterns):
      files = [entry]
    else:
      continue
    if files:
      documents.append((entry, [(f, os.path.join(directory, f)) for f in files]))
  return documents


@gin.configurable("directory_tree", module="pipelines")
class DirectoryTreeSource(_FileDocuments):
  """One document per top-level entry of a directory: a folder (all files under it) or a file.

  Made for corpora such as a folder of code repositories or of books split into chapters.
  Hidden files and folders (".git") are skipped.

  Args:
    directory: the root (gin: `pipelines.directory_tree.directory`).
    file_patterns: fnmatch patterns of file names to keep, e.g. ("*.py", "*.md"); empty keeps all.
    exclude_dirs: fnmatch patterns of folder names skipped at any depth.
    include: fnmatch patterns of top-level names to keep; empty keeps all.
  """

  def __init__(self, directory: Optional[str] = None, file_patterns: Sequence[str] = (),
               exclude_dirs: Sequence[str] = (), include: Sequence[str] = ()):
    if not directory:
      raise ValueError("No directory given: bind pipelines.directory_tree.directory = '/path' in gin "
                       "(or use the source 'tree:/path').")
    if not tf.io.gfile.isdir(directory):
      raise ValueError(f"The directory {directory!r} does not exist.")
    documents = _tree_documents(directory, file_patterns, exclude_dirs, include)
    if not documents:
      raise ValueError(f"The directory {directory!r} holds no files"
                       + (f" matching {list(file_patterns)}" if file_patterns else "")
                       + (f" under entries {list(include)}" if include else "") + ".")
    super().__init__(f"tree:{directory}", documents, with_headers=True)


# Folders of the standard library left out: installed packages, compiled caches, the build
# configuration, and the test suites (a third of the code, mostly fixtures; leaving them out
# keeps documents to the library itself).
STDLIB_EXCLUDED_DIRS = ("site-packages", "__pycache__", "config-*", "test", "tests", "idle_test")


@gin.configurable("python_stdlib", module="pipelines")
class PythonStdlibSource(_FileDocuments):
  """The `.py` files of the running interpreter's standard library, one document per top-level
  module ("json" holds json/__init__.py, json/decoder.py, ...; "os.py" is one file).

  Present on every machine, so it is the default corpus of the main job and the tests.
  Test suites and site-packages are left out (`STDLIB_EXCLUDED_DIRS`).

  Args:
    include: fnmatch patterns of document names to keep, e.g. ("json", "csv.py"); empty keeps all.
    max_documents: keep only the first this many documents of each split (in name order).
  """

  def __init__(self, include: Sequence[str] = (), max_documents: Optional[int] = None):
    directory = sysconfig.get_paths()["stdlib"]
    documents = _tree_documents(directory, ("*.py",), STDLIB_EXCLUDED_DIRS, include)
    if not documents:
      raise ValueError(f"No standard library module in {directory!r} matches {list(include)}.")
    _FileDocuments.__init__(self, "python_stdlib", documents, with_headers=True,
                            max_documents=max_documents)
