"""The decoder stack and the language model: caches across segments, resets, loss."""

import numpy as np
import pytest
import tensorflow as tf

from meliad_tf.model import decoder
from meliad_tf.model import language_model as model
from meliad_tf.model import layer
from meliad_tf.model import task_config as task_config_lib


def tiny_model(position_type="t5", window=4, sequence_length=8, batch_size=2, vocab_size=50,
               use_xl=True, seed=0, attention_block_length=0, fuse_projections=True,
               dropout_rate=0.0, **stack_kwargs):
  tf.random.set_seed(seed)
  config = task_config_lib.TransformerTaskConfig(
      sequence_length=sequence_length, batch_size=batch_size, vocab_size=vocab_size)

  def layer_factory(**kwargs):
    return layer.TransformerLayer(num_heads=2, head_size=8, window_length=window,
                                  use_long_xl_architecture=use_xl,
                                  relative_position_type=position_type,
                                  attention_block_length=attention_block_length,
                                  attn_dropout_rate=dropout_rate, **kwargs)

  def decoder_factory(task_config):
    return decoder.DecoderStack(task_config, num_layers=2, embedding_size=16,
                                layer_factory=layer_factory, **stack_kwargs)

  lm = model.DecoderOnlyLanguageModel(config, decoder_factory=decoder_factory)
  for each in lm.decoder.layers:
    each.tbase.fuse_projections = fuse_projections
  return lm


def run_segments(lm, tokens, segment_length, first_start=True):
  state = lm.initial_state(tokens.shape[0])
  logits = []
  for s in range(tokens.shape[1] // segment_length):
    segment = tokens[:, s * segment_length:(s + 1) * segment_length]
    start = tf.fill([tokens.shape[0]], first_start and s == 0)
    out, state = lm.decoder(segment, start, state)
    logits.append(out)
  return tf.concat(logits, axis=1), state


@pytest.mark.parametrize("block_length", [0, 2])
@pytest.mark.parametrize("position_type", ["t5", "fourier", "rotary", None])
def test_cached_segments_equal_one_long_segment(position_type, block_length):
  lm = tiny_model(position_type, attention_block_length=block_length)
  tokens = tf.random.uniform([2, 32], 1, 50, tf.int32, seed=1)
  by_segment, _ = run_segments(lm, tokens, 8)
  whole, _ = lm.decoder(tokens, tf.fill([2], True), lm.initial_state(2))
  np.testing.assert_allclose(by_segment.numpy(), whole.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("position_type", ["t5", "rotary"])
def test_optimised_paths_give_the_reference_loss_and_gradients(position_type):
  # Banded attention with its written-out gradient and the fused projections against window
  # by window attention and one product per kernel, dropout included.
  batch = {"targets": tf.random.uniform([2, 8], 1, 50, tf.int32, seed=3),
           "start_of_sequence": tf.constant([True, False])}

  def loss_and_gradients(**options):
    lm = tiny_model(position_type, dropout_rate=0.2, **options)
    state = tf.nest.map_structure(lambda x: x + 0.1, lm.initial_state(2))
    with tf.GradientTape() as tape:
      loss, _, new_state = lm(batch, state, training=True, seed=tf.constant([5, 6], tf.int64))
    return [loss] + list(tape.gradient(loss, lm.trainable_variables)) + tf.nest.flatten(new_state)

  got = loss_and_gradients(attention_block_length=2, fuse_projections=True)
  want = loss_and_gradients(attention_block_length=0, fuse_projections=False)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_allclose(tf.convert_to_tensor(g).numpy(),
                               tf.convert_to_tensor(w).numpy(), rtol=1e-4, atol=1e-5)


def test_start_of_sequence_resets_only_its_stream():
  lm = tiny_model()
  tokens = tf.random.uniform([2, 16], 1, 50, tf.int32, seed=2)
  _, state = lm.decoder(tokens[:, :8], tf.fill([2], True), lm.initial_state(2))
  mixed, _ = lm.decoder(tokens[:, 8:], tf.constant([True, False]), state)
  fresh, _ = lm.decoder(tokens[:, 8:], tf.fill([2], True), lm.initial_state(2))
  continued, _ = lm.decoder(tokens[:, 8:], tf.fill([2], False), state)
  np.testing.assert_allclose(mixed[0].numpy(), fresh[0].numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mixed[1].numpy(), continued[1].numpy(), rtol=1e-5, atol=1e-6)
  assert not np.allclose(fresh[1].numpy(), continued[1].numpy())


def test_cache_holds_the_last_window_of_keys():
  lm = tiny_model()
  tokens = tf.random.uniform([2, 8], 1, 50, tf.int32, seed=3)
  _, state = lm.decoder(tokens, tf.fill([2], True), lm.initial_state(2))
  first = lm.decoder.layers[0]
  x = tf.gather(lm.decoder.embedding, tokens)
  keys, values, _, _ = first.tbase.kvq(x)
  np.testing.assert_allclose(state["layer_0"]["keys"].numpy(), keys[:, -4:].numpy(), rtol=1e-6)
  np.testing.assert_allclose(state["layer_0"]["values"].numpy(), values[:, -4:].numpy(),
                             rtol=1e-6)


def test_no_cache_model_sees_only_its_segment():
  lm = tiny_model(window=8, use_xl=False)
  assert lm.state_spec(2) == {}
  tokens = tf.random.uniform([2, 16], 1, 50, tf.int32, seed=4)
  first, _ = lm.decoder(tokens[:, 8:], tf.fill([2], False), {})
  second, _ = lm.decoder(tokens[:, 8:], tf.fill([2], True), {})
  np.testing.assert_allclose(first.numpy(), second.numpy())


def test_loss_is_the_sum_of_masked_next_token_cross_entropies():
  lm = tiny_model()
  targets = np.array([[5, 6, 7, 8, 9, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
  loss_mask = np.ones([2, 8], bool)
  loss_mask[1, 2] = False
  batch = {"targets": tf.constant(targets), "start_of_sequence": tf.constant([True, True]),
           "loss_mask": tf.constant(loss_mask), "num_chars": tf.constant([4, 6])}
  loss, metrics, _ = lm(batch, lm.initial_state(2))
  logits, _ = lm.decoder(tf.constant(targets), tf.constant([True, True]), lm.initial_state(2))
  logp = tf.nn.log_softmax(logits).numpy().astype(np.float64)
  want, count, correct = 0.0, 0, 0
  for b in range(2):
    for t in range(7):
      inp, tgt = targets[b, t], targets[b, t + 1]
      if inp > 0 and tgt > 0 and loss_mask[b, t]:
        want -= logp[b, t, tgt]
        count += 1
        correct += int(np.argmax(logp[b, t]) == tgt)
  np.testing.assert_allclose(loss.numpy(), want, rtol=1e-5)
  assert metrics["token_count"].numpy() == count == 4 + 6
  assert metrics["correct"].numpy() == correct
  summary = model.summarize({k: v.numpy() for k, v in metrics.items()})
  np.testing.assert_allclose(summary["bits_per_token"], want / count / np.log(2), rtol=1e-5)
  np.testing.assert_allclose(summary["bits_per_char"], want / 10 / np.log(2), rtol=1e-5)
  np.testing.assert_allclose(summary["perplexity"], np.exp(want / count), rtol=1e-5)


def test_answer_tokens_are_summed_apart_from_the_rest():
  lm = tiny_model()
  targets = np.array([[5, 6, 7, 8, 9, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
  loss_mask = np.ones([2, 8], bool)
  loss_mask[1, 2] = False
  answer_mask = np.zeros([2, 8], bool)
  answer_mask[0, [1, 2, 6]] = True  # position 6 predicts padding: not counted
  answer_mask[1, [2, 3, 7]] = True  # 2 is outside the loss mask, 7 predicts nothing
  batch = {"targets": tf.constant(targets), "start_of_sequence": tf.constant([True, True]),
           "loss_mask": tf.constant(loss_mask), "answer_mask": tf.constant(answer_mask)}
  loss, metrics, _ = lm(batch, lm.initial_state(2))
  logits, _ = lm.decoder(tf.constant(targets), tf.constant([True, True]), lm.initial_state(2))
  logp = tf.nn.log_softmax(logits).numpy().astype(np.float64)
  answer_loss, answer_count, answer_correct = 0.0, 0, 0
  for b, t in ((0, 1), (0, 2), (1, 3)):
    answer_loss -= logp[b, t, targets[b, t + 1]]
    answer_count += 1
    answer_correct += int(np.argmax(logp[b, t]) == targets[b, t + 1])
  np.testing.assert_allclose(metrics["answer_loss"].numpy(), answer_loss, rtol=1e-5)
  assert metrics["answer_token_count"].numpy() == answer_count
  assert metrics["answer_correct"].numpy() == answer_correct
  summary = model.summarize({k: v.numpy() for k, v in metrics.items()})
  np.testing.assert_allclose(summary["answer_bits_per_token"],
                             answer_loss / answer_count / np.log(2), rtol=1e-5)
  count = metrics["token_count"].numpy()
  np.testing.assert_allclose(summary["non_answer_bits_per_token"],
                             (loss.numpy() - answer_loss) / (count - answer_count) / np.log(2),
                             rtol=1e-5)
  without = model.summarize({k: v.numpy() for k, v in metrics.items()
                             if not k.startswith("answer_")})
  assert not any(key.startswith(("answer_", "non_answer_")) for key in without)


def test_logits_are_tied_embedding_products_divided_by_sqrt_vocab():
  lm = tiny_model(vocab_size=64)
  tokens = tf.random.uniform([2, 8], 1, 64, tf.int32, seed=5)
  logits, _ = lm.decoder(tokens, tf.fill([2], True), lm.initial_state(2))
  x = tf.gather(lm.decoder.embedding, tokens)
  for i, module in enumerate(lm.decoder.layers):
    x, _ = module(x, tf.fill([2], True), lm.initial_state(2)[f"layer_{i}"])
  x = lm.decoder.final_layernorm(x)
  want = x.numpy() @ lm.decoder.embedding.numpy().T / 8.0
  np.testing.assert_allclose(logits.numpy(), want, rtol=1e-5, atol=1e-6)


def test_window_must_divide_segment():
  with pytest.raises(ValueError, match="multiple of the window"):
    tiny_model(window=3, sequence_length=8)
  with pytest.raises(ValueError, match="XL"):
    tiny_model(window=4, sequence_length=8, use_xl=False)


def test_layer_indices_resolve_negative_and_reject_out_of_range():
  assert decoder.resolve_layer_indices((-4,), 12, "memory_layer_indices") == (8,)
  assert decoder.resolve_layer_indices((9, -5), 24, "recurrent_layer_indices") == (9, 19)
  with pytest.raises(ValueError, match="recurrent_layer_indices"):
    decoder.resolve_layer_indices((12,), 12, "recurrent_layer_indices")


def test_dropout_is_deterministic_per_seed_and_off_in_eval():
  lm = tiny_model(sequence_length=8)
  for module in lm.decoder.layers:
    module.tbase.dropout_rate = 0.5
  tokens = tf.random.uniform([2, 8], 1, 50, tf.int32, seed=6)
  batch = {"targets": tokens, "start_of_sequence": tf.fill([2], True)}
  state = lm.initial_state(2)
  a, _, _ = lm(batch, state, training=True, seed=tf.constant([1, 2]))
  b, _, _ = lm(batch, state, training=True, seed=tf.constant([1, 2]))
  c, _, _ = lm(batch, state, training=True, seed=tf.constant([1, 3]))
  e1, _, _ = lm(batch, state)
  e2, _, _ = lm(batch, state)
  assert a.numpy() == b.numpy()
  assert a.numpy() != c.numpy()
  assert e1.numpy() == e2.numpy()
