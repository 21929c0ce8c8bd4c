"""Vocabularies (ids, decode, bad input) and source details (splits, synthetic structure)."""

import os
import re
import sysconfig

import gin
import numpy as np

import pytest
import sentencepiece
import tensorflow as tf

import pipelines
from conftest import SENTENCEPIECE_SETTINGS
from pipeline_helpers import reconstruct, take
from pipelines import streams


def test_byte_vocabulary_shifts_by_three_and_keeps_undecodable_bytes():
  vocab = pipelines.ByteVocabulary()
  assert vocab.vocab_size == 259 and vocab.kind == "bytes"
  assert vocab.encode(b"A\xff") == [65 + 3, 255 + 3]
  assert vocab.decode_bytes([0, 68, 258, 1, 2]) == b"A\xff"
  assert vocab.decode([68, 258]) == "A\ufffd"


def test_raw_byte_vocabulary_passes_bytes_and_rejects_byte_zero(tmp_path):
  vocab = pipelines.RawByteVocabulary()
  assert vocab.vocab_size == 256 and vocab.encode(b"Az") == [65, 122]
  (tmp_path / "nul.bin").write_bytes(b"a" * 9000 + b"\x00b")  # not sniffed as binary
  task = pipelines.get_task(f"files_raw_bytes:{tmp_path}/*.bin")
  split = pipelines.hash_split("nul.bin")
  dataset = pipelines.load_text_dataset(task, split, sequence_length=8, batch_size=1, training=False)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"byte 0[\s\S]*files:.*nul\.bin"):
    take(dataset, 1)


def test_sentencepiece_ids_and_decode(sentencepiece_model):
  vocab = pipelines.SentencePieceVocabulary(sentencepiece_model)
  assert vocab.kind == "sentencepiece" and vocab.vocab_size == 400
  text = "def f(x):\n    return x  # \u00e9t\u00e9\n"
  ids = vocab.encode(text)
  assert 0 not in ids and vocab.decode(ids) == text
  assert vocab.decode(ids + [0, 0]) == text  # padding decodes to nothing
  lengths = vocab.token_byte_lengths()
  assert lengths[0] == 0 and lengths.shape == (400,)


def test_sentencepiece_replaces_undecodable_bytes_without_failing(tmp_path, sentencepiece_model):
  (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe then more\n")
  task = pipelines.get_task(f"files_tokens:{tmp_path}/*.txt",
                            vocabulary=pipelines.SentencePieceVocabulary(sentencepiece_model))
  split = pipelines.hash_split("bad.txt")
  batches = take(pipelines.load_text_dataset(task, split, sequence_length=64, batch_size=1,
                                             training=False), 5)
  (document,) = reconstruct(batches, ended=True)
  assert task.vocabulary.decode(document.tokens) == "ok \ufffd\ufffd then more\n"


# Text where a cut at a space is easy to get wrong: runs and kinds of whitespace, no-break
# spaces, combining marks, bytes that are not UTF-8, leading and trailing spaces.
_AWKWARD_TEXTS = [
    b"a  b\tc \n d\xc2\xa0e f\xcc\x81 g \xcc\x81h i\xe2\x82 j caf\xc3\xa9 k\r\nl m " * 20,
    b"   leading and trailing   ", b"", b" ", b"x y", "\u65e5\u672c a b \uff21 c".encode() * 20,
]


def _stdlib_texts(names):
  stdlib = sysconfig.get_paths()["stdlib"]
  texts = []
  for name in names:
    with open(os.path.join(stdlib, name), "rb") as f:
      texts.append(f.read())
  return texts


def _tokens_of_parts(vocab, text, space_cut, every):
  starts, ends = streams._space_cuts(tf.constant(text), space_cut, every)  # pylint: disable=protected-access
  parts = tf.strings.substr(tf.constant(text), starts, ends - starts)
  return vocab.encode_tf(parts, tf.constant(""), "test").flat_values.numpy().tolist(), len(starts)


@pytest.mark.parametrize("setting", sorted(SENTENCEPIECE_SETTINGS))
def test_sentencepiece_documents_are_cut_at_spaces_only_where_that_is_exact(
    sentencepiece_models, small_stdlib_modules, setting):
  """The model's settings decide the cut; where it cuts, the parts (cut at every space it may
  be cut at) tokenize as the whole text does in SentencePiece's own tokenizer; where it does
  not, cutting would have changed the tokens of some text."""
  vocab = pipelines.SentencePieceVocabulary(sentencepiece_models[setting])
  expected_cut = SENTENCEPIECE_SETTINGS[setting][1]
  assert vocab.space_cut == expected_cut
  processor = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_models[setting])
  texts = _stdlib_texts(small_stdlib_modules) + _AWKWARD_TEXTS
  differing, most_parts = 0, 0
  for text in texts:
    whole = processor.encode(text.decode("utf-8", errors="replace"))
    cut, num_parts = _tokens_of_parts(vocab, text, expected_cut or "drop", every=1)
    most_parts = max(most_parts, num_parts)
    differing += cut != whole
  assert most_parts > 500
  if expected_cut:
    assert differing == 0
  else:
    assert differing > 0


def test_unigram_models_are_cut_when_asked(sentencepiece_models):
  path = sentencepiece_models["unigram_nfkc"]
  assert pipelines.SentencePieceVocabulary(path).space_cut is None
  assert pipelines.SentencePieceVocabulary(path, cut_unigram_at_spaces=True).space_cut == "drop"
  # As the programs build it from --vocab, with the gin binding the README gives.
  gin.parse_config("pipelines.sentencepiece_vocabulary.cut_unigram_at_spaces = True")
  assert pipelines.make_vocabulary(path).space_cut == "drop"


def test_text_is_cut_after_each_multiple_at_a_space_between_visible_characters():
  text = b"ab cd  ef\tgh ij\xc2\xa0kl mn op"
  starts, ends = streams._space_cuts(tf.constant(text), "keep", 4)  # pylint: disable=protected-access
  parts = [text[s:e] for s, e in zip(starts.numpy(), ends.numpy())]
  # The first space at or after 4 that is alone between visible characters is at 12 (not 5 or
  # 6, a run); then 19 (16), 22 (20); none after 24.
  assert parts == [b"ab cd  ef\tgh", b" ij\xc2\xa0kl", b" mn", b" op"]
  starts, ends = streams._space_cuts(tf.constant(text), "drop", 4)  # pylint: disable=protected-access
  assert [text[s:e] for s, e in zip(starts.numpy(), ends.numpy())] == [
      b"ab cd  ef\tgh", b"ij\xc2\xa0kl", b"mn", b"op"]
  for empty_or_uncut in (b"", b"abcdefgh", b"a  b"):
    starts, ends = streams._space_cuts(tf.constant(empty_or_uncut), "keep", 1)  # pylint: disable=protected-access
    assert starts.numpy().tolist() == [0] and ends.numpy().tolist() == [len(empty_or_uncut)]


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"not a model", "is not a SentencePiece model"),
])
def test_sentencepiece_model_file_errors_name_the_file(tmp_path, content, message):
  path = tmp_path / "vocab.model"
  if content is not None:
    path.write_bytes(content)
  with pytest.raises((ValueError, FileNotFoundError), match=f"{re.escape(str(path))}.*{message}"):
    pipelines.SentencePieceVocabulary(str(path))


def test_hash_split_is_stable_and_roughly_90_5_5():
  assert pipelines.hash_split("json") == pipelines.hash_split("json")
  counts = {"train": 0, "validation": 0, "test": 0}
  for i in range(4000):
    counts[pipelines.hash_split(f"document_{i}")] += 1
  assert 3450 < counts["train"] < 3750 and 120 < counts["validation"] < 280 and 120 < counts["test"] < 280


def test_stdlib_splits_are_disjoint_and_test_is_reasonably_sized():
  source = pipelines.PythonStdlibSource()
  names = {split: set(source.document_names(split)) for split in ("train", "validation", "test")}
  assert not (names["train"] & names["test"]) and not (names["train"] & names["validation"])
  assert len(names["test"]) >= 5 and len(names["train"]) >= 100
  assert "json" in set.union(*names.values()) and "site-packages" not in set.union(*names.values())


def test_synthetic_documents_state_facts_then_ask_them_far_later():
  source = pipelines.SyntheticSource(seed=3, num_documents=4, document_length=4000, num_facts=5)
  text = source.generate("train", 2)
  assert text == pipelines.SyntheticSource(seed=3, num_documents=9, document_length=4000,
                                           num_facts=5).generate("train", 2)
  assert text != source.generate("test", 2) and text != source.generate("train", 1)
  assert b"\x00" not in text and abs(len(text) - 4000) < 100
  facts = re.findall(rb"key (\w+) = value (\w+)\.", text)
  stated, asked = facts[:5], facts[5:]
  assert len(asked) == 5 and sorted(asked) == sorted(stated)
  # The first recall is far beyond a 256-byte window from its statement.
  first_key = asked[0][0]
  assert text.rindex(first_key) - text.index(first_key) > 2048


def test_synthetic_task_feeds_meliads_256_embeddings():
  task = pipelines.get_task("synthetic")
  assert task.vocabulary.kind == "raw_bytes" and task.vocabulary.vocab_size == 256
  batch = take(pipelines.load_text_dataset(task, "train", sequence_length=128, batch_size=2), 1)[0]
  assert batch["targets"].max() < 256 and batch["start_of_sequence"].all()


def _answer_positions_of_first_document(task):
  """(tokens, answer_mask) of the first test document's segments laid end to end."""
  batches = take(pipelines.load_text_dataset(task, "test", sequence_length=64, batch_size=1,
                                             training=False), 100)
  first = [b for b in batches if b["document_index"][0] == 0]
  tokens = np.concatenate([b["targets"][0] for b in first])
  mask = np.concatenate([b["answer_mask"][0] for b in first])
  return tokens, mask


def test_synthetic_answers_are_the_values_asked_again():
  source = pipelines.SyntheticSource(seed=5, num_documents=2, num_eval_documents=2,
                                     document_length=1500, num_facts=4)
  text = source.generate("test", 0)
  asked = re.findall(rb"key \w+ = value (\w+)\.", text)[4:]
  spans = source.answer_spans("test", 0)
  assert [text[start:end] for start, end in spans] == asked
  assert all(start > text.index(b"Recall the facts.") for start, _ in spans)
  task = pipelines.Task("synthetic", source, pipelines.ByteVocabulary())
  tokens, mask = _answer_positions_of_first_document(task)
  # Position i is marked when its target, token i + 1, is a byte of an answer.
  marked = [i + 1 for i in np.nonzero(mask)[0]]
  assert marked == [o for start, end in spans for o in range(start, end)]
  assert bytes((tokens[marked] - 3).tolist()) == b"".join(asked)


def test_answers_of_sentencepiece_tokens_are_the_tokens_holding_answer_bytes(sentencepiece_model):
  source = pipelines.SyntheticSource(seed=5, num_documents=2, num_eval_documents=2,
                                     document_length=1500, num_facts=4)
  vocab = pipelines.SentencePieceVocabulary(sentencepiece_model)
  text = source.generate("test", 0)
  answer_bytes = {o for start, end in source.answer_spans("test", 0) for o in range(start, end)}
  # The pieces from the processor itself, and their byte ranges by decoding prefixes.
  ids = vocab.encode(text)
  ends = [len(vocab.decode_bytes(ids[:n + 1])) for n in range(len(ids))]
  starts = [0] + ends[:-1]
  want = [n for n in range(1, len(ids))
          if any(o in answer_bytes for o in range(starts[n], ends[n]))]
  task = pipelines.Task("synthetic", source, vocab)
  tokens, mask = _answer_positions_of_first_document(task)
  assert tokens[:len(ids)].tolist() == ids
  assert [i + 1 for i in np.nonzero(mask)[0]] == want


def test_sources_without_answers_have_no_answer_mask(stdlib_source):
  task = pipelines.Task("stdlib", stdlib_source, pipelines.ByteVocabulary())
  dataset = pipelines.load_text_dataset(task, "train", sequence_length=64, batch_size=2)
  assert "answer_mask" not in dataset.element_spec
