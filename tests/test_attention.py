"""Windowed attention against plain masked attention over the whole sequence (invariant 1)."""

import numpy as np
import pytest
import tensorflow as tf

from meliad_tf.layers import attention
from meliad_tf.layers import positions


def naive_softmax_rows(logits):
  """Meliad's safe softmax written out per row in float64."""
  m = np.maximum(logits.max(axis=-1, keepdims=True), -1000.0)
  e = np.exp(logits - m)
  return e / (e.sum(axis=-1, keepdims=True) + np.exp(-1000.0 - m))


def naive_band_attention(q, k, v, window, bias_table=None, scale=None):
  """Whole-sequence attention: query i (at absolute position i + W) sees keys at distance 1..W.

  q: [B, N, H, d]; k, v: [B, W + N, H, d] (the first W rows are the cache).
  bias_table: [H, 32] T5 table indexed by the bucket of the distance.
  """
  batch, length, heads, _ = q.shape
  out = np.zeros(q.shape)
  for b in range(batch):
    for h in range(heads):
      for i in range(length):
        query_position = i + window
        logits = np.full(k.shape[1], -1e6)
        for j in range(k.shape[1]):
          distance = query_position - j
          if 1 <= distance <= window:
            logit = q[b, i, h] @ k[b, j, h]
            if bias_table is not None:
              logit += bias_table[h, positions.t5_relative_bucket(-distance)]
            if scale is not None:
              logit *= scale[h]
            logits[j] = logit
        p = naive_softmax_rows(logits[None])[0]
        out[b, i, h] = p @ v[b, :, h]
  return out


def t5_bias(table):
  """position_bias for the attention functions from a T5 table [H, 32]."""
  return lambda nq, nk: tf.gather(
      table, positions.t5_relative_bucket(positions.relative_positions(nq, nk)), axis=1)


# (window, windows per segment, block length): 0, or a block as long as the window, is window
# by window against 2W keys; shorter blocks attend to bands of W + b keys.
WINDOW_CASES = [(4, 3, 0), (8, 2, 0), (16, 1, 0), (4, 3, 4), (4, 3, 2), (8, 2, 2),
                (16, 1, 4), (16, 1, 16)]


@pytest.mark.parametrize("window,num_windows,block_length", WINDOW_CASES)
def test_windowed_attention_equals_band_masked_attention(window, num_windows, block_length):
  rng = np.random.default_rng(0)
  batch, heads, size = 2, 3, 5
  length = window * num_windows
  q = rng.normal(size=(batch, length, heads, size)).astype(np.float32)
  k = rng.normal(size=(batch, window + length, heads, size)).astype(np.float32)
  v = rng.normal(size=(batch, window + length, heads, size)).astype(np.float32)
  table = rng.normal(size=(heads, 32)).astype(np.float32)
  scale = rng.uniform(0.5, 2.0, size=heads).astype(np.float32)
  got = attention.sliding_window_attention(
      q, k[:, window:], v[:, window:], k[:, :window], v[:, :window], window,
      position_bias=t5_bias(table), scale=scale, block_length=block_length)
  want = naive_band_attention(q.astype(np.float64), k.astype(np.float64),
                              v.astype(np.float64), window, table, scale)
  np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)


def test_token_never_attends_to_itself():
  # Values are one-hot in the token's own position: any weight on itself would show.
  window = 4
  length = 8
  q = tf.zeros([1, length, 1, 2])
  k = tf.zeros([1, length, 1, 2])
  v = tf.eye(length)[None, :, None, :]
  cache = tf.zeros([1, window, 1, length])
  out = attention.sliding_window_attention(q, k, v, tf.zeros([1, window, 1, 2]), cache, window)
  np.testing.assert_allclose(np.diagonal(out[0, :, 0].numpy()), 0.0)


def test_zero_cache_is_attended_to_not_masked():
  # With equal logits everywhere, token 0 spreads weight over the W cache slots; the
  # cache values are zero, so a token-1 output shows 1/W of token 0's value.
  window = 4
  q = tf.zeros([1, window, 1, 1])
  k = tf.zeros([1, window, 1, 1])
  v = tf.ones([1, window, 1, 1])
  out = attention.sliding_window_attention(q, k, v, tf.zeros([1, window, 1, 1]),
                                           tf.zeros([1, window, 1, 1]), window)
  np.testing.assert_allclose(out[0, :, 0, 0].numpy(), np.arange(window) / window, atol=1e-6)


def test_without_cache_first_token_gets_zero_output():
  q = tf.random.normal([1, 6, 2, 3])
  k = tf.random.normal([1, 6, 2, 3])
  v = tf.random.normal([1, 6, 2, 3])
  out = attention.causal_attention(q, k, v)
  np.testing.assert_allclose(out[0, 0].numpy(), 0.0, atol=1e-30)
  for i in range(1, 6):
    logits = np.einsum("hd,jhd->hj", q.numpy()[0, i], k.numpy()[0, :i])
    p = naive_softmax_rows(logits)
    np.testing.assert_allclose(out[0, i].numpy(), np.einsum("hj,jhd->hd", p, v.numpy()[0, :i]),
                               rtol=1e-5, atol=1e-6)


def test_safe_softmax_of_fully_masked_row_is_zero():
  x = tf.constant([[-1e6, -1e6, -1e6], [1.0, 2.0, 3.0]])
  p = attention.safe_softmax(x).numpy()
  np.testing.assert_allclose(p[0], 0.0, atol=1e-30)
  np.testing.assert_allclose(p[1], tf.nn.softmax(x[1]).numpy(), rtol=1e-6)


def test_dropout_multiplier_scales_probabilities_without_renormalising():
  q = tf.random.normal([1, 4, 1, 2])
  k = tf.random.normal([1, 4, 1, 2])
  v = tf.random.normal([1, 4, 1, 2])
  cache = tf.random.normal([1, 4, 1, 2])
  multiplier = tf.cast(tf.random.uniform([1, 4, 8]) < 0.5, tf.float32) * 2.0
  got = attention.sliding_window_attention(q, k, v, cache, cache, 4,
                                           dropout_multiplier=multiplier)
  logits = tf.einsum("qhd,khd->hqk", q[0], tf.concat([cache[0], k[0]], 0))
  mask = attention.sliding_window_mask(4, 8, 4)
  p = attention.safe_softmax(tf.where(mask, logits, -1e6)) * multiplier
  want = tf.einsum("hqk,khd->qhd", p, tf.concat([cache[0], v[0]], 0))
  np.testing.assert_allclose(got[0].numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_l2_normalize_puts_epsilon_inside_the_root():
  x = tf.constant([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(attention.l2_normalize(x).numpy(),
                             [[3 / np.sqrt(25 + 1e-6), 4 / np.sqrt(25 + 1e-6)], [0, 0]],
                             rtol=1e-6)


def whole_sequence_attention(q, k, v, window, position_bias, scale, dropout_multiplier):
  """Independent reference: one band-masked attention over cache + segment, by autodiff.

  q: [B, N, H, d]; k, v: [B, W + N, H, d] (the cache first). The per-window dropout mask
  [H, W, 2W] is laid out over the whole [H, N, W + N] score matrix: query i of window t sees
  key j of the segment with cache as key j - t W of its window's 2W keys.
  """
  length = q.shape[1]
  whole = None
  if dropout_multiplier is not None:
    per_window = np.asarray(dropout_multiplier)
    whole = np.ones([per_window.shape[0], length, window + length], np.float32)
    for i in range(length):
      t, r = divmod(i, window)
      whole[:, i, t * window:t * window + 2 * window] = per_window[:, r]
  return attention.simple_attention(
      k, v, q, bias=position_bias(length, window + length), scale=scale,
      mask=attention.sliding_window_mask(length, window + length, window),
      dropout_multiplier=whole)


@pytest.mark.parametrize("window,num_windows,block_length", WINDOW_CASES)
def test_windowed_attention_gradients_equal_whole_sequence_gradients(window, num_windows,
                                                                      block_length):
  rng = np.random.default_rng(1)
  batch, heads, size = 2, 2, 4
  length = window * num_windows
  q = tf.constant(rng.normal(size=(batch, length, heads, size)), tf.float32)
  k = tf.constant(rng.normal(size=(batch, window + length, heads, size)), tf.float32)
  v = tf.constant(rng.normal(size=(batch, window + length, heads, size)), tf.float32)
  table = tf.Variable(rng.normal(size=(heads, 32)), dtype=tf.float32)
  scale = tf.Variable(rng.uniform(0.5, 2.0, size=heads), dtype=tf.float32)
  dropout = tf.constant((rng.uniform(size=(heads, window, 2 * window)) < 0.8) / 0.8,
                        tf.float32)
  upstream = tf.constant(rng.normal(size=(batch, length, heads, size)), tf.float32)

  def gradients(fn):
    with tf.GradientTape() as tape:
      tape.watch([q, k, v])
      loss = tf.reduce_sum(fn() * upstream)
    return tape.gradient(loss, [q, k, v, table, scale])

  got = gradients(lambda: attention.sliding_window_attention(
      q, k[:, window:], v[:, window:], k[:, :window], v[:, :window], window,
      position_bias=t5_bias(table), scale=scale, dropout_multiplier=dropout,
      block_length=block_length))
  want = gradients(lambda: whole_sequence_attention(q, k, v, window, t5_bias(table), scale,
                                                    dropout))
  for name, g, w in zip(["queries", "keys", "values", "bias table", "scale"], got, want):
    np.testing.assert_allclose(tf.convert_to_tensor(g).numpy(),
                               tf.convert_to_tensor(w).numpy(), rtol=2e-4, atol=2e-5,
                               err_msg=name)


def test_blocked_attention_under_xla_equals_window_by_window():
  rng = np.random.default_rng(2)
  q, k, v = (tf.constant(rng.normal(size=(1, 16, 2, 4)), tf.float32) for _ in range(3))
  cache_k, cache_v = (tf.constant(rng.normal(size=(1, 8, 2, 4)), tf.float32) for _ in range(2))
  scale = tf.constant([1.5, 0.7])

  def run(block_length):
    fn = tf.function(lambda q, k, v: attention.sliding_window_attention(
        q, k, v, cache_k, cache_v, 8, scale=scale, block_length=block_length),
                     jit_compile=True)
    return fn(q, k, v).numpy()

  np.testing.assert_allclose(run(4), run(0), rtol=1e-5, atol=1e-6)


def test_rotary_blocked_attention_equals_window_by_window():
  rng = np.random.default_rng(3)
  q, k, v = (tf.constant(rng.normal(size=(2, 16, 2, 8)), tf.float32) for _ in range(3))
  cache_k, cache_v = (tf.constant(rng.normal(size=(2, 8, 2, 8)), tf.float32) for _ in range(2))
  run = lambda block_length: attention.sliding_window_attention(
      q, k, v, cache_k, cache_v, 8, rotary_wavelength=10000, block_length=block_length)
  np.testing.assert_allclose(run(4).numpy(), run(0).numpy(), rtol=1e-4, atol=1e-5)


def test_heads_first_attention_and_its_gradients_equal_op_by_op_attention():
  # Every optional input at once, and a fully masked first row (the safe softmax's zeros).
  rng = np.random.default_rng(4)
  q, k, v = (tf.constant(rng.normal(size=(2, 6, 3, 4)), tf.float32) for _ in range(3))
  bias = tf.Variable(rng.normal(size=(3, 6, 6)), dtype=tf.float32)
  scale = tf.Variable([0.5, 1.0, 2.0])
  dropout = tf.constant((rng.uniform(size=(3, 6, 6)) < 0.7) / 0.7, tf.float32)
  mask = attention.sliding_window_mask(6, 6, 6)
  heads_first = lambda x: tf.transpose(x, [0, 2, 1, 3])

  def run(fn):
    with tf.GradientTape() as tape:
      tape.watch([q, k, v])
      out = fn()
      loss = tf.reduce_sum(out * tf.range(1.0, 5.0))
    return [out] + tape.gradient(loss, [q, k, v, bias, scale])

  got = run(lambda: heads_first(attention.attend_heads_first(
      heads_first(q), heads_first(k), heads_first(v), bias=bias, scale=scale, mask=mask,
      dropout_multiplier=dropout)))
  want = run(lambda: attention.simple_attention(k, v, q, bias=bias, scale=scale, mask=mask,
                                                dropout_multiplier=dropout))
  for g, w in zip(got, want):
    np.testing.assert_allclose(tf.convert_to_tensor(g).numpy(),
                               tf.convert_to_tensor(w).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window,target,expected", [(256, 128, 128), (512, 128, 128),
                                                    (96, 128, 96), (100, 64, 50), (7, 4, 1)])
def test_block_length_is_the_longest_divisor_of_the_window_up_to_the_target(window, target,
                                                                             expected):
  assert attention.block_length_for(window, target) == expected
