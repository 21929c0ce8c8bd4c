"""The stream pipeline at book scale: speed, reading, iterator checkpoints and memory, as JSON.

  meliad-bench data [--corpus_dir=DIR --corpus_megabytes=1100 --batch_size=64 --sequence_length=4096]

The corpus is a TFDS dataset in TFDS's own on-disk format (TFRecord files), `meliad_bench_books`,
built on the first run under `--corpus_dir` and reused afterwards: books of lognormal length
(mean `--book_kilobytes`) cut from the running Python's standard library, so the text is real and
present on every machine. Each vocabulary is measured in its own process, on the training split
as the trainer reads it (`load_text_dataset(training=True)` through a TFDS task):

* tokens per second over `--num_batches` batches after `--warmup_batches`;
* bytes read from storage (the process's read system calls, /proc/self/io `rchar`) per byte of
  text the batches delivered, over `--read_batches` batches (bytes vocabulary only, where one
  token is one byte): the share of the corpus read per epoch;
* the iterator checkpoint (`tf.train.Checkpoint(iterator=)`) taken mid-epoch: bytes on disk,
  seconds to save, seconds to restore into a fresh iterator up to its first batch, and whether
  the restored batches equal the uninterrupted ones;
* the process's peak resident memory.

`--epoch_pass` adds one evaluation pass over the whole split with the bytes vocabulary: bytes read
per byte of the corpus's text and of its files. The SentencePiece model (`--sentencepiece_model_type`,
unigram as T5's model that pg19_tokens uses, or BPE as meliad-vocab's and Meliad's PG19 models) is
trained once on standard library documents and cached beside the corpus; `documents_cut_at_spaces`
says whether the pipeline tokenized its documents in pieces (`Vocabulary.space_cut`).
"""

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags

import pipelines
from meliad_tools import shared_flags


FLAGS = flags.FLAGS
shared_flags.define()

flags.DEFINE_string("corpus_dir", os.path.join(os.path.expanduser("~"), ".cache", "meliad-tf", "bench"),
                    "Where the benchmark corpus (a TFDS data directory) and model are built and kept.")
flags.DEFINE_integer("corpus_megabytes", 1100, "Text in the corpus's train split, in MB (10^6 bytes).")
flags.DEFINE_integer("book_kilobytes", 410, "Mean book length in kB (PG19's is about 410).")
flags.DEFINE_integer("batch_size", 64, "B, streams per batch.")
flags.DEFINE_integer("sequence_length", 4096, "L, tokens per segment.")
flags.DEFINE_integer("num_batches", 150, "Timed batches per vocabulary.")
flags.DEFINE_integer("warmup_batches", 60, "Untimed batches before timing: enough for the "
                     "streams' read-ahead to settle, so that the rate is the steady one.")
flags.DEFINE_integer("read_batches", 200, "Batches over which reading is measured (bytes vocabulary).")
flags.DEFINE_list("vocabularies", ["bytes", "sentencepiece"], "Vocabularies measured.")
flags.DEFINE_integer("sentencepiece_vocab_size", 4000, "Pieces of the benchmark's model.")
flags.DEFINE_enum("sentencepiece_model_type", "unigram", ["unigram", "bpe"], "Benchmark model type.")
flags.DEFINE_bool("cut_unigram_at_spaces", False, "Tokenize a unigram model's documents in pieces "
                  "cut at spaces (pipelines.sentencepiece_vocabulary.cut_unigram_at_spaces).")
flags.DEFINE_bool("epoch_pass", True, "Also read the whole split once in evaluation mode (bytes).")
flags.DEFINE_integer("iterator_layout", pipelines.streams.ITERATOR_LAYOUT,
                     "The pipelines' iterator layout (an older one to compare).")
flags.DEFINE_list("sources", ["tfds"], "Sources measured: tfds (the corpus as TFDS built it) and "
                  "files (the same books as text files, one per book; their train split is 90% of them).")
flags.DEFINE_string("measure", None, "Internal: measure SOURCE:VOCABULARY in this process.")

_DATASET = "meliad_bench_books"
_SEED = 1234
_SLICE_BYTES = 16_384


class _BenchBooks(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Books cut from the standard library's source text (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  megabytes: int
  book_kilobytes: int

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({"book_text": tfds.features.Text(),
                                             "book_id": tf.int64}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(self.megabytes * 10**6, self.book_kilobytes * 1000)}

  def _generate_examples(self, total_bytes, mean_book_bytes):
    text = _stdlib_text()
    rng = np.random.default_rng(_SEED)
    sigma = 0.6
    written, book_id = 0, 0
    while written < total_bytes:
      length = int(np.clip(rng.lognormal(np.log(mean_book_bytes) - sigma**2 / 2, sigma),
                           4 * _SLICE_BYTES, 12 * mean_book_bytes))
      starts = rng.integers(0, len(text) - _SLICE_BYTES, size=length // _SLICE_BYTES + 1)
      book = b"".join(text[s:s + _SLICE_BYTES] for s in starts)[:length]
      yield book_id, {"book_text": book.decode("utf-8", errors="ignore"), "book_id": book_id}
      written += length
      book_id += 1


_BUILDERS = {}


def dataset_name(megabytes: int, book_kilobytes: int) -> str:
  """Registers (once) the TFDS builder of a corpus of this size and returns its name."""
  name = f"{_DATASET}_{megabytes}mb_{book_kilobytes}kb"
  if name not in _BUILDERS:
    _BUILDERS[name] = type(f"BenchBooks{megabytes}x{book_kilobytes}", (_BenchBooks,),
                           {"name": name, "megabytes": megabytes, "book_kilobytes": book_kilobytes,
                            "__module__": __name__})
  return name


def _stdlib_text() -> bytes:
  source = pipelines.PythonStdlibSource()
  return b"".join(document["text"].numpy() for document in source.documents("train"))


def _builder(corpus_dir):
  return tfds.builder(dataset_name(FLAGS.corpus_megabytes, FLAGS.book_kilobytes),
                      data_dir=os.path.join(corpus_dir, "tfds"))


def prepare_corpus(corpus_dir) -> dict:
  """Builds the corpus (once) and returns its name and sizes."""
  builder = _builder(corpus_dir)
  start = time.perf_counter()
  if not builder.is_prepared():
    builder.download_and_prepare()
  seconds = time.perf_counter() - start
  split = builder.info.splits["train"]
  return {"name": builder.name, "books": split.num_examples,
          "file_bytes": split.num_bytes, "build_seconds": round(seconds, 1),
          "data_dir": builder.data_dir}


def _files_dir(corpus_dir):
  return os.path.join(corpus_dir, f"files_{FLAGS.corpus_megabytes}mb_{FLAGS.book_kilobytes}kb")


def export_files(corpus_dir) -> None:
  """Writes the corpus's books as text files, one per book (once)."""
  directory = _files_dir(corpus_dir)
  done = os.path.join(directory, "COMPLETE")
  if tf.io.gfile.exists(done):
    return
  tf.io.gfile.makedirs(directory)
  records = _builder(corpus_dir).as_dataset(split="train", shuffle_files=False)
  for record in records:
    with tf.io.gfile.GFile(os.path.join(directory, f"{int(record['book_id']):06d}.txt"), "wb") as f:
      f.write(record["book_text"].numpy())
  with tf.io.gfile.GFile(done, "w") as f:
    f.write("")


def sentencepiece_model(corpus_dir) -> str:
  """A SentencePiece model trained on standard library documents, cached in `corpus_dir`."""
  from meliad_tools import vocab as vocab_tool  # pylint: disable=g-import-not-at-top
  prefix = os.path.join(corpus_dir, f"sp_{FLAGS.sentencepiece_model_type}_{FLAGS.sentencepiece_vocab_size}")
  if not tf.io.gfile.exists(prefix + ".model"):
    vocab_tool.train(pipelines.PythonStdlibSource(), "train", prefix, FLAGS.sentencepiece_vocab_size,
                     FLAGS.sentencepiece_model_type, max_documents=60)
  return prefix + ".model"


def _read_bytes() -> int:
  with open("/proc/self/io", encoding="ascii") as f:
    return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])


def _directory_bytes(directory) -> int:
  return sum(tf.io.gfile.stat(os.path.join(root, name)).length
             for root, _, names in tf.io.gfile.walk(directory) for name in names)


def _equal(a, b) -> bool:
  return all(np.array_equal(a[key].numpy(), b[key].numpy()) for key in a)


def _task(source_kind, vocabulary_name, corpus_dir):
  if source_kind == "tfds":
    source = pipelines.TfdsSource(dataset_name(FLAGS.corpus_megabytes, FLAGS.book_kilobytes), "book_text",
                                  directory=os.path.join(corpus_dir, "tfds"))
  else:
    source = pipelines.TextFilesSource(os.path.join(_files_dir(corpus_dir), "*.txt"))
  if vocabulary_name == "bytes":
    vocabulary = pipelines.ByteVocabulary()
  else:
    vocabulary = pipelines.SentencePieceVocabulary(
        sentencepiece_model(corpus_dir), cut_unigram_at_spaces=FLAGS.cut_unigram_at_spaces)
  return pipelines.Task(f"bench_{vocabulary_name}", source, vocabulary)


def _save(iterator, checkpoint_dir):
  """Saves `iterator` mid-epoch: (timings and size, the checkpoint's path, the next 3 batches)."""
  if tf.io.gfile.exists(checkpoint_dir):
    tf.io.gfile.rmtree(checkpoint_dir)
  start = time.perf_counter()
  path = tf.train.Checkpoint(iterator=iterator).write(os.path.join(checkpoint_dir, "ckpt"))
  result = {"checkpoint_save_seconds": round(time.perf_counter() - start, 2),
            "checkpoint_bytes": _directory_bytes(checkpoint_dir)}
  return result, path, [next(iterator) for _ in range(3)]


def _restore(dataset, path, uninterrupted) -> dict:
  """Restores a fresh iterator from `path` and times it up to its first batch."""
  start = time.perf_counter()
  restored = pipelines.StreamIterator(dataset())
  tf.train.Checkpoint(iterator=restored).read(path).assert_consumed()
  resumed = [next(restored)]
  result = {"checkpoint_restore_seconds": round(time.perf_counter() - start, 2)}
  resumed += [next(restored) for _ in range(2)]
  result["restore_equals_uninterrupted"] = all(map(_equal, uninterrupted, resumed))
  return result


def measure(source_kind, vocabulary_name, corpus_dir) -> dict:
  """All the measures of one vocabulary (run in a process of its own)."""
  task = _task(source_kind, vocabulary_name, corpus_dir)
  shape = dict(split="train", sequence_length=FLAGS.sequence_length, batch_size=FLAGS.batch_size)

  def dataset():
    return pipelines.load_text_dataset(task, training=True, seed=0,
                                       iterator_layout=FLAGS.iterator_layout, **shape)

  result = {"vocabulary": task.vocabulary.kind, "vocab_size": task.vocabulary.vocab_size,
            "documents_cut_at_spaces": bool(task.vocabulary.space_cut)}
  start = time.perf_counter()
  iterator = pipelines.StreamIterator(dataset())
  next(iterator)
  result["first_batch_seconds"] = round(time.perf_counter() - start, 2)
  for _ in range(FLAGS.warmup_batches):
    next(iterator)
  nonzero = 0
  start = time.perf_counter()
  for _ in range(FLAGS.num_batches):
    nonzero += int(next(iterator)["nonzero_tokens"].numpy().sum())
  elapsed = time.perf_counter() - start
  tokens = FLAGS.num_batches * FLAGS.batch_size * FLAGS.sequence_length
  result.update(batches=FLAGS.num_batches, seconds=round(elapsed, 2),
                tokens_per_second=round(tokens / elapsed),
                predicted_tokens_per_second=round(nonzero / elapsed))

  if vocabulary_name == "bytes" and FLAGS.read_batches:
    read_before, text_bytes = _read_bytes(), 0
    for _ in range(FLAGS.read_batches):
      text_bytes += int(np.count_nonzero(next(iterator)["targets"].numpy()))
    result["read_bytes_per_text_byte"] = round((_read_bytes() - read_before) / text_bytes, 3)
    result["read_window_text_bytes"] = text_bytes

  checkpoint_dir = os.path.join(corpus_dir, f"checkpoint_{source_kind}_{vocabulary_name}")
  try:
    saved, path, uninterrupted = _save(iterator, checkpoint_dir)
    # A resumed run has no other pipeline: the saved one's threads stop before the restore.
    del iterator
    time.sleep(2)
    result.update(saved, **_restore(dataset, path, uninterrupted))
  except tf.errors.OpError as e:
    result["checkpoint_error"] = e.message.splitlines()[0]
  finally:
    if tf.io.gfile.exists(checkpoint_dir):
      tf.io.gfile.rmtree(checkpoint_dir)

  if source_kind == "tfds" and vocabulary_name == "bytes" and FLAGS.epoch_pass:
    read_before, start, text_bytes = _read_bytes(), time.perf_counter(), 0
    for batch in pipelines.load_text_dataset(task, training=False, **shape):
      text_bytes += int(np.count_nonzero(batch["targets"].numpy()))
    result["epoch_pass"] = {"seconds": round(time.perf_counter() - start, 1),
                            "text_bytes": text_bytes,
                            "read_bytes": _read_bytes() - read_before}
  result["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return result


def main(argv):
  del argv
  corpus_dir = FLAGS.corpus_dir
  if FLAGS.measure:
    print(json.dumps(measure(*FLAGS.measure.split(":"), corpus_dir)))
    return
  tf.io.gfile.makedirs(corpus_dir)
  corpus = prepare_corpus(corpus_dir)
  results = {"batch_size": FLAGS.batch_size, "sequence_length": FLAGS.sequence_length,
             "corpus": corpus}
  for source_kind in FLAGS.sources:
    if source_kind == "files":
      export_files(corpus_dir)
    for vocabulary_name in FLAGS.vocabularies:
      if vocabulary_name == "sentencepiece":
        sentencepiece_model(corpus_dir)
      flags_passed = [FLAGS[name].serialize() for name in
                      ("corpus_dir", "corpus_megabytes", "book_kilobytes", "batch_size", "sequence_length",
                       "num_batches", "warmup_batches", "read_batches", "sentencepiece_vocab_size",
                       "sentencepiece_model_type", "cut_unigram_at_spaces", "epoch_pass",
                       "iterator_layout")]
      process = subprocess.run([sys.executable, "-m", "meliad_tools.bench_data",
                                f"--measure={source_kind}:{vocabulary_name}"] + flags_passed,
                               capture_output=True, text=True, check=False)
      if process.returncode:
        raise RuntimeError(f"measuring {source_kind}:{vocabulary_name} failed:\n{process.stderr[-4000:]}")
      measured = json.loads(process.stdout.strip().splitlines()[-1])
      if source_kind == "tfds":
        results[vocabulary_name] = measured
      else:
        results.setdefault(source_kind, {})[vocabulary_name] = measured
  epoch = results.get("bytes", {}).get("epoch_pass")
  if epoch:
    epoch["read_per_text_byte"] = round(epoch["read_bytes"] / epoch["text_bytes"], 3)
    epoch["read_per_file_byte"] = round(epoch["read_bytes"] / corpus["file_bytes"], 3)
  print(json.dumps(results, indent=2))


def run():
  shared_flags.run(main)


if __name__ == "__main__":
  run()
