"""Helpers of the pipeline tests: batches as numpy, and an independent reconstruction of the
documents from the batches alone."""

import collections


def to_numpy(batch):
  return {key: value.numpy() for key, value in batch.items()}


def take(dataset, n):
  """The first n batches (fewer if the dataset ends) as dicts of numpy arrays."""
  return [to_numpy(b) for b in dataset.take(n)]


Document = collections.namedtuple("Document", "slot document_id epoch tokens complete")


def reconstruct(batches, ended=False):
  """Documents as the slots carried them, from the batches alone.

  For each slot, the segments from one start flag up to the next are concatenated and the
  padding after the document's last token is stripped. A document still open when the batches
  run out is returned with complete=False, unless `ended` says that the dataset ended there
  (evaluation). Empty evaluation segments (start flag False, nothing but padding, after the
  slot's last document) close the open document.

  Returns:
    A list of Document(slot, document_id, epoch, tokens, complete), tokens an int list;
    document_id is the name where the batches carry names, else the document's index.
  """
  documents = []
  batch_size = batches[0]["targets"].shape[0] if batches else 0
  # Names where the batches have them, else the documents' indices in the split.
  identity = "document_id" if batches and "document_id" in batches[0] else "document_index"
  for slot in range(batch_size):
    current = None
    for batch in batches:
      targets = batch["targets"][slot]
      start = bool(batch["start_of_sequence"][slot])
      empty = not start and not targets.any() and not batch["loss_mask"][slot].any()
      if start or empty:
        if current is not None:
          documents.append(current._replace(complete=True))
          current = None
        if empty:
          continue
        current = Document(slot, batch[identity][slot], int(batch["epoch"][slot]), [], False)
      assert current is not None, "a slot continued a document it never started"
      assert batch[identity][slot] == current.document_id, "a document changed mid-way"
      current.tokens.extend(targets.tolist())
    if current is not None:
      documents.append(current._replace(complete=ended))
  return [d._replace(tokens=_strip_padding(d.tokens) if d.complete else d.tokens) for d in documents]


def _strip_padding(tokens):
  end = len(tokens)
  while end and tokens[end - 1] == 0:
    end -= 1
  return tokens[:end]


def complete_epochs(batches):
  """Epochs that every slot has finished within `batches` (the slot has moved past them)."""
  last = batches[-1]["epoch"]
  return range(int(last.min()))


def texts_by_epoch(documents, vocab, epochs):
  """{epoch: sorted list of decoded document bytes} for complete documents of `epochs`."""
  result = {}
  for epoch in epochs:
    result[epoch] = sorted(vocab.decode_bytes(d.tokens) for d in documents
                           if d.complete and d.epoch == epoch)
  return result


def check_epochs(batches, expected, vocab, min_epochs=2):
  """Every complete epoch holds each expected document (bytes) exactly once; returns the docs."""
  documents = reconstruct(batches)
  epochs = complete_epochs(batches)
  assert len(epochs) >= min_epochs, f"only {len(epochs)} complete epochs; read more batches"
  for epoch, texts in texts_by_epoch(documents, vocab, epochs).items():
    assert texts == sorted(expected), f"epoch {epoch} differs from the source's documents"
  return documents


def epoch_order(documents, epoch):
  """(slot, document_id) in the order the slots started them, for one epoch."""
  return [(d.slot, d.document_id) for d in documents if d.epoch == epoch]


def check_evaluation(batches, expected, vocab):
  """One ordered pass: each document once, then only empty segments, then the end."""
  documents = reconstruct(batches, ended=True)
  assert sorted(vocab.decode_bytes(d.tokens) for d in documents) == sorted(expected)
  finished = [False] * batches[0]["targets"].shape[0]
  for batch in batches:
    for slot, done in enumerate(finished):
      empty = not batch["start_of_sequence"][slot] and not batch["targets"][slot].any()
      if done:
        assert empty, "a finished slot got a document"
      if empty:
        finished[slot] = True
        assert not batch["loss_mask"][slot].any()
        assert batch["num_chars"][slot] == 0 and batch["nonzero_tokens"][slot] == 0
        assert batch["epoch"][slot] == 0
  assert batches[-1]["targets"].any(), "the pass should end right after the last real segment"
