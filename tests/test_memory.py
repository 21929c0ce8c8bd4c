"""The external kNN memory (invariant 3): search, reset, order, ring buffer, the layer's
mixture against numpy, and the memory as trainer state (checkpoints, two replicas)."""

import collections
import logging
import sys

import gin
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.eager import context

from meliad_tf.layers import host_search
from meliad_tf.layers import memory as memory_lib
from meliad_tf.model import decoder
from meliad_tf.model import language_model as model_lib
from meliad_tf.model import layer as layer_lib
from meliad_tf.model import task_config
from meliad_tf.training import gin_setup
from meliad_tf.training import trainer as trainer_lib


ON_DEVICE = ("bucketed", "exact", "approx_max_k")


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  gin.clear_config()


def make_memory(backend="exact", heads=2, size=4, database=64, chunk=16):
  return memory_lib.ExternalMemory(heads, size, size, database, backend=backend,
                                   search_chunk_size=chunk)


def normalised(rng, shape):
  x = rng.standard_normal(shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_state(rng, memory, batch, filled):
  """A memory whose first `filled[b]` slots of stream b hold entries, the rest empty."""
  shape = (batch, memory.num_heads, memory.database_size, memory.key_size)
  keys = normalised(rng, shape)
  values = rng.standard_normal(shape).astype(np.float32)
  for b, n in enumerate(filled):
    keys[b, :, n:] = 0.0
    values[b, :, n:] = 0.0
  return {"keys": tf.constant(keys), "values": tf.constant(values),
          "index": tf.constant(filled, tf.int32)}


def naive_scores(state, queries):
  """Scores [B, H, n, N] by loops over streams and heads, empty slots at -1e6."""
  keys = state["keys"].numpy()
  batch, heads, size, _ = keys.shape
  scores = np.zeros((batch, heads, queries.shape[1], size), np.float32)
  for b in range(batch):
    for h in range(heads):
      empty = keys[b, h].sum(-1) == 0
      scores[b, h] = queries[b, :, h] @ keys[b, h].T + np.where(empty, -1e6, 0.0)
  return scores


# ---------------------------------------------------------------------------------------
# Search

@pytest.mark.parametrize("chunk", [16, 0])
def test_exact_search_returns_the_true_top_k(chunk):
  rng = np.random.default_rng(0)
  memory = make_memory("exact", chunk=chunk)
  state = random_state(rng, memory, 2, [64, 40])
  queries = normalised(rng, (2, 5, 2, 4))
  slots = memory.search(state, tf.constant(queries), 6)[0].numpy()
  scores = naive_scores(state, queries)
  for b in range(2):
    for h in range(2):
      for i in range(5):
        expected = np.argsort(-scores[b, h, i])[:6]
        assert sorted(slots[b, h, i]) == sorted(expected)


def test_approx_max_k_is_exact_on_cpu():
  rng = np.random.default_rng(1)
  state = random_state(rng, make_memory(), 2, [64, 64])
  queries = tf.constant(normalised(rng, (2, 5, 2, 4)))
  exact = make_memory("exact").search(state, queries, 8)[0].numpy()
  approx = make_memory("approx_max_k").search(state, queries, 8)[0].numpy()
  np.testing.assert_array_equal(np.sort(approx, -1), np.sort(exact, -1))


@pytest.mark.parametrize("chunk", [16, 32, 0])
def test_bucketed_search_equals_a_naive_argmax_per_strided_bucket(chunk):
  rng = np.random.default_rng(2)
  memory = make_memory("bucketed", chunk=chunk)
  state = random_state(rng, memory, 2, [64, 24])
  queries = normalised(rng, (2, 5, 2, 4))
  k = 8
  slots = memory.search(state, tf.constant(queries), k)[0].numpy()
  scores = naive_scores(state, queries)
  for b in range(2):
    for h in range(2):
      for i in range(5):
        for bucket in range(k):
          members = list(range(bucket, 64, k))  # slot s is in bucket s mod K
          best = members[int(np.argmax(scores[b, h, i, members]))]
          assert slots[b, h, i, bucket] == best


def test_bucketed_ties_go_to_the_lowest_slot():
  """Rows [R, K] of slots r K + c: the chosen slot of each column is the lowest row holding
  its maximum, as one argmax over the bucket gives."""
  rows = tf.constant([[1.0, 5.0, 2.0],
                      [3.0, 5.0, 2.0],
                      [3.0, 4.0, 2.0]])
  np.testing.assert_array_equal(memory_lib.bucketed_top_k(rows).numpy(), [3, 1, 2])
  np.testing.assert_array_equal(memory_lib.bucketed_top_k(rows, first_row=4).numpy(),
                                [15, 13, 14])
  nan = tf.fill([2, 3], float("nan"))
  assert np.all(memory_lib.bucketed_top_k(nan).numpy() < 6)


@pytest.mark.parametrize("backend", ON_DEVICE)
@pytest.mark.parametrize("given_empty", [False, True])
def test_one_query_search_equals_the_naive_search(backend, given_empty):
  """A decoding step's search (one query per stream, the database in one chunk), with the
  empty slots computed there or given by the decoder: the true top K (exact), or each
  strided bucket's argmax (bucketed), with the neighbours' scores."""
  rng = np.random.default_rng(21)
  memory = make_memory(backend)
  state = random_state(rng, memory, 2, [64, 20])
  queries = normalised(rng, (2, 1, 2, 4))
  empty = memory.empty_slots(state) if given_empty else None
  slots, scores = (t.numpy() for t in memory.search(state, tf.constant(queries), 8,
                                                     empty=empty))
  expected_scores = naive_scores(state, queries)
  for b in range(2):
    for h in range(2):
      row = expected_scores[b, h, 0]
      if backend == "bucketed":
        expected = [c + 8 * int(np.argmax(row[c::8])) for c in range(8)]
        np.testing.assert_array_equal(slots[b, h, 0], expected)
      else:
        assert sorted(slots[b, h, 0]) == sorted(np.argsort(-row, kind="stable")[:8])
      np.testing.assert_allclose(scores[b, h, 0], row[slots[b, h, 0]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ON_DEVICE)
def test_search_scores_are_the_neighbours_dot_products(backend):
  rng = np.random.default_rng(13)
  memory = make_memory(backend)
  state = random_state(rng, memory, 2, [64, 5])
  queries = normalised(rng, (2, 3, 2, 4))
  slots, scores = (t.numpy() for t in memory.search(state, tf.constant(queries), 8))
  keys = state["keys"].numpy()
  for b in range(2):
    for h in range(2):
      for i in range(3):
        stored = keys[b, h, slots[b, h, i]]
        expected = np.where(stored.sum(-1) == 0, -1e6, stored @ queries[b, i, h])
        np.testing.assert_allclose(scores[b, h, i], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("filled", [64, 5])
def test_attention_from_search_scores_equals_attention_over_gathered_keys(filled):
  """The same values and the same gradient into the queries, without gathering the keys
  in the forward pass."""
  rng = np.random.default_rng(14)
  memory = make_memory("bucketed")
  state = random_state(rng, memory, 2, [filled, 64])
  queries = tf.Variable(normalised(rng, (2, 3, 2, 4)))
  scale = tf.constant([1.5, 3.0])
  slots, scores = memory.search(state, queries, 8)
  results = []
  for given in (scores, None):
    with tf.GradientTape() as tape:
      out = memory.attend(state, queries, slots, given, scale=scale)
      loss = tf.reduce_sum(out * tf.range(4, dtype=tf.float32))
    results.append((out.numpy(), tape.gradient(loss, queries).numpy()))
  for from_scores, gathered in zip(*results):
    np.testing.assert_allclose(from_scores, gathered, rtol=1e-5, atol=1e-6)
  assert np.any(results[0][1])


@pytest.mark.parametrize("backend", ON_DEVICE)
def test_empty_memory_returns_zeros(backend):
  memory = make_memory(backend)
  state = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), memory.state_spec(2))
  queries = tf.constant(normalised(np.random.default_rng(3), (2, 5, 2, 4)))
  keys, values = memory.retrieve(state, queries, 8)
  assert keys.shape == values.shape == (2, 2, 5, 8, 4)
  assert not np.any(keys.numpy()) and not np.any(values.numpy())


@pytest.mark.parametrize("backend", ON_DEVICE)
def test_a_partly_filled_memory_returns_its_entries_then_zeros(backend):
  rng = np.random.default_rng(4)
  memory = make_memory(backend)
  state = random_state(rng, memory, 1, [3])  # 3 entries, K = 8
  queries = tf.constant(normalised(rng, (1, 2, 2, 4)))
  keys, values = memory.retrieve(state, queries, 8)
  stored = state["keys"].numpy()[0]
  for h in range(2):
    for i in range(2):
      nonzero = [tuple(k) for k in keys.numpy()[0, h, i] if np.any(k)]
      assert sorted(nonzero) == sorted(tuple(k) for k in stored[h, :3])
      assert np.count_nonzero(np.any(values.numpy()[0, h, i], axis=-1)) == 3


def test_gradient_does_not_reach_the_memory_or_the_search_query():
  rng = np.random.default_rng(5)
  memory = make_memory("exact")
  state = random_state(rng, memory, 1, [64])
  queries = tf.Variable(normalised(rng, (1, 3, 2, 4)))
  keys = tf.Variable(state["keys"])
  with tf.GradientTape(persistent=True) as tape:
    retrieved_keys, retrieved_values = memory.retrieve(dict(state, keys=keys), queries, 4)
    new_state = memory.write(dict(state, keys=keys), queries, queries)
    total = tf.reduce_sum(retrieved_keys) + tf.reduce_sum(retrieved_values)
  assert tape.gradient(total, [queries, keys]) == [None, None]
  assert tape.gradient(tf.reduce_sum(new_state["keys"]), queries) is None


# ---------------------------------------------------------------------------------------
# Reset and ring buffer

def test_reset_clears_only_the_stream_that_starts_a_document():
  rng = np.random.default_rng(6)
  memory = make_memory()
  state = random_state(rng, memory, 3, [64, 64, 32])
  reset = memory.reset(state, tf.constant([False, True, False]))
  for name in ("keys", "values"):
    assert not np.any(reset[name].numpy()[1])
    np.testing.assert_array_equal(reset[name].numpy()[[0, 2]], state[name].numpy()[[0, 2]])
  np.testing.assert_array_equal(reset["index"].numpy(), [64, 0, 32])


def test_ring_buffer_overwrites_the_oldest_segment():
  memory = make_memory(database=8)
  state = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), memory.state_spec(2))
  segments = [tf.fill([2, 4, 2, 4], float(i + 1)) for i in range(3)]
  for segment in segments:
    state = memory.write(state, segment, -segment)
  keys = state["keys"].numpy()
  np.testing.assert_array_equal(state["index"].numpy(), [12, 12])
  assert np.all(keys[:, :, :4] == 3.0)  # the third segment replaced the first
  assert np.all(keys[:, :, 4:] == 2.0)
  assert np.all(state["values"].numpy()[:, :, :4] == -3.0)


def test_streams_write_at_their_own_positions():
  memory = make_memory(database=8)
  state = {"keys": tf.zeros([2, 2, 8, 4]), "values": tf.zeros([2, 2, 8, 4]),
           "index": tf.constant([0, 4])}
  state = memory.write(state, tf.ones([2, 4, 2, 4]), tf.ones([2, 4, 2, 4]))
  keys = state["keys"].numpy()
  assert np.all(keys[0, :, :4] == 1) and not np.any(keys[0, :, 4:])
  assert np.all(keys[1, :, 4:] == 1) and not np.any(keys[1, :, :4])


# ---------------------------------------------------------------------------------------
# The layer

E, H, D, L, N, K = 8, 2, 4, 4, 8, 2


def memory_layer(backend="exact", **kwargs):
  tf.random.set_seed(0)
  memory = memory_lib.ExternalMemory(H, D, D, N, backend=backend)
  layer = layer_lib.TransformerLayer(E, num_heads=H, head_size=D, window_length=L,
                                     relative_position_type=None, memory_num_neighbors=K,
                                     memory=memory, **kwargs)
  # Distinct per-head gates and scales, so that a mix-up of heads shows.
  layer.external_memory_bias.assign([0.3, -1.2])
  layer.tbase.attention_scale.assign([2.0, 3.5])
  return layer


def zero_state(layer, batch):
  return tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), layer.state_spec(batch))


def test_the_current_segment_is_never_retrieved():
  memory = make_memory("exact", database=8)
  layer = layer_lib.TransformerLayer(8, num_heads=2, head_size=4, window_length=4,
                                     relative_position_type=None, memory_num_neighbors=2,
                                     memory=memory)
  state = zero_state(layer, 1)["memory"]
  keys = tf.constant(normalised(np.random.default_rng(7), (1, 4, 2, 4)))
  values = tf.ones([1, 4, 2, 4])
  no_local = tf.zeros([1, 4, 2, 4])
  # Queries equal to this segment's keys find nothing: the memory is read before the write.
  mixed, state = layer._memory_attention(no_local, keys, values, keys, tf.constant([True]),
                                         state, False, None)
  assert not np.any(mixed.numpy())
  assert state["index"].numpy()[0] == 4
  # The next segment does retrieve them.
  mixed, _ = layer._memory_attention(no_local, keys, values, keys, tf.constant([False]),
                                     state, False, None)
  np.testing.assert_allclose(mixed.numpy(), 0.5, rtol=1e-6)


def test_decoding_one_token_reads_the_memory_as_the_segment_does():
  layer = memory_layer("bucketed")
  rng = np.random.default_rng(12)
  state = zero_state(layer, 2)
  _, state = layer(tf.constant(rng.standard_normal((2, L, E)).astype(np.float32)),
                   tf.constant([True, True]), state)
  memory = state["memory"]
  queries = tf.constant(normalised(rng, (2, L, H, D)))
  no_local = tf.zeros([2, L, H, D])
  whole = layer.read_memory(no_local, queries, memory)
  for i in range(L):
    one = layer.read_memory(no_local[:, i:i + 1], queries[:, i:i + 1], memory)
    np.testing.assert_allclose(one.numpy()[:, 0], whole.numpy()[:, i], rtol=1e-6)
  # A generated token can be appended: one entry, the counter moves by one.
  appended = layer.memory.write(memory, queries[:, :1], queries[:, :1])
  np.testing.assert_array_equal(appended["index"].numpy(), [L + 1, L + 1])
  np.testing.assert_array_equal(appended["keys"].numpy()[:, :, L], queries.numpy()[:, 0])


def test_a_write_to_chosen_streams_leaves_the_others_alone():
  memory = make_memory()
  rng = np.random.default_rng(13)
  state = random_state(rng, memory, 2, [60, 8])  # stream 0 wraps around the ring buffer
  keys = tf.constant(normalised(rng, (2, 8, 2, 4)))
  values = tf.constant(rng.standard_normal((2, 8, 2, 4)).astype(np.float32))
  written = memory.write(state, keys, values, streams=tf.constant([True, False]))
  expected_keys, expected_values = state["keys"].numpy(), state["values"].numpy()
  for i in range(8):
    slot = (60 + i) % 64
    expected_keys[0, :, slot] = keys.numpy()[0, i]
    expected_values[0, :, slot] = values.numpy()[0, i]
  np.testing.assert_array_equal(written["keys"].numpy(), expected_keys)
  np.testing.assert_array_equal(written["values"].numpy(), expected_values)
  np.testing.assert_array_equal(written["index"].numpy(), [68, 8])


def numpy_layer(layer, x, start, state):
  """The memory layer in numpy loops, from its parameters: returns (y, new state)."""
  base = layer.tbase
  scale = base.attention_scale.numpy()
  gate = 1.0 / (1.0 + np.exp(-layer.external_memory_bias.numpy()))

  def rms(v, s):
    return v / np.sqrt(np.mean(v ** 2, -1, keepdims=True) + 1e-6) * s

  def unit(v):
    return v / np.sqrt(np.sum(v ** 2, -1, keepdims=True) + 1e-6)

  batch = x.shape[0]
  h = rms(x, base.pre_attn_layernorm.scale.numpy())
  k, v, q = (unit((h @ base.keys_layer.kernel.numpy()).reshape(batch, L, H, D)),
             (h @ base.values_layer.kernel.numpy()).reshape(batch, L, H, D),
             unit((h @ base.queries_layer.kernel.numpy()).reshape(batch, L, H, D)))
  mem_keys, mem_values = state["memory"]["keys"].copy(), state["memory"]["values"].copy()
  index = state["memory"]["index"].copy()
  cache_k, cache_v = state["keys"].copy(), state["values"].copy()
  mixed = np.zeros((batch, L, H, D), np.float32)
  for b in range(batch):
    if start[b]:
      cache_k[b] = cache_v[b] = 0.0
      mem_keys[b] = mem_values[b] = 0.0
      index[b] = 0
    for hd in range(H):
      for i in range(L):
        # Local: the W previous tokens, cache included, never the token itself.
        seen_k = np.concatenate([cache_k[b, i:, hd], k[b, :i, hd]])
        seen_v = np.concatenate([cache_v[b, i:, hd], v[b, :i, hd]])
        logits = seen_k @ q[b, i, hd] * scale[hd]
        p = np.exp(logits - logits.max())
        local = (p / p.sum()) @ seen_v
        # Memory: the true top K of the non-empty slots, empty ones as zeros.
        scores = mem_keys[b, hd] @ q[b, i, hd]
        scores = np.where(mem_keys[b, hd].sum(-1) == 0, -1e6, scores)
        top = np.argsort(-scores)[:K]
        logits = mem_keys[b, hd, top] @ q[b, i, hd] * scale[hd]
        p = np.exp(logits - logits.max())
        external = (p / p.sum()) @ mem_values[b, hd, top]
        mixed[b, i, hd] = (1 - gate[hd]) * local + gate[hd] * external
    for i in range(L):
      mem_keys[b, :, (index[b] + i) % N] = k[b, i]
      mem_values[b, :, (index[b] + i) % N] = v[b, i]
    index[b] += L
  y = x + mixed.reshape(batch, L, H * D) @ base.post_attn_mlp.output_layer.kernel.numpy()
  z = rms(y, base.pre_ffn_layernorm.scale.numpy())
  ffn = np.maximum(z @ base.ffn.hidden.kernel.numpy(), 0) @ base.ffn.output_layer.kernel.numpy()
  new_state = {"keys": k, "values": v,
               "memory": {"keys": mem_keys, "values": mem_values, "index": index}}
  return y + ffn, new_state


def test_two_steps_equal_a_hand_computed_mixture():
  layer = memory_layer("exact")
  rng = np.random.default_rng(8)
  state = zero_state(layer, 2)
  expected_state = tf.nest.map_structure(lambda t: t.numpy(), state)
  for start in ([True, True], [False, True]):
    x = rng.standard_normal((2, L, E)).astype(np.float32)
    y, state = layer(tf.constant(x), tf.constant(start), state)
    expected, expected_state = numpy_layer(layer, x, start, expected_state)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-4, atol=1e-5)
    tf.nest.map_structure(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6),
                          tf.nest.map_structure(lambda t: t.numpy(), state), expected_state)


def test_memory_gate_gets_gradients_and_is_reported():
  layer = memory_layer("exact")
  state = zero_state(layer, 1)
  x = tf.random.stateless_normal([1, L, E], seed=[1, 1])
  _, state = layer(x, tf.constant([True]), state)
  diagnostics = {}
  with tf.GradientTape() as tape:
    y, _ = layer(x, tf.constant([False]), state, diagnostics=diagnostics)
    loss = tf.reduce_sum(y ** 2)
  grad = tape.gradient(loss, layer.external_memory_bias)
  assert np.all(np.abs(grad.numpy()) > 0)
  expected_gate = np.mean(1 / (1 + np.exp(-np.array([0.3, -1.2]))))
  np.testing.assert_allclose(diagnostics["memory_gate"].numpy(), expected_gate, rtol=1e-6)


@pytest.mark.parametrize("backend", ON_DEVICE)
def test_xla_layer_equals_graph_layer(backend):
  layer = memory_layer(backend)
  state = zero_state(layer, 2)
  x = tf.random.stateless_normal([2, L, E], seed=[2, 2])
  step = lambda x, s, state: layer(x, s, state)  # pylint: disable=unnecessary-lambda
  graph_step, xla_step = tf.function(step), tf.function(step, jit_compile=True)
  for start in ([True, True], [False, True], [False, False]):
    start = tf.constant(start)
    graph = graph_step(x, start, state)
    xla = xla_step(x, start, state)
    tf.nest.map_structure(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                          graph, xla)
    state = graph[1]


def test_memory_does_not_reset_when_configured_to_keep_it():
  layer = memory_layer("exact", memory_reset_on_new_doc=False)
  state = zero_state(layer, 1)
  x = tf.random.stateless_normal([1, L, E], seed=[3, 3])
  _, state = layer(x, tf.constant([True]), state)
  _, state = layer(x, tf.constant([True]), state)
  assert state["memory"]["index"].numpy()[0] == 2 * L


# ---------------------------------------------------------------------------------------
# Validation at build time

def build_layer(memory, neighbors=4, heads=2, head_size=4, window=16):
  return layer_lib.TransformerLayer(8, num_heads=heads, head_size=head_size,
                                    window_length=window, memory_num_neighbors=neighbors,
                                    memory=memory)


@pytest.mark.parametrize("kwargs, message", [
    (dict(neighbors=0), "memory_num_neighbors must be positive"),
    (dict(neighbors=128), r"cannot exceed .*database_size \(N = 64\)"),
    (dict(neighbors=5), r"multiple of TransformerLayer.memory_num_neighbors \(K = 5\)"),
    (dict(heads=4), r"num_heads \(NUM_MEMORY_HEADS = 2\) must equal"),
    (dict(head_size=8), r"key_size \(MEMORY_HEAD_DIM = 4\) must equal"),
])
def test_bad_memory_settings_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    build_layer(make_memory("bucketed"), **kwargs)


def test_exact_backend_accepts_k_that_does_not_divide_the_memory():
  build_layer(make_memory("exact"), neighbors=5)


def test_memory_size_must_be_a_multiple_of_the_segment():
  layer = build_layer(make_memory(database=48))
  with pytest.raises(ValueError, match=r"database_size \(N = 48\) must be a multiple of the "
                                       r"segment length .*sequence_length = 32"):
    layer.check_sequence_length(32)


def test_window_shorter_than_the_segment_is_warned_about(caplog):
  layer = build_layer(make_memory(), window=16)
  with caplog.at_level(logging.WARNING):
    layer.check_sequence_length(32)
  assert "shorter than the segment" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    build_layer(make_memory(), window=32).check_sequence_length(32)
  assert "shorter than the segment" not in caplog.text


def test_unknown_backend_is_refused():
  with pytest.raises(ValueError, match="backend must be one of"):
    make_memory("faiss")


def test_the_scann_backend_without_scann_names_the_extra(monkeypatch):
  # As where the extra is not installed: every import of scann fails.
  for name in [n for n in sys.modules if n == "scann" or n.startswith("scann.")] + ["scann"]:
    monkeypatch.setitem(sys.modules, name, None)
  with pytest.raises(ValueError, match=r"backend = 'scann' needs ScaNN.*pip install "
                                       r"'meliad-tf\[scann\]'"):
    make_memory("scann")
  # Chosen in gin, the error comes when the model is built, before any step.
  parse("options/external_memory_8k.gin", "options/memory_backend_scann.gin")
  with pytest.raises(ValueError, match=r"meliad-tf\[scann\]"):
    model_lib.DecoderOnlyLanguageModel()
  make_memory("bucketed")  # the other backends need no ScaNN


# ---------------------------------------------------------------------------------------
# Gin files

def parse(*files, params=()):
  gin.clear_config()
  gin_setup.parse(["base_htrans.gin", "size/tiny_test.gin"] + list(files),
                  ["NUM_LAYERS = 5"] + list(params))


@pytest.mark.parametrize("size", [8, 32, 64, 128])
def test_external_memory_files_place_meliads_memory(size):
  parse(f"options/external_memory_{size}k.gin")
  tf.random.set_seed(0)
  model = model_lib.DecoderOnlyLanguageModel()
  memory_layers = [l for l in model.decoder.layers if l.memory is not None]
  assert [l.name for l in memory_layers] == ["layer_1"]  # -4 of 5 layers
  memory = memory_layers[0].memory
  assert memory.database_size == size * 1024
  assert (memory.num_heads, memory.key_size, memory.backend) == (4, 32, "bucketed")
  assert memory_layers[0].memory_num_neighbors == 128
  spec = model.state_spec(1)["layer_1"]["memory"]
  assert spec["keys"].shape == (1, 4, size * 1024, 32)


@pytest.mark.parametrize("backend", memory_lib.BACKENDS)
def test_backend_files_choose_the_backend(backend):
  parse("options/external_memory_8k.gin", f"options/memory_backend_{backend}.gin")
  tf.random.set_seed(0)
  model = model_lib.DecoderOnlyLanguageModel()
  assert model.decoder.layers[1].memory.backend == backend


def test_memory_heads_are_required():
  parse("memory_configuration.gin", params=[
      "DecoderStack.memory_factory = @memory_factory.memory_on_tpu_factory",
      "DecoderStack.memory_layer_indices = (-4,)"])
  with pytest.raises(ValueError, match="NUM_MEMORY_HEADS"):
    model_lib.DecoderOnlyLanguageModel()


# ---------------------------------------------------------------------------------------
# The memory as trainer state

MEMORY_RUN = ["base_htrans.gin", "size/tiny_test.gin"]


def build_trainer(*params, strategy=None, files=()):
  gin.clear_config()
  gin_setup.parse(MEMORY_RUN + ["options/external_memory_8k.gin"] + list(files), [
      "NUM_LAYERS = 1", "EMBED_DIM = 32", "NUM_HEADS = 2", "HEAD_DIM = 16", "MLP_DIM = 64",
      "transformer_layer.TransformerLayer.window_length = 256",
      "decoder_stack.DecoderStack.memory_layer_indices = (0,)",
      "transformer_layer.TransformerLayer.memory_num_neighbors = 4",
      "memory_factory.memory_on_tpu_factory.database_size = 512",
      "Trainer.warmup_steps = 2", "Trainer.max_scheduled_steps = 100",
      "Trainer.status_every_steps = 0", "Trainer.log_every_steps = 0",
      "Trainer.print_input_every_steps = 0", "Trainer.test_every_steps = 0",
      "Trainer.jit_compile = False"] + list(params))
  return trainer_lib.Trainer().build(strategy)


def test_memory_state_round_trips_through_a_checkpoint(tmp_path):
  trained = build_trainer("Trainer.num_steps = 3")
  trained.train(str(tmp_path))
  saved = trained.train_state.values()
  memory = saved["layer_0"]["memory"]
  assert np.all(memory["index"] == 3 * 256)  # the ring has turned: 768 entries, 512 slots
  assert np.any(memory["keys"][:, :, :256]) and np.any(memory["keys"][:, :, 256:])
  restored = build_trainer("Trainer.num_steps = 3")
  restored.checkpoint_keeper(str(tmp_path)).restore()
  tf.nest.map_structure(np.testing.assert_array_equal, restored.train_state.values(), saved)
  # The restored run continues exactly as the original one.
  np.testing.assert_allclose(restored.train_step()[1]["loss"], trained.train_step()[1]["loss"],
                             rtol=1e-6)


@pytest.mark.slow
def test_mirrored_strategy_with_memory_equals_one_device():
  single = build_trainer("TransformerTaskConfig.batch_size = 2")
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  mirrored = build_trainer("TransformerTaskConfig.batch_size = 1", strategy=strategy)
  for _ in range(3):
    _, metrics_single = single.train_step()
    _, metrics_mirrored = mirrored.train_step()
    np.testing.assert_allclose(metrics_mirrored["loss"], metrics_single["loss"], rtol=1e-5)
  single_memory = single.train_state.values()["layer_0"]["memory"]
  mirrored_memory = mirrored.train_state.values()["layer_0"]["memory"]
  tf.nest.map_structure(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                        single_memory, mirrored_memory)
  # Each replica holds its own stream's memory.
  keys = mirrored_memory["keys"]
  assert np.any(keys[0]) and not np.allclose(keys[0], keys[1])


def test_memorizing_model_runs_in_a_decoder_stack():
  config = task_config.TransformerTaskConfig(sequence_length=L, batch_size=2, vocab_size=16)
  stack = decoder.DecoderStack(
      config, num_layers=2, embedding_size=E,
      layer_factory=lambda **kw: layer_lib.TransformerLayer(
          num_heads=H, head_size=D, window_length=L, memory_num_neighbors=K, **kw),
      memory_factory=lambda: memory_lib.ExternalMemory(H, D, D, N),
      memory_layer_indices=(-1,))
  assert [l.memory is not None for l in stack.layers] == [False, True]
  state = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), stack.state_spec(2))
  logits, state = stack(tf.ones([2, L], tf.int32), tf.constant([True, True]), state)
  assert logits.shape == (2, L, 16)
  np.testing.assert_array_equal(state["layer_1"]["memory"]["index"].numpy(), [L, L])


# ---------------------------------------------------------------------------------------
# ScaNN on the host

def test_scann_layer_equals_the_exact_layer():
  """Below MIN_TREE_SIZE entries the ScaNN indices are brute force: exact neighbours."""
  exact, scann = memory_layer("exact"), memory_layer("scann")
  exact_state, scann_state = zero_state(exact, 2), zero_state(scann, 2)
  rng = np.random.default_rng(9)
  step = tf.function(lambda layer, x, s, state: layer(x, s, state))
  # Five segments fill the 8-slot memory, wrap the ring, and reset stream 1 at the fourth.
  for start in ([True, True], [False, False], [False, False], [False, True], [False, False]):
    x = tf.constant(rng.standard_normal((2, L, E)).astype(np.float32))
    y_exact, exact_state = exact(x, tf.constant(start), exact_state)
    y_scann, scann_state = step(scann, x, tf.constant(start), scann_state)
    np.testing.assert_allclose(y_scann.numpy(), y_exact.numpy(), rtol=1e-5, atol=1e-6)


def test_scann_layer_returns_zeros_from_an_empty_memory():
  layer = memory_layer("scann")
  state = zero_state(layer, 1)["memory"]
  keys = tf.constant(normalised(np.random.default_rng(10), (1, L, H, D)))
  mixed, _ = layer._memory_attention(tf.zeros([1, L, H, D]), keys, keys, keys,
                                     tf.constant([True]), state, True, None)
  assert not np.any(mixed.numpy())


def test_scann_tree_index_is_trained_once_full_and_finds_the_neighbours():
  rng = np.random.default_rng(11)
  size, length, k = 256, 32, 8
  # All partitions searched and re-scored exactly: the tree must find the true top K.
  search = host_search.HostSearch(size, 16, k, host_search.ScannOptions(
      num_leaves=4, leaves_to_search=4, reorder_neighbors=size))
  memory = np.zeros((1, 1, size, 16), np.float32)
  for step in range(size // length + 2):
    queries, keys = normalised(rng, (2, 1, length, 1, 16))
    index = np.array([step * length], np.int32)
    slots = search(("train", 0), queries, keys, index, memory)
    filled = min(step * length, size)
    if filled >= k:
      scores = queries[0, :, 0] @ memory[0, 0].T
      scores[:, memory[0, 0].sum(-1) == 0] = -np.inf
      expected = np.sort(np.argsort(-scores, axis=1)[:, :k], axis=1)
      np.testing.assert_array_equal(np.sort(slots[0, 0], axis=1), expected)
    else:
      assert np.all((slots[0, 0] >= 0).sum(axis=1) == filled)
    written = (index[0] + np.arange(length)) % size
    memory[0, 0, written] = keys[0, :, 0]
  assert search._indices[("train", 0)][0][0].trained


def test_scann_memory_is_rebuilt_from_the_restored_state(tmp_path):
  params = ["Trainer.num_steps = 2", "options/memory_backend_scann.gin"]
  gin_files = [p for p in params if p.endswith(".gin")]
  bindings = [p for p in params if not p.endswith(".gin")]
  trained = build_trainer(*bindings, files=gin_files)
  trained.train(str(tmp_path))
  restored = build_trainer(*bindings, files=gin_files)
  restored.checkpoint_keeper(str(tmp_path)).restore()
  np.testing.assert_allclose(restored.train_step()[1]["loss"], trained.train_step()[1]["loss"],
                             rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_scann_training_equals_exact_training(jit_compile):
  binding = f"Trainer.jit_compile = {jit_compile}"
  scann = build_trainer(binding, files=["options/memory_backend_scann.gin"])
  exact = build_trainer(binding, files=["options/memory_backend_exact.gin"])
  assert scann.model.decoder.layers[0].memory.backend == "scann"
  assert scann.calls_host and not exact.calls_host
  for _ in range(3):
    np.testing.assert_allclose(scann.train_step()[1]["loss"], exact.train_step()[1]["loss"],
                               rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("jit_compile", [False, True])
def test_scann_under_mirrored_strategy_equals_one_device(jit_compile):
  """Each replica searches its own streams' indices."""
  files = ["options/memory_backend_scann.gin"]
  binding = f"Trainer.jit_compile = {jit_compile}"
  single = build_trainer("TransformerTaskConfig.batch_size = 2", binding, files=files)
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  mirrored = build_trainer("TransformerTaskConfig.batch_size = 1", binding, strategy=strategy,
                           files=files)
  for _ in range(3):
    np.testing.assert_allclose(mirrored.train_step()[1]["loss"],
                               single.train_step()[1]["loss"], rtol=1e-5)
  owners = mirrored.model.decoder.layers[0].memory._host_search._indices
  assert sorted(owners) == [("train", 0), ("train", 1)]


def _executed_op_types(step):
  """Op types of the graphs TensorFlow runs for `step`'s functions (after XLA clustering)."""
  context.context().enable_graph_collection()
  try:
    step()
    metadata = context.context().export_run_metadata()
  finally:
    context.context().disable_graph_collection()
  return collections.Counter(node.op for function in metadata.function_graphs
                             for graph in function.partition_graphs for node in graph.node)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_scann_steps_compile_all_but_the_search_with_xla(jit_compile):
  trainer = build_trainer(f"Trainer.jit_compile = {jit_compile}", "Trainer.test_every_steps = 1",
                          "Trainer.num_test_steps = 1", files=["options/memory_backend_scann.gin"])
  for step in (trainer.train_step, trainer.test_cycle):
    ops = _executed_op_types(step)
    assert ops["PyFunc"] == 1  # the search, run by the graph between the clusters
    assert (ops["_XlaRun"] > 0) == jit_compile
    # With XLA, no matmul is left for the graph to run (oneDNN's are _MklMatMul and so on).
    assert any("MatMul" in op or "Einsum" in op for op in ops) != jit_compile
