"""Vocabularies: text <-> token ids, the same tokenizer in the pipeline and in `decode`.

Token id 0 is padding in every vocabulary and is never predicted, as in Meliad.

* `bytes`: UTF-8 byte + 3, with 0 = pad, 1 = eos, 2 = unk (seqio's ByteVocabulary, as Meliad's
  pg19_bytes); vocab_size 259.
* `raw_bytes`: the byte value itself, 0 = pad, so the text must not hold byte 0 (Meliad's
  `synthetic`); vocab_size 256.
* `sentencepiece`: the model's ids; id 0 must be the pad piece (T5's models, `meliad-vocab`'s)
  or the unk piece (Meliad's pg19train_bpe models, whose unknown characters then count as
  padding); vocab_size is the model's number of pieces.

Besides encoding, each vocabulary gives `token_byte_lengths`: how many bytes of text each id
stands for. The pipeline sums it over the predicted tokens of a segment to get `num_chars`
(bits per character). `token_byte_spans_tf` says which bytes of the text each token of a
document comes from (one byte per token for the byte vocabularies), to mark the tokens of a
source's answers.
"""

import abc
import os
import sys
from typing import Iterable, Optional, Tuple

import gin
import numpy as np
import tensorflow as tf


PAD_ID = 0

# The surface SentencePiece writes for an unknown piece (" \u2047 " is its default unk_surface);
# it counts as one byte of text because it stands for one character of unknown width.
_UNK_BYTES = 1


class Vocabulary(abc.ABC):
  """Maps text to int32 token ids and back.

  Attributes:
    kind: "bytes", "raw_bytes" or "sentencepiece".
    vocab_size: number of ids; every id is in [0, vocab_size).
    one_token_per_byte: each byte of the text is one token whatever surrounds it, so a
      document may be tokenized in pieces cut anywhere.
    space_cut: where not None, a document cut at a single space between two visible ASCII
      characters (bytes 0x21-0x7E) tokenizes as the two parts tokenized apart, the second part
      starting at the space ("keep") or just after it ("drop"); so a long document may be
      tokenized in pieces cut at such spaces, with the same tokens as whole.
  """

  kind: str
  vocab_size: int
  one_token_per_byte = False
  space_cut: Optional[str] = None

  @abc.abstractmethod
  def encode_tf(self, text: tf.Tensor, document_id: tf.Tensor, source_name: str) -> tf.Tensor:
    """Tokenizes one whole document inside the tf.data graph.

    Args:
      text: tf.string scalar, the document.
      document_id: tf.string scalar, named in warnings and errors.
      source_name: the source, named in errors.

    Returns:
      int32 [num_tokens]; no BOS or EOS is added (as Meliad's tasks). A vocabulary with a
      `space_cut` also takes a tf.string vector, the parts of one document, and returns an int32
      RaggedTensor [num_parts, None].
    """

  def token_byte_spans_tf(self, text: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """Where each token of `encode_tf(text)` comes from in the text.

    Args:
      text: tf.string scalar, the document.

    Returns:
      (start, end): int32 [num_tokens] each, the [start, end) byte range of every token.

    Raises:
      NotImplementedError: the vocabulary cannot say (a vocabulary of your own that does not
        override this); only sources with answers need it.
    """
    del text
    raise NotImplementedError(
        f"{type(self).__name__} does not give the byte spans of its tokens "
        "(Vocabulary.token_byte_spans_tf), which a source with answers needs to mark them.")

  @abc.abstractmethod
  def token_byte_lengths(self) -> np.ndarray:
    """int32 [vocab_size]: the bytes of text each id stands for (0 for pad and control ids)."""

  @abc.abstractmethod
  def decode_bytes(self, ids: Iterable[int]) -> bytes:
    """The text behind `ids` as bytes; padding (0) and ids out of range are dropped."""

  def decode(self, ids: Iterable[int]) -> str:
    """The text behind `ids`; bytes that are not valid UTF-8 become U+FFFD."""
    return self.decode_bytes(ids).decode("utf-8", errors="replace")

  def encode(self, text) -> list:
    """Tokenizes `text` (str or bytes) eagerly, exactly as the pipeline does."""
    ids = self.encode_tf(tf.constant(text), tf.constant(""), "encode")
    return [int(i) for i in ids.numpy()]

  def __repr__(self):
    return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size})"


def _raw_byte_values(text: tf.Tensor) -> tf.Tensor:
  """tf.string scalar -> int32 [num_bytes]."""
  return tf.cast(tf.io.decode_raw(text, tf.uint8), tf.int32)


def _one_byte_per_token(text: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """The byte spans of the tokens of a vocabulary that has a token per byte."""
  starts = tf.range(tf.strings.length(text))
  return starts, starts + 1


class ByteVocabulary(Vocabulary):
  """UTF-8 bytes shifted by 3, as seqio's ByteVocabulary: 0 = pad, 1 = eos, 2 = unk.

  Any byte string is encodable, so text that is not valid UTF-8 keeps its bytes.
  """

  one_token_per_byte = True

  kind = "bytes"
  num_special = 3
  vocab_size = 256 + num_special

  def encode_tf(self, text, document_id, source_name):
    del document_id, source_name  # every byte string is encodable
    return _raw_byte_values(text) + self.num_special

  def token_byte_spans_tf(self, text):
    return _one_byte_per_token(text)

  def token_byte_lengths(self):
    lengths = np.ones([self.vocab_size], np.int32)
    lengths[:self.num_special] = 0
    return lengths

  def decode_bytes(self, ids):
    return bytes(i - self.num_special for i in ids if self.num_special <= i < self.vocab_size)


class RawByteVocabulary(Vocabulary):
  """Byte values passed through (seqio's PassThroughVocabulary(256) in Meliad's `synthetic`).

  Byte 0 would collide with padding, so a document holding it is an error that names the
  source and the document.
  """

  one_token_per_byte = True

  kind = "raw_bytes"
  vocab_size = 256

  def encode_tf(self, text, document_id, source_name):
    ids = _raw_byte_values(text)
    no_zero_byte = tf.debugging.Assert(
        tf.reduce_all(ids != PAD_ID),
        [f"The raw_bytes vocabulary cannot encode byte 0 (it is padding); source {source_name!r}, "
         "document", document_id, "holds it. Use the bytes vocabulary for this source."])
    with tf.control_dependencies([no_zero_byte]):
      return tf.identity(ids)

  def token_byte_spans_tf(self, text):
    return _one_byte_per_token(text)

  def token_byte_lengths(self):
    lengths = np.ones([self.vocab_size], np.int32)
    lengths[PAD_ID] = 0
    return lengths

  def decode_bytes(self, ids):
    return bytes(i for i in ids if 0 < i < self.vocab_size)


def _load_sentencepiece(model_path: str):
  """Reads and checks a SentencePiece model file; returns (model bytes, processor)."""
  import sentencepiece  # pylint: disable=g-import-not-at-top

  if not tf.io.gfile.exists(model_path) or tf.io.gfile.isdir(model_path):
    raise FileNotFoundError(f"SentencePiece model file {model_path!r} does not exist.")
  with tf.io.gfile.GFile(model_path, "rb") as f:
    model = f.read()
  processor = sentencepiece.SentencePieceProcessor()
  try:
    processor.LoadFromSerializedProto(model)
  except Exception as e:  # sentencepiece raises bare RuntimeError/OSError on a bad proto
    raise ValueError(f"{model_path!r} is not a SentencePiece model: {e}") from e
  if processor.GetPieceSize() == 0:
    raise ValueError(f"{model_path!r} is not a SentencePiece model: it has no pieces.")
  if not (processor.pad_id() == PAD_ID or processor.is_unknown(PAD_ID) or processor.is_control(PAD_ID)):
    raise ValueError(
        f"SentencePiece model {model_path!r} uses id 0 for the ordinary piece "
        f"{processor.IdToPiece(PAD_ID)!r}, but id 0 is padding here. Train the model with pad_id=0 "
        "(meliad-vocab does) or unk_id=0.")
  return model, processor


# SentencePiece's own normalization rules: NFKC (with NMT's whitespace and control-character
# mapping and case folding in some), whose rules never read across a space that separates two
# visible ASCII characters. A user's rule table ("user_defined") could.
_BUILT_IN_NORMALIZERS = ("identity", "nfkc", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf")


def _sentencepiece_space_cut(model: bytes, cut_unigram: bool) -> Optional[str]:
  """The model's `Vocabulary.space_cut`: None unless cutting at a space is exact for it.

  Let the space sit between visible ASCII characters x and y. Normalized, the whole text reads
  "...x▁y..." (x and y are not whitespace, so no run of whitespace is merged there), and no
  built-in normalization rule reads across the space. When no piece holds a "▁" after its
  leading run of them (the pieces of a model that puts "▁" after words do), no piece spans
  "x▁", so BPE's merges never join the two sides and run on each side in the same order as
  in the whole: the tokens of the whole are those of "...x" followed by those of "▁y...". The second part must normalize to "▁y...": "▁" + "y..." where
  the model adds a dummy prefix (drop the space), " y..." where it neither adds one nor strips
  leading whitespace (keep the space). A model that strips whitespace but adds no prefix would
  lose that "▁", so it is not cut.

  A unigram model's Viterbi search also breaks there, but it breaks ties between segmentations
  of equal score (runs of whitespace pieces in code, say) by the rounding of a score summed
  from the start of the text, so about 0.6 % of the tokens of Python sources come out in
  another, equally scored, order when cut. Such models are cut only with `cut_unigram`.
  """
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model)
  normalizer, trainer = proto.normalizer_spec, proto.trainer_spec
  if trainer.model_type == trainer.UNIGRAM and not cut_unigram:
    return None
  if normalizer.name not in _BUILT_IN_NORMALIZERS or not normalizer.escape_whitespaces:
    return None
  if any(space in piece.piece.lstrip("\u2581") for piece in proto.pieces for space in "\u2581 "):
    return None
  if normalizer.add_dummy_prefix:
    return "drop"
  return None if normalizer.remove_extra_whitespaces else "keep"


@gin.configurable("sentencepiece_vocabulary", module="pipelines")
class SentencePieceVocabulary(Vocabulary):
  """A SentencePiece model run through tensorflow_text.SentencepieceTokenizer.

  Id meanings come from the model: `meliad-vocab` trains with 0 = pad, 1 = eos, 2 = unk (as T5);
  Meliad's pg19train_bpe models have 0 = unk and no pad, so unknown characters become 0 and are
  treated as padding. No BOS or EOS is added. Text that is not valid UTF-8 has its bad bytes
  replaced with U+FFFD before tokenizing, and the replacements are logged per document.

  A long document is tokenized in pieces cut at spaces where that gives the tokens of the whole
  document (`Vocabulary.space_cut`: BPE, word and character models with SentencePiece's own
  normalization rules), so that a restored pipeline tokenizes a piece, not a book, again.

  Args:
    model_path: the `.model` file (gin: `pipelines.sentencepiece_vocabulary.model_path`).
    cut_unigram_at_spaces: also cut the documents of a unigram model (T5's, for one). Its
      tokens then differ from the whole document's where two segmentations score the same:
      Meliad tokenizes whole documents, so this is off unless asked for.
  """

  kind = "sentencepiece"

  def __init__(self, model_path: Optional[str] = None, cut_unigram_at_spaces: bool = False):
    if not model_path:
      raise ValueError(
          "No SentencePiece model given: bind pipelines.sentencepiece_vocabulary.model_path = "
          "'/path/to/name.model' in gin (or pass --vocab=/path/to/name.model); meliad-vocab trains one.")
    self.model_path = model_path
    self._model, self._processor = _load_sentencepiece(model_path)
    self.vocab_size = self._processor.GetPieceSize()
    self.space_cut = _sentencepiece_space_cut(self._model, cut_unigram_at_spaces)
    self._tokenizer = None

  def _tf_tokenizer(self):
    # tensorflow_text is slow to import; only the pipeline needs it.
    if self._tokenizer is None:
      import tensorflow_text  # pylint: disable=g-import-not-at-top
      # Built outside the tf.data function being traced, so that every stream's function
      # captures the same eager resource.
      with tf.init_scope():
        self._tokenizer = tensorflow_text.SentencepieceTokenizer(
            model=self._model, out_type=tf.int32, add_bos=False, add_eos=False)
    return self._tokenizer

  def encode_tf(self, text, document_id, source_name):
    del source_name  # nothing here fails on a document
    valid = tf.strings.unicode_transcode(
        text, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)

    def log_replacements():
      def count(s):
        # Split on the bytes of U+FFFD: a regex would read each undecodable byte as U+FFFD.
        parts = tf.reshape(s, [-1])
        return tf.size(tf.strings.split(parts, sep="\uFFFD").flat_values) - tf.size(parts)
      replaced = count(valid) - count(text)
      tf.print("WARNING text_dataset: replaced", replaced, "undecodable byte sequences with U+FFFD "
               "in document", document_id, output_stream=sys.stderr)
      return tf.constant(True)

    # Comparing is a memcmp; the counting regex runs only for the rare document that changed.
    logged = tf.cond(tf.reduce_all(tf.equal(valid, text)), lambda: tf.constant(False),
                     log_replacements)
    with tf.control_dependencies([logged]):
      return self._tf_tokenizer().tokenize(valid)

  def token_byte_spans_tf(self, text):
    # Offsets are into the text as tokenized, so text that is not valid UTF-8 (whose bad bytes
    # `encode_tf` replaces) may be shifted after the first replacement.
    valid = tf.strings.unicode_transcode(
        text, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)
    _, starts, ends = self._tf_tokenizer().tokenize_with_offsets(valid)
    return tf.cast(starts, tf.int32), tf.cast(ends, tf.int32)

  def token_byte_lengths(self):
    p = self._processor
    lengths = np.zeros([self.vocab_size], np.int32)
    for i in range(self.vocab_size):
      if p.IsControl(i):
        continue
      if p.IsUnknown(i):
        lengths[i] = _UNK_BYTES
      elif p.IsByte(i):
        lengths[i] = 1
      else:
        # Mid-text, a leading "▁" is the space before the word, so it counts as one byte.
        lengths[i] = len(p.IdToPiece(i).replace("\u2581", " ").encode("utf-8"))
    return lengths

  def decode_bytes(self, ids):
    return self.decode(ids).encode("utf-8")

  def decode(self, ids):
    return self._processor.DecodeIds([int(i) for i in ids if 0 < i < self.vocab_size])

  def __repr__(self):
    return f"SentencePieceVocabulary({self.model_path!r}, vocab_size={self.vocab_size})"


def make_vocabulary(spec: str) -> Vocabulary:
  """A vocabulary from its command-line name: "bytes", "raw_bytes" or a path to a `.model` file."""
  if spec == "bytes":
    return ByteVocabulary()
  if spec == "raw_bytes":
    return RawByteVocabulary()
  if spec.endswith(".model") or os.path.sep in spec:
    return SentencePieceVocabulary(model_path=spec)
  raise ValueError(
      f"Unknown vocabulary {spec!r}: use 'bytes', 'raw_bytes' or the path of a SentencePiece .model file.")

