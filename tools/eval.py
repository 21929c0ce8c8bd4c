"""meliad-eval: perplexity of whole documents, per document, in aggregate and by position.

  meliad-eval --saved_model=exported/tiny --split=test --max_documents=16 --output=eval.json
  meliad-eval --workdir=runs/tiny --source=pg19_bytes --default_data_dir=/data/tfds \
      --output=pg19.json

Every document of the split is scored once, in order, B at a time, with the model's
state carried from segment to segment (the pipelines' evaluation mode). Printed and
written as JSON: per document and in aggregate, bits per token, bits per byte,
perplexity, token and byte counts (and, where the source marks answers, as the synthetic
fact-recall documents do, the answer tokens' bits per token and the other tokens'); and a PNG of mean loss against the token offset in
the document (--plot, by default next to --output). Progress goes to stderr.

--source is a task name (pg19_bytes, files_tokens:/data/*.txt, ...) or a source short
name (python_stdlib, synthetic, files:GLOB, tree:DIR, tfds:NAME:FEATURE), tokenized with
the model's vocabulary; by default the task the model was trained on, configured as in
its config.gin.
"""

import json
import os
import sys

from absl import app
from absl import flags

import pipelines
from meliad_tf.common import storage
from meliad_tf.serving import evaluation
from meliad_tf.serving import export
from meliad_tools import shared_flags


FLAGS = flags.FLAGS
shared_flags.define("saved_model", "workdir", "load_dir", "source", "split", "max_documents",
                    "batch_size", "output", "jit_compile", "default_data_dir", "gin_param")
flags.DEFINE_integer("bucket_tokens", 0, "Width in tokens of the loss-by-position buckets "
                     "(0: the segment length).")
flags.DEFINE_string("plot", "", "Write the loss-by-position PNG here (default: --output with "
                    "the extension .png).")
flags.DEFINE_integer("print_documents", 20, "Print at most this many per-document lines.")
flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")


def _plot_path():
  if FLAGS.plot:
    return FLAGS.plot
  if FLAGS.output:
    return os.path.splitext(FLAGS.output)[0] + ".png"
  return ""


def _check_flags():
  if FLAGS.max_documents < 0:
    raise app.UsageError(f"--max_documents must be >= 0 (0: all), got {FLAGS.max_documents}")
  if FLAGS.bucket_tokens < 0:
    raise app.UsageError(f"--bucket_tokens must be >= 0, got {FLAGS.bucket_tokens}")
  for flag in ("output", "plot"):
    path = getattr(FLAGS, flag)
    if path:
      try:
        storage.check_writable(path)
      except ValueError as e:
        raise app.UsageError(f"--{flag}={path}: {e}") from e


def open_model_and_task():
  """The model from the flags, and the task to evaluate tokenized with its vocabulary."""
  try:
    handle = export.open_model(saved_model=FLAGS.saved_model, workdir=FLAGS.workdir,
                               load_dir=FLAGS.load_dir, batch_size=shared_flags.value("batch_size", 0),
                               jit_compile=export.resolve_jit_compile(FLAGS.jit_compile),
                               gin_params=FLAGS.gin_param)
    handle.parse_config(FLAGS.gin_param)
    pipelines.set_default_data_directory(FLAGS.default_data_dir)
    task = evaluation.make_task(FLAGS.source or handle.metadata["task"], handle.vocabulary)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  return handle, task


def _answers(metrics):
  """The answer tokens' part of a result line, where the source marks answers."""
  if "answer_tokens" not in metrics:
    return ""
  return (f"; {metrics['answer_tokens']} answer tokens: {metrics['answer_bits_per_token']:.4f} "
          f"bits/token, the others {metrics['non_answer_bits_per_token']:.4f}")


def print_results(results, limit):
  documents = results["documents"]
  for document in documents[:limit]:
    print(f"{document['document_id']}: {document['tokens']} tokens, {document['bytes']} bytes, "
          f"{document['bits_per_token']:.4f} bits/token, {document['bits_per_byte']:.4f} "
          f"bits/byte, perplexity {document['perplexity']:.3f}{_answers(document)}")
  if len(documents) > limit:
    print(f"... {len(documents) - limit} more documents")
  total = results["aggregate"]
  print(f"{results['task']} {results['split']}: {total['documents']} documents, "
        f"{total['tokens']} tokens, {total['bytes']} bytes: {total['bits_per_token']:.4f} "
        f"bits/token, {total['bits_per_byte']:.4f} bits/byte, perplexity "
        f"{total['perplexity']:.3f}{_answers(total)} ({results['seconds']:.1f} s)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _check_flags()
  handle, task = open_model_and_task()
  try:
    results = evaluation.evaluate(
        handle.module, task, shared_flags.value("split", "test"), batch_size=handle.batch_size,
        sequence_length=handle.sequence_length, max_documents=FLAGS.max_documents,
        bucket_tokens=FLAGS.bucket_tokens or None, progress=FLAGS.progress)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  results["model"] = {key: handle.metadata[key] for key in (
      "family", "task", "step", "sequence_length", "window_length", "batch_size")}
  results["model"]["origin"] = FLAGS.saved_model or FLAGS.workdir or FLAGS.load_dir
  print_results(results, FLAGS.print_documents)
  if FLAGS.output:
    storage.write_atomically(FLAGS.output, json.dumps(results, indent=1))
    print(f"results: {FLAGS.output}")
  plot = _plot_path()
  if plot:
    evaluation.plot_loss_by_offset(
        results["loss_by_offset"], plot,
        f"{results['task']} {results['split']}: {results['aggregate']['documents']} documents")
    print(f"loss by position: {plot}")


def run():
  shared_flags.run(main)


if __name__ == "__main__":
  sys.exit(run())
