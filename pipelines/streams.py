"""Ordered per-stream segments: the batches a long-context model trains on.

A stream is one batch slot. It reads documents one after another; each document's tokens (those
of the whole document) are cut into segments of L tokens, the last one right-padded with 0. A
long document is tokenized a piece at a time where that gives the same tokens: in pieces of
whole segments for a byte vocabulary, in pieces cut at spaces for a SentencePiece model that
allows it (`Vocabulary.space_cut`). Batch t+1 holds, in slot b, the segment that follows slot
b's segment in batch t, so a model's per-slot state (XL cache, recurrent state, memory)
carries over.

Document order. Documents are dealt to the S streams of an input pipeline round-robin: in epoch
e, stream s reads documents s, s+S, s+2S, ... of that epoch's order, a permutation of the
pipeline's N documents drawn from (seed, e) by `tf.random.experimental.index_shuffle`, computed
per position without materialising it. Training repeats forever, a new order per epoch, so
every document appears exactly once per epoch across the streams. A stream counts its own
epochs: when its share of epoch e is done it starts its share of epoch e+1 while other streams
may still be in epoch e. Evaluation reads each document once in the source's order, then gives
finished streams empty segments until every stream is done.

Reading. A stream reads only its own documents, by index (`sources.IndexedSource.document`), so
each document is read from storage once per epoch per input pipeline whatever S is; a source
that can only be read in order is first copied once into random-access files
(`sources.random_access`).

Checkpoints. Everything is tf.data operations without Python generators, and the pipeline uses
symbolic checkpoints (`tf.data.Options.experimental_symbolic_checkpoint`): an iterator saved
with `tf.train.Checkpoint(iterator=)` holds, per stream, its count of documents started (which
gives the epoch and the document), the piece and the segment it is at, a few kB, not the text
or tokens it has buffered. A restored iterator reads each stream's current document again,
tokenizes its current piece (the whole document where it is not cut) and resumes at the very
next segment. The streams are one `interleave` over the stream index, so that their functions
are traced once, not once per stream; tf.data restores them one after another, so
`resume.StreamIterator` tokenizes the streams' current whole documents in parallel before a
restore, into a table (`resume.DocumentTokens`) the pipeline looks up.

Answers. Where the source's documents mark answers (`sources.ANSWERS`, as the synthetic
fact-recall documents do), batches also hold `answer_mask` bool [B, L]: True at the positions
whose target, the next token, comes from an answer's bytes (the convention of `loss_mask`).
The answer tokens are those the source says only long-range context predicts; the loss on them
is reported apart from the rest.

Batches of the training path hold numbers only (`document_index`, the document's index in the
split); document names (`document_id`) come with evaluation batches and on request.

Distribution. With an input context, the P input pipelines (one per host) share the streams:
pipeline p runs global streams p*S .. p*S+S-1 of the P*S, and global stream g reads positions
g, g + P*S, ... of the epoch's order of all the split's documents. So hosts read disjoint
documents, and the global batch is the same whatever the number of pipelines it is read by. An
input pipeline serves R = num_replicas_in_sync / P replicas: it runs S = R * B streams and
emits, per step, R consecutive batches of B slots, replica r's batch holding streams
r*B .. r*B+B-1. That is the order in which `distribute_datasets_from_function` hands a
pipeline's elements to its replicas, so slot b of each replica keeps its stream from step to
step.
"""

import sys
from typing import Dict, Optional, Tuple

import tensorflow as tf
from absl import logging

from pipelines import loss_mask as loss_mask_lib
from pipelines import resume
from pipelines import sources as sources_lib
from pipelines import vocabularies


# Fields of a batch, all [B] or [B, L]; document_id only where names are asked for.
FIELDS = ("targets", "start_of_sequence", "epoch", "loss_mask", "num_chars", "nonzero_tokens",
          "document_index")
NAME_FIELD = "document_id"
# Present only where the source's documents mark answers.
ANSWER_FIELD = "answer_mask"
_VERBOSE_CHARS = 60
# The layout of the pipeline's operations, which a saved iterator must be restored into:
# 1 tokenized every document whole; 2 tokenizes byte vocabularies' documents in pieces (see
# `_pieces`); 3 also tokenizes SentencePiece documents in pieces cut at spaces where the model
# allows it (`_space_cut_segments`), and is 2 for other vocabularies except that documents with
# answers are tokenized whole (as in layout 1). A checkpoint saved under an older layout
# continues under it (`stream_batches(iterator_layout=...)`); the batches are the same under
# every layout but for the answer marks layout 2 set at the end of a piece (see below). Layout 4
# is 3 with each stream working ahead by segments, not by blocks (see `stream_batches`).
ITERATOR_LAYOUT = 4
ITERATOR_LAYOUTS = (1, 2, 3, 4)
# Segments each stream of layout 4 keeps ready: a second of batches at 64 x 4096 tokens, time
# for the stream to tokenize its next book.
SEGMENTS_AHEAD = 16


def _document_order(source: sources_lib.IndexedSource, split: str, training: bool, seed: int,
                    num_streams: int, stream: tf.Tensor) -> tf.data.Dataset:
  """The documents global stream `stream` (int64 scalar) of `num_streams` reads: {"text",
  "document_id", "document_index", "epoch"}."""
  num_documents = source.num_documents(split)
  # The stream reads positions stream, stream + S, ... of each epoch's order.
  per_epoch = (num_documents - stream + num_streams - 1) // num_streams

  def read(count):
    """The stream's count-th document, with its split index and epoch."""
    # An evaluation stream may have no document (more streams than documents): never called.
    epoch, step = count // tf.maximum(per_epoch, 1), count % tf.maximum(per_epoch, 1)
    index = stream + step * num_streams
    if training:
      index = tf.random.experimental.index_shuffle(
          index, seed=tf.stack([tf.constant(seed, tf.int64), epoch]),
          max_index=tf.constant(num_documents - 1, tf.int64))
    return source.document(split, index).map(lambda document: dict(
        document, document_index=tf.cast(index, tf.int32), epoch=tf.cast(epoch, tf.int32)))

  counts = tf.data.Dataset.counter() if training else tf.data.Dataset.range(per_epoch)
  return counts.flat_map(read)


def _segment_fields(targets: tf.Tensor, mask: tf.Tensor, start_of_sequence: tf.Tensor,
                    document: Dict[str, tf.Tensor], token_bytes: tf.Tensor) -> Dict[str, tf.Tensor]:
  """The fields of a document's segments from their targets and loss mask ([k, L] each)."""
  length = targets.shape[1]
  num_segments = tf.shape(targets)[0]
  # Position 0 of a segment is never predicted (its input is another segment's), nor is padding.
  predicted = mask & (targets != vocabularies.PAD_ID) & (tf.range(length) >= 1)[tf.newaxis, :]
  predicted_int = tf.cast(predicted, tf.int32)
  return {
      "targets": targets,
      "start_of_sequence": start_of_sequence,
      "epoch": tf.fill([num_segments], document["epoch"]),
      "loss_mask": mask,
      "num_chars": tf.reduce_sum(tf.gather(token_bytes, targets) * predicted_int, axis=1),
      "nonzero_tokens": tf.reduce_sum(predicted_int, axis=1),
      "document_index": tf.fill([num_segments], document["document_index"]),
      NAME_FIELD: tf.fill([num_segments], document["document_id"]),
  }


def _log_document(document: Dict[str, tf.Tensor]):
  return tf.print("INFO text_dataset: reading document", document["document_id"], ":",
                  tf.strings.substr(document["text"], 0, _VERBOSE_CHARS, unit="UTF8_CHAR"),
                  output_stream=sys.stderr)


def _segmenter(vocab: vocabularies.Vocabulary, source_name: str, sequence_length: int,
               mask_tokens: Tuple[Tuple[int, ...], Tuple[int, ...]], verbose: bool,
               document_tokens: Optional[resume.DocumentTokens]):
  """A function from one document to all its segments, every field with a leading [segments].

  `document_tokens`, given only for a vocabulary that takes documents whole here (not one
  token per byte), holds the tokens of the documents a restore needs.
  """
  token_bytes = tf.constant(vocab.token_byte_lengths())
  start_tokens, end_tokens = mask_tokens
  length = sequence_length

  def segment(document):
    text, document_id = document["text"], document["document_id"]
    first_piece = document.get("first_piece", tf.constant(True))
    if verbose:
      tf.cond(first_piece, lambda: _log_document(document), tf.no_op)
    if document_tokens is not None:
      tokens = document_tokens.encode(document)  # [n]
    else:
      tokens = vocab.encode_tf(text, document_id, source_name)  # [n]
    num_tokens = tf.size(tokens)
    num_segments = (num_tokens + length - 1) // length
    padding = num_segments * length - num_tokens
    if start_tokens:
      mask = loss_mask_lib.loss_mask(tokens, start_tokens, end_tokens, document_id)
    else:
      mask = tf.ones([num_tokens], tf.bool)
    targets = tf.reshape(tf.pad(tokens, [[0, padding]]), [num_segments, length])
    mask = tf.reshape(tf.pad(mask, [[0, padding]]), [num_segments, length])
    fields = _segment_fields(targets, mask, (tf.range(num_segments) == 0) & first_piece, document,
                             token_bytes)
    if sources_lib.ANSWERS in document:
      answer_tokens = _answer_tokens(vocab, text, document[sources_lib.ANSWERS])  # [n]
      # Position i predicts token i + 1.
      answer_positions = tf.concat([answer_tokens[1:], [False]], axis=0)
      fields[ANSWER_FIELD] = tf.reshape(tf.pad(answer_positions, [[0, padding]]),
                                        [num_segments, length])
    return fields

  return segment


# Bytes of text tokenized at once where a vocabulary allows pieces (about a megabyte).
PIECE_BYTES = 1 << 20


def _pieces(vocab: vocabularies.Vocabulary, sequence_length: int, masked: bool):
  """A function from one document to the pieces it is tokenized in, each with `first_piece`.

  A byte vocabulary tokenizes every byte alone, so a long document is cut into pieces of a
  whole number of segments (about PIECE_BYTES), and a book of any length takes bounded
  memory. Other vocabularies, and a loss mask (found over the whole document), take the
  document whole here; `_space_cut_segments` cuts SentencePiece's documents.
  """
  if not vocab.one_token_per_byte or masked:
    return lambda document: tf.data.Dataset.from_tensors(dict(document, first_piece=True))
  size = sequence_length * max(1, PIECE_BYTES // sequence_length)

  def pieces(document):
    starts = tf.range(0, tf.maximum(tf.strings.length(document["text"]), 1), size)

    def piece(start):
      # The answers' byte marks are cut with the text they mark.
      cut = {key: tf.strings.substr(document[key], start, size)
             for key in ("text", sources_lib.ANSWERS) if key in document}
      return dict(document, **cut, first_piece=tf.equal(start, 0))

    return tf.data.Dataset.from_tensor_slices(starts).map(piece)

  return pieces


# A document whose vocabulary has a `space_cut` is cut into parts of about CUT_BYTES (at the
# first space after each multiple that it may be cut at), and PIECE_PARTS parts, about 64 kB,
# are tokenized at once: a restored stream tokenizes again the piece it is in, and a segment
# that spans two pieces is tokenized again from the cut before it.
CUT_BYTES = 2048
PIECE_PARTS = 32


def _space_cuts(text: tf.Tensor, space_cut: str, every: int) -> Tuple[tf.Tensor, tf.Tensor]:
  """int64 [parts] starts and ends of `text` cut at the first space it may be cut at (see
  `Vocabulary.space_cut`) after each multiple of `every` bytes."""
  data = tf.io.decode_raw(text, tf.uint8)
  size = tf.size(data, out_type=tf.int64)
  visible = (data > 0x20) & (data < 0x7F)
  cuttable = (data[1:-1] == 0x20) & visible[:-2] & visible[2:]
  spaces = tf.where(cuttable)[:, 0] + 1
  wanted = tf.searchsorted(spaces, tf.range(every, tf.maximum(size, every), every, dtype=tf.int64))
  cuts, _ = tf.unique(tf.gather(spaces, tf.boolean_mask(wanted, wanted < tf.size(spaces))))
  dropped = 1 if space_cut == "drop" else 0
  return tf.concat([[0], cuts + dropped], axis=0), tf.concat([cuts, [size]], axis=0)


def _space_cut_segments(vocab: vocabularies.Vocabulary, source_name: str, sequence_length: int,
                        verbose: bool):
  """A function from one document to its segments in blocks, for a vocabulary with a space_cut.

  The document's tokens are those of its parts (`_space_cuts`) one after another, the tokens
  of the whole. Each piece of parts gives the segments its last part completes (the
  document's last piece all that is left, padded); the next piece starts tokenizing at the
  part that holds the first token not yet given, a position (part, tokens to skip) that the
  iterator checkpoint keeps.
  """
  token_bytes = tf.constant(vocab.token_byte_lengths())
  length = sequence_length

  def segments(document):
    if verbose:
      _log_document(document)
    text = document["text"]
    starts, ends = _space_cuts(text, vocab.space_cut, CUT_BYTES)
    num_parts = tf.size(starts, out_type=tf.int64)
    num_pieces = (num_parts + PIECE_PARTS - 1) // PIECE_PARTS

    def piece_segments(position, piece):
      first_part, skip, segments_before = position
      end_part = tf.minimum((piece + 1) * PIECE_PARTS, num_parts)
      part_starts = starts[first_part:end_part]
      parts = tf.strings.substr(text, part_starts, ends[first_part:end_part] - part_starts)
      tokens = vocab.encode_tf(parts, document["document_id"], source_name)
      ahead = tokens.flat_values[skip:]
      num_ahead = tf.size(ahead, out_type=tf.int64)
      # Only the document's last piece ends a segment early (padded).
      num_segments = tf.where(tf.equal(piece, num_pieces - 1), (num_ahead + length - 1) // length,
                              num_ahead // length)
      used = tf.minimum(num_segments * length, num_ahead)
      targets = tf.reshape(tf.pad(ahead[:used], [[0, num_segments * length - used]]),
                           [num_segments, length])
      next_token = skip + used
      part = tf.searchsorted(tokens.row_splits, next_token[tf.newaxis], side="right")[0] - 1
      position = (first_part + tf.cast(part, tf.int64), next_token - tokens.row_splits[part],
                  segments_before + num_segments)
      not_padding = tf.reshape(tf.range(num_segments * length) < used, [num_segments, length])
      first = tf.equal(tf.range(num_segments) + segments_before, 0)
      return position, _segment_fields(targets, not_padding, first, document, token_bytes)

    start = (tf.constant(0, tf.int64), tf.constant(0, tf.int64), tf.constant(0, tf.int64))
    return tf.data.Dataset.range(num_pieces).scan(start, piece_segments)

  return segments


def _answer_tokens(vocab: vocabularies.Vocabulary, text: tf.Tensor,
                   answers: tf.Tensor) -> tf.Tensor:
  """bool [num_tokens]: the tokens of `text` that hold a byte of an answer.

  Args:
    vocab: gives each token's byte span in the text.
    text: tf.string scalar, the document.
    answers: tf.string scalar of the text's length, byte 1 at the answers' bytes.
  """
  starts, ends = vocab.token_byte_spans_tf(text)
  answer_bytes = tf.cast(tf.io.decode_raw(answers, tf.uint8), tf.int32)
  # Answer bytes before each byte offset, so a span's count is a difference.
  before = tf.concat([[0], tf.cumsum(answer_bytes)], axis=0)
  return tf.gather(before, ends) - tf.gather(before, starts) > 0


def _empty_segment(sequence_length: int) -> Dict[str, tf.Tensor]:
  """What a finished stream emits in evaluation: all padding, nothing predicted."""
  return {
      ANSWER_FIELD: tf.zeros([sequence_length], tf.bool),
      "targets": tf.zeros([sequence_length], tf.int32),
      "start_of_sequence": tf.constant(False),
      "epoch": tf.constant(0, tf.int32),
      "loss_mask": tf.zeros([sequence_length], tf.bool),
      "num_chars": tf.constant(0, tf.int32),
      "nonzero_tokens": tf.constant(0, tf.int32),
      "document_index": tf.constant(-1, tf.int32),
      NAME_FIELD: tf.constant(""),
  }


def stream_batches(source: sources_lib.Source, vocab: vocabularies.Vocabulary, split: str,
                   sequence_length: int, batch_size: int, training: bool, seed: int,
                   num_input_pipelines: int = 1, input_pipeline_id: int = 0,
                   replicas_per_pipeline: int = 1,
                   mask_tokens: Tuple[Tuple[int, ...], Tuple[int, ...]] = ((), ()),
                   verbose: bool = False, document_names: bool = False,
                   iterator_layout: int = ITERATOR_LAYOUT) -> tf.data.Dataset:
  """Batches of ordered per-stream segments (see the module docstring).

  Args:
    source: where documents come from; a `StreamingSource` is first read once into
      random-access files (`sources.random_access`).
    vocab: tokenizes the documents (the batches are those of each whole document tokenized).
    split: the source split to read.
    sequence_length: L, tokens per segment.
    batch_size: B, slots per batch (per replica).
    training: endless shuffled epochs if True; one ordered pass, padded to the end, if False.
    seed: draws the per-epoch document order in training.
    num_input_pipelines: P, input pipelines sharing the documents.
    input_pipeline_id: this pipeline's index in [0, P).
    replicas_per_pipeline: R, replicas fed by this pipeline, one batch each per step.
    mask_tokens: (start, end) loss-mask token subsequences; start empty means no mask.
    verbose: log the start of every document read.
    document_names: add `document_id`, the documents' names (strings), to the batches.
    iterator_layout: one of ITERATOR_LAYOUTS; an older one restores iterators saved by an
      older version (layout 1 tokenizes every document whole, 2 every SentencePiece document,
      3 works ahead by blocks).

  Returns:
    A dataset of dicts: targets int32 [B, L], start_of_sequence bool [B], epoch int32 [B],
    loss_mask bool [B, L], num_chars int32 [B], nonzero_tokens int32 [B], document_index int32
    [B] (-1 in the empty segments that end evaluation), with `document_names` document_id
    string [B] ("" in those segments), and where the source marks answers answer_mask bool
    [B, L]. Its iterators checkpoint positions only.
  """
  if iterator_layout not in ITERATOR_LAYOUTS:
    raise ValueError(f"iterator_layout must be one of {ITERATOR_LAYOUTS}, got {iterator_layout!r} "
                     "(a checkpoint written by a newer version of the pipelines)")
  source = sources_lib.random_access(source)
  num_streams = replicas_per_pipeline * batch_size
  total_streams = num_streams * num_input_pipelines
  first_stream = num_streams * input_pipeline_id
  num_documents = source.num_documents(split)
  if num_documents <= first_stream:
    raise ValueError(f"Split {split!r} of source {source.name!r} has no documents for input pipeline "
                     f"{input_pipeline_id} of {num_input_pipelines} ({num_documents} in all, "
                     f"{total_streams} streams).")
  # A stream whose share of an epoch is empty would look for documents forever.
  if training and num_documents < total_streams:
    raise ValueError(
        f"Split {split!r} of source {source.name!r} has {num_documents} documents, fewer than its "
        f"{total_streams} streams (batch size {batch_size} x {replicas_per_pipeline} replicas x "
        f"{num_input_pipelines} input pipelines); use a smaller batch size or a larger split.")
  logging.info("Streams: %s split %s, %d documents, %d streams of L=%d, %s, pipeline %d of %d.",
               source.name, split, num_documents, num_streams, sequence_length,
               "training" if training else "evaluation", input_pipeline_id, num_input_pipelines)

  fields = FIELDS + (ANSWER_FIELD,) + ((NAME_FIELD,) if document_names else ())
  # A byte vocabulary's pieces are tokenized as fast as a table is read.
  document_tokens = (None if vocab.one_token_per_byte else
                     resume.DocumentTokens(source, split, vocab, replicas_per_pipeline))
  segment = _segmenter(vocab, source.name, sequence_length, mask_tokens, verbose, document_tokens)

  def keep_fields(segments):
    return {key: segments[key] for key in fields if key in segments}

  masked = bool(mask_tokens[0])
  pieces = _pieces(vocab, sequence_length, masked)
  space_cut_segments = (_space_cut_segments(vocab, source.name, sequence_length, verbose)
                        if vocab.space_cut else None)

  def stream_segments(stream):
    documents = _document_order(source, split, training, seed, total_streams,
                                first_stream + stream)
    # Answers are marked over the whole document's tokens (a token's mark is its successor's),
    # and so is the loss mask. Layout 2 cut documents with answers in byte pieces, and marked
    # the last token of a piece as if the document ended there.
    answers = sources_lib.ANSWERS in documents.element_spec
    cut_at_spaces = iterator_layout >= 3 and space_cut_segments and not masked and not answers
    if iterator_layout == 1 or (iterator_layout >= 3 and answers):
      blocks = documents.map(segment)
    elif cut_at_spaces:
      blocks = documents.flat_map(space_cut_segments)
    else:
      blocks = documents.flat_map(pieces).map(segment)
    # Work ahead of the batches keeps the streams' tokenizing off their critical path; symbolic
    # checkpoints do not save those buffers. Layouts 1-3 tokenize the next block ahead, which
    # a restore then starts in every stream while the other streams are still restoring;
    # layout 4 keeps segments ready, and tokenizes a stream's next block once its current one
    # is being read.
    if iterator_layout >= 4:
      segments = blocks.map(keep_fields).unbatch().prefetch(SEGMENTS_AHEAD)
    else:
      segments = blocks.map(keep_fields).prefetch(1).unbatch()
    if not training:
      empty = {key: value for key, value in _empty_segment(sequence_length).items()
               if key in segments.element_spec}
      segments = segments.map(lambda s: dict(s, real=True)).concatenate(
          tf.data.Dataset.from_tensors(dict(empty, real=False)).repeat())
    return segments

  # One segment of each stream in turn: batch t holds segment t of every stream, in stream order.
  # Every stream is endless (evaluation pads), so the interleave never moves past stream S-1.
  batches = tf.data.Dataset.range(num_streams).interleave(
      stream_segments, cycle_length=num_streams, block_length=1).batch(num_streams, drop_remainder=True)
  if not training:
    batches = batches.take_while(lambda batch: tf.reduce_any(batch["real"]))
    batches = batches.map(lambda batch: {key: batch[key] for key in fields if key in batch})
  if replicas_per_pipeline > 1:
    batches = batches.map(lambda batch: {
        key: tf.reshape(value, [replicas_per_pipeline, batch_size] + value.shape[1:].as_list())
        for key, value in batch.items()}).unbatch()
  options = tf.data.Options()
  options.experimental_symbolic_checkpoint = True
  if document_tokens is not None:
    # The table only spares work: the batches are the same without it.
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  batches = batches.prefetch(tf.data.AUTOTUNE).with_options(options)
  setattr(batches, resume.DOCUMENT_TOKENS_ATTRIBUTE, document_tokens)
  return batches
