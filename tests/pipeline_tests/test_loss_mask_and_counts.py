"""Meliad's loss mask on hand-worked examples, and num_chars / nonzero_tokens against a
naive count over the batches."""

import gin
import numpy as np
import pytest
import tensorflow as tf

from pipelines import loss_mask
import pipelines
from pipeline_helpers import take


# Tokens 0..7 of a hand-worked document: start subsequence (2,) at 2, end subsequence (1,) at 5.
_DOCUMENT = [5, 6, 2, 7, 8, 1, 9, 4]


def _mask(tokens, start, end):
  return loss_mask.loss_mask(tf.constant(tokens, tf.int32), start, end, tf.constant("doc")).numpy().tolist()


def test_loss_mask_hand_worked_examples():
  # [max(0, s - 1), e + len(end) - 1) = [1, 5): predicts the start token through the end token.
  assert _mask(_DOCUMENT, (2,), (1,)) == [False, True, True, True, True, False, False, False]
  # Two-token delimiters: start (2, 7) at 2, end (1, 9) at 5 -> [1, 6).
  assert _mask(_DOCUMENT, (2, 7), (1, 9)) == [False, True, True, True, True, True, False, False]
  # No end subsequence: e = n, so [1, n - 1).
  assert _mask(_DOCUMENT, (2,), ()) == [False, True, True, True, True, True, True, False]
  # End delimiter absent after the start: runs to the end of the document.
  assert _mask(_DOCUMENT, (7,), (5,)) == [False, False, True, True, True, True, True, True]
  # Start at position 0: the offset is clipped at 0.
  assert _mask(_DOCUMENT, (5,), (2,)) == [True, True, False, False, False, False, False, False]
  # No start subsequence in the document: everything counts.
  assert _mask(_DOCUMENT, (3,), (1,)) == [True] * 8


def test_get_loss_mask_tokens_is_off_by_default_and_restricted_to_splits():
  assert pipelines.get_loss_mask_tokens("train") == ((), ())
  gin.parse_config("""
      text_dataset.get_loss_mask_tokens.loss_mask_start_tokens = (2,)
      text_dataset.get_loss_mask_tokens.loss_mask_end_tokens = (1,)
      text_dataset.get_loss_mask_tokens.splits = ("test",)
  """)
  assert pipelines.get_loss_mask_tokens("test") == ((2,), (1,))
  assert pipelines.get_loss_mask_tokens("train") == ((), ())


def test_pipeline_applies_the_configured_loss_mask(tmp_path):
  # Raw bytes: token id = byte. "<" opens and ">" closes the span.
  text = b"abc<def>ghij"
  (tmp_path / "doc.txt").write_bytes(text)
  gin.parse_config(f"""
      text_dataset.get_loss_mask_tokens.loss_mask_start_tokens = ({ord('<')},)
      text_dataset.get_loss_mask_tokens.loss_mask_end_tokens = ({ord('>')},)
  """)
  task = pipelines.get_task(f"files_raw_bytes:{tmp_path}/*.txt")
  split = pipelines.hash_split("doc.txt")
  batches = take(pipelines.load_text_dataset(task, split, sequence_length=5, batch_size=1,
                                             training=False), 10)
  mask = np.concatenate([b["loss_mask"][0] for b in batches]).tolist()
  # s = 3, e = 7: positions [2, 7) of 12, then padding to 15.
  assert mask == [False, False, True, True, True, True, True] + [False] * 8
  # Predicted: segment "abc<d" positions 2-4 (1 is outside the mask); segment "ef>gh" position
  # 6 only (5 is a segment's first position); segment "ij" none.
  assert [int(b["nonzero_tokens"][0]) for b in batches] == [3, 1, 0]


def _naive_counts(batch, byte_length):
  chars, tokens = [], []
  for targets, mask in zip(batch["targets"], batch["loss_mask"]):
    predicted = [int(t) for i, (t, m) in enumerate(zip(targets, mask)) if i >= 1 and t != 0 and m]
    tokens.append(len(predicted))
    chars.append(sum(byte_length(t) for t in predicted))
  return chars, tokens


def test_num_chars_and_nonzero_tokens_bytes(stdlib_source):
  task = pipelines.Task("stdlib", stdlib_source, pipelines.ByteVocabulary())
  for batch in take(pipelines.load_text_dataset(task, "test", sequence_length=64, batch_size=3,
                                                training=False), 10_000):
    chars, tokens = _naive_counts(batch, lambda t: 1)
    assert batch["num_chars"].tolist() == chars
    assert batch["nonzero_tokens"].tolist() == tokens


def test_num_chars_and_nonzero_tokens_sentencepiece(stdlib_source, sentencepiece_model):
  import sentencepiece  # pylint: disable=g-import-not-at-top
  processor = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model)

  def byte_length(token):
    if processor.is_byte(token):
      return 1
    return len(processor.id_to_piece(token).replace("\u2581", " ").encode("utf-8"))

  task = pipelines.Task("stdlib", stdlib_source, pipelines.SentencePieceVocabulary(sentencepiece_model))
  batches = take(pipelines.load_text_dataset(task, "train", sequence_length=32, batch_size=2), 50)
  for batch in batches:
    chars, tokens = _naive_counts(batch, byte_length)
    assert batch["num_chars"].tolist() == chars
    assert batch["nonzero_tokens"].tolist() == tokens
  # Over a whole segment, the pieces' bytes are the text's bytes after position 0.
  first = batches[1]["targets"][0]
  assert batches[1]["num_chars"][0] == len(processor.decode(first[1:].tolist()).encode("utf-8"))


@pytest.mark.parametrize("vocab", ["bytes", "raw_bytes"])
def test_num_chars_counts_bytes_of_multibyte_text(tmp_path, vocab):
  text = "na\u00efve \u65e5\u672c\u8a9e text"
  (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
  task = pipelines.get_task(f"files_{vocab}:{tmp_path}/*.txt")
  split = pipelines.hash_split("doc.txt")
  batch = take(pipelines.load_text_dataset(task, split, sequence_length=64, batch_size=1,
                                           training=False), 1)[0]
  assert batch["num_chars"][0] == len(text.encode("utf-8")) - 1  # position 0 is not predicted
