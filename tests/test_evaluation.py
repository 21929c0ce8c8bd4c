"""Evaluation: per-document and by-position metrics against a naive computation, every
document once, bounded memory for long books, and meliad-eval's outputs and errors."""

import io
import json
import math
import tracemalloc

import gin
import numpy as np
import pytest
import tensorflow as tf
from absl import app
from absl.testing import flagsaver

import pipelines
import tiny_run
from meliad_tf.serving import evaluation
from meliad_tf.serving import loading as checkpoint_loading
from meliad_tools import eval as eval_tool


L = tiny_run.SEQUENCE_LENGTH
LOG2_E = 1 / math.log(2)


pytestmark = pytest.mark.usefixtures("clean_gin")


@pytest.fixture(scope="module")
def synthetic_test_task():
  tiny_run.configure()
  task = pipelines.get_task("synthetic")
  gin.clear_config()
  return task


def naive_document_losses(model, tokens):
  """Per predicted token of one document: (offset in the document, loss in nats).

  The document is cut into segments of L, run one after another with the state carried;
  position t of a segment predicts token t+1 of it when both are non-zero.
  """
  num_segments = -(-len(tokens) // L)
  padded = np.zeros([num_segments * L], np.int32)
  padded[:len(tokens)] = tokens
  state = model.initial_state(1)
  result = []
  for s in range(num_segments):
    segment = padded[s * L:(s + 1) * L]
    logits, state = model.decoder(tf.constant(segment[None]), tf.constant([s == 0]), state)
    logits = logits.numpy()[0].astype(np.float64)
    for t in range(L - 1):
      if segment[t] > 0 and segment[t + 1] > 0:
        row = logits[t] - logits[t].max()
        result.append((s * L + t + 1, math.log(np.exp(row).sum()) - row[segment[t + 1]]))
  return result


def test_document_metrics_equal_a_naive_computation(saved_model, synthetic_test_task):
  loaded = tf.saved_model.load(saved_model)
  results = evaluation.evaluate(loaded, synthetic_test_task, "test", batch_size=2,
                                sequence_length=L, bucket_tokens=100, progress=False)
  model = checkpoint_loading.load_model(tiny_run.shared_run()).model
  documents = {d["document_id"]: d for d in results["documents"]}
  assert sorted(documents) == [f"synthetic/test/{i}" for i in range(3)]
  bucket_loss, bucket_tokens = np.zeros(100), np.zeros(100)
  total_loss = total_tokens = total_answer_loss = total_answer_tokens = 0
  for i in range(3):
    text = synthetic_test_task.source.generate("test", i)
    losses = naive_document_losses(model, np.frombuffer(text, np.uint8).astype(np.int32))
    loss = sum(value for _, value in losses)
    # Raw bytes: the token at offset o is byte o.
    answer_bytes = {o for start, end in synthetic_test_task.source.answer_spans("test", i)
                    for o in range(start, end)}
    answer_losses = [value for offset, value in losses if offset in answer_bytes]
    assert answer_losses, "the tiny documents' values must be scored"
    got = documents[f"synthetic/test/{i}"]
    assert got["answer_tokens"] == len(answer_losses)
    np.testing.assert_allclose(got["answer_bits_per_token"],
                               sum(answer_losses) / len(answer_losses) * LOG2_E, rtol=1e-5)
    np.testing.assert_allclose(
        got["non_answer_bits_per_token"],
        (loss - sum(answer_losses)) / (len(losses) - len(answer_losses)) * LOG2_E, rtol=1e-5)
    total_answer_loss += sum(answer_losses)
    total_answer_tokens += len(answer_losses)
    # Raw bytes: a predicted token is one byte.
    assert got["tokens"] == got["bytes"] == len(losses)
    assert got["segments"] == -(-len(text) // L)
    np.testing.assert_allclose(got["loss_nats"], loss, rtol=1e-5)
    np.testing.assert_allclose(got["bits_per_token"], loss / len(losses) * LOG2_E, rtol=1e-5)
    np.testing.assert_allclose(got["bits_per_byte"], loss / len(losses) * LOG2_E, rtol=1e-5)
    np.testing.assert_allclose(got["perplexity"], math.exp(loss / len(losses)), rtol=1e-5)
    for offset, value in losses:
      bucket_loss[offset // 100] += value
      bucket_tokens[offset // 100] += 1
    total_loss += loss
    total_tokens += len(losses)
  aggregate = results["aggregate"]
  assert aggregate["documents"] == 3 and aggregate["tokens"] == total_tokens
  np.testing.assert_allclose(aggregate["bits_per_token"], total_loss / total_tokens * LOG2_E,
                             rtol=1e-5)
  assert aggregate["answer_tokens"] == total_answer_tokens
  np.testing.assert_allclose(aggregate["answer_bits_per_token"],
                             total_answer_loss / total_answer_tokens * LOG2_E, rtol=1e-5)
  by_offset = results["loss_by_offset"]
  used = np.nonzero(bucket_tokens)[0]
  assert by_offset["bucket_start"] == (used * 100).tolist()
  assert by_offset["tokens"] == bucket_tokens[used].tolist()
  np.testing.assert_allclose(by_offset["mean_loss_nats"], bucket_loss[used] / bucket_tokens[used],
                             rtol=1e-5)


def test_max_documents_evaluates_the_first_documents_once(saved_model, synthetic_test_task):
  loaded = tf.saved_model.load(saved_model)
  results = evaluation.evaluate(loaded, synthetic_test_task, "test", batch_size=2,
                                sequence_length=L, max_documents=1, progress=False)
  assert [d["document_id"] for d in results["documents"]] == ["synthetic/test/0"]


class _Streamed(pipelines.StreamingSource):
  name = "streamed"
  shuffle_buffer_size = 4

  def documents(self, split):
    texts = [f"document {i} of {split}" for i in range(5)]
    return tf.data.Dataset.from_tensor_slices(
        {"text": texts, "document_id": [f"d{i}" for i in range(5)]})


def test_first_documents_limits_indexed_and_streaming_sources(synthetic_test_task):
  indexed = evaluation.first_documents(synthetic_test_task.source, 2)
  assert indexed.num_documents("test") == 2
  streamed = evaluation.first_documents(_Streamed(), 3)
  assert [d["document_id"] for d in streamed.documents("test").as_numpy_iterator()] == [
      b"d0", b"d1", b"d2"]
  assert evaluation.first_documents(synthetic_test_task.source, 0) is synthetic_test_task.source
  with pytest.raises(ValueError, match="--max_documents must be >= 0"):
    evaluation.first_documents(synthetic_test_task.source, -1)


def test_a_long_book_is_evaluated_in_bounded_memory():
  length, num_segments = 512, 800  # a book of 409,600 tokens
  evaluator = evaluation.Evaluator(1, length, bucket_tokens=4096)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 256, size=[1, length], dtype=np.int32)
  log_probs = -rng.random([1, length])
  log_probs[:, -1] = 0.0
  batch = {"targets": tokens, "loss_mask": np.ones([1, length], bool),
           "num_chars": np.array([length - 1]), "document_id": np.array([b"book"])}
  tracemalloc.start()
  try:
    for s in range(num_segments):
      evaluator.add(dict(batch, start_of_sequence=np.array([s == 0])), log_probs)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  # Keeping every token loss would take 409,600 * 8 bytes = 3.3 MB.
  assert peak < 1_000_000, peak
  evaluator.finish()
  results = evaluator.results()
  assert results["documents"][0]["tokens"] == num_segments * (length - 1)
  assert len(results["loss_by_offset"]["tokens"]) == num_segments * length // 4096
  np.testing.assert_allclose(results["aggregate"]["loss_nats"],
                             -log_probs.sum() * num_segments, rtol=1e-9)


def test_a_segment_without_its_document_start_is_an_error():
  evaluator = evaluation.Evaluator(1, 4, bucket_tokens=4)
  batch = {"targets": np.ones([1, 4], np.int32), "loss_mask": np.ones([1, 4], bool),
           "num_chars": np.array([3]), "document_id": np.array([b"x"]),
           "start_of_sequence": np.array([False])}
  with pytest.raises(ValueError, match="without its first segment"):
    evaluator.add(batch, np.zeros([1, 4]))


def test_progress_bar_shows_documents_rate_and_eta():
  stream = io.StringIO()  # not a terminal: redrawn at most every `interval` seconds
  bar = evaluation.progress_bar(4, stream, interval=0.0)
  bar.update(1)
  bar.set_postfix_str("1,000 tokens/s")
  bar.update(3)
  bar.close()
  last = stream.getvalue().split("\r")[-1]
  assert "4/4" in last and "1,000 tokens/s" in last and "00:00" in last


def test_a_source_without_answers_reports_no_answer_metrics():
  evaluator = evaluation.Evaluator(1, 4, bucket_tokens=4)
  batch = {"targets": np.ones([1, 4], np.int32), "loss_mask": np.ones([1, 4], bool),
           "num_chars": np.array([3]), "document_id": np.array([b"x"]),
           "start_of_sequence": np.array([True])}
  evaluator.add(batch, -np.ones([1, 4]))
  evaluator.finish()
  results = evaluator.results()
  assert "answer_tokens" not in results["aggregate"]
  assert "answer_tokens" not in results["documents"][0]


def _eval_flags(**overrides):
  settings = dict(saved_model=tiny_run.shared_export(), workdir="", load_dir="", source="",
                  split="test", max_documents=0, batch_size=0, bucket_tokens=0, output="",
                  plot="", print_documents=20, progress=True, jit_compile=False, gin_param=[])
  settings.update(overrides)
  return flagsaver.flagsaver(**settings)


def test_meliad_eval_writes_json_and_plot_and_shows_progress(tmp_path, capsys):
  output = tmp_path / "eval.json"
  with _eval_flags(output=str(output)):
    eval_tool.main(["meliad-eval"])
  captured = capsys.readouterr()
  assert "3/3" in captured.err and "tokens/s" in captured.err
  assert "synthetic test: 3 documents" in captured.out
  assert " answer tokens: " in captured.out
  results = json.loads(output.read_text())
  assert results["model"]["family"] == "transformer_xl"
  assert {"bits_per_token", "bits_per_byte", "perplexity", "tokens", "bytes"} <= set(
      results["aggregate"])
  assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  in_process = tmp_path / "workdir.json"
  with _eval_flags(saved_model="", workdir=tiny_run.shared_run(), output=str(in_process),
                   progress=False):
    eval_tool.main(["meliad-eval"])
  again = json.loads(in_process.read_text())
  for key in ("tokens", "bytes"):
    assert again["aggregate"][key] == results["aggregate"][key]
  np.testing.assert_allclose(again["aggregate"]["loss_nats"], results["aggregate"]["loss_nats"],
                             rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (dict(max_documents=-1), "--max_documents must be >= 0"),
    (dict(output="/dev/null/dir/eval.json"), "--output=/dev/null/dir/eval.json: /dev/null is a file"),
    (dict(workdir="/tmp"), "give exactly one of --saved_model and --workdir"),
    (dict(saved_model="/nonexistent"), "--saved_model=/nonexistent does not exist"),
    (dict(batch_size=3), "scores 2 streams, not --batch_size=3"),
    (dict(source="nope"), "Unknown task 'nope'"),
])
def test_meliad_eval_rejects_bad_flags(overrides, message):
  with _eval_flags(**overrides):
    with pytest.raises(app.UsageError, match=message):
      eval_tool.main(["meliad-eval"])


def test_meliad_eval_refuses_a_saved_model_that_is_not_ours(tmp_path):
  module = tf.Module()
  module.f = tf.function(lambda: tf.constant(1), input_signature=[])
  tf.saved_model.save(module, str(tmp_path))
  with _eval_flags(saved_model=str(tmp_path)):
    with pytest.raises(app.UsageError, match="not a SavedModel written by meliad-export"):
      eval_tool.main(["meliad-eval"])
