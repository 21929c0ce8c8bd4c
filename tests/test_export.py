"""The SavedModel: invariant 8 (reloaded scores equal the in-process model), state across
calls, reset, loading without our package, signatures, assets and atomic writes."""

import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest
import sentencepiece
import tensorflow as tf
from absl import app
from absl.testing import flagsaver

import pipelines
import tiny_run
from meliad_tf.model import language_model as model_lib
from meliad_tf.serving import export
from meliad_tf.serving import loading as checkpoint_loading
from meliad_tools import export as export_tool


L = tiny_run.SEQUENCE_LENGTH
B = tiny_run.BATCH
# float32 forward passes of the same graph ops, in and out of a SavedModel.
RTOL, ATOL = 1e-5, 1e-5


pytestmark = pytest.mark.usefixtures("clean_gin")


@pytest.fixture(scope="module")
def in_process():
  run = checkpoint_loading.load_model(tiny_run.shared_run())
  gin.clear_config()
  return run.model


def document_tokens(num_documents):
  """Token ids of the first synthetic test documents (raw bytes), as the run configures them."""
  tiny_run.configure()
  source = pipelines.get_task("synthetic").source
  documents = [np.frombuffer(source.generate("test", i), np.uint8).astype(np.int32)
               for i in range(num_documents)]
  gin.clear_config()
  return documents


def as_segments(documents):
  """[B, S, L]: document b cut into segments of L, zero-padded to the longest."""
  num_segments = max(-(-len(d) // L) for d in documents)
  out = np.zeros([len(documents), num_segments * L], np.int32)
  for b, d in enumerate(documents):
    out[b, :len(d)] = d
  return out.reshape(len(documents), num_segments, L)


def naive_log_probs(model, segments):
  """log p(token t+1) at each position t, by numpy from the decoder's logits, segment by
  segment with the state carried; 0 where padding is involved or at a segment's end."""
  batch, num_segments, length = segments.shape
  state = model.initial_state(batch)
  result = np.zeros(segments.shape, np.float64)
  for s in range(num_segments):
    tokens = segments[:, s]
    logits, state = model.decoder(tf.constant(tokens), tf.fill([batch], s == 0), state)
    logits = logits.numpy().astype(np.float64)
    log_softmax = logits - logits.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    for b in range(batch):
      for t in range(length - 1):
        if tokens[b, t] > 0 and tokens[b, t + 1] > 0:
          result[b, s, t] = log_softmax[b, t, tokens[b, t + 1]]
  return result


def score_segments(module, segments, first_start=True):
  module.reset_all()
  outputs = []
  for s in range(segments.shape[1]):
    start = tf.fill([segments.shape[0]], first_start and s == 0)
    outputs.append({k: v.numpy() for k, v in module.score(tf.constant(segments[:, s]),
                                                          start).items()})
  return outputs


def test_reloaded_saved_model_gives_the_in_process_token_losses(saved_model, in_process):
  segments = as_segments(document_tokens(B))
  loaded = tf.saved_model.load(saved_model)
  outputs = score_segments(loaded, segments)
  log_probs = np.stack([o["log_probs"] for o in outputs], axis=1)
  expected = naive_log_probs(in_process, segments)
  np.testing.assert_allclose(log_probs, expected, rtol=RTOL, atol=ATOL)
  for s, output in enumerate(outputs):
    np.testing.assert_allclose(output["loss"], -expected[:, s].sum(), rtol=RTOL)
    assert output["token_count"] == np.count_nonzero(expected[:, s])


def test_one_long_call_equals_several_calls_with_carried_state(saved_model, in_process):
  segments = as_segments(document_tokens(B))
  batch, num_segments, _ = segments.shape
  loaded = tf.saved_model.load(saved_model)
  by_segment = np.stack([o["log_probs"] for o in score_segments(loaded, segments)], axis=1)
  whole = tf.constant(segments.reshape(batch, num_segments * L))
  _, metrics, _ = in_process({"targets": whole, "start_of_sequence": tf.fill([batch], True)},
                             in_process.initial_state(batch))
  long_call = -metrics["token_losses"].numpy().reshape(batch, num_segments, L)
  # A segment's last position predicts the next segment's first token only in the long call.
  np.testing.assert_allclose(by_segment[:, :, :-1], long_call[:, :, :-1], rtol=RTOL, atol=ATOL)
  assert np.all(by_segment[:, :, -1] == 0)


def test_reset_of_one_stream_leaves_the_others(saved_model):
  segments = as_segments(document_tokens(B))[:, :2]
  loaded = tf.saved_model.load(saved_model)
  first, second = tf.constant(segments[:, 0]), tf.constant(segments[:, 1])
  both = tf.constant([True, True])
  continuing = tf.constant([False, False])

  loaded.reset_all()
  loaded.score(first, both)
  continued = loaded.score(second, continuing)["log_probs"].numpy()
  loaded.reset_all()
  fresh = loaded.score(second, both)["log_probs"].numpy()
  loaded.reset_all()
  loaded.score(first, both)
  loaded.reset(tf.constant([True, False]))
  mixed = loaded.score(second, continuing)["log_probs"].numpy()

  np.testing.assert_allclose(mixed[0], fresh[0], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(mixed[1], continued[1], rtol=RTOL, atol=ATOL)
  assert not np.allclose(fresh[1], continued[1], atol=1e-4)


def test_saved_model_runs_in_a_process_without_our_package(saved_model, tmp_path):
  segments = as_segments(document_tokens(B))[:, :2]
  np.save(tmp_path / "segments.npy", segments)
  expected = np.stack([o["log_probs"] for o in score_segments(
      tf.saved_model.load(saved_model), segments)])
  np.save(tmp_path / "expected.npy", expected)
  code = f"""
import json, sys
import numpy as np
import tensorflow as tf
m = tf.saved_model.load({saved_model!r})
meta = json.load(open({os.path.join(saved_model, "assets", "metadata.json")!r}))
segments = np.load({str(tmp_path / "segments.npy")!r})
m.reset_all()
got = np.stack([m.score(tf.constant(segments[:, s]), tf.fill([2], s == 0))["log_probs"].numpy()
                for s in range(segments.shape[1])])
np.testing.assert_allclose(got, np.load({str(tmp_path / "expected.npy")!r}), rtol=1e-6, atol=1e-6)
tokens = m.generate(tf.constant(segments[:, 0]), tf.constant([5, 9]), tf.constant(4),
                    tf.constant(0.0), tf.constant(0), tf.constant([1, 2], tf.int64))["tokens"]
assert tokens.shape == (2, 4), tokens.shape
assert m.decode(m.encode("key = value")).numpy() == b"key = value"
ours = [n for n in sys.modules if n.split(".")[0] in ("meliad_tf", "pipelines", "meliad_tools")]
assert not ours, ours
print("OK", meta["family"])
"""
  process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=str(tmp_path), env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                           check=False)
  assert process.returncode == 0, process.stderr[-3000:]
  assert process.stdout.strip().endswith("OK transformer_xl")


def test_metadata_and_assets_describe_the_model(saved_model):
  meta = export.read_metadata(saved_model)
  expected = {"family": "transformer_xl", "task": "synthetic", "step": 2, "num_layers": 2,
              "embedding_size": 32, "num_heads": 2, "head_size": 16, "vocab_size": 256,
              "sequence_length": L, "window_length": tiny_run.WINDOW, "batch_size": B,
              "supports_generate": True, "memory_layers": [], "recurrent_layers": [],
              "jit_compile": False}
  assert {k: meta[k] for k in expected} == expected
  assert meta["vocabulary"] == {"kind": "raw_bytes", "vocab_size": 256, "file": "vocabulary.json"}
  assert meta["state"]["layer_1/keys"] == {"shape": [B, tiny_run.WINDOW, 2, 16],
                                           "dtype": "float32"}
  assets = os.path.join(saved_model, "assets")
  with open(os.path.join(assets, "config.gin")) as f, \
      open(os.path.join(tiny_run.shared_run(), "config.gin")) as g:
    assert f.read() == g.read()
  with open(os.path.join(assets, "vocabulary.json")) as f:
    assert json.load(f)["offset"] == 0
  loaded = tf.saved_model.load(saved_model)
  text = "Remember these facts.\nkey 1 = value 2.\n"
  assert loaded.encode(text).numpy().tolist() == pipelines.RawByteVocabulary().encode(text)
  assert loaded.decode(tf.constant([0, 72, 105, 0], tf.int32)).numpy() == b"Hi"


def test_signatures_reject_wrong_dtypes_shapes_and_token_ids(saved_model):
  loaded = tf.saved_model.load(saved_model)
  start = tf.constant([True, True])
  with pytest.raises(TypeError, match=r"dtype=tf.int64.*to TensorSpec\(shape=\(2, 32\), "
                                      r"dtype=tf.int32, name='tokens'\)"):
    loaded.score(tf.zeros([B, L], tf.int64), start)
  with pytest.raises(TypeError, match=r"shape=\(2, 33\).*to TensorSpec\(shape=\(2, 32\)"):
    loaded.score(tf.zeros([B, L + 1], tf.int32), start)
  with pytest.raises(TypeError, match="start_of_sequence"):
    loaded.score(tf.zeros([B, L], tf.int32), tf.constant([1, 1]))
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"token ids must be in \[0, 256\)"):
    loaded.score(tf.fill([B, L], 256), start)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"token ids must be in \[0, 256\)"):
    loaded.score(tf.fill([B, L], -1), start)
  with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a int32 tensor"):
    loaded.signatures["score"](tokens=tf.zeros([B, L], tf.int64), start_of_sequence=start)


def test_a_directory_that_is_not_ours_is_refused(tmp_path):
  module = tf.Module()
  module.f = tf.function(lambda: tf.constant(1), input_signature=[])
  tf.saved_model.save(module, str(tmp_path / "other"))
  with pytest.raises(ValueError, match="not a SavedModel written by meliad-export: it has no "
                                       "assets/metadata.json"):
    export.load(str(tmp_path / "other"))
  with pytest.raises(ValueError, match="does not exist"):
    export.load(str(tmp_path / "missing"))


def test_a_workdir_without_checkpoint_is_refused(tmp_path):
  with pytest.raises(checkpoint_loading.WorkdirError, match="no checkpoint in .*checkpoints"):
    checkpoint_loading.load_model(str(tmp_path))
  with pytest.raises(checkpoint_loading.WorkdirError, match="does not exist"):
    checkpoint_loading.load_model(str(tmp_path / "missing"))
  with flagsaver.flagsaver(workdir=str(tmp_path), output=str(tmp_path / "out")):
    with pytest.raises(app.UsageError, match="no checkpoint in"):
      export_tool.main(["meliad-export"])
  assert not os.path.exists(tmp_path / "out")


def test_meliad_export_writes_a_loadable_xla_saved_model_that_scores_like_graphs(
    tmp_path, capsys, saved_model):
  output = tmp_path / "exported"
  with flagsaver.flagsaver(workdir=tiny_run.shared_run(), load_dir="", output=str(output),
                           batch_size=1, overwrite=False, jit_compile=True, gin_param=[]):
    export_tool.main(["meliad-export"])
    assert "(transformer_xl, step 2, B=1, L=32, W=16)" in capsys.readouterr().out
    with pytest.raises(app.UsageError, match="already exists; remove it or pass --overwrite"):
      export_tool.main(["meliad-export"])
  loaded, meta = export.load(str(output))
  assert meta["batch_size"] == 1 and meta["jit_compile"]
  segments = as_segments(document_tokens(B))[:, :2]
  xla = score_segments(loaded, segments[:1])
  graph = score_segments(tf.saved_model.load(saved_model), segments)
  for x, g in zip(xla, graph):
    np.testing.assert_allclose(x["log_probs"][0], g["log_probs"][0], rtol=1e-4, atol=1e-5)


def test_a_failed_export_leaves_nothing_under_the_target(tmp_path, in_process, monkeypatch):
  module = export.ScoringModule(in_process, 1, pipelines.RawByteVocabulary())

  def fail_halfway(obj, path, **kwargs):
    del obj, kwargs
    os.makedirs(os.path.join(path, "variables"))
    with open(os.path.join(path, "saved_model.pb"), "w") as f:
      f.write("partial")
    raise OSError("disk full")

  monkeypatch.setattr(tf.saved_model, "save", fail_halfway)
  with pytest.raises(OSError, match="disk full"):
    export.export(module, str(tmp_path / "model"), vocabulary=pipelines.RawByteVocabulary(),
                  config_text="", task_name="synthetic", step=0)
  assert os.listdir(tmp_path) == []


def test_overwrite_replaces_an_existing_export(tmp_path, in_process):
  target = tmp_path / "model"
  target.mkdir()
  (target / "stale.txt").write_text("old")
  module = export.ScoringModule(in_process, 1, pipelines.RawByteVocabulary())
  with pytest.raises(export.ExportError, match="already exists"):
    export.export(module, str(target), vocabulary=pipelines.RawByteVocabulary(),
                  config_text="", task_name="synthetic", step=7)
  export.export(module, str(target), vocabulary=pipelines.RawByteVocabulary(),
                config_text="", task_name="synthetic", step=7, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["model"]
  assert not (target / "stale.txt").exists()
  assert export.read_metadata(str(target))["step"] == 7


def test_sentencepiece_vocabulary_travels_as_an_asset(tmp_path):
  text = "the quick brown fox jumps over the lazy dog\n" * 50
  prefix = str(tmp_path / "sp")
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(text.splitlines(keepends=True)), model_prefix=prefix,
      vocab_size=40, model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      byte_fallback=False, minloglevel=2)
  vocabulary = pipelines.SentencePieceVocabulary(prefix + ".model")
  tiny_run.configure("NUM_EMBEDDINGS = 64")
  model = model_lib.DecoderOnlyLanguageModel(output_token_losses=True)
  module = export.ScoringModule(model, 1, vocabulary)
  export.export(module, str(tmp_path / "model"), vocabulary=vocabulary, config_text="",
                task_name="files_tokens:x", step=0)
  loaded, meta = export.load(str(tmp_path / "model"))
  assert meta["vocabulary"]["kind"] == "sentencepiece"
  assert os.path.exists(tmp_path / "model" / "assets" / "vocabulary.model")
  sample = "the lazy fox"
  assert loaded.encode(sample).numpy().tolist() == vocabulary.encode(sample)
  assert loaded.decode(tf.constant(vocabulary.encode(sample))).numpy().decode() == sample
  restored = export.vocabulary_of(str(tmp_path / "model"), meta)
  assert restored.encode(sample) == vocabulary.encode(sample)


def test_xla_is_the_default_only_with_a_gpu():
  assert export.resolve_jit_compile(True) and not export.resolve_jit_compile(False)
  assert export.resolve_jit_compile(None) == bool(tf.config.list_physical_devices("GPU"))


FAMILIES = {
    "block_recurrent": ["TransformerLayer.window_length = 8",
                        "DecoderStack.recurrent_layer_indices = (-1,)",
                        "TransformerLayer.recurrent_num_states = 4",
                        "DecoderStack.feedback_recurrence = False"],
    "memorizing": tiny_run.MEMORIZING,
}


def family_model(name, *params):
  """An untrained tiny model of a family, with segments of 16 tokens."""
  tiny_run.configure("TransformerTaskConfig.sequence_length = 16", *FAMILIES[name], *params)
  tf.random.set_seed(1)
  return model_lib.DecoderOnlyLanguageModel(output_token_losses=True)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_scores_alike_after_reload_and_resets_to_a_document_start(name, tmp_path):
  model = family_model(name)
  vocabulary = pipelines.RawByteVocabulary()
  module = export.ScoringModule(model, 2, vocabulary)
  export.export(module, str(tmp_path / "model"), vocabulary=vocabulary, config_text="",
                task_name="synthetic", step=0)
  loaded, meta = export.load(str(tmp_path / "model"))
  assert meta["family"] == name
  if name == "memorizing":
    assert (meta["memory_num_neighbors"], meta["memory_database_size"]) == (4, 32)
  else:
    assert meta["recurrent_num_states"] == 4
  assert meta["supports_generate"] and meta["generate_unsupported_reason"] is None
  segments = tf.random.stateless_uniform([2, 3, 16], [5, 6], 1, 256, tf.int32).numpy()
  scored = np.stack([o["log_probs"] for o in score_segments(loaded, segments)], axis=1)
  np.testing.assert_allclose(scored, naive_log_probs(model, segments), rtol=RTOL, atol=ATOL)
  # The stateless signature, the state carried by the caller, gives the same; and
  # serving_default is score.
  state = {key.replace("new_state__", "state__"): value
           for key, value in loaded.signatures["initial_state"]().items()}
  for index in range(segments.shape[1]):
    outputs = loaded.signatures["score_segment"](
        tokens=tf.constant(segments[:, index]),
        start_of_sequence=tf.constant([index == 0] * 2), **state)
    np.testing.assert_allclose(outputs["log_probs"], scored[:, index], rtol=RTOL, atol=ATOL)
    state = {key.replace("new_state__", "state__"): value for key, value in outputs.items()
             if key.startswith("new_state__")}
  assert loaded.signatures["serving_default"].structured_outputs.keys() == {
      "log_probs", "predictions", "loss", "token_count"}
  # After a reset the stream starts afresh (the learned initial state, an empty memory),
  # whatever start_of_sequence says.
  loaded.reset(tf.constant([True, False]))
  after_reset = loaded.score(tf.constant(segments[:, 0]), tf.constant([False, False]))
  np.testing.assert_allclose(after_reset["log_probs"][0], scored[0, 0], rtol=RTOL, atol=ATOL)
  # Generation (tests/test_generation.py checks it against the forward pass) is the same
  # out of the SavedModel; its signature takes write_memory by keyword.
  prompt = tf.constant(segments[:, :2].reshape(2, 32))
  arguments = dict(prompt=prompt, lengths=tf.constant([23, 4]), max_length=tf.constant(20),
                   temperature=tf.constant(1.0), top_k=tf.constant(0),
                   seed=tf.constant([3, 1], tf.int64))
  tokens = {}
  for write_memory in (False, True):
    tokens[write_memory] = module.generate(
        **arguments, write_memory=tf.constant(write_memory))["tokens"].numpy()
    reloaded = loaded.signatures["generate"](**arguments, write_memory=tf.constant(write_memory))
    np.testing.assert_array_equal(reloaded["tokens"].numpy(), tokens[write_memory])
  # Called without write_memory, the restored function does not write.
  np.testing.assert_array_equal(loaded.generate(*arguments.values())["tokens"].numpy(),
                                tokens[False])


def test_a_memory_searched_on_the_host_scores_in_process_but_is_not_exported(tmp_path):
  model = family_model("memorizing", "memory_on_tpu_factory.backend = 'scann'")
  vocabulary = pipelines.RawByteVocabulary()
  tokens = tf.constant(np.arange(1, 33, dtype=np.int32).reshape(2, 16) * 7 % 200 + 1)
  scored = {}
  for jit_compile in (False, True):  # XLA clusters around the host's search
    module = export.ScoringModule(model, 2, vocabulary, jit_compile=jit_compile)
    scored[jit_compile] = module.score(tokens, tf.constant([True, True]))["log_probs"].numpy()
  np.testing.assert_allclose(scored[True], scored[False], rtol=RTOL, atol=ATOL)
  with pytest.raises(export.ExportError, match="a SavedModel cannot hold"):
    export.export(export.ScoringModule(model, 2, vocabulary), str(tmp_path / "model"),
                  vocabulary=vocabulary, config_text="", task_name="synthetic", step=0)
  assert os.listdir(tmp_path) == []


def test_score_refuses_ids_the_embedding_has_but_the_vocabulary_does_not(clean_gin):
  """An embedding of 300 rows for the 256 raw bytes: ids 256..299 are no text's tokens."""
  tiny_run.configure("NUM_EMBEDDINGS = 300", "TransformerTaskConfig.sequence_length = 16")
  model = model_lib.DecoderOnlyLanguageModel(output_token_losses=True)
  module = export.ScoringModule(model, 1, pipelines.RawByteVocabulary())
  module.score(tf.fill([1, 16], 255), tf.constant([True]))
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"must be in \[0, 256\)"):
    module.score(tf.fill([1, 16], 280), tf.constant([True]))

