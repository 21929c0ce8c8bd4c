"""The decoder-only language model: next-token targets, the summed loss, and metric sums."""

import math

import gin
import tensorflow as tf

from meliad_tf.model import decoder as decoder_lib


LOG2_E = 1.4426950408889634
# Metrics under this prefix are per-step values that layers report (averaged over steps
# and over replicas, not summed like counts).
DIAGNOSTICS_PREFIX = "diagnostics/"


def shift_targets(tokens):
  """Targets are the inputs shifted left inside the segment; the last position gets 0."""
  return tf.concat([tokens[:, 1:], tf.zeros_like(tokens[:, :1])], axis=1)


def prediction_mask(input_tokens, target_tokens, loss_mask=None):
  """Positions that count: input and target both non-padding, and inside the loss mask."""
  mask = (input_tokens > 0) & (target_tokens > 0)
  if loss_mask is not None:
    mask &= loss_mask
  return mask


@gin.configurable(module="models")
class DecoderOnlyLanguageModel(tf.Module):
  """Scores a batch of segments; returns metric *sums* so that they add across replicas.

  Args:
    task_config: a TransformerTaskConfig.
    decoder_factory: builds the decoder stack (gin: DecoderStack).
    sample_method: "sample" or "greedy", for generation.
    output_token_losses: also return the per-token losses [B, L].
  """

  def __init__(self, task_config, decoder_factory=decoder_lib.DecoderStack,
               sample_method="sample", output_token_losses=False, name="model"):
    super().__init__(name=name)
    if sample_method not in ("sample", "greedy"):
      raise ValueError(f"DecoderOnlyLanguageModel.sample_method must be 'sample' or 'greedy', "
                       f"got {sample_method!r}")
    self.task_config = task_config
    self.sample_method = sample_method
    self.output_token_losses = output_token_losses
    with self.name_scope:
      self.decoder = decoder_factory(task_config=task_config)

  @property
  def vocab_size(self):
    return self.task_config.vocab_size

  def state_spec(self, batch_size):
    return self.decoder.state_spec(batch_size)

  def initial_state(self, batch_size):
    return tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype),
                                 self.state_spec(batch_size))

  def __call__(self, batch, state, *, training=False, seed=None):
    """Runs one segment per stream.

    Args:
      batch: dict with `targets` int32 [B, L], `start_of_sequence` bool [B], and
        optionally `loss_mask` bool [B, L], `num_chars` int32 [B] and `answer_mask` bool
        [B, L] (positions whose target is an answer token, see `pipelines.streams`).
      state: the per-stream state (see `state_spec`).
      training: enables dropout.
      seed: [2] int dropout seed for this step.
    Returns:
      (loss, metrics, new_state): `loss` is the float32 SUM of the token losses (Meliad's
      objective); `metrics` holds sums: loss, token_count, correct, num_chars, with
      `answer_mask` the same over the answer tokens (answer_loss, answer_token_count,
      answer_correct), and
      optionally token_losses [B, L] with token_predictions int32 [B, L] (the argmax of
      the next-token distribution at every position, for export and generation tests);
      plus the layers' per-step diagnostics (e.g. a recurrent layer's gate means) under
      DIAGNOSTICS_PREFIX + "layer_<i>/<name>".
    """
    tokens = tf.math.floormod(tf.cast(batch["targets"], tf.int32), self.vocab_size)
    targets = shift_targets(tokens)
    diagnostics = {}
    logits, new_state = self.decoder(tokens, batch["start_of_sequence"], state,
                                     training=training, seed=seed, diagnostics=diagnostics)
    with tf.name_scope("loss"):
      mask = prediction_mask(tokens, targets, batch.get("loss_mask"))
      weights = tf.cast(mask, tf.float32)
      token_losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets,
                                                                    logits=logits) * weights
      loss = tf.reduce_sum(token_losses)
      predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
      correct = tf.cast(tf.equal(predictions, targets), tf.float32) * weights
    metrics = {
        "loss": loss,
        "token_count": tf.reduce_sum(weights),
        "correct": tf.reduce_sum(correct),
    }
    if "num_chars" in batch:
      metrics["num_chars"] = tf.cast(tf.reduce_sum(batch["num_chars"]), tf.float32)
    if "answer_mask" in batch:
      answers = tf.cast(batch["answer_mask"], tf.float32)  # token_losses and correct hold weights
      metrics["answer_loss"] = tf.reduce_sum(token_losses * answers)
      metrics["answer_token_count"] = tf.reduce_sum(weights * answers)
      metrics["answer_correct"] = tf.reduce_sum(correct * answers)
    for name, value in diagnostics.items():
      metrics[DIAGNOSTICS_PREFIX + name] = value
    if self.output_token_losses:
      metrics["token_losses"] = token_losses
      metrics["token_predictions"] = predictions
    return loss, metrics, new_state


def summarize(sums, num_steps=1):
  """Meliad's metrics from counts summed over `num_steps` steps (numpy or Python numbers).

  Returns loss (as Meliad reports it: the mean over the steps of each step's summed loss),
  nats/bits per token, bits per byte (if num_chars), accuracy, perplexity, and the
  diagnostics averaged over the steps. With answer counts (batches of a source that marks
  answers), also answer_token_count, answer_bits_per_token, answer_accuracy and
  non_answer_bits_per_token (every other token). Empty counts give zeros rather than NaN,
  with Meliad's 1e-6 guard.
  """
  tokens = float(sums["token_count"])
  loss = float(sums["loss"])
  nats = loss / (tokens + 1e-6)
  result = {
      "loss": loss / max(num_steps, 1),
      "token_count": tokens,
      "nats_per_token": nats,
      "bits_per_token": nats * LOG2_E,
      "accuracy": float(sums["correct"]) / (tokens + 1e-6),
      "perplexity": math.exp(nats),
  }
  if "num_chars" in sums:
    result["num_chars"] = float(sums["num_chars"])
    result["bits_per_char"] = loss / (float(sums["num_chars"]) + 1e-6) * LOG2_E
  if "answer_token_count" in sums:
    answer_tokens = float(sums["answer_token_count"])
    answer_loss = float(sums["answer_loss"])
    result["answer_token_count"] = answer_tokens
    result["answer_bits_per_token"] = answer_loss / (answer_tokens + 1e-6) * LOG2_E
    result["answer_accuracy"] = float(sums["answer_correct"]) / (answer_tokens + 1e-6)
    result["non_answer_bits_per_token"] = (
        (loss - answer_loss) / (tokens - answer_tokens + 1e-6) * LOG2_E)
  for key, value in sums.items():
    if key.startswith(DIAGNOSTICS_PREFIX):
      result[key] = float(value) / max(num_steps, 1)
  return result
