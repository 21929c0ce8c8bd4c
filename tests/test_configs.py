"""The gin files: each composes with base_htrans.gin, builds, and does what its name says.

Covered: the top-level files, size/, options/ and recurrent/. tasks/ is written
separately and is not walked here.

"Non-embedding parameters" (the sizes quoted for Meliad's size files) means every
trainable parameter except the embedding table: 4·E·H·d (keys, values, queries, output
projection) + 2·E·F (the FFN) per layer, plus the small vectors: two norm scales of E
and a per-head attention scale per layer, each layer's own T5 table (H x 32), and the
final norm's scale. The small vectors matter once: small_37M is 37,764,704 = 37.8M
with them, 37.7M without.
"""

import math
import os

import gin
import pytest
import tensorflow as tf

from meliad_tf.layers import positions
from meliad_tf.model import language_model as model_lib
from meliad_tf.training import gin_setup
from meliad_tf.training import trainer as trainer_lib  # Registers training_loop.* and optimizer_config.*


BASE = "base_htrans.gin"
TINY = "size/tiny_test.gin"


def gin_files(*folders):
  """Gin files, relative to the configs directory, in the top level and the given folders."""
  root = gin_setup.CONFIG_DIRECTORY
  found = []
  for folder in ("",) + folders:
    directory = os.path.join(root, folder)
    found += sorted(os.path.join(folder, name) if folder else name
                    for name in os.listdir(directory) if name.endswith(".gin"))
  return found


ALL_FILES = gin_files("size", "options")
SIZE_FILES = [f for f in ALL_FILES if f.startswith("size/")]
OPTION_FILES = [f for f in ALL_FILES if f.startswith("options/")]
RECURRENT_FILES = [f for f in gin_files("recurrent") if f.startswith("recurrent/")]
GATE_FILES = [f"recurrent/{gate}_{arrangement}.gin" for gate in ("bias", "lstm")
              for arrangement in ("dual", "single", "skip")]


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def parse(*files, params=()):
  gin_setup.parse([BASE] + [f for f in files if f != BASE], params)


def build_model():
  tf.random.set_seed(0)
  return model_lib.DecoderOnlyLanguageModel()


def build_trainer():
  return trainer_lib.Trainer()  # Records its configuration; builds nothing.


def layers(model):
  return model.decoder.layers


def partners(option):
  """Files an option needs before it to build: a window only fits a longer segment, a
  memory at layer -4 needs four layers."""
  if option.startswith(("options/window_", "options/stack_window_")):
    return ["options/seq_2048.gin"]
  if option.startswith("options/external_memory_"):
    return ["size/layer13.gin"]  # the memory sits at layer -4
  return []


# ---------------------------------------------------------------------------------------
# Parameter counts

def bound_dimensions():
  """(NL, E, H, d, F) as the configurables will receive them (macros resolved)."""
  stack = gin.get_bindings("decoder_stack.DecoderStack")
  layer = gin.get_bindings("transformer_layer.TransformerLayer")
  ffn = gin.get_bindings("transformer_ffn/nn_components.MLP")
  return (stack["num_layers"], stack["embedding_size"], layer["num_heads"],
          layer["head_size"], ffn["num_hidden_units"])


def non_embedding_parameters(num_layers, embed, heads, head_size, mlp):
  """The matrices alone: projections and FFN."""
  return num_layers * (4 * embed * heads * head_size + 2 * embed * mlp)


def expected_trainable_without_embedding():
  """The matrices plus the small vectors, from the bound configuration."""
  num_layers, embed, heads, head_size, mlp = bound_dimensions()
  layer = gin.get_bindings("transformer_layer.TransformerLayer")
  base = gin.get_bindings("transformer_base.TransformerBase")
  stack = gin.get_bindings("decoder_stack.DecoderStack")
  per_layer = 2 * embed  # pre-attention and pre-FFN norm scales
  if base["normalize_keys"]:
    per_layer += heads  # learned attention scale per head
  per_layer += {"t5": positions.T5_NUM_BUCKETS * heads, "fourier": 128 * heads,
                "rotary": 0, None: 0}[layer["relative_position_type"]]
  final_norm = embed if stack["use_final_layernorm"] else 0
  # Each memory layer's gate: one bias per head.
  memory_gates = heads * len(stack["memory_layer_indices"]) if stack["memory_factory"] else 0
  return (non_embedding_parameters(num_layers, embed, heads, head_size, mlp)
          + num_layers * per_layer + final_norm + memory_gates)


def trainable_without_embedding(model):
  total = sum(v.shape.num_elements() for v in model.trainable_variables)
  return total - model.decoder.embedding.shape.num_elements()


# file: (NL, E, H, d, F, parameters without the embedding in millions, rounded to 0.1M).
# The layerNN files change the depth of the base model only.
SIZES = {
    BASE: (12, 512, 8, 128, 2048, 50.3),
    "size/tiny_test.gin": (2, 128, 4, 32, 256, 0.3),
    "size/small_test.gin": (6, 512, 8, 128, 2048, 25.2),
    "size/small.gin": (6, 512, 8, 128, 2048, 25.2),
    "size/small_37M.gin": (12, 512, 8, 64, 2048, 37.8),
    "size/small_75M.gin": (12, 512, 8, 128, 4096, 75.5),
    "size/medium_150M.gin": (12, 1024, 8, 128, 4096, 151.0),
    "size/medium_300M.gin": (12, 1024, 16, 128, 8192, 302.0),
    "size/large_600M.gin": (12, 2048, 16, 128, 8192, 604.0),
    "size/large_1200M.gin": (12, 2048, 32, 128, 16384, 1208.0),
    "size/layer13.gin": (13, 512, 8, 128, 2048, 54.5),
    "size/layer24.gin": (24, 512, 8, 128, 2048, 100.7),
    "size/layer26.gin": (26, 512, 8, 128, 2048, 109.1),
}
# Built in the default run; the others (up to 4.8 GB of parameters) only with -m slow.
SMALL_SIZES = {BASE, "size/tiny_test.gin", "size/small_test.gin", "size/small.gin",
               "size/small_37M.gin", "size/small_75M.gin", "size/layer13.gin"}


def test_every_size_file_has_a_row_in_the_size_table():
  assert set(SIZE_FILES) == set(SIZES) - {BASE}


@pytest.mark.parametrize("size_file", sorted(SIZES))
def test_size_file_binds_the_dimensions_and_parameter_count_of_its_name(size_file):
  parse(size_file)
  *dimensions, millions = SIZES[size_file]
  assert bound_dimensions() == tuple(dimensions)
  assert round(expected_trainable_without_embedding() / 1e6, 1) == millions


def test_size_count_includes_the_small_vectors():
  parse("size/small_37M.gin")
  assert non_embedding_parameters(*bound_dimensions()) == 37_748_736  # 4EHd + 2EF alone
  assert expected_trainable_without_embedding() == 37_764_704


@pytest.mark.parametrize("size_file", [
    f if f in SMALL_SIZES else pytest.param(f, marks=pytest.mark.slow) for f in sorted(SIZES)])
def test_built_model_has_the_counted_parameters(size_file):
  parse(size_file)
  model = build_model()
  assert trainable_without_embedding(model) == expected_trainable_without_embedding()
  num_layers, embed, _, _, _ = bound_dimensions()
  assert len(layers(model)) == num_layers
  assert model.decoder.embedding.shape == (gin.query_parameter("%NUM_EMBEDDINGS"), embed)


# ---------------------------------------------------------------------------------------
# Every file composes with the base

@pytest.mark.parametrize("gin_file", ALL_FILES)
def test_file_parses_after_base(gin_file):
  parse(gin_file)


@pytest.mark.parametrize("option", OPTION_FILES)
def test_option_builds_on_the_tiny_model(option):
  parse(TINY, *partners(option), option)
  model = build_model()
  assert trainable_without_embedding(model) == expected_trainable_without_embedding()


@pytest.mark.slow
@pytest.mark.parametrize("option", OPTION_FILES)
def test_option_builds_at_base_size(option):
  parse(*partners(option), option)
  model = build_model()
  assert trainable_without_embedding(model) == expected_trainable_without_embedding()


def test_window_longer_than_the_segment_is_rejected_when_building():
  parse("options/window_2048.gin")  # base segment: 512 tokens
  with pytest.raises(ValueError, match="multiple of the window"):
    build_model()


# ---------------------------------------------------------------------------------------
# Meliad's README recipes and the order of files

def test_recipe_baseline_test_builds():
  parse("size/small_test.gin")
  model = build_model()
  assert len(layers(model)) == 6
  assert model.task_config.sequence_length == 512
  assert model.task_config.batch_size == 2
  assert all(l.window_length == 256 and l.use_long_xl_architecture for l in layers(model))
  assert build_trainer().num_steps == 10_000


MEMORIZING_BASELINE = ("size/medium_150M.gin", "options/positions_t5.gin",
                       "options/seq_512.gin")


def test_recipe_medium_t5_seq512_parses_with_its_sizes():
  parse(*MEMORIZING_BASELINE)
  assert bound_dimensions() == (12, 1024, 8, 128, 4096)
  assert gin.get_bindings("transformer_layer.TransformerLayer")["relative_position_type"] == "t5"
  assert gin.get_bindings("decoder_stack.TransformerTaskConfig")["sequence_length"] == 512


@pytest.mark.slow
def test_recipe_medium_t5_seq512_builds():
  parse(*MEMORIZING_BASELINE)
  model = build_model()
  assert round(trainable_without_embedding(model) / 1e6, 1) == 151.0
  assert all(l.relative_position_type == "t5" for l in layers(model))


def test_later_file_overrides_earlier_binding():
  parse("options/seq_512.gin", "options/window_128.gin")
  assert gin.get_bindings("transformer_layer.TransformerLayer")["window_length"] == 128
  gin.clear_config()
  parse("options/window_128.gin", "options/seq_1024_nocache.gin")
  assert gin.get_bindings("transformer_layer.TransformerLayer")["window_length"] == 1024
  gin.clear_config()
  parse("options/lr_scale_05.gin", "options/lr_scale_2.gin")
  assert build_trainer().learning_rate_multiplier == 2.0


def test_size_macros_apply_whatever_the_order():
  parse("options/seq_1024.gin", "size/medium_150M.gin")
  after = bound_dimensions()
  gin.clear_config()
  parse("size/medium_150M.gin", "options/seq_1024.gin")
  assert bound_dimensions() == after == (12, 1024, 8, 128, 4096)


def test_command_line_bindings_override_files():
  parse("size/tiny_test.gin", params=["NUM_LAYERS = 3",
                                       "transformer_layer.TransformerLayer.window_length = 64"])
  model = build_model()
  assert len(layers(model)) == 3
  assert all(l.window_length == 64 for l in layers(model))


# ---------------------------------------------------------------------------------------
# Errors name what is wrong

def test_unknown_file_is_named():
  with pytest.raises(IOError, match="options/no_such_option.gin"):
    parse("options/no_such_option.gin")


def test_unknown_configurable_is_named():
  with pytest.raises(ValueError, match="no_such_module.NoSuchThing"):
    parse(params=["no_such_module.NoSuchThing.size = 1"])


def test_unknown_parameter_is_named():
  with pytest.raises(ValueError, match="no_such_parameter"):
    parse(params=["transformer_layer.TransformerLayer.no_such_parameter = 1"])


def test_unknown_parameter_in_a_file_is_named_with_the_file(tmp_path):
  (tmp_path / "typo.gin").write_text("decoder_stack.DecoderStack:\n  num_layer = 3\n")
  with pytest.raises(ValueError, match=r"num_layer(?s:.*)typo\.gin"):
    gin_setup.parse([BASE, "typo.gin"], search_paths=[str(tmp_path)])


# ---------------------------------------------------------------------------------------
# Each option changes what its name says (model options on the tiny model)

@pytest.mark.parametrize("option, position_type, absolute", [
    ("options/positions_t5.gin", "t5", False),
    ("options/positions_fourier.gin", "fourier", False),
    ("options/positions_rotary.gin", "rotary", False),
    ("options/positions_absolute.gin", None, True),
])
def test_positions_option_sets_the_encoding(option, position_type, absolute):
  # Start from another encoding, so that the option has to replace it.
  other = "options/positions_absolute.gin" if position_type else "options/positions_rotary.gin"
  parse(TINY, other, option)
  model = build_model()
  assert model.decoder.use_absolute_positions == absolute
  for layer in layers(model):
    assert layer.relative_position_type == position_type
    table = {"t5": positions.T5RelativePositionBias,
             "fourier": positions.RelativeFourierPositions}.get(position_type)
    if table is None:
      assert layer.relative_positions is None
    else:
      assert isinstance(layer.relative_positions, table)


def test_no_norm_turns_off_key_normalisation():
  parse(TINY, "options/no_norm.gin")
  for layer in layers(build_model()):
    assert not layer.tbase.normalize_keys
    assert layer.tbase.attention_scale is None


@pytest.mark.parametrize("length, batch", [(512, 8), (1024, 4), (2048, 2), (4096, 1)])
def test_seq_option_sets_length_and_streams_with_the_cache(length, batch):
  # After a nocache file, so that the option has to turn the cache back on.
  parse(TINY, "options/seq_512_nocache.gin", f"options/seq_{length}.gin")
  model = build_model()
  assert model.task_config.sequence_length == length
  assert model.task_config.batch_size == batch
  assert length * batch == 4096  # tokens per replica per step stay the same
  assert all(l.use_long_xl_architecture for l in layers(model))
  assert model.state_spec(batch)  # the cache is carried


@pytest.mark.parametrize("length, batch", [(512, 8), (1024, 4), (2048, 2)])
def test_nocache_option_sets_one_window_per_segment_and_no_state(length, batch):
  parse(TINY, f"options/seq_{length}_nocache.gin")
  model = build_model()
  assert model.task_config.sequence_length == length
  assert model.task_config.batch_size == batch
  for layer in layers(model):
    assert not layer.use_long_xl_architecture
    assert layer.window_length == length
  assert model.state_spec(batch) == {}


@pytest.mark.parametrize("window", [128, 256, 512, 1024, 2048])
def test_window_option_sets_the_window(window):
  parse(TINY, "options/seq_2048.gin", f"options/window_{window}.gin")
  model = build_model()
  assert all(l.window_length == window for l in layers(model))
  assert model.state_spec(1)["layer_0"]["keys"].shape[1] == window


def test_bfloat16_computes_in_bfloat16_with_float32_parameters_and_loss():
  parse(TINY, "options/bfloat16.gin")
  model = build_model()
  assert model.decoder.dtype == tf.bfloat16
  assert all(l.dtype == tf.bfloat16 for l in layers(model))
  assert all(v.dtype == tf.float32 for v in model.trainable_variables)
  tokens = tf.random.uniform([1, 256], 1, 256, tf.int32, seed=0)
  loss, _, state = model({"targets": tokens, "start_of_sequence": tf.constant([True])},
                         model.initial_state(1))
  assert loss.dtype == tf.float32 and math.isfinite(float(loss))
  assert state["layer_0"]["keys"].dtype == tf.bfloat16


def test_enable_scan_forces_float32_and_never_unrolls():
  parse(TINY, "options/bfloat16.gin", "options/enable_scan.gin")
  assert gin.query_parameter("%DTYPE") == "float32"
  assert gin.get_bindings("transformer_layer.TransformerLayer")["max_unrolled_windows"] == 0
  assert all(l.dtype == tf.float32 for l in layers(build_model()))


def test_debug_mode_reaches_the_trainer():
  parse("options/debug_mode.gin")
  trainer = build_trainer()
  assert trainer.trace_debug_mode
  assert trainer.print_variables
  assert not trainer.jit_compile
  assert gin.get_bindings("training_loop.Trainer")["replicate_mode"] is False


# ---------------------------------------------------------------------------------------
# Learning-rate options: the rate the trainer would use (base: 250k steps, 1000 warm-up)

def cosine(step, max_steps=250_000, max_lr=0.01, min_lr=0.001):
  return min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * step / max_steps)) / 2


@pytest.mark.parametrize("option, step, expected", [
    (BASE, 62_500, cosine(62_500)),
    ("options/lr_cosine_decay.gin", 62_500, cosine(62_500)),
    ("options/lr_cosine_decay_spike.gin", 1000, 0.04 * (10_000 - 1000) / 10_000),
    ("options/lr_cosine_decay_spike.gin", 20_000, cosine(20_000)),
    ("options/lr_linear_decay.gin", 62_500, 0.001 + 0.009 * 0.75),
    ("options/lr_linear_decay.gin", 500_000, 0.0005),  # tail: 2 min_lr (1/2)^(500k / 250k)
    ("options/lr_rsqrt_decay.gin", 2500, 0.001 / math.sqrt(2500 / 250_000)),
    ("options/lr_rsqrt_decay_std.gin", 1000, 1 / math.sqrt(1000)),
    ("options/lr_rsqrt_decay_std.gin", 40_000, 1 / math.sqrt(40_000)),
    ("options/lr_max_steps_125k.gin", 125_000, 0.001),
    ("options/lr_max_steps_250k.gin", 250_000, 0.001),
    ("options/lr_max_steps_500k.gin", 250_000, cosine(250_000, max_steps=500_000)),
    ("options/lr_scale_05.gin", 62_500, 0.5 * cosine(62_500)),
    ("options/lr_scale_2.gin", 62_500, 2.0 * cosine(62_500)),
])
def test_learning_rate_option_gives_its_schedule(option, step, expected):
  parse(option)
  trainer = build_trainer()
  rate = float(trainer.learning_rate(tf.constant(step, tf.int64)))
  assert rate == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("steps", [125_000, 250_000, 500_000])
def test_lr_max_steps_sets_the_schedule_horizon(steps):
  parse(f"options/lr_max_steps_{steps // 1000}k.gin")
  assert build_trainer().max_scheduled_steps == steps


@pytest.mark.parametrize("option, multiplier", [("options/lr_scale_05.gin", 0.5),
                                                ("options/lr_scale_2.gin", 2.0)])
def test_lr_scale_sets_the_multiplier(option, multiplier):
  parse(option)
  assert build_trainer().learning_rate_multiplier == multiplier


def test_every_option_file_has_a_behaviour_test():
  checked = {
      "options/bfloat16.gin", "options/debug_mode.gin", "options/enable_scan.gin",
      "options/no_norm.gin", "options/positions_absolute.gin", "options/positions_fourier.gin",
      "options/positions_rotary.gin", "options/positions_t5.gin",
      "options/lr_cosine_decay.gin", "options/lr_cosine_decay_spike.gin",
      "options/lr_linear_decay.gin", "options/lr_rsqrt_decay.gin",
      "options/lr_rsqrt_decay_std.gin", "options/lr_scale_05.gin", "options/lr_scale_2.gin",
  }
  checked |= {f"options/lr_max_steps_{k}k.gin" for k in (125, 250, 500)}
  checked |= {f"options/seq_{n}.gin" for n in (512, 1024, 2048, 4096)}
  checked |= {f"options/seq_{n}_nocache.gin" for n in (512, 1024, 2048)}
  checked |= {f"options/window_{w}.gin" for w in (128, 256, 512, 1024, 2048)}
  checked |= {"options/stack_window_512.gin"}
  # The memory files are checked in test_memory.py.
  checked |= {f"options/external_memory_{n}k.gin" for n in (8, 32, 64, 128)}
  checked |= {f"options/memory_backend_{b}.gin"
              for b in ("bucketed", "exact", "approx_max_k", "scann")}
  # test_trainer.py::test_the_trainer_leaves_the_named_gates_unscaled runs this one.
  checked |= {"options/gates_unscaled.gin"}
  assert set(OPTION_FILES) == checked


def test_stack_window_runs_the_stack_on_chunks_of_512():
  parse(TINY, "options/seq_2048.gin", "options/stack_window_512.gin")
  model = build_model()
  assert model.decoder.dstack_window_length == 512
  assert model.decoder.chunk_length == 512
  assert not model.decoder.feedback  # no recurrent layer to feed back
  assert all(l.window_length == 512 and not l.cross_attention for l in layers(model))


# ---------------------------------------------------------------------------------------
# recurrent/: the Block-Recurrent Transformer's files, in Meliad's order (size, options,
# then a gate file, then the files "applied after the gate config")

# The tiny model with room for layer -3, and segments that hold the gate files' W = 512.
RECURRENT_TINY = (TINY, "options/seq_1024.gin")
RECURRENT_TINY_PARAMS = ("NUM_LAYERS = 4",)


def recurrent_parameters(gate_type, single_gate, skip_ffn):
  """Trainable parameters a recurrent layer adds to an ordinary one.

  The token side gains Wq2 (E x Hd), attention_scale2 (H) and Hd more projection rows. The
  cell has its own norm (E), position embeddings and initial state (S x E each), Wk, Wv, Wq,
  Wq2 (E x Hd each), two attention scales (H each), then its gated projection and FFN.
  """
  _, embed, heads, head_size, mlp = bound_dimensions()
  states = gin.query_parameter("transformer_layer.TransformerLayer.recurrent_num_states")
  width = heads * head_size

  def gate(hidden):
    return embed if gate_type == "bias" else 2 * (hidden * embed + embed)

  token_side = embed * width + heads + width * embed
  cell = embed + 2 * states * embed + 4 * embed * width + 2 * heads
  if single_gate:
    cell += 2 * width * mlp + mlp * embed + gate(mlp)
  else:
    cell += 2 * width * embed + gate(2 * width)
    if not skip_ffn:
      cell += embed + 2 * embed * mlp + gate(mlp)
  return token_side + cell


@pytest.mark.parametrize("recurrent_file", RECURRENT_FILES)
def test_recurrent_file_parses_after_base_and_a_gate_file(recurrent_file):
  parse("size/small_test.gin", "recurrent/bias_skip.gin", recurrent_file)


@pytest.mark.parametrize("gate_file", GATE_FILES)
def test_gate_file_builds_its_arrangement_at_layer_minus_3(gate_file):
  gate_type, arrangement = gate_file[len("recurrent/"):-len(".gin")].split("_")
  single_gate, skip_ffn = arrangement == "single", arrangement == "skip"
  parse(*RECURRENT_TINY, gate_file, params=RECURRENT_TINY_PARAMS)
  model = build_model()
  recurrent = [i for i, l in enumerate(layers(model)) if l.recurrent is not None]
  assert recurrent == [1]  # -3 of 4 layers
  assert not model.decoder.feedback
  cell = layers(model)[1].recurrent
  assert cell.num_states == 512 and layers(model)[1].window_length == 512
  tbase = cell.recurrent_tbase
  assert tbase.single_gate == single_gate and tbase.skip_ffn == skip_ffn
  gated = tbase.ffn if single_gate else tbase.post_attn_mlp
  assert gated.gate_type == gate_type
  assert (trainable_without_embedding(model) == expected_trainable_without_embedding()
          + recurrent_parameters(gate_type, single_gate, skip_ffn))


def test_recurrent_files_override_window_and_states_in_order():
  def window_and_states():
    bindings = gin.get_bindings("transformer_layer.TransformerLayer")
    return bindings["window_length"], bindings["recurrent_num_states"]

  parse("size/small_test.gin")
  assert window_and_states() == (256, 384)
  gin.clear_config()
  parse("size/small_test.gin", "recurrent/bias_skip.gin")
  assert window_and_states() == (512, 512)  # the gate file overrides the size file
  gin.clear_config()
  parse("size/small_test.gin", "recurrent/bias_skip.gin", "recurrent/states_128.gin",
        "options/window_256.gin")
  assert window_and_states() == (256, 128)  # and later files override it
  gin.clear_config()
  parse("size/small_test.gin", "recurrent/states_128.gin", "options/window_256.gin",
        "recurrent/bias_skip.gin")
  assert window_and_states() == (512, 512)  # before it, they are overridden


@pytest.mark.parametrize("states", [128, 256, 512, 1024, 2048])
def test_states_file_sets_the_number_of_states(states):
  parse(*RECURRENT_TINY, "recurrent/lstm_skip.gin", f"recurrent/states_{states}.gin",
        params=RECURRENT_TINY_PARAMS)
  model = build_model()
  assert layers(model)[1].recurrent.num_states == states
  assert model.state_spec(1)["layer_1"]["recurrent"].shape == (1, states, 128)


def test_block_feedback_file_runs_the_stack_window_by_window_with_feedback():
  parse(*RECURRENT_TINY, "recurrent/bias_dual.gin", "options/window_256.gin",
        "recurrent/block_feedback_512.gin", params=RECURRENT_TINY_PARAMS)
  model = build_model()
  assert model.decoder.feedback and model.decoder.chunk_length == 512
  for i, l in enumerate(layers(model)):
    assert l.window_length == 512  # block_feedback_512 resets W after window_256
    assert l.cross_attention == (i != 1)
  assert (trainable_without_embedding(model) == expected_trainable_without_embedding()
          + recurrent_parameters("bias", False, False)
          + 3 * (128 * 128 + 4 + 128 * 128))  # Wq2, scale2, projection rows of 3 layers


def test_tall_24L_has_two_recurrent_layers():
  parse(*RECURRENT_TINY, "recurrent/bias_skip.gin", "recurrent/tall_24L.gin")
  model = build_model()
  assert len(layers(model)) == 24
  assert [i for i, l in enumerate(layers(model)) if l.recurrent is not None] == [9, 19]


def test_recipe_block_recurrent_binds_its_configuration():
  parse("size/medium_150M.gin", "options/positions_t5.gin", "options/seq_4096.gin",
        "recurrent/bias_skip.gin")
  layer = gin.get_bindings("transformer_layer.TransformerLayer")
  stack = gin.get_bindings("decoder_stack.DecoderStack")
  assert gin.get_bindings("decoder_stack.TransformerTaskConfig")["sequence_length"] == 4096
  assert (layer["window_length"], layer["recurrent_num_states"]) == (512, 512)
  assert (layer["recurrent_gate_type"], layer["recurrent_single_gate"],
          layer["recurrent_skip_ffn"]) == ("bias", False, True)
  assert stack["recurrent_layer_indices"] == (-3,) and not stack["feedback_recurrence"]


def test_recipe_block_recurrent_small_test_builds():
  parse("size/small_test.gin", "recurrent/bias_skip.gin", "options/window_256.gin")
  model = build_model()
  assert [i for i, l in enumerate(layers(model)) if l.recurrent is not None] == [3]
  assert model.state_spec(2)["layer_3"]["recurrent"].shape == (2, 512, 512)
  assert (trainable_without_embedding(model) == expected_trainable_without_embedding()
          + recurrent_parameters("bias", False, True))


def test_every_recurrent_file_has_a_behaviour_test():
  checked = set(GATE_FILES) | {f"recurrent/states_{n}.gin" for n in (128, 256, 512, 1024, 2048)}
  checked |= {"recurrent/block_feedback_512.gin", "recurrent/tall_24L.gin"}
  assert set(RECURRENT_FILES) == checked
