"""Meliad options that had no counterpart here: LayerNorm's variants, MLP.initializer_scale,
TransformerTaskConfig.sequential_chunks, and rotary positions with a memory."""

import numpy as np
import pytest
import tensorflow as tf

from meliad_tf.layers import memory as memory_lib
from meliad_tf.layers import mlp
from meliad_tf.layers import norms
from meliad_tf.layers import positions
from meliad_tf.model import layer as layer_lib
from meliad_tf.model import task_config


def _naive_layer_norm(x, scale, bias, use_mean, epsilon=1e-6):
  x = np.asarray(x, np.float64)
  if use_mean:
    x = x - x.mean(-1, keepdims=True)
  y = x / np.sqrt((x * x).mean(-1, keepdims=True) + epsilon)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y


@pytest.mark.parametrize("use_mean", [False, True])
def test_scalar_scale_and_bias_are_one_value_for_all_features(use_mean):
  norm = norms.LayerNorm(6, use_bias=True, use_mean=use_mean, use_scalar_scale_bias=True)
  assert norm.scale.shape == [1] and norm.bias.shape == [1]
  norm.scale.assign([1.7])
  norm.bias.assign([-0.3])
  x = np.random.default_rng(0).normal(size=(2, 3, 6)).astype(np.float32)
  np.testing.assert_allclose(norm(tf.constant(x)).numpy(),
                             _naive_layer_norm(x, 1.7, -0.3, use_mean), rtol=1e-5, atol=1e-6)


def test_per_feature_scale_and_bias():
  norm = norms.LayerNorm(4, use_bias=True)
  scale, bias = np.array([1.0, 2.0, 0.5, -1.0]), np.array([0.1, 0.0, -0.2, 0.3])
  norm.scale.assign(scale)
  norm.bias.assign(bias)
  x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
  np.testing.assert_allclose(norm(tf.constant(x)).numpy(),
                             _naive_layer_norm(x, scale, bias, False), rtol=1e-5, atol=1e-6)


def test_disabled_layernorm_is_the_identity_without_parameters():
  norm = norms.LayerNorm(5, use_bias=True, enable_layernorm=False)
  assert not norm.trainable_variables
  x = np.random.default_rng(2).normal(size=(2, 5)).astype(np.float32)
  np.testing.assert_array_equal(norm(tf.constant(x)).numpy(), x)


def test_initializer_scale_sets_the_kernels_variance_but_not_the_gates():
  tf.random.set_seed(0)
  # Variance scaling with fan in: the kernel's variance is scale / fan_in.
  for scale in (1.0, 0.25):
    ffn = mlp.MLP(400, 300, num_layers=2, num_hidden_units=500, gate_type="lstm",
                  initializer_scale=scale)
    np.testing.assert_allclose(np.std(ffn.hidden.kernel.numpy()), np.sqrt(scale / 400),
                               rtol=0.03)
    np.testing.assert_allclose(np.std(ffn.output_layer.kernel.numpy()), np.sqrt(scale / 500),
                               rtol=0.03)
    np.testing.assert_allclose(np.std(ffn.forget_gate.kernel.numpy()), np.sqrt(0.1 / 500),
                               rtol=0.03)
  with pytest.raises(ValueError, match="initializer_scale"):
    mlp.MLP(4, 4, num_layers=1, initializer_scale=0.0)


def test_sequential_chunks_true_is_accepted_and_false_refused():
  assert task_config.TransformerTaskConfig(sequential_chunks=True).sequential_chunks
  with pytest.raises(ValueError, match="sequential_chunks"):
    task_config.TransformerTaskConfig(sequential_chunks=False)


def test_rotary_memory_attention_uses_the_rotated_window_queries():
  """The memory's attention logits are q rotated by its position in its window, dotted with
  the stored (unrotated) keys, while the search ranks with the unrotated queries."""
  num_heads, head_size, window, length, size = 2, 4, 4, 8, 16
  memory = memory_lib.ExternalMemory(num_heads, head_size, head_size, size, backend="exact")
  layer = layer_lib.TransformerLayer(8, num_heads=num_heads, head_size=head_size,
                                     window_length=window, relative_position_type="rotary",
                                     memory=memory, memory_num_neighbors=2)
  rng = np.random.default_rng(3)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  stored_keys = unit(rng.normal(size=(1, num_heads, size, head_size))).astype(np.float32)
  stored_values = rng.normal(size=(1, num_heads, size, head_size)).astype(np.float32)
  state = {"keys": tf.constant(stored_keys), "values": tf.constant(stored_values),
           "index": tf.constant([size])}
  queries = unit(rng.normal(size=(1, length, num_heads, head_size))).astype(np.float32)
  local = np.zeros_like(queries)
  mixed, _ = layer._memory_attention(  # pylint: disable=protected-access
      tf.constant(local), tf.constant(queries), tf.constant(queries), tf.constant(queries),
      tf.constant([False]), state, False, None, rotary_wavelength=layer_lib.ROTARY_WAVELENGTH)

  # Naive: the exact top 2 by unrotated scores; softmax of rotated-query logits; gate 0.5.
  expected = np.zeros_like(queries)
  for t in range(length):
    rotated = positions.rotate_half_split(tf.constant(queries[:, t:t + 1]), [t % window],
                                          layer_lib.ROTARY_WAVELENGTH).numpy()[0, 0]
    for h in range(num_heads):
      scores = stored_keys[0, h] @ queries[0, t, h]
      top = np.argsort(-scores)[:2]
      logits = stored_keys[0, h, top] @ rotated[h]
      p = np.exp(logits - logits.max())
      p /= p.sum()
      expected[0, t, h] = 0.5 * (p @ stored_values[0, h, top])
  np.testing.assert_allclose(mixed.numpy(), expected, rtol=1e-5, atol=1e-6)
