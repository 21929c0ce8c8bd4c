"""Fixtures of the pipeline tests: small corpora on disk and a tiny SentencePiece model."""

import os
import sysconfig

import gin
import numpy as np
import pytest
import sentencepiece
import tensorflow_datasets as tfds

import pipelines


# Standard library modules small enough for quick epochs at L = 64.
_SMALL_MODULE_BYTES = 6000


@pytest.fixture(autouse=True)
def clean_gin():
  yield
  gin.clear_config()


@pytest.fixture(scope="session")
def small_stdlib_modules():
  """Names of small top-level standard library modules (single files)."""
  stdlib = sysconfig.get_paths()["stdlib"]
  names = sorted(name for name in os.listdir(stdlib) if name.endswith(".py")
                 and 0 < os.path.getsize(os.path.join(stdlib, name)) < _SMALL_MODULE_BYTES)
  assert len(names) >= 20, names
  return names


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
  """A glob corpus: 40 text files of varied lengths, one of them empty, one with bad UTF-8."""
  directory = tmp_path_factory.mktemp("books")
  rng = np.random.default_rng(0)
  words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
  for i in range(40):
    text = " ".join(rng.choice(words, size=int(rng.integers(5, 120)))) + f"\nend of book {i}\n"
    (directory / f"book_{i:02d}.txt").write_text(text)
  (directory / "empty.txt").write_bytes(b"")
  (directory / "latin1.txt").write_bytes("caf\u00e9 na\u00efve d\u00e9j\u00e0 vu\n".encode("latin-1"))
  return directory


@pytest.fixture(scope="session")
def tree_corpus(tmp_path_factory):
  """A tree corpus: 30 'repositories' of a few files each, plus hidden files to be skipped."""
  root = tmp_path_factory.mktemp("repos")
  rng = np.random.default_rng(1)
  for i in range(30):
    repo = root / f"repo{i:02d}"
    (repo / "src").mkdir(parents=True)
    (repo / "README.md").write_text(f"# Repository {i}\n")
    (repo / "src" / "main.py").write_text("\n".join(f"x{j} = {j}" for j in range(int(rng.integers(1, 30)))))
    (repo / "src" / "util.py").write_text(f"def f():\n  return {i}\n")
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
  (root / "NOTES.txt").write_text("top-level file as its own document\n")
  return root


def _stdlib_lines(names, keepends):
  stdlib = sysconfig.get_paths()["stdlib"]
  lines = []
  for name in names:
    with open(os.path.join(stdlib, name), encoding="utf-8") as f:
      lines.extend(f.read().splitlines(keepends=keepends))
  return lines


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory, small_stdlib_modules):
  """A 400-piece BPE model trained on small standard library modules (pad 0, eos 1, unk 2)."""
  lines = _stdlib_lines(small_stdlib_modules, keepends=True)
  prefix = str(tmp_path_factory.mktemp("sp") / "tiny")
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=400, model_type="bpe",
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
      byte_fallback=True, minloglevel=2)
  return prefix + ".model"


# SentencePiece settings and the `space_cut` the vocabulary must find for them.
SENTENCEPIECE_SETTINGS = {
    # meliad-vocab's: no whitespace stripping, a dummy prefix.
    "bpe_identity_prefix": (dict(model_type="bpe", normalization_rule_name="identity",
                                 remove_extra_whitespaces=False), "drop"),
    "bpe_nfkc_strip_prefix": (dict(model_type="bpe", normalization_rule_name="nmt_nfkc"), "drop"),
    "char_nfkc_cf": (dict(model_type="char", normalization_rule_name="nmt_nfkc_cf"), "drop"),
    "bpe_identity_no_prefix": (dict(model_type="bpe", normalization_rule_name="identity",
                                    remove_extra_whitespaces=False, add_dummy_prefix=False,
                                    allow_whitespace_only_pieces=True), "keep"),
    # T5's kind: cut only when asked, for its ties (pieces of runs of spaces, as in code,
    # make many).
    "unigram_nfkc": (dict(model_type="unigram", normalization_rule_name="nmt_nfkc", vocab_size=1000,
                          remove_extra_whitespaces=False, allow_whitespace_only_pieces=True), None),
    # Stripping leading whitespace without a prefix loses the "▁" of the cut.
    "bpe_strip_no_prefix": (dict(model_type="bpe", add_dummy_prefix=False), None),
    # Pieces that span spaces (enough of them that some do).
    "bpe_across_spaces": (dict(model_type="bpe", split_by_whitespace=False, vocab_size=1000), None),
}


@pytest.fixture(scope="session")
def sentencepiece_models(tmp_path_factory, small_stdlib_modules):
  """{name: model path} of small models with each of SENTENCEPIECE_SETTINGS."""
  lines = _stdlib_lines(small_stdlib_modules, keepends=False)
  directory = tmp_path_factory.mktemp("sp_settings")
  paths = {}
  for name, (settings, _) in SENTENCEPIECE_SETTINGS.items():
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(directory / name), **{
            "vocab_size": 400, "pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1,
            "byte_fallback": True, "minloglevel": 2, "num_threads": 1, **settings})
    paths[name] = str(directory / name) + ".model"
  return paths


@pytest.fixture(scope="session")
def stdlib_source(small_stdlib_modules):
  return pipelines.PythonStdlibSource(include=tuple(small_stdlib_modules))


_TEST_BOOKS = ["" if i == 5 else f"Book {i}. " + "caf\u00e9 lorem ipsum " * (i * 7 % 23 + 1)
               for i in range(20)]


class MeliadTestBooks(tfds.core.GeneratorBasedBuilder):
  """20 short books, one of them empty, as TFDS writes them (its files, its example order)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"book_text": tfds.features.Text(), "book_id": np.int64, "title": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, text in enumerate(_TEST_BOOKS):
      yield i, {"book_text": text, "book_id": i, "title": f"title {i}"}


class MeliadTestLongBooks(MeliadTestBooks):
  """24 books of 20-60 kB."""

  def _generate_examples(self):
    rng = np.random.default_rng(3)
    for i in range(24):
      words = rng.choice(["alpha", "beta", "gamma", "delta", "epsilon"], size=int(rng.integers(3_500, 10_000)))
      yield i, {"book_text": " ".join(words), "book_id": i, "title": f"title {i}"}


@pytest.fixture(scope="session")
def tfds_long_books(tmp_path_factory):
  """(data_dir, texts in file order) of meliad_test_long_books, built by TFDS as TFRecord files."""
  data_dir = str(tmp_path_factory.mktemp("tfds_long"))
  builder = MeliadTestLongBooks(data_dir=data_dir)
  builder.download_and_prepare()
  texts = [r["book_text"] for r in builder.as_dataset(split="train", shuffle_files=False).as_numpy_iterator()]
  return data_dir, texts


@pytest.fixture(scope="session")
def tfds_books(tmp_path_factory):
  """A function of the file format ("tfrecord", "array_record") -> (data_dir, texts by book_id):
  meliad_test_books built by TFDS in that format (once per session)."""
  built = {}

  def build(file_format):
    if file_format not in built:
      data_dir = str(tmp_path_factory.mktemp(f"tfds_{file_format}"))
      builder = MeliadTestBooks(data_dir=data_dir, file_format=file_format)
      builder.download_and_prepare()
      built[file_format] = data_dir
    return built[file_format], [text.encode() for text in _TEST_BOOKS]

  return build
