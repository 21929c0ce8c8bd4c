"""Fixtures of the pipeline tests: small corpora on disk and a tiny SentencePiece model."""

import os
import sysconfig

import gin
import numpy as np
import pytest
import sentencepiece

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


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory, small_stdlib_modules):
  """A 400-piece BPE model trained on small standard library modules (pad 0, eos 1, unk 2)."""
  stdlib = sysconfig.get_paths()["stdlib"]
  lines = []
  for name in small_stdlib_modules:
    with open(os.path.join(stdlib, name), encoding="utf-8") as f:
      lines.extend(f.read().splitlines(keepends=True))
  prefix = str(tmp_path_factory.mktemp("sp") / "tiny")
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=400, model_type="bpe",
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
      byte_fallback=True, minloglevel=2)
  return prefix + ".model"


@pytest.fixture(scope="session")
def stdlib_source(small_stdlib_modules):
  return pipelines.PythonStdlibSource(include=tuple(small_stdlib_modules))
