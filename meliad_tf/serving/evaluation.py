"""Perplexity of whole documents, scored in the pipelines' evaluation mode.

The pipeline deals every document of a split once to B streams and cuts it into
segments of L tokens; the model scores one segment per stream per call,
carrying each stream's state. This module turns the per-token log-probabilities into:

* per document: predicted tokens, bytes, loss in nats, bits per token, bits per byte,
  perplexity; where the source marks answers (the synthetic fact-recall values, which only
  long-range context predicts), the answer tokens' count and bits per token, and the bits per
  token of every other token;
* the same in aggregate over all documents (token- and byte-weighted);
* loss by position: the summed loss and token count per bucket of token offset in the
  document, so the gain from long-range context shows as a falling curve.

Memory stays bounded for books of any length: per stream only the running sums of its
current document are kept, per finished document a handful of numbers, and per offset
bucket two numbers; token losses are dropped once added.
"""

import dataclasses
import math
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf
import tqdm

import pipelines
from meliad_tf.common import storage
from meliad_tf.model import language_model as model_lib


def _rates(loss, tokens, num_bytes, answer_loss=None, answer_tokens=0):
  """The metrics of summed losses (nats) and counts; the answers' only when given."""
  nats = loss / tokens if tokens else 0.0
  rates = {
      "tokens": int(tokens),
      "bytes": int(num_bytes),
      "loss_nats": float(loss),
      "bits_per_token": nats * model_lib.LOG2_E,
      "bits_per_byte": loss / num_bytes * model_lib.LOG2_E if num_bytes else 0.0,
      "perplexity": math.exp(nats) if nats < 700 else math.inf,
  }
  if answer_loss is not None:
    other_tokens = tokens - answer_tokens
    rates.update(
        answer_tokens=int(answer_tokens),
        answer_loss_nats=float(answer_loss),
        answer_bits_per_token=(answer_loss / answer_tokens * model_lib.LOG2_E
                               if answer_tokens else 0.0),
        non_answer_bits_per_token=((loss - answer_loss) / other_tokens * model_lib.LOG2_E
                                   if other_tokens else 0.0))
  return rates


@dataclasses.dataclass
class _Document:
  """Running sums of one document being scored; the answers' are None where the source
  marks none."""
  document_id: str
  loss: float = 0.0
  tokens: int = 0
  num_bytes: int = 0
  segments: int = 0
  answer_loss: Optional[float] = None
  answer_tokens: int = 0

  def summary(self):
    return dict(document_id=self.document_id, segments=self.segments,
                **_rates(self.loss, self.tokens, self.num_bytes, self.answer_loss,
                         self.answer_tokens))


class OffsetHistogram:
  """Summed loss and token counts per bucket of token offset in the document.

  Bucket k holds predicted tokens at offsets [k * bucket_tokens, (k + 1) * bucket_tokens),
  where offset i is the i-th token of the document (the first predicted token is 1).

  Args:
    bucket_tokens: width of a bucket in tokens.
  """

  def __init__(self, bucket_tokens):
    if bucket_tokens <= 0:
      raise ValueError(f"bucket_tokens must be positive, got {bucket_tokens}")
    self.bucket_tokens = bucket_tokens
    self.loss = np.zeros([0], np.float64)
    self.tokens = np.zeros([0], np.int64)

  def add(self, offsets, losses):
    """Adds token losses (nats) at their offsets (1-D arrays of the same length)."""
    if not len(offsets):
      return
    buckets = np.asarray(offsets) // self.bucket_tokens
    size = int(buckets.max()) + 1
    if size > len(self.loss):
      self.loss = np.pad(self.loss, [0, size - len(self.loss)])
      self.tokens = np.pad(self.tokens, [0, size - len(self.tokens)])
    self.loss += np.bincount(buckets, weights=losses, minlength=len(self.loss))
    self.tokens += np.bincount(buckets, minlength=len(self.tokens))

  def result(self):
    """Non-empty buckets: their first offset, token count and mean loss."""
    used = np.nonzero(self.tokens)[0]
    mean = self.loss[used] / self.tokens[used]
    return {
        "bucket_tokens": self.bucket_tokens,
        "bucket_start": (used * self.bucket_tokens).tolist(),
        "tokens": self.tokens[used].tolist(),
        "mean_loss_nats": mean.tolist(),
        "bits_per_token": (mean * model_lib.LOG2_E).tolist(),
    }


class Evaluator:
  """Accumulates scored batches of ordered per-stream segments into document metrics.

  Args:
    batch_size: B, streams per batch.
    sequence_length: L, tokens per segment.
    bucket_tokens: width of the loss-by-offset buckets.
  """

  def __init__(self, batch_size, sequence_length, bucket_tokens):
    self.batch_size = batch_size
    self.sequence_length = sequence_length
    self.histogram = OffsetHistogram(bucket_tokens)
    self.open: List[Optional[_Document]] = [None] * batch_size
    self.finished: List[Dict] = []
    self.tokens = 0

  def add(self, batch, log_probs):
    """Adds one scored batch.

    Args:
      batch: numpy dict from `load_text_dataset(..., training=False)`: targets [B, L],
        start_of_sequence [B], loss_mask [B, L], num_chars [B], document_id [B], and
        answer_mask [B, L] where the source marks answers.
      log_probs: float [B, L], log p(token t+1) at position t (as `score` returns).
    """
    tokens = batch["targets"]
    mask = model_lib.prediction_mask(tokens, model_lib.shift_targets(tokens),
                                     batch["loss_mask"]).numpy()
    answers = batch.get("answer_mask")
    losses = -np.asarray(log_probs, np.float64)
    positions = np.arange(self.sequence_length) + 1
    for b in range(self.batch_size):
      document_id = batch["document_id"][b].decode("utf-8", errors="replace")
      if batch["start_of_sequence"][b]:
        self._close(b)
        self.open[b] = _Document(document_id)
      document = self.open[b]
      if not document_id:  # a finished stream's padding segment
        continue
      if document is None or document.document_id != document_id:
        raise ValueError(f"stream {b} continues document {document_id!r} without its first "
                         "segment; evaluate batches from the pipelines' evaluation mode")
      predicted = mask[b]
      document.loss += float(losses[b][predicted].sum())
      count = int(predicted.sum())
      document.tokens += count
      document.num_bytes += int(batch["num_chars"][b])
      if answers is not None:
        answered = predicted & answers[b]
        document.answer_loss = (document.answer_loss or 0.0) + float(losses[b][answered].sum())
        document.answer_tokens += int(answered.sum())
      offsets = document.segments * self.sequence_length + positions[predicted]
      self.histogram.add(offsets, losses[b][predicted])
      document.segments += 1
      self.tokens += count

  def _close(self, b):
    if self.open[b] is not None:
      self.finished.append(self.open[b].summary())
      self.open[b] = None

  def finish(self):
    """Closes the documents still open (the pipeline's last segments)."""
    for b in range(self.batch_size):
      self._close(b)

  def results(self):
    """{"aggregate": ..., "documents": [...], "loss_by_offset": ...}."""
    loss = sum(d["loss_nats"] for d in self.finished)
    tokens = sum(d["tokens"] for d in self.finished)
    num_bytes = sum(d["bytes"] for d in self.finished)
    answer_loss, answer_tokens = None, 0
    with_answers = [d for d in self.finished if "answer_tokens" in d]
    if with_answers:
      answer_tokens = sum(d["answer_tokens"] for d in with_answers)
      answer_loss = sum(d["answer_loss_nats"] for d in with_answers)
    aggregate = dict(documents=len(self.finished),
                     **_rates(loss, tokens, num_bytes, answer_loss, answer_tokens))
    return {"aggregate": aggregate, "documents": list(self.finished),
            "loss_by_offset": self.histogram.result()}


def progress_bar(total_documents=None, stream=None, interval=10.0):
  """A tqdm bar of documents done, with the tokens per second and the ETA, on stderr.

  Args:
    total_documents: the number to expect, or None if unknown (then no ETA).
    stream: where to write (default stderr).
    interval: seconds between redraws when `stream` is not a terminal (a log file), so that
      a long evaluation writes a line every few seconds, not one per batch.
  """
  stream = stream or sys.stderr
  tty = hasattr(stream, "isatty") and stream.isatty()
  return tqdm.tqdm(total=total_documents, unit="doc", file=stream,
                   mininterval=0.2 if tty else interval, dynamic_ncols=tty, ascii=not tty)


class _FirstIndexedDocuments(pipelines.IndexedSource):
  """The first N documents of each split of an indexed source."""

  def __init__(self, source, max_documents):
    self.name = source.name
    self.source = source
    self.max_documents = max_documents

  def num_documents(self, split):
    return min(self.source.num_documents(split), self.max_documents)

  def read(self, split, index):
    return self.source.read(split, index)


class _FirstStreamedDocuments(pipelines.StreamingSource):
  """The first N documents of each split of a streaming source."""

  def __init__(self, source, max_documents):
    self.name = source.name
    self.source = source
    self.max_documents = max_documents

  def documents(self, split):
    return self.source.documents(split).take(self.max_documents)

  def num_documents(self, split):
    total = self.source.num_documents(split)
    return None if total is None else min(total, self.max_documents)


def first_documents(source, max_documents):
  """`source` restricted to the first `max_documents` documents of each split (0: all)."""
  if not max_documents:
    return source
  if max_documents < 0:
    raise ValueError(f"--max_documents must be >= 0 (0: all), got {max_documents}")
  if isinstance(source, pipelines.IndexedSource):
    return _FirstIndexedDocuments(source, max_documents)
  return _FirstStreamedDocuments(source, max_documents)


def make_task(spec, vocabulary):
  """The task to evaluate or prompt from: a task name or a source short name, tokenized
  with the model's `vocabulary` (see `pipelines.get_task` and `pipelines.make_source`)."""
  if pipelines.is_source_name(spec):
    return pipelines.Task(spec, pipelines.make_source(spec), vocabulary)
  return pipelines.get_task(spec, vocabulary=vocabulary)


def evaluate(module, task, split, *, batch_size, sequence_length, max_documents=0,
             bucket_tokens=None, progress=True, progress_stream=None):
  """Scores every document of `split` once and returns the metrics.

  Args:
    module: has `score(tokens, start_of_sequence)` and `reset_all()`: a SavedModel loaded
      with `export.load` or an in-process `export.ScoringModule`.
    task: a `pipelines.Task` whose vocabulary is the model's.
    split: the split to read.
    batch_size: B of the module's `score`.
    sequence_length: L of the module's `score`.
    max_documents: evaluate the first N documents of the split (0: all).
    bucket_tokens: width of the loss-by-offset buckets (default L).
    progress: show the progress bar.
    progress_stream: where the bar goes (default stderr).
  Returns:
    `Evaluator.results()` plus "split", "task" and "seconds".
  """
  source = first_documents(task.source, max_documents)
  dataset = pipelines.load_text_dataset(
      pipelines.Task(task.name, source, task.vocabulary), split=split,
      sequence_length=sequence_length, batch_size=batch_size, training=False)
  evaluator = Evaluator(batch_size, sequence_length, bucket_tokens or sequence_length)
  bar = progress_bar(source.num_documents(split), progress_stream) if progress else None
  start = time.perf_counter()
  module.reset_all()

  def show_progress():
    bar.update(len(evaluator.finished) - bar.n)
    elapsed = time.perf_counter() - start
    bar.set_postfix_str(f"{evaluator.tokens / elapsed:,.0f} tokens/s", refresh=False)

  for batch in dataset.as_numpy_iterator():
    scores = module.score(tf.constant(batch["targets"]), tf.constant(batch["start_of_sequence"]))
    evaluator.add(batch, scores["log_probs"].numpy())
    if bar:
      show_progress()
  evaluator.finish()
  if bar:
    show_progress()
    bar.close()
  results = evaluator.results()
  results.update(task=task.name, split=split, seconds=time.perf_counter() - start)
  return results


def plot_loss_by_offset(loss_by_offset, path, title):
  """Writes a PNG of mean bits per token against the token offset in the document."""
  import matplotlib  # pylint: disable=g-import-not-at-top  # Heavy; only the plot needs it.
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

  width = loss_by_offset["bucket_tokens"]
  centers = [start + width / 2 for start in loss_by_offset["bucket_start"]]
  figure, axes = pyplot.subplots(figsize=(8, 4.5))
  axes.plot(centers, loss_by_offset["bits_per_token"], marker=".", linewidth=1)
  axes.set_xlabel(f"token offset in the document (buckets of {width} tokens)")
  axes.set_ylabel("mean bits per token")
  axes.set_title(title)
  axes.grid(True, alpha=0.3)
  figure.tight_layout()
  storage.save_figure(figure, path, dpi=100)
  pyplot.close(figure)
