"""The optional loss mask of Meliad: train only on a delimited span of each document.

Off by default. Configured in gin as in Meliad:

  text_dataset.get_loss_mask_tokens.loss_mask_start_tokens = (2,)
  text_dataset.get_loss_mask_tokens.loss_mask_end_tokens = (1,)
  text_dataset.get_loss_mask_tokens.splits = ("test",)

For a whole document of tokens t[0..n), let s be the first occurrence of the start
subsequence and e the first occurrence of the end subsequence at or after s (e = n if there is
none). The mask is True on [max(0, s - 1), min(n, e + len(end) - 1)): shifted one to the left
because a position's target is the next token, and covering the start and end tokens. Without
an occurrence of the start subsequence the mask is all True. More than one occurrence of either
subsequence is logged; only the first counts.

Where the end subsequence also occurs before s, Meliad's code ignores any later occurrence and
runs the mask to the end of the document; we use the first one after s, as described above.
"""

import sys
from typing import Sequence, Tuple

import gin
import tensorflow as tf


@gin.configurable(module="text_dataset")
def get_loss_mask_tokens(
    split: str,
    loss_mask_start_tokens: Sequence[int] = (),
    loss_mask_end_tokens: Sequence[int] = (),
    splits: Sequence[str] = ("all",),
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
  """The (start, end) token subsequences delimiting the loss on `split`; ((), ()) when off.

  Args:
    split: the split being loaded ("train", "test", ...).
    loss_mask_start_tokens: token ids that open the span; empty turns the mask off.
    loss_mask_end_tokens: token ids that close it; empty runs the span to the document's end.
    splits: splits the mask applies to; "all" applies it to every split.
  """
  if "all" in splits or split in splits:
    return tuple(loss_mask_start_tokens), tuple(loss_mask_end_tokens)
  return (), ()


def _occurrences(tokens: tf.Tensor, pattern: Tuple[int, ...]) -> tf.Tensor:
  """bool [n]: True where `pattern` starts in `tokens` (int32 [n])."""
  n = tf.size(tokens)
  m = len(pattern)
  num_starts = tf.maximum(n - m + 1, 0)
  found = tf.ones([num_starts], tf.bool)
  for offset, token in enumerate(pattern):
    found &= tf.equal(tokens[offset:offset + num_starts], token)
  return tf.pad(found, [[0, n - num_starts]])


def loss_mask(tokens: tf.Tensor, start_tokens: Tuple[int, ...], end_tokens: Tuple[int, ...],
              document_id: tf.Tensor) -> tf.Tensor:
  """The loss mask of one whole document.

  Args:
    tokens: int32 [n], the document.
    start_tokens: the start subsequence (non-empty).
    end_tokens: the end subsequence, possibly empty.
    document_id: tf.string scalar, named in the log of repeated delimiters.

  Returns:
    bool [n].
  """
  n = tf.size(tokens)
  positions = tf.range(n)
  starts = _occurrences(tokens, start_tokens)
  first_start = tf.reduce_min(tf.where(starts, positions, n))
  if end_tokens:
    ends = _occurrences(tokens, end_tokens)
    first_end = tf.reduce_min(tf.where(ends & (positions >= first_start), positions, n))
    num_ends = tf.reduce_sum(tf.cast(ends, tf.int32))
  else:
    first_end = n
    num_ends = tf.constant(0)
  num_starts = tf.reduce_sum(tf.cast(starts, tf.int32))

  def log_repeats():
    tf.print("ERROR text_dataset: loss mask: document", document_id, "has", num_starts, "start and",
             num_ends, "end occurrences; only the first counts.", output_stream=sys.stderr)
    return tf.constant(True)

  logged = tf.cond((num_starts > 1) | (num_ends > 1), log_repeats, lambda: tf.constant(False))
  begin = tf.maximum(0, first_start - 1)
  end = tf.minimum(n, first_end + len(end_tokens) - 1)
  with tf.control_dependencies([logged]):
    return tf.where(num_starts > 0, (positions >= begin) & (positions < end), tf.ones([n], tf.bool))
