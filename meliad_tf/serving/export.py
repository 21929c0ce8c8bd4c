"""The exported model: a SavedModel that plain TensorFlow loads and runs.

`ScoringModule` wraps a `DecoderOnlyLanguageModel` for B streams. Its functions are
TensorFlow ops only, so `tf.saved_model.load` needs nothing from this package (a
SentencePiece vocabulary needs `import tensorflow_text` before loading, for its ops):

* `score(tokens int32 [B, L], start_of_sequence bool [B])` ->
  {"log_probs" float32 [B, L]: log p(token t+1) at position t, 0 where nothing is
  predicted (padding, the last position of the segment); "predictions" int32 [B, L]: the
  argmax of the next-token distribution; "loss": the summed negative log-likelihood;
  "token_count": the predicted tokens}. The per-stream state (XL caches, and memories or
  recurrent states for those families) lives in variables and carries over between calls.
  `serving_default` is `score`.
* `score_segment(tokens, start_of_sequence, state__<path>...)` -> the outputs of `score`
  and `new_state__<path>...`: the same computation with the state as explicit tensors in
  and out (one per state tensor, its path in `metadata.json`'s "state" with "/" written
  "__"), for servers that keep no state between requests: the caller keeps each stream's
  state and sends it back with the stream's next segment. `initial_state()` gives the
  state of B new streams (zeros; a stream's first segment has `start_of_sequence` True).
* `reset(streams bool [B])` and `reset_all()`: forget the given (all) streams. The next
  `score` treats them as starting a document whatever its `start_of_sequence` says, as it
  does for every stream of a freshly loaded SavedModel.
* `generate(prompt int32 [B, P], lengths int32 [B], max_length, temperature, top_k,
  seed int64 [2], write_memory bool [] = False)` -> {"tokens" int32 [B, max_length]} (see
  `generation.generate`; `write_memory` writes the segments completed while generating to a
  memory model's memory; the `generate` signature, called by keyword, needs it given); it
  does not touch the scoring state. Absent when the model cannot generate, for a layer
  without the XL cache (metadata `supports_generate` is false and
  `generate_unsupported_reason` says why).
* `encode(text string [])` -> int32 [n] and `decode(tokens int32 [n])` -> string [].

Assets: `config.gin` (the run's operative configuration), `metadata.json` (family,
sizes, L, W, B, vocabulary, state shapes) and the vocabulary (`vocabulary.json` for the
byte schemes, `vocabulary.model` for SentencePiece).

`export` writes the directory into a temporary sibling and moves it into place only once
complete (`storage.publish_directory`, with `saved_model.pb` moved last where the move is
not one rename, as on GCS), so a failed export leaves nothing a loader accepts under the
target name. Every path may be on any filesystem TensorFlow reads (`gs://...`). A memory
searched on the host (the ScaNN backend, a Python call inside the step) cannot be held by a
SavedModel: such models are refused and can be evaluated in process.
"""

import dataclasses
import json
import os

import gin
import tensorflow as tf

import pipelines
from meliad_tf.common import storage
from meliad_tf.serving import generation
from meliad_tf.serving import loading as checkpoint_loading
from meliad_tf.training import gin_setup
from meliad_tf.training import state as state_lib
from meliad_tf.training import steps


FORMAT = "meliad-tf-saved-model"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
# The file that makes a directory a SavedModel; written last.
SAVED_MODEL_FILE = "saved_model.pb"
CONFIG_FILE = "config.gin"
BYTE_VOCABULARY_FILE = "vocabulary.json"
SENTENCEPIECE_FILE = "vocabulary.model"

# Offsets of token ids above byte values, per byte vocabulary kind (pipelines.vocabularies).
_BYTE_OFFSETS = {"bytes": 3, "raw_bytes": 0}
_BYTE_DESCRIPTIONS = {
    "bytes": "token = UTF-8 byte value + 3; 0 = padding, 1 = end of sequence, 2 = unknown",
    "raw_bytes": "token = byte value; 0 = padding (byte 0 cannot be encoded)",
}


class ExportError(RuntimeError):
  pass


def family(model):
  """"transformer_xl", "memorizing" or "block_recurrent"."""
  stack = model.decoder
  if stack.recurrent_layer_indices:
    return "block_recurrent"
  if stack.memory_layer_indices:
    return "memorizing"
  return "transformer_xl"


class _ByteCodec(tf.Module):
  """Text <-> ids of a byte vocabulary in graph ops (no tokenizer library needed)."""

  def __init__(self, offset, vocab_size):
    super().__init__(name="byte_codec")
    self.offset = offset
    self.vocab_size = vocab_size

  def encode(self, text):
    return tf.cast(tf.io.decode_raw(text, tf.uint8), tf.int32) + self.offset

  def decode(self, tokens):
    values = tokens - self.offset
    keep = (tokens > 0) & (values >= 0) & (values < 256)
    single_bytes = tf.constant([bytes([i]) for i in range(256)])
    return tf.strings.reduce_join(tf.gather(single_bytes, tf.boolean_mask(values, keep)))


class _SentencePieceCodec(tf.Module):
  """Text <-> ids through tensorflow_text's SentencePiece ops."""

  def __init__(self, model_proto, vocab_size):
    super().__init__(name="sentencepiece_codec")
    import tensorflow_text  # pylint: disable=g-import-not-at-top
    self.vocab_size = vocab_size
    self.tokenizer = tensorflow_text.SentencepieceTokenizer(model=model_proto, out_type=tf.int32)

  def encode(self, text):
    return self.tokenizer.tokenize(text)

  def decode(self, tokens):
    keep = (tokens > 0) & (tokens < self.vocab_size)
    return self.tokenizer.detokenize(tf.boolean_mask(tokens, keep))


def make_codec(vocabulary):
  """The in-graph tokenizer of a `pipelines` vocabulary."""
  if vocabulary.kind in _BYTE_OFFSETS:
    return _ByteCodec(_BYTE_OFFSETS[vocabulary.kind], vocabulary.vocab_size)
  if vocabulary.kind == "sentencepiece":
    with tf.io.gfile.GFile(vocabulary.model_path, "rb") as f:
      return _SentencePieceCodec(f.read(), vocabulary.vocab_size)
  raise ExportError(f"cannot export vocabulary kind {vocabulary.kind!r}")


class ScoringModule(tf.Module):
  """A model with per-stream state in variables: score, reset, generate (see module doc).

  Used in process as is, or saved by `export`.

  Args:
    model: a `DecoderOnlyLanguageModel` built with `output_token_losses=True`.
    batch_size: B, the streams scored together.
    vocabulary: the `pipelines` vocabulary of the model's task.
    jit_compile: compile the scoring forward pass and the decode step with XLA.
  """

  def __init__(self, model, batch_size, vocabulary, jit_compile=False):
    super().__init__(name="meliad_scoring")
    if not model.output_token_losses:
      raise ValueError("ScoringModule needs the model built with "
                       "DecoderOnlyLanguageModel(output_token_losses=True)")
    if vocabulary.vocab_size > model.vocab_size:
      raise ValueError(f"the vocabulary has {vocabulary.vocab_size} ids but the embedding only "
                       f"{model.vocab_size} rows")
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.model = model
    self.batch_size = batch_size
    self.sequence_length = model.task_config.sequence_length
    # Ids the vocabulary can produce; the embedding may have more rows (Meliad's 32128
    # for T5's 32100 pieces), which no text maps to.
    self.vocab_size = vocabulary.vocab_size
    self.state = state_lib.StreamState(model.state_spec, batch_size, mode="scoring")
    # Streams whose next `score` starts a document: all of them in a new (or newly loaded)
    # module, and those given to `reset`.
    self.pending_start = tf.Variable(tf.ones([batch_size], tf.bool), trainable=False)
    self.codec = make_codec(vocabulary)
    self.generate_unsupported_reason = generation.unsupported_reason(model)
    self.jit_compile = jit_compile
    self._forward = steps.compile_step(self._forward_and_store, jit_compile,
                                       calls_host=bool(model.decoder.host_search_layers))
    self.score = tf.function(self._score, input_signature=[
        tf.TensorSpec([batch_size, self.sequence_length], tf.int32, name="tokens"),
        tf.TensorSpec([batch_size], tf.bool, name="start_of_sequence")])
    # The state as explicit tensors, for servers that keep no state between requests.
    self.state_names = [name for name, _ in _flatten(model.state_spec(batch_size))]
    state_specs = [tf.TensorSpec(spec.shape, spec.dtype, name=_state_input(name))
                   for name, spec in _flatten(model.state_spec(batch_size))]
    self._forward_stateless = steps.compile_step(
        self._segment_with_state, jit_compile,
        calls_host=bool(model.decoder.host_search_layers))
    self.score_segment = tf.function(self._score_segment, input_signature=[
        tf.TensorSpec([batch_size, self.sequence_length], tf.int32, name="tokens"),
        tf.TensorSpec([batch_size], tf.bool, name="start_of_sequence"), *state_specs])
    self.initial_state = tf.function(self._initial_state, input_signature=[])
    self.reset = tf.function(self._reset, input_signature=[
        tf.TensorSpec([batch_size], tf.bool, name="streams")])
    self.reset_all = tf.function(self._reset_all, input_signature=[])
    self.encode = tf.function(self.codec.encode,
                              input_signature=[tf.TensorSpec([], tf.string, name="text")])
    self.decode = tf.function(self.codec.decode,
                              input_signature=[tf.TensorSpec([None], tf.int32, name="tokens")])
    if self.generate_unsupported_reason is None:
      self.generate = tf.function(self._generate, input_signature=[
          tf.TensorSpec([batch_size, None], tf.int32, name="prompt"),
          tf.TensorSpec([batch_size], tf.int32, name="lengths"),
          tf.TensorSpec([], tf.int32, name="max_length"),
          tf.TensorSpec([], tf.float32, name="temperature"),
          tf.TensorSpec([], tf.int32, name="top_k"),
          tf.TensorSpec([2], tf.int64, name="seed"),
          tf.TensorSpec([], tf.bool, name="write_memory")])

  def _forward_and_store(self, tokens, start_of_sequence):
    start = start_of_sequence | self.pending_start
    batch = {"targets": tokens, "start_of_sequence": start}
    _, metrics, new_state = self.model(batch, self.state.read(), training=False)
    self.state.assign(new_state)
    self.pending_start.assign(tf.zeros_like(self.pending_start))
    return {
        "log_probs": 0.0 - metrics["token_losses"],
        "predictions": metrics["token_predictions"],
        "loss": metrics["loss"],
        "token_count": metrics["token_count"],
    }

  def _score(self, tokens, start_of_sequence):
    message = f"score: token ids must be in [0, {self.vocab_size}), ids of the vocabulary"
    checks = [tf.debugging.assert_non_negative(tokens, message=message),
              tf.debugging.assert_less(tokens, self.vocab_size, message=message)]
    with tf.control_dependencies(checks):
      return self._forward(tf.identity(tokens), start_of_sequence)

  def _segment_with_state(self, tokens, start_of_sequence, state):
    batch = {"targets": tokens, "start_of_sequence": start_of_sequence}
    _, metrics, new_state = self.model(batch, state, training=False)
    outputs = {"log_probs": 0.0 - metrics["token_losses"],
               "predictions": metrics["token_predictions"], "loss": metrics["loss"],
               "token_count": metrics["token_count"]}
    outputs.update({_state_output(name): value for name, value in _flatten(new_state)})
    return outputs

  def _score_segment(self, tokens, start_of_sequence, *state_values):
    state = self._unflatten_state(state_values)
    message = f"score_segment: token ids must be in [0, {self.vocab_size}), ids of the vocabulary"
    checks = [tf.debugging.assert_non_negative(tokens, message=message),
              tf.debugging.assert_less(tokens, self.vocab_size, message=message)]
    with tf.control_dependencies(checks):
      return self._forward_stateless(tf.identity(tokens), start_of_sequence, state)

  def _initial_state(self):
    return {_state_output(name): tf.zeros(spec.shape, spec.dtype)
            for name, spec in _flatten(self.model.state_spec(self.batch_size))}

  def _unflatten_state(self, values):
    spec = self.model.state_spec(self.batch_size)
    by_name = dict(zip(self.state_names, values))
    return tf.nest.pack_sequence_as(spec, [by_name[name] for name, _ in _flatten(spec)])

  def _reset(self, streams):
    current = self.state.read()
    zeros = tf.nest.map_structure(tf.zeros_like, current)
    self.state.assign(generation.where_streams(streams, zeros, current))
    self.pending_start.assign(self.pending_start | streams)
    return {"reset_streams": tf.reduce_sum(tf.cast(streams, tf.int32))}

  def _reset_all(self):
    return self._reset(tf.ones([self.batch_size], tf.bool))

  def _generate(self, prompt, lengths, max_length, temperature, top_k, seed,
                write_memory=False):
    return {"tokens": generation.generate(self.model, prompt, lengths, max_length, temperature,
                                          top_k, seed, jit_compile=self.jit_compile,
                                          write_memory=write_memory)}


def metadata(module, *, vocabulary, task_name, step):
  """The description written to assets/metadata.json."""
  model = module.model
  stack = model.decoder
  first = stack.layers[0]
  state = {}
  for path, spec in _flatten(module.model.state_spec(module.batch_size)):
    state[path] = {"shape": list(spec.shape), "dtype": spec.dtype.name}
  result = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "family": family(model),
      "task": task_name,
      "step": step,
      "num_layers": stack.num_layers,
      "embedding_size": stack.embedding_size,
      "num_heads": first.num_heads,
      "head_size": first.head_size,
      "vocab_size": model.vocab_size,
      "sequence_length": module.sequence_length,
      "window_length": first.window_length,
      "batch_size": module.batch_size,
      "use_long_xl_architecture": first.use_long_xl_architecture,
      "relative_position_type": first.relative_position_type,
      "dtype": stack.dtype.name,
      "vocabulary": {"kind": vocabulary.kind, "vocab_size": vocabulary.vocab_size,
                     "file": (SENTENCEPIECE_FILE if vocabulary.kind == "sentencepiece"
                              else BYTE_VOCABULARY_FILE)},
      "memory_layers": list(stack.memory_layer_indices),
      "recurrent_layers": list(stack.recurrent_layer_indices),
      "state": state,
      "jit_compile": module.jit_compile,
      "supports_generate": module.generate_unsupported_reason is None,
      "generate_unsupported_reason": module.generate_unsupported_reason,
  }
  if stack.memory_layer_indices:
    memory_layer = stack.layers[stack.memory_layer_indices[0]]
    result["memory_num_neighbors"] = memory_layer.memory_num_neighbors
    result["memory_database_size"] = memory_layer.memory.database_size
  if stack.recurrent_layer_indices:
    result["recurrent_num_states"] = (
        stack.layers[stack.recurrent_layer_indices[0]].recurrent.num_states)
  return result


def _flatten(nested, prefix=""):
  for key in sorted(nested):
    value = nested[key]
    if isinstance(value, dict):
      yield from _flatten(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", value


def _write_assets(directory, vocabulary, config_text, meta):
  """Writes the asset files into `directory`; returns their paths by name."""
  paths = {"config": os.path.join(directory, CONFIG_FILE),
           "metadata": os.path.join(directory, METADATA_FILE)}
  storage.write_atomically(paths["config"], config_text)
  storage.write_atomically(paths["metadata"], json.dumps(meta, indent=1, sort_keys=True))
  if vocabulary.kind == "sentencepiece":
    paths["vocabulary"] = os.path.join(directory, SENTENCEPIECE_FILE)
    tf.io.gfile.copy(vocabulary.model_path, paths["vocabulary"], overwrite=True)
  else:
    paths["vocabulary"] = os.path.join(directory, BYTE_VOCABULARY_FILE)
    storage.write_atomically(paths["vocabulary"], json.dumps(
        {"kind": vocabulary.kind, "vocab_size": vocabulary.vocab_size,
         "offset": _BYTE_OFFSETS[vocabulary.kind], "pad_id": 0,
         "scheme": _BYTE_DESCRIPTIONS[vocabulary.kind]}, indent=1))
  return paths


def _state_input(name):
  """A state tensor's name as an input of `score_segment`: "state__layer_0__keys"."""
  return "state__" + name.replace("/", "__")


def _state_output(name):
  """A state tensor's name among the outputs of `score_segment` and `initial_state`."""
  return "new_state__" + name.replace("/", "__")


def _signatures(module):
  signatures = {"score": module.score, "serving_default": module.score,
                "score_segment": module.score_segment, "initial_state": module.initial_state,
                "reset": module.reset, "reset_all": module.reset_all}
  if module.generate_unsupported_reason is None:
    signatures["generate"] = module.generate
  return signatures


def export(module, output_dir, *, vocabulary, config_text, task_name, step, overwrite=False):
  """Writes `module` as a SavedModel at `output_dir`, atomically.

  Args:
    module: a `ScoringModule` (its scoring state is saved as it is; export a fresh one).
    output_dir: the SavedModel directory to create.
    vocabulary: the `pipelines` vocabulary (its file or scheme becomes an asset).
    config_text: the operative gin configuration.
    task_name: the task the model was trained on.
    step: the training step of the checkpoint.
    overwrite: replace an existing `output_dir`.
  Returns:
    The metadata written.
  Raises:
    ExportError: if `output_dir` exists and `overwrite` is False, or the model searches a
      memory on the host (ScaNN), which a SavedModel cannot hold.
  """
  output_dir = storage.absolute(output_dir)
  host_layers = module.model.decoder.host_search_layers
  if host_layers:
    raise ExportError(
        f"{', '.join(host_layers)} search their memory on the host "
        "through a Python call (memory_on_tpu_factory.backend = 'scann'), which a SavedModel "
        "cannot hold; export with --gin_param=\"memory_on_tpu_factory.backend = 'exact'\" "
        "(or 'bucketed', Meliad's), or evaluate in process with meliad-eval --workdir")
  if tf.io.gfile.exists(output_dir) and not overwrite:
    incomplete = not tf.io.gfile.exists(os.path.join(output_dir, SAVED_MODEL_FILE))
    raise ExportError(f"{output_dir} already exists"
                      + (" (an interrupted export: it has no saved_model.pb)" if incomplete
                         else "") + "; remove it or pass --overwrite")
  meta = metadata(module, vocabulary=vocabulary, task_name=task_name, step=step)
  tf.io.gfile.makedirs(storage.parent(output_dir))
  staging = storage.staging_directory(output_dir)
  try:
    paths = _write_assets(os.path.join(staging, "asset_sources"), vocabulary, config_text,
                          meta)
    module.config_file = tf.saved_model.Asset(paths["config"])
    module.metadata_file = tf.saved_model.Asset(paths["metadata"])
    module.vocabulary_file = tf.saved_model.Asset(paths["vocabulary"])
    saved = os.path.join(staging, "saved_model")
    tf.saved_model.save(module, saved, signatures=_signatures(module))
    storage.publish_directory(saved, output_dir, last_file=SAVED_MODEL_FILE)
  finally:
    storage.remove_directory(staging)
  return meta


def read_metadata(saved_model_dir):
  """The metadata of one of our SavedModels.

  Raises:
    ValueError: if the directory is missing or is not a SavedModel written by `export`.
  """
  if not tf.io.gfile.isdir(saved_model_dir):
    raise ValueError(f"--saved_model={saved_model_dir} does not exist or is not a directory")
  if not tf.io.gfile.exists(os.path.join(saved_model_dir, SAVED_MODEL_FILE)):
    raise ValueError(f"{saved_model_dir} has no {SAVED_MODEL_FILE}: it is not a SavedModel, "
                     "or an export into it was interrupted; export it again")
  path = os.path.join(saved_model_dir, "assets", METADATA_FILE)
  if not tf.io.gfile.exists(path):
    raise ValueError(f"{saved_model_dir} is not a SavedModel written by meliad-export: it has no "
                     f"assets/{METADATA_FILE}")
  with tf.io.gfile.GFile(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path} does not describe a meliad-tf SavedModel (format "
                     f"{meta.get('format')!r}, expected {FORMAT!r})")
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{saved_model_dir} has format version {meta.get('format_version')}; this "
                     f"version of meliad-tf reads version {FORMAT_VERSION}")
  return meta


def load(saved_model_dir):
  """Loads one of our SavedModels; returns (loaded object, metadata)."""
  meta = read_metadata(saved_model_dir)
  if meta["vocabulary"]["kind"] == "sentencepiece":
    # Registers the SentencePiece ops the SavedModel's encode and decode use.
    import tensorflow_text  # pylint: disable=g-import-not-at-top,unused-import
  return tf.saved_model.load(saved_model_dir), meta


def vocabulary_of(saved_model_dir, meta):
  """The `pipelines` vocabulary described by a SavedModel's assets (for host-side tokenizing)."""
  kind = meta["vocabulary"]["kind"]
  if kind == "bytes":
    return pipelines.ByteVocabulary()
  if kind == "raw_bytes":
    return pipelines.RawByteVocabulary()
  return pipelines.SentencePieceVocabulary(
      model_path=os.path.join(saved_model_dir, "assets", meta["vocabulary"]["file"]))


def resolve_jit_compile(requested):
  """`requested` if given, else XLA only with a GPU.

  On this project's shared 2-core CPU, meliad-bench eval measured XLA 1.6-2.3x faster than
  plain graphs at scoring tiny_test, but 0.8-1.2x at scoring small_test and 0.5-0.9x at its
  decode step, plus its compilation; so plain graphs on CPU.
  """
  if requested is not None:
    return requested
  return bool(tf.config.list_physical_devices("GPU"))


@dataclasses.dataclass
class ModelHandle:
  """A model ready to score and generate, from a SavedModel or from a training run.

  Attributes:
    module: the loaded SavedModel, or an in-process `ScoringModule`; both have `score`,
      `reset`, `reset_all`, `encode`, `decode` and (if supported) `generate`.
    metadata: as written to assets/metadata.json.
    vocabulary: the `pipelines` vocabulary, for tokenizing on the host.
    config_text: the run's operative gin configuration.
    config_path: the file holding it.
    origin: "saved_model" or "workdir".
  """
  module: object
  metadata: dict
  vocabulary: pipelines.Vocabulary
  config_text: str
  config_path: str
  origin: str

  def parse_config(self, gin_params=()):
    """Makes the run's gin configuration (plus `gin_params`) the process's, so that sources
    built afterwards (e.g. the synthetic documents) have the run's settings."""
    gin.clear_config()
    gin_setup.parse([self.config_path], gin_params)

  @property
  def batch_size(self):
    return self.metadata["batch_size"]

  @property
  def sequence_length(self):
    return self.metadata["sequence_length"]


def open_model(saved_model="", workdir="", load_dir="", batch_size=0, jit_compile=False,
               gin_params=()):
  """Opens `saved_model`, or builds the model of a training run in process.

  Args:
    saved_model: a directory written by `export`.
    workdir, load_dir: a training run (see `checkpoint_loading.load_model`).
    batch_size: streams to score at once; 0 means the SavedModel's, or the run's
      TransformerTaskConfig.batch_size. A SavedModel only serves its own.
    jit_compile: for a run loaded in process, compile the scoring step with XLA.
    gin_params: for a run, bindings applied after its config.gin.
  Raises:
    ValueError: for a bad combination of arguments, a directory that is not ours, or a
      workdir without a checkpoint (`checkpoint_loading.WorkdirError`).
  """
  if bool(saved_model) == bool(workdir or load_dir):
    raise ValueError("give exactly one of --saved_model and --workdir (or --load_dir)")
  if batch_size < 0:
    raise ValueError(f"--batch_size must be positive (0: the model's own), got {batch_size}")
  if saved_model:
    loaded, meta = load(saved_model)
    if batch_size and batch_size != meta["batch_size"]:
      raise ValueError(f"the SavedModel {saved_model} scores {meta['batch_size']} streams, not "
                       f"--batch_size={batch_size}; export it again with "
                       f"meliad-export --batch_size={batch_size}")
    config_path = os.path.join(saved_model, "assets", CONFIG_FILE)
    with tf.io.gfile.GFile(config_path) as f:
      config_text = f.read()
    return ModelHandle(loaded, meta, vocabulary_of(saved_model, meta), config_text, config_path,
                       "saved_model")
  run = checkpoint_loading.load_model(workdir, load_dir, gin_params)
  vocabulary = pipelines.get_task(run.task_config.dataset_name).vocabulary
  module = ScoringModule(run.model, batch_size or run.task_config.batch_size, vocabulary,
                         jit_compile=jit_compile)
  meta = metadata(module, vocabulary=vocabulary, task_name=run.task_config.dataset_name,
                  step=run.step)
  return ModelHandle(module, meta, vocabulary, run.config_text,
                     os.path.join(run.workdir, checkpoint_loading.CONFIG_FILE), "workdir")
