"""Converting a Meliad (JAX/Flax) training run into a workdir of ours.

Meliad's training loop writes, in its workdir, `config.gin` (its operative gin configuration)
and `checkpoint_<step>`: Flax's serialisation of its TrainState, either one msgpack file
(Flax's legacy format) or a directory holding such a file named `checkpoint` (Orbax, Flax's
default from 0.7, with every array aggregated into it as on one device). The TrainState is

  optimizer/target/<parameter path>              the parameters
  optimizer/state/step                           the optimizer step (the next step to run)
  optimizer/state/param_states/<path>/<slot>     Adafactor's v_row, v_col, v, m (unused ones
                                                 are zeros of shape (1,)), or Adam's
  state/...                                      XL caches, recurrent states, memories

Conversion translates the configuration to our gin names (refusing, by name, any binding we
do not support), builds our Trainer from it, copies every parameter, every optimizer slot we
keep and the step into its variables (refusing parameters on either side without a
counterpart), and saves a checkpoint with the trainer's own CheckpointKeeper, so that
`meliad-train` resumes it as one of its own runs and `meliad-eval` and `meliad-export` read it.
The per-stream state is not converted: Meliad does not save its data position, so a restored
Meliad run starts every stream on a new document, and so does ours.

Reading Flax's msgpack needs the `msgpack` package (`pip install meliad-tf[convert]`).
"""

import inspect
import os
import re

import gin
from gin import config_parser
import numpy as np
import tensorflow as tf

import pipelines
from meliad_tf.layers import memory
from meliad_tf.layers import mlp
from meliad_tf.layers import norms
from meliad_tf.model import decoder
from meliad_tf.model import language_model as model_lib
from meliad_tf.model import layer as layer_lib
from meliad_tf.model import task_config as task_config_lib
from meliad_tf.training import checkpoints
from meliad_tf.training import gin_setup
from meliad_tf.training import optimizer as optimizer_lib
from meliad_tf.training import schedules
from meliad_tf.training import trainer as trainer_lib


CONFIG_FILE = "config.gin"
# Flax's legacy format is this file; Orbax's is a directory holding a file of this name.
ORBAX_MSGPACK_FILE = "checkpoint"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)$")
# Flax's msgpack extension codes (flax.serialization._MsgpackExtType).
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_SCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"


class ConversionError(ValueError):
  """A Meliad run that cannot be converted: the message says what and why."""


def require_msgpack():
  """The msgpack module; ImportError naming the extra that installs it when missing."""
  try:
    import msgpack  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading Meliad's Flax checkpoints needs the msgpack package: "
                      "pip install 'meliad-tf[convert]'") from e
  return msgpack


# ------------------------------------------------------------------------------------------
# Flax's checkpoint files


def latest_checkpoint(meliad_workdir):
  """The path of the highest-numbered `checkpoint_<step>` in a Meliad workdir.

  Raises:
    ConversionError: the directory does not exist or holds no checkpoint.
  """
  if not tf.io.gfile.isdir(meliad_workdir):
    raise ConversionError(f"--meliad_workdir={meliad_workdir} is not a directory")
  steps = []
  for name in tf.io.gfile.listdir(meliad_workdir):
    match = _CHECKPOINT_NAME.match(name.rstrip("/"))
    if match:
      steps.append((int(match.group(1)), name.rstrip("/")))
  if not steps:
    raise ConversionError(f"no checkpoint_<step> in {meliad_workdir}: Meliad's training loop "
                          "writes one every Trainer.checkpoint_every_steps and at the end")
  return os.path.join(meliad_workdir, max(steps)[1])


def _array_from_bytes(msgpack, data):
  """An array from Flax's encoding: msgpack of (shape, dtype name, C-order bytes)."""
  shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
  dtype_name = dtype_name.decode() if isinstance(dtype_name, bytes) else dtype_name
  shape = tuple(shape)
  if dtype_name == "bfloat16":
    # The upper half of a float32: widen exactly.
    bits = np.frombuffer(buffer, np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32).reshape(shape)
  return np.frombuffer(buffer, np.dtype(dtype_name)).reshape(shape).copy()


def _unchunk(tree):
  """Flax stores arrays over 1 GiB as {_CHUNKED: True, "shape": {...}, "chunks": {...}}."""
  if not isinstance(tree, dict):
    return tree
  if tree.get(_CHUNKED):
    shape = tuple(int(tree["shape"][str(i)]) for i in range(len(tree["shape"])))
    chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
    return np.concatenate([np.ravel(c) for c in chunks]).reshape(shape)
  return {key: _unchunk(value) for key, value in tree.items()}


def read_flax_checkpoint(path):
  """The state dict of a Flax checkpoint: nested dicts of numpy arrays.

  Args:
    path: a `checkpoint_<step>` file (Flax's legacy format) or directory (Orbax's, with its
      arrays aggregated into the msgpack file `checkpoint`).
  Raises:
    ConversionError: the file is missing or not Flax's msgpack, or the arrays are stored
      outside it (Orbax's tensorstore layout, for arrays sharded over several devices).
  """
  msgpack = require_msgpack()
  source = path
  if tf.io.gfile.isdir(path):
    source = os.path.join(path, ORBAX_MSGPACK_FILE)
    if not tf.io.gfile.exists(source):
      raise ConversionError(
          f"{path} is an Orbax checkpoint without the msgpack file {ORBAX_MSGPACK_FILE}: "
          "arrays saved in Orbax's tensorstore layout (sharded over several devices) are not "
          "supported; save the checkpoint from one host with its arrays aggregated")
  with tf.io.gfile.GFile(source, "rb") as f:
    data = f.read()

  def ext_hook(code, payload):
    if code == _EXT_NDARRAY:
      return _array_from_bytes(msgpack, payload)
    if code == _EXT_SCALAR:
      return _array_from_bytes(msgpack, payload)[()]
    if code == _EXT_COMPLEX:
      real, imag = msgpack.unpackb(payload)
      return complex(real, imag)
    raise ConversionError(f"{source}: unknown msgpack extension type {code}")

  try:
    tree = msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
  except (ValueError, msgpack.exceptions.ExtraData) as e:
    raise ConversionError(f"{source} is not a Flax msgpack checkpoint: {e}") from e
  if not isinstance(tree, dict):
    raise ConversionError(f"{source} is not a Flax checkpoint of a TrainState")
  tree = _unchunk(tree)
  stored_elsewhere = [p for p, v in flatten(tree).items() if isinstance(v, str)]
  if stored_elsewhere:
    raise ConversionError(
        f"{path} stores {len(stored_elsewhere)} arrays outside its msgpack file (Orbax's "
        f"tensorstore layout), e.g. {stored_elsewhere[0]}: not supported")
  return tree


def flatten(tree, prefix=""):
  """{"a": {"b": x}} -> {"a/b": x}."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(flatten(value, path + "/"))
    else:
      flat[path] = value
  return flat


# ------------------------------------------------------------------------------------------
# The gin configuration

# Meliad's configurables (as its operative config names them, without the module) -> ours.
CONFIGURABLES = {
    "DecoderOnlyLanguageModel": ("models.DecoderOnlyLanguageModel",
                                 model_lib.DecoderOnlyLanguageModel),
    "DecoderStack": ("decoder_stack.DecoderStack", decoder.DecoderStack),
    "TransformerTaskConfig": ("decoder_stack.TransformerTaskConfig",
                              task_config_lib.TransformerTaskConfig),
    "TransformerLayer": ("transformer_layer.TransformerLayer", layer_lib.TransformerLayer),
    "TransformerBase": ("transformer_base.TransformerBase", layer_lib.TransformerBase),
    "MLP": ("nn_components.MLP", mlp.MLP),
    "LayerNorm": ("nn_components.LayerNorm", norms.LayerNorm),
    "Trainer": ("training_loop.Trainer", trainer_lib.Trainer),
    "FlaxAdafactorConfig": ("optimizer_config.FlaxAdafactorConfig",
                            optimizer_lib.FlaxAdafactorConfig),
    "AdamConfig": ("optimizer_config.AdamConfig", optimizer_lib.AdamConfig),
    "memory_on_tpu_factory": ("memory_factory.memory_on_tpu_factory",
                              memory.memory_on_tpu_factory),
    "load_text_dataset": ("text_dataset.load_text_dataset", pipelines.load_text_dataset),
    "set_default_data_directory": ("text_dataset.set_default_data_directory",
                                   pipelines.set_default_data_directory),
    "get_loss_mask_tokens": ("text_dataset.get_loss_mask_tokens",
                             pipelines.get_loss_mask_tokens),
}
for _name in ("lr_constant", "lr_rsqrt_decay_std", "lr_rsqrt_decay", "lr_exponential_decay",
              "lr_linear_decay", "lr_cosine_decay"):
  CONFIGURABLES[_name] = (f"optimizer_config.{_name}", getattr(schedules, _name))

# Bindings of Flax's plumbing, dropped when they have the value that leaves Meliad's
# behaviour as ours is (any other value is refused). "*" is any configurable.
IGNORED = {
    ("*", "name"): None,  # Flax module names; ours are fixed.
    ("TransformerLayer", "memory"): None,  # Passed by the stack to memory layers.
    ("TransformerLayer", "supported_modes_for_cache"): ("train", "test"),
    ("TransformerLayer", "update_memory_modes"): ("train", "test"),
    ("BatchedMemory", "query_stride"): 1,
    ("BatchedMemory", "update_stride"): 1,
    ("RelativeFourierPositions", "position_vector_size"): 128,
}


class _Reference:

  def __init__(self, name, evaluate):
    self.name, self.evaluate = name, evaluate


class _Macro:

  def __init__(self, name):
    self.name = name


class _Delegate(config_parser.ParserDelegate):
  """Keeps references and macros as they are written, for translation."""

  def configurable_reference(self, scoped_name, evaluate):
    return _Reference(scoped_name, evaluate)

  def macro(self, name):
    return _Macro(name)


def _our_name(meliad_name):
  """`scope/module.Name` of Meliad -> `scope/ours.Name`, or None if we have no such thing."""
  scope, _, selector = meliad_name.rpartition("/")
  entry = CONFIGURABLES.get(selector.rsplit(".", 1)[-1])
  if entry is None:
    return None
  return f"{scope}/{entry[0]}" if scope else entry[0]


def _accepted_parameters(selector):
  return set(inspect.signature(CONFIGURABLES[selector][1]).parameters)


def _render(value, problems, where):
  """A parsed gin value as gin text, references translated to our names."""
  if isinstance(value, _Reference):
    name = _our_name(value.name)
    if name is None:
      problems.append(f"{where}: refers to @{value.name}, which meliad-tf does not have")
      name = value.name
    return "@" + name + ("()" if value.evaluate else "")
  if isinstance(value, _Macro):
    return "%" + value.name
  if isinstance(value, tuple):
    items = [_render(v, problems, where) for v in value]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
  if isinstance(value, list):
    return "[" + ", ".join(_render(v, problems, where) for v in value) + "]"
  if isinstance(value, dict):
    return "{" + ", ".join(f"{_render(k, problems, where)}: {_render(v, problems, where)}"
                           for k, v in value.items()) + "}"
  return repr(value)


def _plain(value, macros):
  """A parsed value as a Python value (tuples of strings, numbers), for comparisons."""
  if isinstance(value, _Macro):
    return _plain(macros.get(value.name), macros)
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v, macros) for v in value)
  return value


def translate_config(text, source=CONFIG_FILE):
  """Translates Meliad's operative gin configuration into ours.

  Meliad's import lines are dropped, its configurables get our module names (our gin names
  keep Meliad's modules), macros are kept, and bindings of Flax's plumbing that leave
  Meliad's behaviour unchanged (module names, ...) are dropped.

  Args:
    text: the content of Meliad's config.gin.
    source: its path, for messages.
  Returns:
    The configuration as our gin text.
  Raises:
    ConversionError: naming every binding we do not support (an unknown configurable or
      parameter, or a value we cannot reproduce), with its line.
  """
  lines, problems, macros = [], [], {}
  try:
    statements = list(config_parser.ConfigParser(text, _Delegate()))
  except SyntaxError as e:
    raise ConversionError(f"{source}, line {e.lineno}: not a gin file: {e.msg}") from e
  for statement in statements:
    if isinstance(statement, config_parser.ImportStatement):
      continue
    if not isinstance(statement, config_parser.BindingStatement):
      raise ConversionError(f"{source}, line {statement.location.line_num}: unexpected "
                            f"statement {statement.location.line_content.strip()!r} in an "
                            "operative configuration")
    line = statement.location.line_content.strip()
    where = f"{source}, line {statement.location.line_num} ({line})"
    if not statement.arg_name:  # A macro definition.
      macros[statement.selector] = statement.value
      lines.append(f"{statement.selector} = {_render(statement.value, problems, where)}")
      continue
    selector = statement.selector.rsplit(".", 1)[-1]
    parameter = statement.arg_name
    ignored = IGNORED.get(("*", parameter), IGNORED.get((selector, parameter), KeyError))
    if ignored is not KeyError:
      if _plain(statement.value, macros) != ignored:
        problems.append(f"{where}: meliad-tf supports only {selector}.{parameter} = "
                        f"{ignored!r}")
      continue
    if selector not in CONFIGURABLES:
      problems.append(f"{where}: meliad-tf has no counterpart of {selector}")
      continue
    if parameter not in _accepted_parameters(selector):
      problems.append(f"{where}: meliad-tf's {CONFIGURABLES[selector][0]} has no parameter "
                      f"{parameter!r}")
      continue
    scope = f"{statement.scope}/" if statement.scope else ""
    lines.append(f"{scope}{CONFIGURABLES[selector][0]}.{parameter} = "
                 f"{_render(statement.value, problems, where)}")
  if problems:
    raise ConversionError("cannot convert the configuration; unsupported bindings:\n  "
                          + "\n  ".join(problems))
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# Parameters and optimizer state


def _add_norm(pairs, prefix, norm):
  if norm is None:
    return
  if norm.scale is not None:
    pairs[f"{prefix}/scale"] = norm.scale
  if norm.bias is not None:
    pairs[f"{prefix}/bias"] = norm.bias


def _add_dense(pairs, prefix, dense):
  pairs[f"{prefix}/kernel"] = dense.kernel
  if dense.bias is not None:
    pairs[f"{prefix}/bias"] = dense.bias


def _add_mlp(pairs, prefix, module):
  if module is None:
    return
  if module.hidden is not None:
    _add_dense(pairs, f"{prefix}/hidden0", module.hidden)
  _add_dense(pairs, f"{prefix}/output_layer", module.output_layer)
  if module.gate_type == "bias":
    pairs[f"{prefix}/gate_bias"] = module.gate_bias
  elif module.gate_type == "full":
    _add_dense(pairs, f"{prefix}/gate_layer", module.gate)
  elif module.gate_type == "lstm":
    _add_dense(pairs, f"{prefix}/input_gate", module.input_gate)
    _add_dense(pairs, f"{prefix}/forget_gate", module.forget_gate)


def _add_tbase(pairs, prefix, tbase):
  kvq = f"{prefix}/_kvq"
  _add_norm(pairs, f"{kvq}/pre_attn_layernorm", tbase.pre_attn_layernorm)
  for name in ("keys_layer", "values_layer", "queries_layer", "queries2_layer"):
    dense = getattr(tbase, name)
    if dense is not None:
      _add_dense(pairs, f"{kvq}/{name}", dense)
  if tbase.attention_scale is not None:
    pairs[f"{kvq}/attention_scale"] = tbase.attention_scale
  if tbase.position_embeddings is not None:
    pairs[f"{kvq}/position_embeddings"] = tbase.position_embeddings
  if tbase.attention_scale2 is not None:
    pairs[f"{prefix}/attention_scale2"] = tbase.attention_scale2
  _add_mlp(pairs, f"{prefix}/post_attn_mlp", tbase.post_attn_mlp)
  _add_norm(pairs, f"{prefix}/pre_ffn_layernorm", tbase.pre_ffn_layernorm)
  _add_mlp(pairs, f"{prefix}/ffn", tbase.ffn)


def parameter_paths(model):
  """Flax parameter path (under `params`) -> our variable, for every parameter of `model`."""
  stack = model.decoder
  pairs = {"decoder/embed/embedding": stack.embedding}
  _add_norm(pairs, "decoder/final_layernorm", stack.final_layernorm)
  for i, layer in enumerate(stack.layers):
    prefix = f"decoder/transformer{i}"
    _add_tbase(pairs, f"{prefix}/tbase", layer.tbase)
    positions = layer.relative_positions
    if positions is not None:
      name = "rel_embedding" if hasattr(positions, "rel_embedding") else "rotation_matrix"
      pairs[f"{prefix}/relative_positions/{name}"] = getattr(positions, name)
    if layer.external_memory_bias is not None:
      pairs[f"{prefix}/external_memory_bias"] = layer.external_memory_bias
    if layer.recurrent is not None:
      _add_tbase(pairs, f"{prefix}/recurrent_tbase", layer.recurrent.recurrent_tbase)
      pairs[f"{prefix}/recurrent_initial_state"] = layer.recurrent.recurrent_initial_state
  mapped = {id(v) for v in pairs.values()}
  unmapped = [v.name for v in model.trainable_variables if id(v) not in mapped]
  if unmapped:
    raise ConversionError(f"no Meliad parameter maps to {unmapped}")
  return pairs


def _check_shapes(path, ours, theirs):
  if tuple(ours.shape) != tuple(np.shape(theirs)):
    raise ConversionError(f"Meliad's {path} has shape {tuple(np.shape(theirs))} but "
                          f"meliad-tf's {ours.name} has {tuple(ours.shape)}")


def assign_parameters(model, params):
  """Copies Meliad's parameters (the `optimizer/target` tree) into `model`.

  Raises:
    ConversionError: naming parameters present on one side only, or of other shapes.
  """
  flat = flatten(params)
  pairs = parameter_paths(model)
  only_meliad = sorted(set(flat) - set(pairs))
  only_ours = sorted(set(pairs) - set(flat))
  if only_meliad or only_ours:
    lines = [f"  {p}: in Meliad's checkpoint, no counterpart here" for p in only_meliad]
    lines += [f"  {p} ({pairs[p].name}): expected, not in Meliad's checkpoint"
              for p in only_ours]
    raise ConversionError("the checkpoint's parameters do not match the configuration:\n"
                          + "\n".join(lines))
  for path, variable in pairs.items():
    _check_shapes(path, variable, flat[path])
    variable.assign(np.asarray(flat[path], np.float32))
  return pairs


def assign_optimizer(optimizer, pairs, optimizer_tree):
  """Copies the optimizer step and every slot we keep from Meliad's `optimizer/state`.

  A slot Flax keeps but we do not must be unused in Flax (zeros of shape (1,)).
  """
  param_states = flatten(optimizer_tree.get("param_states", {}))
  for path, variable in pairs.items():
    slots = optimizer.slots_for(variable)
    for slot_name, slot in slots.items():
      key = f"{path}/{slot_name}"
      if key not in param_states:
        raise ConversionError(f"Meliad's optimizer state has no {key}: it was written by "
                              "another optimizer than the configuration's")
      _check_shapes(key, slot, param_states[key])
      slot.assign(np.asarray(param_states[key], np.float32))
    for key, value in param_states.items():
      if not key.startswith(path + "/"):
        continue
      slot_name = key[len(path) + 1:]
      if slot_name not in slots and (np.shape(value) != (1,) or np.any(value)):
        raise ConversionError(f"Meliad's optimizer slot {key} {np.shape(value)} has no "
                              "counterpart here")
  optimizer.iterations.assign(int(np.asarray(optimizer_tree["step"])))


# ------------------------------------------------------------------------------------------
# The whole run


def convert(meliad_workdir, output, gin_params=()):
  """Converts Meliad's latest checkpoint in `meliad_workdir` into a workdir at `output`.

  This replaces the process's gin configuration with the translated one.

  Args:
    meliad_workdir: Meliad's workdir (config.gin and checkpoint_<step>).
    output: our workdir to create; it must not hold a checkpoint.
    gin_params: bindings applied after the translated configuration (for instance another
      dataset for the data iterators the checkpoint holds).
  Returns:
    (checkpoint path written, optimizer step).
  Raises:
    ConversionError: what cannot be converted, by name; nothing is written then.
  """
  config_path = os.path.join(meliad_workdir, CONFIG_FILE)
  if not tf.io.gfile.exists(config_path):
    raise ConversionError(f"{config_path} is missing: Meliad's training loop writes its "
                          "operative configuration there at the start of a run")
  checkpoint_path = latest_checkpoint(meliad_workdir)
  if checkpoints.latest_checkpoint(output):
    raise ConversionError(f"--output={output} already holds a checkpoint")
  with tf.io.gfile.GFile(config_path) as f:
    translated = translate_config(f.read(), config_path)
  state = read_flax_checkpoint(checkpoint_path)
  if "optimizer" not in state or "target" not in state["optimizer"]:
    raise ConversionError(f"{checkpoint_path} holds no optimizer/target: not a checkpoint of "
                          "Meliad's TrainState")
  gin.clear_config()
  try:
    gin_setup.parse([], [translated, *gin_params])
  except (ValueError, KeyError, SyntaxError) as e:
    raise ConversionError(f"the translated configuration does not parse: {e}") from e
  trainer = trainer_lib.Trainer().build()
  pairs = assign_parameters(trainer.model, state["optimizer"]["target"])
  assign_optimizer(trainer.optimizer, pairs, state["optimizer"]["state"])
  tf.io.gfile.makedirs(output)
  with tf.io.gfile.GFile(os.path.join(output, CONFIG_FILE), "w") as f:
    f.write(gin.operative_config_str())
  keeper = trainer.checkpoint_keeper(output)
  return keeper.save(), trainer.step
