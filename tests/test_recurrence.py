"""The Block-Recurrent Transformer.

The numerics are checked against `NaiveRecurrentLayer`, a numpy transcription of Meliad's
recurrent layer (the block-wise attention of tokens and states, the gates, the state update)
written here with plain loops over the windows.
"""

import functools

import gin
import numpy as np
import pytest
import tensorflow as tf

from meliad_tf.layers import recurrence
from meliad_tf.model import decoder
from meliad_tf.model import language_model as model_lib
from meliad_tf.model import layer as layer_lib
from meliad_tf.model import task_config as task_config_lib
from meliad_tf.training import gin_setup
from meliad_tf.training import trainer as trainer_lib


EMBED = 16
HEADS = 2
HEAD_SIZE = 8
WINDOW = 4
STATES = 3
VOCAB = 50

# (gate type, single gate, skip FFN) of each recurrent/*.gin file.
ARRANGEMENTS = {
    "bias_dual": ("bias", False, False),
    "bias_single": ("bias", True, False),
    "bias_skip": ("bias", False, True),
    "lstm_dual": ("lstm", False, False),
    "lstm_single": ("lstm", True, False),
    "lstm_skip": ("lstm", False, True),
}


@pytest.fixture(autouse=True)
def _clean_gin():
  # The layers here are gin-configurable: no binding of another test may leak in.
  gin.clear_config()
  yield
  gin.clear_config()


# ---------------------------------------------------------------------------------------
# A naive numpy transcription of the spec


def rms_norm(x, scale):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def l2_normalize(x):
  return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def naive_attention(queries, keys, values, scale, mask=None):
  """queries [B, nq, H, d], keys/values [B, nk, H, d]; Meliad's safe softmax."""
  batch, num_queries, heads, _ = queries.shape
  out = np.zeros(queries.shape)
  for b in range(batch):
    for h in range(heads):
      for i in range(num_queries):
        logits = keys[b, :, h] @ queries[b, i, h] * scale[h]
        if mask is not None:
          logits = np.where(mask[i], logits, -1e6)
        top = max(logits.max(), -1000.0)
        weights = np.exp(logits - top) / (np.exp(logits - top).sum() + np.exp(-1000.0 - top))
        out[b, i, h] = weights @ values[b, :, h]
  return out


def value(variable):
  return variable.numpy().astype(np.float64)


class NaiveRecurrentLayer:
  """Meliad's recurrent layer for one segment, evaluation mode, no position bias, XL cache on."""

  def __init__(self, layer, gate_type, single_gate, skip_ffn):
    self.layer = layer
    self.gate_type = gate_type
    self.single_gate = single_gate
    self.skip_ffn = skip_ffn
    self.heads, self.head_size = layer.num_heads, layer.head_size

  def split(self, x):
    return x.reshape(x.shape[:-1] + (self.heads, self.head_size))

  def kvq(self, tbase, x):
    h = rms_norm(x, value(tbase.pre_attn_layernorm.scale))
    if tbase.position_embeddings is not None:
      h = h + value(tbase.position_embeddings)  # after the norm, as in Meliad
    project = lambda dense: self.split(h @ value(dense.kernel))
    return (l2_normalize(project(tbase.keys_layer)), project(tbase.values_layer),
            l2_normalize(project(tbase.queries_layer)),
            l2_normalize(project(tbase.queries2_layer)))

  def gate(self, mlp, state, y, hidden):
    """The spec's "bias" and "lstm" gates; `hidden` is the MLP's last hidden activation."""
    if self.gate_type == "bias":
      keep = sigmoid(value(mlp.gate_bias))
      return state * keep + y * (1.0 - keep)
    forget = sigmoid(hidden @ value(mlp.forget_gate.kernel) + value(mlp.forget_gate.bias) + 1)
    write = sigmoid(hidden @ value(mlp.input_gate.kernel) + value(mlp.input_gate.bias) - 1)
    return state * forget + y * write

  def state_update(self, state, block_keys, block_values):
    tbase = self.layer.recurrent.recurrent_tbase
    rk, rv, rq, rq2 = self.kvq(tbase, state)
    r_self = naive_attention(rq, rk, rv, value(tbase.attention_scale))
    r_cross = naive_attention(rq2, block_keys, block_values, value(tbase.attention_scale2))
    a = np.concatenate([r_self, r_cross], axis=-2)
    a = a.reshape(a.shape[:-2] + (-1,))  # [B, S, 2 H d]
    if self.single_gate:
      hidden = np.maximum(a @ value(tbase.ffn.hidden.kernel), 0)
      return self.gate(tbase.ffn, state, np.tanh(hidden @ value(tbase.ffn.output_layer.kernel)),
                       hidden)
    c1 = self.gate(tbase.post_attn_mlp, state, a @ value(tbase.post_attn_mlp.output_layer.kernel),
                   a)
    if self.skip_ffn:
      return c1
    z = rms_norm(c1, value(tbase.pre_ffn_layernorm.scale))
    hidden = np.maximum(z @ value(tbase.ffn.hidden.kernel), 0)
    return self.gate(tbase.ffn, c1, hidden @ value(tbase.ffn.output_layer.kernel), hidden)

  def __call__(self, x, start_of_sequence, state):
    """Returns (outputs [B, N, E], the states entering each window, the final state)."""
    x = x.astype(np.float64)
    tbase = self.layer.tbase
    keys, values, queries, queries2 = self.kvq(tbase, x)
    reset = start_of_sequence[:, None, None, None]
    previous_keys = np.where(reset, 0.0, state["keys"])
    previous_values = np.where(reset, 0.0, state["values"])
    c = np.where(start_of_sequence[:, None, None],
                 value(self.layer.recurrent.recurrent_initial_state), state["recurrent"])
    w = WINDOW
    rel = np.arange(2 * w)[None, :] - (np.arange(w)[:, None] + w)
    band = (rel < 0) & (rel >= -w)
    outputs, entering = [], []
    for t in range(x.shape[1] // w):
      cur = slice(t * w, (t + 1) * w)
      block_keys = np.concatenate([previous_keys, keys[:, cur]], axis=1)
      block_values = np.concatenate([previous_values, values[:, cur]], axis=1)
      rk, rv, _, _ = self.kvq(self.layer.recurrent.recurrent_tbase, c)
      self_attn = naive_attention(queries[:, cur], block_keys, block_values,
                                  value(tbase.attention_scale), band)
      cross = naive_attention(queries2[:, cur], rk, rv, value(tbase.attention_scale2))
      heads = np.concatenate([self_attn, cross], axis=-2)
      y = x[:, cur] + heads.reshape(heads.shape[:-2] + (-1,)) @ value(
          tbase.post_attn_mlp.output_layer.kernel)
      hidden = np.maximum(rms_norm(y, value(tbase.pre_ffn_layernorm.scale))
                          @ value(tbase.ffn.hidden.kernel), 0)
      outputs.append(y + hidden @ value(tbase.ffn.output_layer.kernel))
      entering.append(c)
      c = self.state_update(c, block_keys, block_values)
      previous_keys, previous_values = keys[:, cur], values[:, cur]
    return np.concatenate(outputs, axis=1), entering, c


# ---------------------------------------------------------------------------------------
# Builders


def recurrent_layer(arrangement="bias_skip", position_type=None, seed=0, **kwargs):
  gate_type, single_gate, skip_ffn = ARRANGEMENTS[arrangement]
  tf.random.set_seed(seed)
  module = layer_lib.TransformerLayer(
      embedding_size=EMBED, num_heads=HEADS, head_size=HEAD_SIZE, window_length=WINDOW,
      relative_position_type=position_type, recurrent_num_states=STATES,
      recurrent_gate_type=gate_type, recurrent_single_gate=single_gate,
      recurrent_skip_ffn=skip_ffn, is_recurrent=True, **kwargs)
  scramble_fixed_initialisations(module)
  return module


def scramble_fixed_initialisations(module):
  """Norm and attention scales start at one; give each its own value so mix-ups show."""
  rng = np.random.default_rng(1)
  for variable in module.trainable_variables:
    if "scale" in variable.name:
      variable.assign(rng.uniform(0.5, 4.0, variable.shape).astype(np.float32))
    if "gate_bias" in variable.name:
      variable.assign(rng.normal(0.0, 1.0, variable.shape).astype(np.float32))


def random_state(module, batch_size, seed=3):
  return tf.nest.map_structure(
      lambda s: tf.random.stateless_normal(s.shape, seed=[seed, 4], dtype=s.dtype),
      module.state_spec(batch_size))


def language_model(recurrent_layer_indices=(1,), num_layers=2, feedback=False, window=WINDOW,
                   sequence_length=2 * WINDOW, batch_size=2, position_type="t5", seed=0,
                   arrangement="bias_skip", attention_block_length=WINDOW):
  gate_type, single_gate, skip_ffn = ARRANGEMENTS[arrangement]
  tf.random.set_seed(seed)
  config = task_config_lib.TransformerTaskConfig(sequence_length=sequence_length,
                                                 batch_size=batch_size, vocab_size=VOCAB)
  layer_factory = functools.partial(
      layer_lib.TransformerLayer, num_heads=HEADS, head_size=HEAD_SIZE, window_length=window,
      relative_position_type=position_type, recurrent_num_states=STATES,
      recurrent_gate_type=gate_type, recurrent_single_gate=single_gate,
      recurrent_skip_ffn=skip_ffn, attention_block_length=attention_block_length)
  decoder_factory = functools.partial(
      decoder.DecoderStack, num_layers=num_layers, embedding_size=EMBED,
      layer_factory=layer_factory, recurrent_layer_indices=recurrent_layer_indices,
      dstack_window_length=window if feedback else 0, feedback_recurrence=feedback)
  lm = model_lib.DecoderOnlyLanguageModel(config, decoder_factory=decoder_factory)
  scramble_fixed_initialisations(lm)
  return lm


@pytest.mark.parametrize("feedback", [False, True])
def test_written_out_attention_gradients_equal_tensorflow_s(feedback):
  # attention_block_length 0 differentiates every attention op by op; 2 computes the
  # sliding window in blocks and writes out the gradients of the cell's and cross attentions.
  tokens = tokens_of(2, 2 * WINDOW, seed=9)
  batch = {"targets": tokens, "start_of_sequence": tf.constant([True, False])}

  def loss_and_gradients(block_length):
    lm = language_model(feedback=feedback, attention_block_length=block_length)
    state = random_state(lm, 2)
    with tf.GradientTape() as tape:
      loss, _, new_state = lm(batch, state, training=False)
    return [loss] + list(tape.gradient(loss, lm.trainable_variables)) + tf.nest.flatten(
        new_state)

  got, want = loss_and_gradients(2), loss_and_gradients(0)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_allclose(tf.convert_to_tensor(g).numpy(),
                               tf.convert_to_tensor(w).numpy(), rtol=1e-4, atol=1e-5)


def tokens_of(batch_size, length, seed):
  return tf.random.stateless_uniform([batch_size, length], seed=[seed, 0], minval=1,
                                     maxval=VOCAB, dtype=tf.int32)


def run_segments(lm, tokens, segment_length):
  state = lm.initial_state(tokens.shape[0])
  logits = []
  for s in range(tokens.shape[1] // segment_length):
    segment = tokens[:, s * segment_length:(s + 1) * segment_length]
    out, state = lm.decoder(segment, tf.fill([tokens.shape[0]], s == 0), state)
    logits.append(out)
  return tf.concat(logits, axis=1), state


# ---------------------------------------------------------------------------------------
# The recurrent layer against the spec


@pytest.mark.parametrize("arrangement", sorted(ARRANGEMENTS))
def test_recurrent_layer_equals_naive_transcription(arrangement):
  module = recurrent_layer(arrangement)
  x = tf.random.stateless_normal([2, 3 * WINDOW, EMBED], seed=[1, 2])
  start = np.array([True, False])
  state = random_state(module, 2)
  y, new_state = module(x, tf.constant(start), state)
  naive = NaiveRecurrentLayer(module, *ARRANGEMENTS[arrangement])
  expected_y, _, expected_state = naive(x.numpy(), start,
                                        tf.nest.map_structure(np.asarray, state))
  np.testing.assert_allclose(y.numpy(), expected_y, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(new_state["recurrent"].numpy(), expected_state, rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize("arrangement", sorted(ARRANGEMENTS))
def test_cell_parameters_follow_the_arrangement(arrangement):
  gate_type, single_gate, skip_ffn = ARRANGEMENTS[arrangement]
  cell = recurrent_layer(arrangement).recurrent.recurrent_tbase
  assert cell.position_embeddings.shape == (STATES, EMBED)
  assert cell.queries2_layer is not None and cell.attention_scale2 is not None
  if single_gate:
    # No projection and no second norm: the FFN reads the 2 H d attention output.
    assert cell.post_attn_mlp is None and cell.pre_ffn_layernorm is None
    assert cell.ffn.hidden.kernel.shape[0] == 2 * HEADS * HEAD_SIZE
    gated = cell.ffn
  else:
    assert cell.post_attn_mlp.output_layer.kernel.shape == (2 * HEADS * HEAD_SIZE, EMBED)
    assert (cell.ffn is None) == skip_ffn
    gated = cell.post_attn_mlp
  assert gated.gate_type == gate_type


def test_single_gate_and_skip_ffn_are_refused_together():
  with pytest.raises(ValueError, match="single_gate and skip_ffn"):
    layer_lib.TransformerLayer(embedding_size=EMBED, num_heads=HEADS, head_size=HEAD_SIZE,
                               window_length=WINDOW, recurrent_num_states=STATES,
                               recurrent_single_gate=True, recurrent_skip_ffn=True,
                               is_recurrent=True)


def test_recurrent_layer_needs_states():
  with pytest.raises(ValueError, match="recurrent_num_states"):
    layer_lib.TransformerLayer(embedding_size=EMBED, num_heads=HEADS, head_size=HEAD_SIZE,
                               window_length=WINDOW, is_recurrent=True)


def test_initialisations_follow_the_spec():
  tf.random.set_seed(0)
  module = layer_lib.TransformerLayer(embedding_size=256, num_heads=HEADS, head_size=HEAD_SIZE,
                                      window_length=WINDOW, recurrent_num_states=64,
                                      recurrent_gate_type="lstm", is_recurrent=True)
  cell = module.recurrent
  assert np.std(cell.recurrent_initial_state.numpy()) == pytest.approx(0.1, rel=0.05)
  assert np.std(cell.recurrent_tbase.position_embeddings.numpy()) == pytest.approx(1.0, rel=0.05)
  gate = cell.recurrent_tbase.post_attn_mlp.forget_gate
  fan_in = 2 * HEADS * HEAD_SIZE
  assert np.std(gate.kernel.numpy()) == pytest.approx(np.sqrt(0.1 / fan_in), rel=0.1)
  assert np.std(gate.bias.numpy()) == pytest.approx(0.1, rel=0.3)


def test_state_at_a_document_start_is_the_learned_initial_state():
  module = recurrent_layer()
  x = tf.random.stateless_normal([2, 2 * WINDOW, EMBED], seed=[5, 6])
  start = tf.constant([True, True])
  y_random, state_random = module(x, start, random_state(module, 2, seed=7))
  y_zeros, state_zeros = module(x, start, random_state(module, 2, seed=8))
  np.testing.assert_allclose(y_random.numpy(), y_zeros.numpy(), rtol=1e-6)
  np.testing.assert_allclose(state_random["recurrent"].numpy(), state_zeros["recurrent"].numpy(),
                             rtol=1e-6)
  # The first block's update starts from the initial state itself.
  keys, values, _, _ = module.tbase.kvq(x)
  block_keys = tf.concat([tf.zeros_like(keys[:, :WINDOW]), keys[:, :WINDOW]], axis=1)
  block_values = tf.concat([tf.zeros_like(values[:, :WINDOW]), values[:, :WINDOW]], axis=1)
  naive = NaiveRecurrentLayer(module, *ARRANGEMENTS["bias_skip"])
  initial = np.broadcast_to(value(module.recurrent.recurrent_initial_state), (2, STATES, EMBED))
  after_first = naive.state_update(initial, block_keys.numpy(), block_values.numpy())
  _, state_one = module(x[:, :WINDOW], start, random_state(module, 2))
  np.testing.assert_allclose(state_one["recurrent"].numpy(), after_first, rtol=1e-4, atol=1e-5)


def test_gradient_reaches_the_initial_state_only_at_a_document_start():
  module = recurrent_layer()
  x = tf.random.stateless_normal([2, 2 * WINDOW, EMBED], seed=[5, 6])
  state = random_state(module, 2)
  initial = module.recurrent.recurrent_initial_state
  for start, reaches in (([True, False], True), ([False, False], False)):
    with tf.GradientTape() as tape:
      y, _ = module(x, tf.constant(start), state)
      loss = tf.reduce_sum(tf.square(y))
    grad = tape.gradient(loss, initial)
    assert (grad is not None and np.abs(grad.numpy()).max() > 0) == reaches


def test_gradients_flow_across_the_windows_of_a_segment():
  module = recurrent_layer()
  x = tf.random.stateless_normal([1, 3 * WINDOW, EMBED], seed=[5, 6])
  with tf.GradientTape() as tape:
    tape.watch(x)
    _, new_state = module(x, tf.constant([True]), random_state(module, 1))
    final = tf.reduce_sum(new_state["recurrent"])
  # The final state depends on the first window through two later updates.
  grad = tape.gradient(final, x)
  assert np.abs(grad.numpy()[:, :WINDOW]).max() > 0


def test_state_carries_information_beyond_the_window():
  tokens = tokens_of(1, 3 * WINDOW, seed=11)
  changed = tf.concat([tokens_of(1, WINDOW, seed=12), tokens[:, WINDOW:]], axis=1)
  for recurrent, depends in (((0,), True), ((), False)):
    lm = language_model(recurrent_layer_indices=recurrent, num_layers=1,
                        sequence_length=3 * WINDOW)
    logits, _ = lm.decoder(tokens, tf.constant([True]), lm.initial_state(1))
    logits_changed, _ = lm.decoder(changed, tf.constant([True]), lm.initial_state(1))
    # Window 2 sees window 1 directly; window 0 only through the state.
    differs = not np.allclose(logits[:, 2 * WINDOW:], logits_changed[:, 2 * WINDOW:], atol=1e-6)
    assert differs == depends


@pytest.mark.parametrize("feedback", [False, True])
def test_no_token_sees_its_own_block_through_the_state(feedback):
  """Causality: logits at position p do not depend on any token after p.

  If a block's tokens read the state *after* their block's update, position t*W would see
  tokens t*W+1 .. (t+1)*W-1 through it.
  """
  lm = language_model(recurrent_layer_indices=(0,), num_layers=2, feedback=feedback,
                      sequence_length=3 * WINDOW)
  tokens = tokens_of(1, 3 * WINDOW, seed=13)
  logits, _ = lm.decoder(tokens, tf.constant([True]), lm.initial_state(1))
  for p in (0, WINDOW, WINDOW + 1, 2 * WINDOW, 2 * WINDOW + 2):
    changed = tf.concat([tokens[:, :p + 1], tokens_of(1, 3 * WINDOW - p - 1, seed=14 + p)],
                        axis=1)
    logits_changed, _ = lm.decoder(changed, tf.constant([True]), lm.initial_state(1))
    np.testing.assert_allclose(logits_changed[:, :p + 1].numpy(), logits[:, :p + 1].numpy(),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits_changed[:, p + 1:], logits[:, p + 1:], atol=1e-6)


# ---------------------------------------------------------------------------------------
# Carrying the state across segments (invariant 4)


@pytest.mark.parametrize("feedback, position_type",
                         [(False, "t5"), (False, "rotary"), (True, "t5")])
def test_state_carried_across_segments_equals_one_long_segment(feedback, position_type):
  lm = language_model(recurrent_layer_indices=(0, 1), num_layers=3, feedback=feedback,
                      position_type=position_type)
  tokens = tokens_of(2, 6 * WINDOW, seed=21)
  by_segment, state_by_segment = run_segments(lm, tokens, 2 * WINDOW)
  whole, state_whole = lm.decoder(tokens, tf.fill([2], True), lm.initial_state(2))
  np.testing.assert_allclose(by_segment.numpy(), whole.numpy(), rtol=1e-4, atol=1e-5)
  tf.nest.map_structure(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                        state_by_segment, state_whole)


def test_no_gradient_into_the_previous_segment():
  lm = language_model(recurrent_layer_indices=(1,))
  state = {key: dict(value) for key, value in random_state(lm, 2).items()}
  recurrent = tf.Variable(state["layer_1"]["recurrent"])
  with tf.GradientTape() as tape:
    state["layer_1"]["recurrent"] = recurrent.read_value()
    logits, _ = lm.decoder(tokens_of(2, 2 * WINDOW, seed=1), tf.fill([2], False), state)
    loss = tf.reduce_sum(logits)
  assert tape.gradient(loss, recurrent) is None


# ---------------------------------------------------------------------------------------
# Block feedback and several recurrent layers


class RecordingLayer:
  """Wraps a layer and records what it is called with and returns, chunk by chunk."""

  def __init__(self, wrapped):
    self.wrapped = wrapped
    self.cross_attention = wrapped.cross_attention
    self.calls = []

  def __call__(self, x, start_of_sequence, state, **kwargs):
    y, new_state = self.wrapped(x, start_of_sequence, state, **kwargs)
    self.calls.append({"start": start_of_sequence.numpy(), "y": y.numpy(),
                       "cross_attention_kv": kwargs.get("cross_attention_kv")})
    return y, new_state

  def state_spec(self, batch_size):
    return self.wrapped.state_spec(batch_size)


def test_block_feedback_gives_other_layers_a_second_query_and_cross_heads():
  lm = language_model(recurrent_layer_indices=(1,), num_layers=3, feedback=True)
  width = 2 * HEADS * HEAD_SIZE
  for i, module in enumerate(lm.decoder.layers):
    assert module.tbase.queries2_layer is not None
    assert module.tbase.attention_scale2.shape == (HEADS,)
    assert module.tbase.post_attn_mlp.output_layer.kernel.shape == (width, EMBED)
    assert (module.recurrent is not None) == (i == 1)
    assert module.cross_attention == (i != 1)
  plain = language_model(recurrent_layer_indices=(1,), num_layers=3, feedback=False)
  assert plain.decoder.layers[0].tbase.queries2_layer is None
  assert plain.decoder.layers[0].tbase.post_attn_mlp.output_layer.kernel.shape == (
      HEADS * HEAD_SIZE, EMBED)


@pytest.mark.parametrize("recurrent_layer_indices", [(1,), (0, 2)])
def test_block_feedback_cross_attends_to_the_state_entering_each_chunk(recurrent_layer_indices):
  num_layers = 3 if len(recurrent_layer_indices) == 1 else 4
  lm = language_model(recurrent_layer_indices=recurrent_layer_indices, num_layers=num_layers,
                      feedback=True, sequence_length=3 * WINDOW)
  feedback_index = recurrent_layer_indices[-1]  # the last recurrent layer wins, as in Meliad
  listener = min(set(range(num_layers)) - set(recurrent_layer_indices))  # a layer below
  recorder = RecordingLayer(lm.decoder.layers[listener])
  lm.decoder.layers[listener] = recorder
  tokens = tokens_of(2, 3 * WINDOW, seed=31)
  start = tf.constant([True, False])
  state = random_state(lm, 2)
  lm.decoder(tokens, start, state)
  calls = list(recorder.calls)
  assert [call["start"].tolist() for call in calls] == [
      [True, False], [False, False], [False, False]]
  cell = lm.decoder.layers[feedback_index].recurrent
  naive = NaiveRecurrentLayer(lm.decoder.layers[feedback_index], "bias", False, True)
  for chunk, call in enumerate(calls):
    # The state entering this chunk: what the stack leaves after the earlier chunks.
    if chunk == 0:
      entering = np.where(np.array([True, False])[:, None, None],
                          value(cell.recurrent_initial_state),
                          state[f"layer_{feedback_index}"]["recurrent"].numpy())
    else:
      _, partial_state = lm.decoder(tokens[:, :chunk * WINDOW], start, state)
      entering = partial_state[f"layer_{feedback_index}"]["recurrent"].numpy()
    keys, values, _, _ = naive.kvq(cell.recurrent_tbase, entering.astype(np.float64))
    np.testing.assert_allclose(call["cross_attention_kv"][0].numpy(), keys, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(call["cross_attention_kv"][1].numpy(), values, rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("feedback", [False, True])
def test_block_feedback_lets_lower_layers_see_the_state(feedback):
  """Layer 0 of chunk 2 sees chunk 0 only through the state fed back from layer 1."""
  tokens = tokens_of(1, 3 * WINDOW, seed=41)
  changed = tf.concat([tokens_of(1, WINDOW, seed=42), tokens[:, WINDOW:]], axis=1)
  outputs = []
  for t in (tokens, changed):
    lm = language_model(recurrent_layer_indices=(1,), num_layers=2, feedback=feedback,
                        sequence_length=3 * WINDOW)
    if not feedback:
      lm.decoder.dstack_window_length = WINDOW  # same chunks, no cross attention
    recorder = RecordingLayer(lm.decoder.layers[0])
    lm.decoder.layers[0] = recorder
    lm.decoder(t, tf.constant([True]), lm.initial_state(1))
    outputs.append(recorder.calls[2]["y"])
  assert (not np.allclose(outputs[0], outputs[1], atol=1e-6)) == feedback


def test_feedback_layer_without_recurrent_kv_is_an_error():
  module = layer_lib.TransformerLayer(embedding_size=EMBED, num_heads=HEADS,
                                      head_size=HEAD_SIZE, window_length=WINDOW,
                                      cross_attention=True)
  x = tf.zeros([1, WINDOW, EMBED])
  with pytest.raises(ValueError, match="cross_attention_kv"):
    module(x, tf.constant([True]), random_state(module, 1))


def test_segment_must_split_into_stack_chunks():
  config = task_config_lib.TransformerTaskConfig(sequence_length=12, batch_size=1,
                                                 vocab_size=VOCAB)
  with pytest.raises(ValueError, match="dstack_window_length"):
    decoder.DecoderStack(config, num_layers=1, embedding_size=EMBED,
                         layer_factory=functools.partial(layer_lib.TransformerLayer,
                                                         num_heads=HEADS, head_size=HEAD_SIZE,
                                                         window_length=4),
                         dstack_window_length=8)


# ---------------------------------------------------------------------------------------
# Diagnostics


def test_diagnostics_report_gate_means_and_the_state_attention_share():
  lm = language_model(recurrent_layer_indices=(1,), arrangement="lstm_dual")
  batch = {"targets": tokens_of(2, 2 * WINDOW, seed=51), "start_of_sequence": tf.fill([2], True)}
  _, metrics, _ = lm(batch, lm.initial_state(2))
  prefix = model_lib.DIAGNOSTICS_PREFIX + "layer_1/"
  assert {k for k in metrics if k.startswith(model_lib.DIAGNOSTICS_PREFIX)} == {
      prefix + name for name in ("gate_mean", "input_gate_mean", "ffn_gate_mean",
                                 "state_attention_share")}
  for name in ("gate_mean", "input_gate_mean", "ffn_gate_mean", "state_attention_share"):
    assert 0.0 < float(metrics[prefix + name]) < 1.0


def test_bias_gate_mean_is_the_mean_keep_share():
  lm = language_model(recurrent_layer_indices=(1,), arrangement="bias_skip")
  diagnostics = {}
  lm.decoder(tokens_of(2, 2 * WINDOW, seed=52), tf.fill([2], True), lm.initial_state(2),
             diagnostics=diagnostics)
  gate_bias = value(lm.decoder.layers[1].recurrent.recurrent_tbase.post_attn_mlp.gate_bias)
  assert float(diagnostics["layer_1/gate_mean"]) == pytest.approx(np.mean(sigmoid(gate_bias)),
                                                                  rel=1e-5)


def test_state_attention_share_is_the_cross_heads_share_of_the_projection():
  rng = np.random.default_rng(0)
  self_attn = rng.normal(size=(2, 20, HEADS, HEAD_SIZE)).astype(np.float32)
  cross_attn = rng.normal(size=(2, 20, HEADS, HEAD_SIZE)).astype(np.float32)
  kernel = rng.normal(size=(2 * HEADS * HEAD_SIZE, EMBED)).astype(np.float32)
  width = HEADS * HEAD_SIZE
  self_norm = cross_norm = 0.0
  for b in range(2):
    for n in range(20):
      if (b * 20 + n) % recurrence.SHARE_TOKEN_STRIDE:
        continue  # estimated on every 7th position of the flattened batch
      self_norm += np.linalg.norm(self_attn[b, n].reshape(-1) @ kernel[:width])
      cross_norm += np.linalg.norm(cross_attn[b, n].reshape(-1) @ kernel[width:])
  share = recurrence.attention_share(tf.constant(self_attn), tf.constant(cross_attn),
                                     tf.constant(kernel))
  assert float(share) == pytest.approx(cross_norm / (self_norm + cross_norm), rel=1e-5)
  zero = recurrence.attention_share(tf.constant(self_attn), tf.zeros_like(cross_attn),
                                    tf.constant(kernel))
  assert float(zero) == 0.0


# ---------------------------------------------------------------------------------------
# The functions a decoder calls block by block


def test_stepping_the_cell_block_by_block_reproduces_the_layer():
  module = recurrent_layer("lstm_dual")
  x = tf.random.stateless_normal([2, 3 * WINDOW, EMBED], seed=[7, 8])
  start = tf.constant([True, False])
  state = random_state(module, 2)
  _, new_state = module(x, start, state)
  keys, values, _, _ = module.tbase.kvq(x)
  cell = module.recurrent
  c = cell.load(start, state["recurrent"])
  previous_keys = tf.where(start[:, None, None, None], 0.0, state["keys"])
  previous_values = tf.where(start[:, None, None, None], 0.0, state["values"])
  for t in range(3):
    current = slice(t * WINDOW, (t + 1) * WINDOW)
    c = cell.step(c, tf.concat([previous_keys, keys[:, current]], axis=1),
                  tf.concat([previous_values, values[:, current]], axis=1))
    previous_keys, previous_values = keys[:, current], values[:, current]
  np.testing.assert_allclose(c.numpy(), new_state["recurrent"].numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# In the trainer: checkpoints and MirroredStrategy (invariants 6 and 7 for the state)

RECURRENT_TINY = ["base_htrans.gin", "size/tiny_test.gin", "recurrent/bias_skip.gin",
                  "options/window_128.gin"]


def build_trainer(*params, strategy=None):
  gin.clear_config()
  gin_setup.parse(RECURRENT_TINY, [
      "NUM_LAYERS = 1", "decoder_stack.DecoderStack.recurrent_layer_indices = (0,)",
      "EMBED_DIM = 32", "NUM_HEADS = 2", "HEAD_DIM = 16", "MLP_DIM = 64",
      "transformer_layer.TransformerLayer.recurrent_num_states = 8",
      "Trainer.warmup_steps = 2", "Trainer.max_scheduled_steps = 100",
      "Trainer.status_every_steps = 0", "Trainer.log_every_steps = 0",
      "Trainer.print_input_every_steps = 0", "Trainer.test_every_steps = 0",
      "Trainer.jit_compile = False"] + list(params))
  return trainer_lib.Trainer().build(strategy)


def test_recurrent_state_round_trips_through_a_checkpoint(tmp_path):
  trained = build_trainer("Trainer.num_steps = 2")
  trained.train(str(tmp_path))
  saved = trained.train_state.values()
  assert np.abs(saved["layer_0"]["recurrent"]).max() > 0
  restored = build_trainer("Trainer.num_steps = 2")
  restored.checkpoint_keeper(str(tmp_path)).restore()
  tf.nest.map_structure(np.testing.assert_array_equal, restored.train_state.values(), saved)
  # And the restored run continues exactly as the original would.
  np.testing.assert_allclose(restored.train_step()[1]["loss"], trained.train_step()[1]["loss"],
                             rtol=1e-6)


@pytest.mark.slow
def test_mirrored_strategy_over_two_cpus_equals_one_device():
  single = build_trainer("TransformerTaskConfig.batch_size = 2", "Trainer.num_steps = 2")
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  mirrored = build_trainer("TransformerTaskConfig.batch_size = 1", "Trainer.num_steps = 2",
                           strategy=strategy)
  for _ in range(2):
    _, metrics_single = single.train_step()
    _, metrics_mirrored = mirrored.train_step()
    # Data-dependent diagnostics are per-replica ratios, averaged: not comparable.
    for key in ("loss", "token_count", "correct", "diagnostics/layer_0/gate_mean"):
      np.testing.assert_allclose(metrics_mirrored[key], metrics_single[key], rtol=1e-4,
                                 err_msg=key)
  for a, b in zip(single.params, mirrored.params):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=a.name)
  single_state = single.train_state.values()
  mirrored_state = mirrored.train_state.values()
  tf.nest.map_structure(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                        single_state, mirrored_state)
  recurrent = mirrored_state["layer_0"]["recurrent"]
  assert not np.allclose(recurrent[0], recurrent[1])  # the replicas hold different streams


@pytest.mark.parametrize("arrangement, feedback", [("bias_skip", False), ("lstm_dual", True),
                                                   ("bias_single", False)])
def test_every_parameter_gets_a_gradient(arrangement, feedback):
  lm = language_model(recurrent_layer_indices=(1,), num_layers=3, feedback=feedback,
                      arrangement=arrangement)
  batch = {"targets": tokens_of(2, 2 * WINDOW, seed=61), "start_of_sequence": tf.fill([2], True)}
  with tf.GradientTape() as tape:
    loss, _, _ = lm(batch, lm.initial_state(2))
  grads = tape.gradient(loss, lm.trainable_variables)
  missing = [v.name for v, g in zip(lm.trainable_variables, grads)
             if g is None or not np.any(tf.convert_to_tensor(g).numpy())]
  assert not missing
