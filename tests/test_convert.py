"""meliad-convert: Flax's checkpoint files, the gin translation, refusals, and the workdir it
writes (resumed by the trainer, exported). Numerical parity is in test_meliad_parity.py."""

import gzip
import json
import os
import sys

import gin
import msgpack
import numpy as np
import pytest
import tensorflow as tf
from absl import app
from absl.testing import flagsaver

from meliad_tf.model import language_model as model_lib
from meliad_tf.serving import export
from meliad_tf.training import checkpoints
from meliad_tf.training import convert
from meliad_tf.training import gin_setup
from meliad_tf.training import optimizer as optimizer_lib
from meliad_tf.training import trainer as trainer_lib
from meliad_tools import convert as convert_tool
from meliad_tools import export as export_tool


GOLDENS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meliad_goldens")
XL = os.path.join(GOLDENS, "xl_t5")  # Flax's legacy format: one msgpack file.
MEMORY = os.path.join(GOLDENS, "memory_bucketed")  # Orbax's directory.


def _flax_array(array):
  """Flax's encoding of an array, written here from its documented layout."""
  payload = msgpack.packb((list(array.shape), array.dtype.name, array.tobytes("C")),
                          use_bin_type=True)
  return msgpack.ExtType(1, payload)


def test_reads_flax_legacy_files_and_orbax_directories():
  for directory, kind in ((XL, "file"), (MEMORY, "directory")):
    path = convert.latest_checkpoint(directory)
    assert os.path.basename(path) == "checkpoint_1"
    assert (os.path.isdir(path) if kind == "directory" else os.path.isfile(path))
    tree = convert.read_flax_checkpoint(path)
    assert int(tree["optimizer"]["state"]["step"]) == 2
    embedding = tree["optimizer"]["target"]["decoder"]["embed"]["embedding"]
    assert embedding.shape == (256, 6) and embedding.dtype == np.float32


def test_bfloat16_chunked_and_scalar_leaves(tmp_path):
  values = np.array([1.5, -2.25, 3.0e-3, 7.0], np.float32)
  bfloat16 = (values.view(np.uint32) >> 16).astype(np.uint16)
  bf16_payload = msgpack.packb(([2, 2], "bfloat16", bfloat16.tobytes()), use_bin_type=True)
  whole = np.arange(10, dtype=np.float32).reshape(2, 5)
  chunked = {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 5},
             "chunks": {"0": _flax_array(whole.ravel()[:6]), "1": _flax_array(whole.ravel()[6:])}}
  scalar = msgpack.ExtType(3, _flax_array(np.array(5, np.int32)).data)
  data = msgpack.packb({"a": msgpack.ExtType(1, bf16_payload), "b": {"c": chunked}, "s": scalar},
                       use_bin_type=True)
  path = tmp_path / "checkpoint_7"
  path.write_bytes(data)
  tree = convert.read_flax_checkpoint(str(path))
  # These values are exact in bfloat16 (8 bits of mantissa) except 3e-3, truncated.
  np.testing.assert_array_equal(tree["a"].ravel()[[0, 1, 3]], [1.5, -2.25, 7.0])
  np.testing.assert_allclose(tree["a"].ravel()[2], 3.0e-3, rtol=2 ** -7)
  np.testing.assert_array_equal(tree["b"]["c"], whole)
  assert tree["s"] == 5
  assert convert.latest_checkpoint(str(tmp_path)).endswith("checkpoint_7")


def test_latest_checkpoint_is_the_highest_step_and_ignores_unfinished_writes(tmp_path):
  for name in ("checkpoint_9", "checkpoint_10", "checkpoint_12.orbax-checkpoint-tmp-123",
               "checkpoint_11tmp"):
    (tmp_path / name).write_bytes(b"")
  assert convert.latest_checkpoint(str(tmp_path)).endswith("checkpoint_10")
  (tmp_path / "empty").mkdir()
  with pytest.raises(convert.ConversionError, match="no checkpoint_<step>"):
    convert.latest_checkpoint(str(tmp_path / "empty"))
  with pytest.raises(convert.ConversionError, match="not a directory"):
    convert.latest_checkpoint(str(tmp_path / "missing"))


def test_not_a_flax_checkpoint_is_refused(tmp_path):
  (tmp_path / "checkpoint_1").write_bytes(b"\xc1 not msgpack")
  with pytest.raises(convert.ConversionError, match="not a Flax"):
    convert.read_flax_checkpoint(str(tmp_path / "checkpoint_1"))
  (tmp_path / "checkpoint_2").mkdir()
  with pytest.raises(convert.ConversionError, match="tensorstore"):
    convert.read_flax_checkpoint(str(tmp_path / "checkpoint_2"))


def test_missing_msgpack_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "msgpack", None)
  with pytest.raises(ImportError, match=r"meliad-tf\[convert\]"):
    convert.require_msgpack()


MELIAD_CONFIG = """\
import training_loop
from transformer import decoder_stack

# Macros:
NUM_HEADS = 4
DTYPE = 'float32'

DecoderStack.memory_factory = @memory_factory.memory_on_tpu_factory
DecoderStack.name = None
DecoderStack.recurrent_layer_indices = (-3,)
transformer_attn/MLP.num_layers = 1
TransformerLayer.num_heads = %NUM_HEADS
TransformerLayer.supported_modes_for_cache = ('train', 'test')
Trainer.optimizer_factory = @optimizer_config.FlaxAdafactorConfig()
BatchedMemory.query_stride = 1
"""


def test_translation_keeps_meliads_bindings_under_our_names():
  text = convert.translate_config(MELIAD_CONFIG)
  assert text.splitlines() == [
      "NUM_HEADS = 4",
      "DTYPE = 'float32'",
      "decoder_stack.DecoderStack.memory_factory = @memory_factory.memory_on_tpu_factory",
      "decoder_stack.DecoderStack.recurrent_layer_indices = (-3,)",
      "transformer_attn/nn_components.MLP.num_layers = 1",
      "transformer_layer.TransformerLayer.num_heads = %NUM_HEADS",
      "training_loop.Trainer.optimizer_factory = @optimizer_config.FlaxAdafactorConfig()",
  ]


def test_unsupported_bindings_are_refused_by_name_and_line():
  text = MELIAD_CONFIG + ("TransformerLayer.importance_mode = 'x'\n"
                          "BatchedMemory.query_stride = 2\n"
                          "register_interstep_callbacks.log = @my_callback\n"
                          "Trainer.model_definition = @models.SomethingElse\n"
                          "STRIDE = 2\n"
                          "BatchedMemory.update_stride = %STRIDE\n")
  with pytest.raises(convert.ConversionError) as error:
    convert.translate_config(text, "run/config.gin")
  message = str(error.value)
  assert "run/config.gin, line 16 (TransformerLayer.importance_mode = 'x')" in message
  assert "has no parameter 'importance_mode'" in message
  assert "supports only BatchedMemory.query_stride = 1" in message
  assert "no counterpart of register_interstep_callbacks" in message
  assert "@models.SomethingElse, which meliad-tf does not have" in message
  assert "line 21 (BatchedMemory.update_stride = %STRIDE): meliad-tf supports only" in message


@pytest.mark.parametrize("binding, message", [
    ("NUM_LAYERS = 3", r"decoder/transformer2/.*expected, not in Meliad's checkpoint"),
    ("MLP_DIM = 8", r"has shape \(6, 16\) but .* has \(6, 8\)"),
])
def test_a_checkpoint_that_does_not_fit_the_configuration_is_refused(tmp_path, clean_gin,
                                                                     binding, message):
  with pytest.raises(convert.ConversionError, match=message):
    convert.convert(XL, str(tmp_path / "out"), [binding])
  assert not checkpoints.latest_checkpoint(str(tmp_path / "out"))


def test_meliad_train_resumes_the_converted_run_and_meliad_export_exports_it(tmp_path,
                                                                            clean_gin, capsys):
  workdir = str(tmp_path / "converted")
  with flagsaver.flagsaver(meliad_workdir=MEMORY, output=workdir,
                           gin_param=["training_loop.Trainer.num_steps = 3"]):
    convert_tool.main(["meliad-convert"])
    assert "(optimizer step 2)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already holds a checkpoint"):
      convert_tool.main(["meliad-convert"])
  converted = convert.read_flax_checkpoint(convert.latest_checkpoint(MEMORY))
  gin.clear_config()
  gin_setup.parse([os.path.join(workdir, "config.gin")])
  trainer = trainer_lib.Trainer().build()
  trainer.train(workdir)
  assert trainer.step == 3
  assert [checkpoints.checkpoint_step(p) for p in
          checkpoints.checkpoint_candidates(os.path.join(workdir, "checkpoints"))[0]] == [3]
  # The step ran from the converted parameters: they moved by one small update.
  embedding = converted["optimizer"]["target"]["decoder"]["embed"]["embedding"]
  moved = trainer.model.decoder.embedding.numpy() - embedding
  assert 0 < np.max(np.abs(moved)) < 0.1 * np.max(np.abs(embedding))
  with flagsaver.flagsaver(workdir=workdir, load_dir="", output=str(tmp_path / "exported"),
                           batch_size=1, overwrite=False, jit_compile=False, gin_param=[]):
    export_tool.main(["meliad-export"])
  assert export.read_metadata(str(tmp_path / "exported"))["step"] == 3


def test_convert_tool_requires_its_flags():
  with flagsaver.flagsaver(meliad_workdir="", output=""):
    with pytest.raises(app.UsageError, match="--meliad_workdir"):
      convert_tool.main(["meliad-convert"])


def test_training_with_token_losses_in_the_metrics(tmp_path, clean_gin):
  gin_setup.parse(["base_htrans.gin", "size/tiny_test.gin"], [
      "models.DecoderOnlyLanguageModel.output_token_losses = True",
      "decoder_stack.TransformerTaskConfig.sequence_length = 128",
      "transformer_layer.TransformerLayer.window_length = 64",
      "training_loop.Trainer.num_steps = 1", "training_loop.Trainer.test_every_steps = 0"])
  trainer = trainer_lib.Trainer().build()
  trainer.train(str(tmp_path / "run"))
  assert trainer.step == 1


with gzip.open(os.path.join(GOLDENS, "parameter_shapes.json.gz"), "rt") as _f:
  MELIAD_SHAPES = json.load(_f)


@pytest.mark.parametrize("name", sorted(MELIAD_SHAPES["arrangements"]))
def test_every_parameter_and_slot_has_meliads_path_and_shape(name, clean_gin):
  """Against the parameters and Adafactor slots of Meliad's own model, for every recurrent
  gate and arrangement, block feedback, Fourier positions and a LayerNorm bias."""
  record = MELIAD_SHAPES["arrangements"][name]
  gin_setup.parse(["base_htrans.gin"] + record["gin_files"],
                  MELIAD_SHAPES["common_bindings"] + record["bindings"]
                  + MELIAD_SHAPES["late_bindings"])
  model = model_lib.DecoderOnlyLanguageModel()
  optimizer = optimizer_lib.FlaxAdafactorConfig().create()
  optimizer.build(model.trainable_variables)
  pairs = convert.parameter_paths(model)
  assert {path: list(v.shape) for path, v in pairs.items()} == record["params"]
  slots = {f"{path}/{slot}": list(slot_variable.shape) for path, variable in pairs.items()
           for slot, slot_variable in optimizer.slots_for(variable).items()}
  assert slots == record["slots"]


def test_converts_into_a_workdir_on_any_filesystem(tmp_path, monkeypatch, clean_gin):
  monkeypatch.chdir(tmp_path)  # A local-file call would leave a directory "ram:" here.
  output = "ram://meliad_convert_test/converted"
  convert.convert(XL, output)
  assert tf.io.gfile.exists(os.path.join(output, "config.gin"))
  assert tf.io.gfile.exists(os.path.join(output, checkpoints.SIGNATURE_FILE))
  assert os.listdir(tmp_path) == []
