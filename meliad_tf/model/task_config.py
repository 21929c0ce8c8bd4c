"""What the model is trained on: dataset, splits, segment length, streams, vocabulary size."""

import dataclasses

import gin


@gin.configurable(module="decoder_stack")
@dataclasses.dataclass(frozen=True)
class TransformerTaskConfig:
  """The task as Meliad's gin files describe it.

  Attributes:
    dataset_name: a task name known to `pipelines.get_task` (e.g. "python_stdlib_bytes", "pg19_tokens").
    train_split: split read by training steps.
    test_split: split read by test steps.
    sequence_length: L, tokens per segment (per step and stream).
    batch_size: B, streams per replica.
    vocab_size: rows of the embedding table; the task's vocabulary must not be larger.
    sequential_chunks: Meliad's switch between documents read in order, segment after
      segment (True, its default and the only mode here), and a shuffle of independent
      one-segment chunks (False, refused: the pipelines always read documents in order).
  """
  dataset_name: str = "synthetic"
  train_split: str = "train"
  test_split: str = "test"
  sequence_length: int = 512
  batch_size: int = 8
  vocab_size: int = 256
  sequential_chunks: bool = True

  def __post_init__(self):
    if self.sequential_chunks is not True:
      raise ValueError(
          f"TransformerTaskConfig.sequential_chunks = {self.sequential_chunks!r} is not "
          "supported: documents are always read in order, segment after segment (Meliad's "
          "default, True); Meliad's False shuffles one-segment chunks, each a document of "
          "its own")
    for field in ("sequence_length", "batch_size", "vocab_size"):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"TransformerTaskConfig.{field} must be a positive integer, got {value!r}")
