"""meliad-vocab: train a SentencePiece model on the documents of any source.

  meliad-vocab --source=python_stdlib --vocab_size=8000 --output=/tmp/stdlib_8k
  meliad-data --source=python_stdlib --vocab=/tmp/stdlib_8k.model

Ids of the model: 0 = pad (so that 0 is padding, as everywhere in the pipelines), 1 = eos,
2 = unk (T5's layout), no bos. By default the model keeps text exactly as it is (identity
normalization, whitespace runs kept and learnable as pieces, unknown characters spelled as UTF-8
byte pieces), so code keeps its indentation and decoding gives the text back.

Documents are cut into training sentences at line ends, at most `--max_sentence_length` bytes
each (a line longer than that is cut). `--output=PREFIX` gets PREFIX.model and PREFIX.vocab
(on any filesystem, e.g. gs://bucket/vocab/stdlib_8k), each written under a temporary name
and renamed into place, so a reader never sees half a file.
PREFIX.vocab has one line per id, "piece<TAB>score", with backslash, newline and tab inside a
piece written as \\\\, \\n and \\t.
"""

import io

from absl import app
from absl import flags
from absl import logging

import pipelines
from meliad_tf.common import storage
from meliad_tf.training import gin_setup
from meliad_tools import shared_flags


FLAGS = flags.FLAGS
shared_flags.define("source", "split", "output", "max_documents", "default_data_dir", "gin_param")

flags.DEFINE_integer("vocab_size", 8000, "Pieces in the model, including pad, eos, unk and byte pieces.")
flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece model type.")
flags.DEFINE_integer("max_sentence_length", 4096, "Bytes per training sentence.")
flags.DEFINE_integer("input_sentence_size", 2_000_000,
                     "Sentences SentencePiece samples for training (0: all).")
flags.DEFINE_float("character_coverage", 0.9995, "Share of characters covered by ordinary pieces.")
flags.DEFINE_string("normalization_rule_name", "identity",
                    "SentencePiece normalization (identity keeps text as is; nmt_nfkc as T5).")
flags.DEFINE_bool("byte_fallback", True, "Spell characters outside the vocabulary as UTF-8 byte pieces.")


def _sentences(documents, max_documents, max_length):
  """Training sentences: runs of whole lines of each document, each at most max_length bytes."""
  for count, document in enumerate(documents):
    if max_documents is not None and count >= max_documents:
      return
    text = document["text"].numpy().decode("utf-8", errors="replace")
    sentence, size = [], 0
    for line in text.splitlines(keepends=True):
      length = len(line.encode("utf-8"))
      if sentence and size + length > max_length:
        yield "".join(sentence)
        sentence, size = [], 0
      while length > max_length:  # one line longer than a sentence
        head = line.encode("utf-8")[:max_length].decode("utf-8", errors="ignore")
        yield head
        line = line[len(head):]
        length = len(line.encode("utf-8"))
      sentence.append(line)
      size += length
    if sentence:
      yield "".join(sentence)


def _vocab_text(model_proto: bytes) -> str:
  """"piece<TAB>score" per id, escaping newlines and tabs inside pieces.

  SentencePiece's own .vocab writes such pieces raw, which splits them over lines; escaped, line
  k is id k.
  """
  import sentencepiece  # pylint: disable=g-import-not-at-top

  processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
  lines = []
  for i in range(processor.GetPieceSize()):
    piece = processor.IdToPiece(i).replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    lines.append(f"{piece}\t{processor.GetScore(i):g}\n")
  return "".join(lines)


def train(source: pipelines.Source, split: str, output: str, vocab_size: int, model_type: str,
          max_documents=None, max_sentence_length: int = 4096, input_sentence_size: int = 2_000_000,
          character_coverage: float = 0.9995, normalization_rule_name: str = "identity",
          byte_fallback: bool = True) -> str:
  """Trains a SentencePiece model on `source`'s `split`; returns the path of the .model file.

  Args:
    source: documents to learn from.
    split: the split read.
    output: prefix of the .model and .vocab files (any filesystem).
    vocab_size: number of pieces.
    model_type: "bpe" or "unigram".
    max_documents: read at most this many documents (None: all).
    max_sentence_length: bytes per training sentence.
    input_sentence_size: sentences sampled for training (0: all).
    character_coverage: share of characters covered by ordinary pieces.
    normalization_rule_name: SentencePiece normalization rule.
    byte_fallback: spell unknown characters as byte pieces.
  """
  import sentencepiece  # pylint: disable=g-import-not-at-top

  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=_sentences(source.documents(split), max_documents, max_sentence_length),
      model_writer=model, vocab_size=vocab_size, model_type=model_type,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      normalization_rule_name=normalization_rule_name, remove_extra_whitespaces=False,
      add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
      byte_fallback=byte_fallback, character_coverage=character_coverage,
      max_sentence_length=max_sentence_length, input_sentence_size=input_sentence_size,
      shuffle_input_sentence=True, minloglevel=2)
  storage.write_atomically(output + ".model", model.getvalue())
  storage.write_atomically(output + ".vocab", _vocab_text(model.getvalue()))
  return output + ".model"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.output:
    raise app.UsageError("--output is required: the prefix of the .model and .vocab files.")
  try:
    storage.check_writable(FLAGS.output + ".model")
  except ValueError as e:
    raise app.UsageError(f"--output={FLAGS.output}: {e}") from e
  if FLAGS.vocab_size <= 0:
    raise app.UsageError(f"--vocab_size must be positive, got {FLAGS.vocab_size}.")
  if FLAGS.max_sentence_length < 4:  # room for any UTF-8 character
    raise app.UsageError(f"--max_sentence_length must be at least 4, got {FLAGS.max_sentence_length}.")
  if FLAGS.max_documents < 0:
    raise app.UsageError(f"--max_documents must be >= 0 (0: all), got {FLAGS.max_documents}.")
  source_name = shared_flags.value("source", "python_stdlib")
  split = shared_flags.value("split", "train")
  try:
    gin_setup.parse([], FLAGS.gin_param)
    pipelines.set_default_data_directory(FLAGS.default_data_dir)
    if pipelines.is_source_name(source_name):
      source = pipelines.make_source(source_name)
    else:
      source = pipelines.get_task(source_name, vocabulary=pipelines.ByteVocabulary()).source
    source.documents(split)  # checks the split before training starts
  except (ValueError, OSError) as e:
    raise app.UsageError(f"--source={source_name} --split={split}: {e}") from e
  try:
    path = train(source, split, FLAGS.output, FLAGS.vocab_size, FLAGS.model_type,
                 max_documents=FLAGS.max_documents or None, max_sentence_length=FLAGS.max_sentence_length,
                 input_sentence_size=FLAGS.input_sentence_size,
                 character_coverage=FLAGS.character_coverage,
                 normalization_rule_name=FLAGS.normalization_rule_name,
                 byte_fallback=FLAGS.byte_fallback)
  except RuntimeError as e:  # SentencePiece reports bad settings (e.g. too small a vocab_size) so
    raise app.UsageError(f"SentencePiece training failed: {e}") from e
  logging.info("Wrote %s and %s.vocab", path, FLAGS.output)
  print(path)


def run():
  shared_flags.run(main)


if __name__ == "__main__":
  run()
