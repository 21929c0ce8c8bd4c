"""Windowed attention against plain masked attention over the whole sequence (invariant 1)."""

import numpy as np
import pytest
import tensorflow as tf

from meliad_tf import attention
from meliad_tf import positions


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


@pytest.mark.parametrize("window,num_windows", [(4, 3), (8, 2), (16, 1)])
def test_windowed_attention_equals_band_masked_attention(window, num_windows):
  rng = np.random.default_rng(0)
  batch, heads, size = 2, 3, 5
  length = window * num_windows
  q = rng.normal(size=(batch, length, heads, size)).astype(np.float32)
  k = rng.normal(size=(batch, window + length, heads, size)).astype(np.float32)
  v = rng.normal(size=(batch, window + length, heads, size)).astype(np.float32)
  table = rng.normal(size=(heads, 32)).astype(np.float32)
  scale = rng.uniform(0.5, 2.0, size=heads).astype(np.float32)
  bias = tf.gather(table, positions.t5_relative_bucket(
      positions.relative_positions(window, 2 * window)), axis=1)
  got = attention.sliding_window_attention(
      q, k[:, window:], v[:, window:], k[:, :window], v[:, :window], window,
      bias=bias, scale=scale)
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
