"""Tokens per second of the stream pipeline, bytes against SentencePiece, as JSON.

  python -m meliad_tools.bench_data [--batch_size=8 --sequence_length=512 --num_batches=300]

Reads the python_stdlib training split. The SentencePiece model is trained on the fly on a few
standard library documents into a temporary directory. The first `--warmup_batches` batches
(graph tracing, the first documents) are not timed.
"""

import json
import tempfile
import time

from absl import app
from absl import flags

import pipelines
from meliad_tools import vocab as vocab_tool

FLAGS = flags.FLAGS

flags.DEFINE_integer("batch_size", 8, "B, streams per batch.")
flags.DEFINE_integer("sequence_length", 512, "L, tokens per segment.")
flags.DEFINE_integer("num_batches", 300, "Timed batches per vocabulary.")
flags.DEFINE_integer("warmup_batches", 20, "Untimed batches before timing.")
flags.DEFINE_integer("sentencepiece_vocab_size", 4000, "Pieces of the model trained for the benchmark.")
flags.DEFINE_integer("sentencepiece_documents", 40, "Documents the benchmark's model is trained on.")


def measure(task: pipelines.Task, batch_size: int, sequence_length: int, num_batches: int,
            warmup_batches: int) -> dict:
  """Reads warmup + timed batches of `task`'s training split; returns the timed rates."""
  dataset = pipelines.load_text_dataset(task, split="train", sequence_length=sequence_length,
                                        batch_size=batch_size, training=True, seed=0)
  iterator = iter(dataset)
  for _ in range(warmup_batches):
    next(iterator)
  nonzero = 0
  start = time.perf_counter()
  for _ in range(num_batches):
    nonzero += int(next(iterator)["nonzero_tokens"].numpy().sum())
  elapsed = time.perf_counter() - start
  tokens = num_batches * batch_size * sequence_length
  return {
      "vocabulary": task.vocabulary.kind,
      "vocab_size": task.vocabulary.vocab_size,
      "batches": num_batches,
      "seconds": round(elapsed, 3),
      "batches_per_second": round(num_batches / elapsed, 1),
      "tokens_per_second": round(tokens / elapsed),
      "predicted_tokens_per_second": round(nonzero / elapsed),
  }


def main(argv):
  del argv
  source = pipelines.PythonStdlibSource()
  results = {"batch_size": FLAGS.batch_size, "sequence_length": FLAGS.sequence_length,
             "source": source.name}
  common = dict(batch_size=FLAGS.batch_size, sequence_length=FLAGS.sequence_length,
                num_batches=FLAGS.num_batches, warmup_batches=FLAGS.warmup_batches)
  results["bytes"] = measure(pipelines.Task("python_stdlib_bytes", source, pipelines.ByteVocabulary()),
                             **common)
  with tempfile.TemporaryDirectory() as directory:
    start = time.perf_counter()
    model = vocab_tool.train(source, "train", f"{directory}/bench", FLAGS.sentencepiece_vocab_size,
                             "bpe", max_documents=FLAGS.sentencepiece_documents)
    training_seconds = time.perf_counter() - start
    vocab = pipelines.SentencePieceVocabulary(model)
    results["sentencepiece"] = measure(pipelines.Task("python_stdlib_tokens", source, vocab), **common)
    results["sentencepiece"]["model_training_seconds"] = round(training_seconds, 1)
  print(json.dumps(results, indent=2))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
