"""meliad-data: look at the batches a task produces, and dump them as JSON lines.

  meliad-data --source=python_stdlib --batch_size=4 --sequence_length=512 --num_batches=3
  meliad-data --source=python_stdlib --batch_size=4 --sequence_length=512 --num_batches=400 \
      --dump=batches.jsonl

`--source` is a task name (see `pipelines.get_task`, e.g. pg19_bytes, files_tokens:/data/*.txt)
or a source short name: python_stdlib, synthetic, files:GLOB, tree:DIR, tfds:NAME:FEATURE.
`--vocab` (bytes, raw_bytes, or a SentencePiece .model path) overrides a task's vocabulary and
defaults to bytes for a short name.

The first `--print_batches` batches are printed per slot: slot, document id, start flag, epoch and
the decoded text, shortened. With `--dump`, every batch is one JSON object per line holding all
fields as lists (`document_id` the per-slot document name, which the training batches of
`meliad-train` do not carry, and `document_index` its index in the split); progress goes to
stderr.
"""

import contextlib
import json
import sys
import time

from absl import app
from absl import flags
import tensorflow as tf

import pipelines
from meliad_tf.common import storage
from meliad_tf.training import gin_setup
from meliad_tools import shared_flags


FLAGS = flags.FLAGS
shared_flags.define("source", "split", "batch_size", "seed", "default_data_dir", "gin_param")

flags.DEFINE_string("vocab", None, "bytes | raw_bytes | path to a SentencePiece .model.")
flags.DEFINE_integer("sequence_length", 512, "L, tokens per segment.")
flags.DEFINE_integer("num_batches", 3, "Batches to read (fewer if an evaluation pass ends first).")
flags.DEFINE_integer("print_batches", 3, "Batches to print decoded.")
flags.DEFINE_integer("max_chars", 100, "Characters of decoded text printed per slot.")
flags.DEFINE_string("dump", None, "Write every batch to this file as JSON lines.")
flags.DEFINE_bool("eval", False, "Evaluation mode: one ordered pass, then the dataset ends.")
flags.DEFINE_multi_string("gin_file", [], "Gin files configuring sources and vocabularies.")

_PROGRESS_SECONDS = 5.0


def _task() -> pipelines.Task:
  """The task the flags name; any bad flag is reported here, before reading data."""
  if FLAGS.sequence_length <= 0:
    raise app.UsageError(f"--sequence_length must be positive, got {FLAGS.sequence_length}.")
  if FLAGS.batch_size is not None and FLAGS.batch_size <= 0:
    raise app.UsageError(f"--batch_size must be positive, got {FLAGS.batch_size}.")
  if FLAGS.num_batches < 0:
    raise app.UsageError(f"--num_batches must not be negative, got {FLAGS.num_batches}.")
  if FLAGS.dump:
    try:
      storage.check_writable(FLAGS.dump)
    except ValueError as e:
      raise app.UsageError(f"--dump={FLAGS.dump}: {e}") from e
  source = shared_flags.value("source", "python_stdlib")
  try:
    gin_setup.parse(FLAGS.gin_file, FLAGS.gin_param)
    pipelines.set_default_data_directory(FLAGS.default_data_dir)
    vocab = pipelines.make_vocabulary(FLAGS.vocab) if FLAGS.vocab else None
    if pipelines.is_source_name(source):
      return pipelines.Task(source, pipelines.make_source(source),
                            vocab or pipelines.ByteVocabulary())
    return pipelines.get_task(source, vocabulary=vocab)
  except (ValueError, OSError) as e:
    raise app.UsageError(f"--source={source} --vocab={FLAGS.vocab}: {e}") from e


def batch_to_json(step: int, batch) -> dict:
  """One batch as plain lists; document ids decoded as UTF-8."""
  row = {"step": step}
  for key, value in batch.items():
    value = value.numpy()
    if key == "document_id":
      row[key] = [v.decode("utf-8", errors="replace") for v in value]
    else:
      row[key] = value.tolist()
  return row


def print_batch(step: int, batch, vocab: pipelines.Vocabulary, max_chars: int) -> None:
  print(f"batch {step}")
  for slot in range(batch["targets"].shape[0]):
    text = vocab.decode(batch["targets"][slot].numpy().tolist())
    shown = text[:max_chars] + ("..." if len(text) > max_chars else "")
    doc_id = batch["document_id"][slot].numpy().decode("utf-8", errors="replace")
    print(f"  slot {slot} doc={doc_id!r} start={bool(batch['start_of_sequence'][slot])} "
          f"epoch={int(batch['epoch'][slot])} chars={int(batch['num_chars'][slot])}: {shown!r}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  task = _task()
  split = shared_flags.value("split", "train")
  try:
    dataset = pipelines.load_text_dataset(
        task, split=split, sequence_length=FLAGS.sequence_length,
        batch_size=shared_flags.value("batch_size", 4), training=not FLAGS.eval,
        seed=shared_flags.value("seed", 42), document_names=True)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(f"task {task.name}: source {task.source.name}, vocabulary {task.vocabulary!r}, split {split}")

  start = last_report = time.time()
  tokens = 0
  count = 0
  with tf.io.gfile.GFile(FLAGS.dump, "w") if FLAGS.dump else contextlib.nullcontext() as dump:
    for batch in dataset.take(FLAGS.num_batches):
      if count < FLAGS.print_batches:
        print_batch(count, batch, task.vocabulary, FLAGS.max_chars)
      tokens += int(batch["targets"].shape[0] * batch["targets"].shape[1])
      if dump:
        dump.write(json.dumps(batch_to_json(count, batch)) + "\n")
      count += 1
      if time.time() - last_report > _PROGRESS_SECONDS:
        last_report = time.time()
        print(f"{count} batches, {tokens / (last_report - start):.0f} tokens/s", file=sys.stderr, flush=True)
  elapsed = max(time.time() - start, 1e-9)
  print(f"{count} batches, {tokens} tokens, {tokens / elapsed:.0f} tokens/s"
        + (f", written to {FLAGS.dump}" if FLAGS.dump else ""), file=sys.stderr)


def run():
  shared_flags.run(main)


if __name__ == "__main__":
  run()
