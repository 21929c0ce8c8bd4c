"""Synthetic documents with long-range structure: facts stated early, asked again far later.

Each document first states `num_facts` random facts, "key <k> = value <v>.", with keys and
values of random lowercase letters and digits; then comes filler prose of random common words,
long enough that the document reaches `document_length` bytes (thousands of bytes, far beyond a
128- or 256-token window); then the same keys are asked again in a new random order, each
followed by its value. A model with a sliding window alone cannot predict those values, but one
with an external memory or a recurrent state that kept the early statement can. The text is
printable ASCII and newlines: it never holds byte 0.

Documents are generated eagerly at construction with numpy, each from its own generator seeded
by (seed, split, index), so document i of a split is the same whatever the number of documents.
"""

from typing import Dict, List, Tuple

import gin
import numpy as np
import tensorflow as tf

from pipelines import sources


_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
_ALPHANUMERIC = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))
_FILLER_WORDS = np.array((
    "the a of and to in is was it that he she they we you his her their this with for on as at by "
    "from but not or be had have were are been an which one all would there when so what up out "
    "into no more some time could then them than other its only over new very after first also "
    "two like little most about many before must through back years where much your way well "
    "down should because each just those people how too any day same long own old great still "
    "house river road light stone water night morning city garden letter window story voice "
    "walked spoke looked turned carried found thought waited opened followed remembered").split())
_KEY_LENGTH = 8


@gin.configurable("synthetic", module="pipelines")
class SyntheticSource(sources.IndexedSource):
  """Generated fact-recall documents (see the module docstring).

  Args:
    seed: generator seed; documents are a function of (seed, split, index).
    num_documents: documents in the train split.
    num_eval_documents: documents in each of the validation and test splits.
    document_length: approximate bytes per document (the filler fills up to it).
    num_facts: facts stated at the start and asked at the end of each document.
  """

  def __init__(self, seed: int = 42, num_documents: int = 64, num_eval_documents: int = 16,
               document_length: int = 16384, num_facts: int = 16):
    for field, value in (("num_documents", num_documents), ("num_eval_documents", num_eval_documents),
                         ("document_length", document_length), ("num_facts", num_facts)):
      if value <= 0:
        raise ValueError(f"pipelines.synthetic.{field} must be positive, got {value}.")
    self.name = "synthetic"
    self.seed = seed
    self._document_length = document_length
    self._num_facts = num_facts
    counts = {"train": num_documents, "validation": num_eval_documents, "test": num_eval_documents}
    documents = {split: [self._generate(split, i) for i in range(n)]
                 for split, n in counts.items()}
    self._texts: Dict[str, List[bytes]] = {
        split: [text for text, _ in pairs] for split, pairs in documents.items()}
    self._answers: Dict[str, List[bytes]] = {
        split: [_byte_mask(len(text), spans) for text, spans in pairs]
        for split, pairs in documents.items()}

  def generate(self, split: str, index: int) -> bytes:
    """The text of document `index` of `split`."""
    return self._generate(split, index)[0]

  def answer_spans(self, split: str, index: int) -> List[Tuple[int, int]]:
    """The [start, end) byte ranges of the values asked again at the end of the document."""
    return self._generate(split, index)[1]

  def _generate(self, split: str, index: int) -> Tuple[bytes, List[Tuple[int, int]]]:
    """The text of document `index` of `split` and its answer spans."""
    sources.check_split(self.name, split)
    rng = np.random.default_rng([self.seed, _SPLIT_CODES[split], index])

    def random_words(n, length):
      letters = rng.choice(_ALPHANUMERIC, size=(n, length))
      return ["".join(row) for row in letters]

    keys = random_words(2 * self._num_facts, _KEY_LENGTH)
    keys = list(dict.fromkeys(keys))[:self._num_facts]  # distinct keys; collisions are rare
    values = random_words(len(keys), _KEY_LENGTH)
    statement = "".join(f"key {k} = value {v}.\n" for k, v in zip(keys, values))
    recall_lines = [f"key {keys[j]} = value {values[j]}.\n" for j in rng.permutation(len(keys))]
    head = f"Document {index} of {split}. Remember these facts.\n{statement}\n"
    tail = "\nRecall the facts.\n" + "".join(recall_lines)

    filler_length = max(0, self._document_length - len(head) - len(tail))
    # Words average about 5 bytes with their space; draw enough, then cut at a sentence end.
    words = rng.choice(_FILLER_WORDS, size=filler_length // 4 + 16)
    sentence_ends = rng.random(len(words)) < 0.08
    pieces, size = [], 0
    for word, ends in zip(words, sentence_ends):
      piece = word + (".\n" if ends else " ")
      if size + len(piece) > filler_length:
        break
      pieces.append(piece)
      size += len(piece)
    text = head + "".join(pieces) + tail
    # Each recall line ends with "<value>.\n"; the value is what only the statement gives.
    spans, end = [], len(text)
    for line in reversed(recall_lines):
      value_end = end - 2
      spans.append((value_end - _KEY_LENGTH, value_end))
      end -= len(line)
    return text.encode("ascii"), spans[::-1]

  def num_documents(self, split):
    sources.check_split(self.name, split)
    return len(self._texts[split])

  def read(self, split, index):
    texts = tf.constant(self._texts[split], tf.string)
    answers = tf.constant(self._answers[split], tf.string)
    return {"text": tf.gather(texts, index),
            "document_id": f"synthetic/{split}/" + tf.strings.as_string(index),
            sources.ANSWERS: tf.gather(answers, index)}


def _byte_mask(length: int, spans: List[Tuple[int, int]]) -> bytes:
  """`length` bytes, 1 inside the spans and 0 elsewhere."""
  mask = bytearray(length)
  for start, end in spans:
    mask[start:end] = b"\x01" * (end - start)
  return bytes(mask)
