"""Incremental decoding: one-token steps reproduce the segment re-run for every family,
greedy generation is the argmax and sampling the seeded draw of the forward pass over the
fed-back text, and bad arguments."""

import gin
import numpy as np
import pytest
import tensorflow as tf
from absl import app
from absl import flags
from absl.testing import flagsaver

import pipelines
import tiny_run
from meliad_tf.model import language_model as model_lib
from meliad_tf.serving import export
from meliad_tf.serving import generation
from meliad_tools import generate as generate_tool


L = tiny_run.SEQUENCE_LENGTH
V = tiny_run.VOCAB_SIZE


pytestmark = pytest.mark.usefixtures("clean_gin")


def random_model(*params):
  """An untrained tiny model (segments of 16, windows of 8) with extra gin bindings."""
  tiny_run.configure("TransformerTaskConfig.sequence_length = 16",
                     "TransformerLayer.window_length = 8", *params)
  tf.random.set_seed(3)
  model = model_lib.DecoderOnlyLanguageModel(output_token_losses=True)
  gin.clear_config()
  return model


POSITIONS = {
    "t5": [],
    "fourier": ["TransformerLayer.relative_position_type = 'fourier'"],
    "rotary": ["TransformerLayer.relative_position_type = 'rotary'"],
    "absolute": ["TransformerLayer.relative_position_type = None",
                 "DecoderStack.use_absolute_positions = True"],
}


# Every family, in small (segments of 16 tokens; `random_model` sets windows of 8 unless
# overridden).
FAMILIES = {
    **{f"transformer_xl_{name}": params for name, params in POSITIONS.items()},
    # The memory holds two segments (N = 32): four segments wrap its ring buffer.
    "memorizing": tiny_run.MEMORIZING,
    "memorizing_exact": tiny_run.MEMORIZING + ["memory_on_tpu_factory.backend = 'exact'"],
    "memorizing_scann": tiny_run.MEMORIZING + ["memory_on_tpu_factory.backend = 'scann'"],
    # Windows shorter than the segment: the memory is read and written once per segment
    # nonetheless, and the attention over the neighbours rotates each query by its position
    # in its window.
    "memorizing_rotary_windows": tiny_run.MEMORIZING + [
        "TransformerLayer.window_length = 8",
        "TransformerLayer.relative_position_type = 'rotary'"],
    # The stack runs on chunks of 8: the memory is read and written once per chunk.
    "memorizing_chunks": tiny_run.MEMORIZING + ["TransformerLayer.window_length = 8",
                                                "DecoderStack.dstack_window_length = 8"],
    # recurrent/bias_skip.gin with both layers recurrent and blocks of 4: 4 blocks a segment.
    "recurrent_bias_skip": ["TransformerLayer.window_length = 4",
                            "DecoderStack.recurrent_layer_indices = (0, 1)",
                            "TransformerLayer.recurrent_num_states = 4",
                            "TransformerLayer.recurrent_gate_type = 'bias'",
                            "TransformerLayer.recurrent_skip_ffn = True",
                            "DecoderStack.feedback_recurrence = False"],
    "recurrent_lstm_dual": ["DecoderStack.recurrent_layer_indices = (-1,)",
                            "TransformerLayer.recurrent_num_states = 4",
                            "TransformerLayer.recurrent_gate_type = 'lstm'",
                            "DecoderStack.feedback_recurrence = False"],
    "recurrent_lstm_single": ["DecoderStack.recurrent_layer_indices = (0,)",
                              "TransformerLayer.recurrent_num_states = 4",
                              "TransformerLayer.recurrent_gate_type = 'lstm'",
                              "TransformerLayer.recurrent_single_gate = True",
                              "DecoderStack.feedback_recurrence = False"],
    # recurrent/block_feedback_512.gin in small: the stack runs on chunks of 8, and layer 0
    # cross-attends to the state of the recurrent layer 1.
    "block_feedback": ["TransformerLayer.window_length = 8",
                       "DecoderStack.dstack_window_length = 8",
                       "DecoderStack.recurrent_layer_indices = (-1,)",
                       "TransformerLayer.recurrent_num_states = 4",
                       "DecoderStack.feedback_recurrence = True"],
    # Two blocks per chunk: the fed-back state is the one entering the chunk, not the block.
    "block_feedback_two_blocks_per_chunk": [
        "TransformerLayer.window_length = 4", "DecoderStack.dstack_window_length = 8",
        "DecoderStack.recurrent_layer_indices = (-1,)",
        "TransformerLayer.recurrent_num_states = 4", "DecoderStack.feedback_recurrence = True"],
}
SEGMENT = 16


def rerun_logits(model, text):
  """The segment re-run, the reference of one-token decoding: the logits [B, n, V] at every
  position t of `text` [B, n] are those of the ordinary forward pass over the segment
  holding t, on its tokens up to t (zeros after them), from the state the forward passes
  over the whole previous segments left. Returns them and the state the forward passes over
  the whole text leave."""
  forward = tf.function(lambda tokens, start, state: model.decoder(tokens, start, state))
  batch, length = text.shape
  state = model.initial_state(batch)
  rows = []
  for s in range(-(-length // SEGMENT)):
    start = tf.fill([batch], s == 0)
    segment = text[:, s * SEGMENT:(s + 1) * SEGMENT]
    for p in range(segment.shape[1]):
      tokens = np.zeros([batch, SEGMENT], np.int32)
      tokens[:, :p + 1] = segment[:, :p + 1]
      rows.append(forward(tf.constant(tokens), start, state)[0].numpy()[:, p])
    tokens = np.zeros([batch, SEGMENT], np.int32)
    tokens[:, :segment.shape[1]] = segment
    _, state = forward(tf.constant(tokens), start, state)
  return np.stack(rows, axis=1), state


def assert_decode_state_is_the_forward_state(decode_state, state):
  """After whole segments, one-token decoding holds what the forward passes left: each
  layer's last W keys and values, recurrent state, and memory slot by slot."""
  for key, layer_state in state.items():
    decoded = decode_state["layers"][key]
    boundary = decode_state["boundaries"].get(key, {})
    window = layer_state["keys"].shape[1]
    expected = dict(keys=layer_state["keys"], values=layer_state["values"])
    actual = dict(keys=decoded["keys"][:, -window:], values=decoded["values"][:, -window:])
    for name in ("recurrent", "memory"):
      if name in layer_state:
        expected[name], actual[name] = layer_state[name], boundary[name]
    tf.nest.map_structure(
        lambda a, e: np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-4, atol=1e-5,
                                                err_msg=key), actual, expected)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_one_token_decoding_equals_the_segment_rerun(name):
  """Four segments: blocks end, chunks end, and the memory is written four times (wrapping
  its ring buffer of two segments), all while decoding; at the end the decoder holds the
  forward passes' state."""
  model = random_model(*FAMILIES[name])
  batch, length = 2, 4 * SEGMENT
  text = tf.random.stateless_uniform([batch, length], [4, 5], 1, V, tf.int32).numpy()
  expected, state = rerun_logits(model, text)
  decoder = generation.IncrementalDecoder(model)
  decode_state = decoder.init_state(model.initial_state(batch), tf.fill([batch], True))
  step = tf.function(decoder.step)
  for t in range(length):
    logits, decode_state = step(tf.constant(text[:, t]), tf.fill([batch], t), decode_state)
    np.testing.assert_allclose(logits.numpy(), expected[:, t], rtol=1e-4, atol=1e-5,
                               err_msg=f"position {t}")
  assert_decode_state_is_the_forward_state(decode_state, state)


def test_only_tokens_that_end_a_block_or_a_call_change_the_boundary_state():
  """A memory layer at layer 1 (calls of 16), a recurrent layer 0 (blocks of 4): the state
  besides the windows changes at positions 3, 7, 11 and 15 only, and a decoding step does
  not return it at all (a compiled step would copy the memory with every token)."""
  model = random_model(*tiny_run.MEMORIZING, "TransformerLayer.window_length = 4",
                       "DecoderStack.recurrent_layer_indices = (0,)",
                       "TransformerLayer.recurrent_num_states = 4",
                       "DecoderStack.feedback_recurrence = False")
  stack = model.decoder
  positions = tf.range(SEGMENT)
  np.testing.assert_array_equal(stack.ends_boundary(positions).numpy(),
                                (np.arange(SEGMENT) + 1) % 4 == 0)
  np.testing.assert_array_equal(model.decoder.layers[1].ends_boundary(positions, SEGMENT),
                                np.arange(SEGMENT) == SEGMENT - 1)
  assert not np.any(model.decoder.layers[1].ends_boundary(positions, SEGMENT, False))
  decoder = generation.IncrementalDecoder(model)
  state = decoder.init_state(model.initial_state(2), tf.fill([2], True))
  _, token_states = stack.decode_step(tf.ones([2], tf.int32), tf.zeros([2], tf.int32), state)
  assert tf.nest.map_structure(lambda t: t.shape, token_states) == tf.nest.map_structure(
      lambda t: t.shape, state["layers"])
  for t in range(SEGMENT):
    _, new_state = decoder.step(tf.fill([2], t + 1), tf.fill([2], t), state)
    unchanged = [a is b for a, b in zip(tf.nest.flatten(new_state["boundaries"]),
                                        tf.nest.flatten(state["boundaries"]))]
    layer_0 = [a is b for a, b in zip(tf.nest.flatten(new_state["boundaries"]["layer_0"]),
                                      tf.nest.flatten(state["boundaries"]["layer_0"]))]
    memory = new_state["boundaries"]["layer_1"]["memory"]["keys"]
    assert all(unchanged) == ((t + 1) % 4 != 0), t
    assert not any(layer_0) == ((t + 1) % 4 == 0), t
    assert np.any(memory.numpy()) == (t == SEGMENT - 1), t
    state = new_state


def test_a_block_end_moves_only_the_state_of_the_streams_it_ends():
  """Stream 0 ends a block of 4 at position 3, stream 1 (at 2) does not: stream 0's state is
  the cell's step over the window before the block and the block, stream 1's is untouched."""
  model = random_model("TransformerLayer.window_length = 4",
                       "DecoderStack.recurrent_layer_indices = (0,)",
                       "TransformerLayer.recurrent_num_states = 4",
                       "DecoderStack.feedback_recurrence = False")
  layer = model.decoder.layers[0]
  state = tf.nest.map_structure(
      lambda t: tf.random.stateless_normal(t.shape, [8, 9]), model.initial_state(2)["layer_0"])
  token_state, boundary = layer.init_decode_state(state, tf.fill([2], False), SEGMENT)
  token_state = tf.nest.map_structure(
      lambda t: tf.random.stateless_normal(t.shape, [10, 11]), token_state)
  moved = layer.end_boundaries(token_state, boundary, tf.constant([3, 2]), SEGMENT)
  window = [tf.concat([boundary[f"previous_{name}"], token_state[name]], axis=1)
            for name in ("keys", "values")]
  stepped = layer.recurrent.step(boundary["recurrent"], *window)
  np.testing.assert_allclose(moved["recurrent"][0], stepped[0], rtol=1e-6)
  np.testing.assert_array_equal(moved["previous_keys"][0], token_state["keys"][0])
  for name, value in boundary.items():
    np.testing.assert_array_equal(moved[name][1], value[1], err_msg=name)
    assert not np.array_equal(moved[name][0], value[0]), name


def test_a_feedback_layer_without_the_fed_back_state_is_refused():
  model = random_model(*FAMILIES["block_feedback"])
  layer = model.decoder.layers[0]
  state = model.initial_state(2)["layer_0"]
  token_state, boundary_state = layer.init_decode_state(state, tf.fill([2], True), 8)
  x = tf.zeros([2, 1, model.decoder.embedding_size])
  message = "layer_0 has cross_attention .* without cross_attention_kv"
  with pytest.raises(ValueError, match=message):
    layer.decode_step(x, token_state, boundary_state, tf.zeros([2], tf.int32))
  with pytest.raises(ValueError, match=message):
    layer(tf.tile(x, [1, 8, 1]), tf.fill([2], True), state)


def test_decode_buffer_is_seeded_from_the_xl_cache():
  model = random_model()
  tokens = tf.random.stateless_uniform([2, 32], [6, 7], 1, V, tf.int32)
  _, state = model.decoder(tokens[:, :16], tf.fill([2], True), model.initial_state(2))
  forward, _ = model.decoder(tokens[:, 16:], tf.fill([2], False), state)
  decoder = generation.IncrementalDecoder(model)
  decode_state = decoder.init_state(state, tf.constant([False, False]))
  for t in range(16):
    logits, decode_state = decoder.step(tokens[:, 16 + t], tf.fill([2], 16 + t), decode_state)
    np.testing.assert_allclose(logits.numpy(), forward[:, t].numpy(), rtol=1e-4, atol=1e-5)


def generate(module, prompts, max_length, temperature=0.0, seed=0, **options):
  """module.generate on prompts of different lengths (zero-padded into one tensor)."""
  lengths = [len(p) for p in prompts]
  prompt = np.zeros([len(prompts), max(lengths)], np.int32)
  for b, p in enumerate(prompts):
    prompt[b, :len(p)] = p
  return module.generate(tf.constant(prompt), tf.constant(lengths), tf.constant(max_length),
                         tf.constant(temperature), tf.constant(0),
                         tf.constant([seed, 0], tf.int64), **options)["tokens"].numpy()


def greedy(module, prompts, max_length, **options):
  return generate(module, prompts, max_length, **options)


def test_greedy_generation_is_the_argmax_of_score_on_the_fed_back_text(saved_model):
  loaded = tf.saved_model.load(saved_model)
  text = pipelines.RawByteVocabulary().encode(
      "Document 0 of test. Remember these facts.\nkey 4ab = value 9z.\nkey")
  # One prompt longer than a segment (a forward pass, then 13 tokens fed one at a time),
  # one shorter.
  prompts = [text[:45], text[:7]]
  max_length = 40
  generated = greedy(loaded, prompts, max_length)
  assert generated.shape == (2, max_length)
  assert np.all((generated > 0) & (generated < V))

  fed_back = [np.concatenate([p, g]) for p, g in zip(prompts, generated)]
  num_segments = -(-max(len(f) for f in fed_back) // L)
  segments = np.zeros([2, num_segments * L], np.int32)
  for b, f in enumerate(fed_back):
    segments[b, :len(f)] = f
  loaded.reset_all()
  predictions = np.concatenate([
      loaded.score(tf.constant(segments[:, s * L:(s + 1) * L]), tf.fill([2], s == 0)
                   )["predictions"].numpy() for s in range(num_segments)], axis=1)
  for b, prompt in enumerate(prompts):
    # The token generated after position t is the argmax of the prediction at t.
    positions = np.arange(len(prompt) - 1, len(prompt) - 1 + max_length)
    np.testing.assert_array_equal(generated[b], predictions[b, positions])


def test_in_process_generation_equals_the_saved_model(saved_model):
  handle = export.open_model(workdir=tiny_run.shared_run(), batch_size=2)
  prompts = [[70, 71, 72] * 12, [80, 81]]
  np.testing.assert_array_equal(greedy(handle.module, prompts, 8),
                                greedy(tf.saved_model.load(saved_model), prompts, 8))


def test_xla_generation_equals_graph_generation():
  model = export.open_model(workdir=tiny_run.shared_run()).module.model
  vocabulary = pipelines.RawByteVocabulary()
  prompt = tf.constant([[70, 71, 72] * 12, [80, 81] + [0] * 34])
  arguments = (prompt, tf.constant([36, 2]), tf.constant(10))
  for temperature, top_k in ((0.0, 0), (1.0, 5)):
    sampling = (tf.constant(temperature), tf.constant(top_k), tf.constant([4, 2], tf.int64))
    graph = export.ScoringModule(model, 2, vocabulary).generate(*arguments, *sampling)
    xla = export.ScoringModule(model, 2, vocabulary, jit_compile=True).generate(*arguments,
                                                                               *sampling)
    np.testing.assert_array_equal(xla["tokens"].numpy(), graph["tokens"].numpy())


def test_sampling_with_a_seed_is_repeatable(saved_model):
  loaded = tf.saved_model.load(saved_model)

  def sample(seed, top_k=0):
    return loaded.generate(tf.constant([[70, 71], [72, 73]]), tf.constant([2, 2]),
                           tf.constant(24), tf.constant(1.0), tf.constant(top_k),
                           tf.constant([seed, 0], tf.int64))["tokens"].numpy()

  np.testing.assert_array_equal(sample(1), sample(1))
  assert not np.array_equal(sample(1), sample(2))
  np.testing.assert_array_equal(sample(5, top_k=1), greedy(loaded, [[70, 71], [72, 73]], 24))


def test_greedy_sampling_is_the_argmax_and_top_1_too():
  logits = tf.random.stateless_normal([8, 50], [1, 2])
  argmax = np.argmax(logits.numpy(), axis=-1)
  seed = tf.constant([3, 4], tf.int64)
  greedy_draw = generation.sample_next(logits, tf.constant(0.0), tf.constant(0), seed)
  np.testing.assert_array_equal(greedy_draw.numpy(), argmax)
  top_1 = generation.sample_next(logits, tf.constant(2.0), tf.constant(1), seed)
  np.testing.assert_array_equal(top_1.numpy(), argmax)


def test_samples_follow_the_tempered_distribution_and_stay_in_the_top_k():
  row = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
  draws = 20000
  logits = tf.constant(np.tile(row, [draws, 1]))
  temperature = 0.7
  sampled = generation.sample_next(logits, tf.constant(temperature), tf.constant(0),
                                   tf.constant([9, 9], tf.int64)).numpy()
  expected = np.exp(row / temperature) / np.exp(row / temperature).sum()
  frequencies = np.bincount(sampled, minlength=len(row)) / draws
  np.testing.assert_allclose(frequencies, expected, atol=0.015)

  top_3 = generation.sample_next(logits, tf.constant(1.0), tf.constant(3),
                                 tf.constant([9, 10], tf.int64)).numpy()
  assert set(np.unique(top_3)) == {0, 1, 2}
  kept = np.exp(row[:3]) / np.exp(row[:3]).sum()
  np.testing.assert_allclose(np.bincount(top_3, minlength=3) / draws, kept, atol=0.015)


@pytest.mark.parametrize("arguments, message", [
    (dict(max_length=0), "max_length must be >= 1"),
    (dict(lengths=[0, 2]), r"every prompt needs at least one token"),
    (dict(lengths=[3, 2]), "lengths must not exceed"),
    (dict(prompt=[[1, 256], [3, 4]]), r"prompt token ids must be in \[0, 256\)"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=257), r"top_k must be <= the vocabulary \(256\)"),
    (dict(top_k=-1), "top_k must be >= 0"),
])
def test_generate_rejects_bad_arguments(saved_model, arguments, message):
  loaded = tf.saved_model.load(saved_model)
  values = dict(prompt=[[1, 2], [3, 4]], lengths=[2, 2], max_length=3, temperature=1.0, top_k=0)
  values.update(arguments)
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    loaded.generate(tf.constant(values["prompt"]), tf.constant(values["lengths"]),
                    tf.constant(values["max_length"]), tf.constant(values["temperature"]),
                    tf.constant(values["top_k"]), tf.constant([0, 0], tf.int64))


def test_a_model_without_the_xl_cache_exports_without_generate(tmp_path):
  model = random_model("TransformerLayer.use_long_xl_architecture = False",
                       "TransformerLayer.window_length = 16")
  with pytest.raises(generation.GenerationNotSupportedError, match="needs the XL cache"):
    generation.IncrementalDecoder(model)
  with pytest.raises(generation.GenerationNotSupportedError, match="needs the XL cache"):
    generation.generate(model, tf.ones([1, 3], tf.int32), tf.constant([3]), 2, 0.0, 0, [0, 0])
  module = export.ScoringModule(model, 1, pipelines.RawByteVocabulary())
  assert not hasattr(module, "generate")
  export.export(module, str(tmp_path / "model"), vocabulary=pipelines.RawByteVocabulary(),
                config_text="", task_name="synthetic", step=0)
  meta = export.read_metadata(str(tmp_path / "model"))
  assert not meta["supports_generate"]
  assert "needs the XL cache" in meta["generate_unsupported_reason"]
  with flagsaver.flagsaver(saved_model=str(tmp_path / "model"), workdir="", load_dir="",
                           prompt="abc", prompt_file=None, prompt_source=None, max_length=4,
                           sampling="greedy", top_k=0, num_samples=1, batch_size=0):
    with pytest.raises(app.UsageError, match="this model cannot generate: .*XL cache"):
      generate_tool.main(["meliad-generate"])


def test_where_streams_selects_each_streams_rows():
  streams = tf.constant([True, False])
  new = {"cache": tf.ones([2, 3]), "memory": tf.ones([4, 5])}  # memory: 2 rows per stream
  old = tf.nest.map_structure(tf.zeros_like, new)
  chosen = generation.where_streams(streams, new, old)
  np.testing.assert_array_equal(chosen["cache"].numpy()[:, 0], [1, 0])
  np.testing.assert_array_equal(chosen["memory"].numpy()[:, 0], [1, 1, 0, 0])
  with pytest.raises(ValueError, match="does not have the 2 streams on its leading axis"):
    generation.where_streams(streams, tf.ones([3]), tf.zeros([3]))


# Families generated below (besides the trained Transformer-XL model of tiny_run).
GENERATED_FAMILIES = ("memorizing", "memorizing_exact", "memorizing_scann",
                      "recurrent_bias_skip", "recurrent_lstm_dual", "block_feedback")
# Stream 0's prompt is longer than a segment, stream 1's is not; 40 tokens cross two or three
# segment boundaries, and many block boundaries.
PROMPTS = [list(range(30, 51)), [60, 61, 62, 63, 64]]
NUM_GENERATED = 40


def forward_logits(model, text, memory_frozen_from=None):
  """Logits [n, V] of the ordinary forward pass over `text` (one stream), segment by segment
  from the initial state, as scoring runs it. From segment `memory_frozen_from` on, a
  segment's new state keeps the memory it started with (nothing more is written)."""
  num_segments = -(-len(text) // SEGMENT)
  tokens = np.zeros([1, num_segments * SEGMENT], np.int32)
  tokens[0, :len(text)] = text
  state = model.initial_state(1)
  logits = []
  for s in range(num_segments):
    segment_logits, new_state = model.decoder(
        tf.constant(tokens[:, s * SEGMENT:(s + 1) * SEGMENT]), tf.constant([s == 0]), state)
    if memory_frozen_from is not None and s >= memory_frozen_from:
      for key, layer_state in new_state.items():
        if "memory" in layer_state:
          new_state[key] = dict(layer_state, memory=state[key]["memory"])
    state = new_state
    logits.append(segment_logits.numpy()[0])
  return np.concatenate(logits)[:len(text)]


def family_module(name, jit_compile=False):
  return export.ScoringModule(random_model(*FAMILIES[name]), 2, pipelines.RawByteVocabulary(),
                              jit_compile=jit_compile)


@pytest.mark.parametrize("name", GENERATED_FAMILIES)
def test_greedy_generation_is_the_argmax_of_the_forward_pass_for_every_family(name):
  module = family_module(name)
  # write_memory: the forward pass over the whole text writes every segment to the memory.
  generated = greedy(module, PROMPTS, NUM_GENERATED, write_memory=tf.constant(True))
  for prompt, tokens in zip(PROMPTS, generated):
    logits = forward_logits(module.model, prompt + list(tokens))
    # The token generated after position t is the argmax of the logits at t.
    positions = np.arange(len(prompt) - 1, len(prompt) - 1 + NUM_GENERATED)
    np.testing.assert_array_equal(tokens, np.argmax(logits[positions], axis=-1))


def assert_seeded_draws(generated, logits, seed):
  """Asserts that `generated` [B, n], continuing PROMPTS, holds the draws (temperature 1) of
  `logits` (per stream, [len(prompt) + n, V] of the forward pass over its prompt and
  tokens), seeded as `generation.generate` seeds them: its decode step t feeds stream b the
  token at position start_b + t (start_b: after the prompt's whole segments) and draws with
  the seed fold_in(seed, t), all streams at once."""
  starts = [(len(p) - 1) // SEGMENT * SEGMENT for p in PROMPTS]
  remaining = [len(p) - start for p, start in zip(PROMPTS, starts)]
  num_generated = generated.shape[1]
  for t in range(max(remaining) + num_generated - 1):
    rows = np.stack([stream_logits[start + t] if start + t < len(stream_logits)
                     else np.zeros_like(stream_logits[0])
                     for stream_logits, start in zip(logits, starts)])
    draw = generation.sample_next(
        tf.constant(rows), tf.constant(1.0), tf.constant(0),
        tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), t)).numpy()
    for b, left in enumerate(remaining):
      index = t - left + 1  # the token generated after this step, if any
      if 0 <= index < num_generated:
        assert generated[b, index] == draw[b], f"stream {b}, token {index}"


@pytest.mark.parametrize("name", GENERATED_FAMILIES)
def test_sampling_draws_from_the_forward_pass_for_every_family(name):
  module = family_module(name)
  seed = 7
  generated = generate(module, PROMPTS, NUM_GENERATED, temperature=1.0, seed=seed,
                       write_memory=tf.constant(True))
  assert_seeded_draws(generated, [forward_logits(module.model, prompt + list(tokens))
                                  for prompt, tokens in zip(PROMPTS, generated)], seed)


@pytest.mark.parametrize("name", ["memorizing", "memorizing_scann",
                                  pytest.param("recurrent_lstm_dual", marks=pytest.mark.slow),
                                  pytest.param("block_feedback", marks=pytest.mark.slow)])
def test_xla_generation_equals_graph_generation_for_every_family(name):
  """XLA compiles the whole decode step, or, for a memory searched on the host, all of it but
  the search."""
  model = random_model(*FAMILIES[name])
  graph, xla = (export.ScoringModule(model, 2, pipelines.RawByteVocabulary(), jit_compile=jit)
                for jit in (False, True))
  for temperature in (0.0, 1.0):
    options = dict(temperature=temperature, seed=3, write_memory=tf.constant(True))
    np.testing.assert_array_equal(generate(xla, PROMPTS, NUM_GENERATED, **options),
                                  generate(graph, PROMPTS, NUM_GENERATED, **options))


def test_write_memory_writes_the_generated_segments_and_only_then():
  """Sampled tokens are the draws of the forward pass's logits: with write_memory, over the
  whole text; without, with the memory frozen after the prompt's whole segments. (Greedy
  decoding of this untrained model repeats a token whatever the memory holds.)"""
  module = family_module("memorizing")
  seed = 7
  written, frozen = (generate(module, PROMPTS, NUM_GENERATED, temperature=1.0, seed=seed,
                              write_memory=tf.constant(write)) for write in (True, False))
  for tokens, memory_frozen in ((written, False), (frozen, True)):
    assert_seeded_draws(tokens, [
        forward_logits(module.model, prompt + list(stream_tokens),
                       (len(prompt) - 1) // SEGMENT if memory_frozen else None)
        for prompt, stream_tokens in zip(PROMPTS, tokens)], seed)
  # Both streams' first generated segment completes with their 12th token (index 32 for
  # stream 0, 16 for stream 1); the tokens after it read what was written.
  np.testing.assert_array_equal(written[:, :12], frozen[:, :12])
  assert all(not np.array_equal(w[12:], f[12:]) for w, f in zip(written, frozen))


def test_generation_of_a_memory_model_leaves_the_scoring_state_alone():
  module = family_module("memorizing")
  tokens = tf.constant(np.arange(1, 2 * SEGMENT + 1, dtype=np.int32).reshape(2, SEGMENT))
  module.score(tokens, tf.constant([True, True]))
  before = module.state.values()
  greedy(module, PROMPTS, NUM_GENERATED, write_memory=tf.constant(True))
  after = module.state.values()
  tf.nest.map_structure(np.testing.assert_array_equal, before, after)


def _tool_flags(**overrides):
  settings = dict(saved_model=tiny_run.shared_export(), workdir="", load_dir="", prompt="key ",
                  prompt_file=None, prompt_source=None, max_length=12, sampling="greedy",
                  temperature=1.0, top_k=0, seed=0, num_samples=1, batch_size=0, gin_param=[],
                  jit_compile=False, write_memory=False)
  settings.update(overrides)
  return flagsaver.flagsaver(**settings)


def test_meliad_generate_prints_the_greedy_continuation(saved_model, capsys):
  loaded = tf.saved_model.load(saved_model)
  expected = greedy(loaded, [list(b"key "), list(b"key ")], 12)[0]
  with _tool_flags():
    generate_tool.main(["meliad-generate"])
  printed = capsys.readouterr().out
  assert printed == loaded.decode(tf.constant(expected)).numpy().decode("utf-8", "replace") + "\n"


def test_meliad_generate_takes_the_prompt_from_a_document(capsys):
  with _tool_flags(prompt=None, prompt_source="synthetic", prompt_split="test",
                   prompt_document=1, prompt_tokens=40, workdir=tiny_run.shared_run(),
                   saved_model="", num_samples=2, sampling="sample", top_k=5, seed=3):
    generate_tool.main(["meliad-generate"])
  printed = capsys.readouterr().out
  assert printed.startswith("--- sample 0 ---\n") and "--- sample 1 ---\n" in printed


def test_meliad_generate_writes_to_the_memory_of_a_memory_run(tmp_path, capsys):
  # A run's directory as meliad-train leaves it: config.gin and a checkpoint.
  tiny_run.configure("TransformerTaskConfig.sequence_length = 16", *FAMILIES["memorizing"])
  tf.random.set_seed(5)
  model = model_lib.DecoderOnlyLanguageModel(output_token_losses=True)
  (tmp_path / "config.gin").write_text(gin.config_str())
  tf.train.Checkpoint(model=model).save(str(tmp_path / "checkpoints" / "ckpt"))
  gin.clear_config()
  prompt = "Remember these facts.\nkey 4ab = value 9z.\nkey"
  module = export.ScoringModule(model, 1, pipelines.RawByteVocabulary())
  expected = greedy(module, [list(prompt.encode())], 40, write_memory=tf.constant(True))[0]
  with _tool_flags(saved_model="", workdir=str(tmp_path), prompt=prompt, max_length=40,
                   write_memory=True):
    generate_tool.main(["meliad-generate"])
  printed = capsys.readouterr().out
  assert printed == module.decode(tf.constant(expected)).numpy().decode("utf-8", "replace") + "\n"


@pytest.mark.parametrize("overrides, message", [
    (dict(max_length=0), "--max_length must be >= 1, got 0"),
    (dict(write_memory=True), "--write_memory applies to a model with a memory "
                              r"\(this one is transformer_xl\)"),
    (dict(prompt_file="x.txt"), "give exactly one of --prompt, --prompt_file and "
                                "--prompt_source"),
    (dict(sampling="sample", temperature=0.0), "--temperature must be > 0"),
    (dict(top_k=3), "--top_k applies to --sampling=sample"),
    (dict(sampling="sample", top_k=300), r"--top_k=300 exceeds the vocabulary \(256 ids\)"),
    (dict(num_samples=3), "--num_samples=3 exceeds the 2 streams"),
    (dict(prompt=""), "the prompt is empty"),
    (dict(saved_model="", workdir=""), "give exactly one of --saved_model and --workdir"),
])
def test_meliad_generate_rejects_bad_flags(overrides, message):
  with _tool_flags(**overrides):
    with pytest.raises(app.UsageError, match=message):
      generate_tool.main(["meliad-generate"])


def test_unknown_sampling_method_is_refused():
  with flagsaver.flagsaver():
    with pytest.raises(flags.IllegalFlagValueError, match="value should be one of <greedy|sample>"):
      flags.FLAGS["sampling"].parse("beam")
