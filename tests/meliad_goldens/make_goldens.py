"""Regenerates the Meliad parity goldens in this folder with Meliad's own JAX code.

Runs only in an environment where Meliad (the 2022 JAX release) imports, never in the test
suite, which only reads what this writes:

  cp -r MELIAD_SOURCE /scratch/meliad            # a writable copy of Meliad's repository
  PYTHONPATH=/scratch/meliad MELIAD_PYTHON tests/meliad_goldens/make_goldens.py \
      --meliad_dir=/scratch/meliad --output_dir=tests/meliad_goldens

For each family below it builds Meliad's model from Meliad's gin files plus tiny sizes, trains
it for TRAIN_STEPS steps on random tokens with Meliad's Trainer, and writes, under
`<family>/`:

  config.gin         the operative configuration, as Meliad's training loop writes it;
  checkpoint_<step>  the TrainState (parameters, Adafactor state, step, per-stream state),
                     saved with Flax's `checkpoints.save_checkpoint` as Meliad's loop does
                     (a legacy msgpack file, or Orbax's directory for families marked so);
  outputs.npz        Meliad's outputs from that checkpoint:
    eval_targets, eval_start_of_sequence: NUM_SEGMENTS consecutive test batches [S, B, L],
      [S, B]: stream 0 reads one document throughout; stream 1 ends a document with padding
      in segment 1 and starts the next one in segment 2, beside stream 0's continuing one;
    eval_logits [S, B, L, LOGIT_ROWS], eval_token_losses [S, B, L], eval_loss [S]: test-mode outputs
      with the test caches, memories and recurrent states carried from segment to segment;
    train_targets, train_start_of_sequence: one training batch (every stream starting);
    train_loss, train_learning_rate: Meliad's loss and learning rate of that step;
    param/<path>: the parameters after that one Adafactor step, by Flax path.

Dropout is off (rates 0), so every output is deterministic.

It also writes `parameter_shapes.json.gz`: for more arrangements (every recurrent gate type and
arrangement, Fourier positions, LayerNorm with a bias), the gin files and bindings, and the
path and shape of every parameter and optimizer slot of Meliad's freshly initialised model;
and `adafactor_factored.npz` (see `adafactor_factored`).
"""

import argparse
import gzip
import json
import os
import sys

import numpy as np


FAMILIES = {
    # name: (gin files after base_htrans.gin, extra bindings, orbax format)
    "xl_t5": ([], [], False),
    "memory_bucketed": (["options/external_memory_8k.gin"], [
        "decoder_stack.DecoderStack.memory_layer_indices = (1,)",
        "transformer_layer.TransformerLayer.memory_num_neighbors = 4",
        "memory_factory.memory_on_tpu_factory.database_size = 32",
    ], True),
    "recurrent_bias_skip": (["recurrent/bias_skip.gin"], [
        "decoder_stack.DecoderStack.recurrent_layer_indices = (1,)",
    ], True),
    "recurrent_lstm_dual": (["recurrent/lstm_dual.gin"], [
        "decoder_stack.DecoderStack.recurrent_layer_indices = (1,)",
    ], False),
    "block_feedback_bias_single": (["recurrent/bias_single.gin",
                                    "recurrent/block_feedback_512.gin"], [
        "decoder_stack.DecoderStack.recurrent_layer_indices = (1,)",
        "decoder_stack.DecoderStack.dstack_window_length = 8",
    ], True),
    # Rotary positions with a memory (the memory attends with rotated queries), and Meliad's
    # LayerNorm variants: mean-centred, with a bias, one scale and bias for all features.
    "memory_rotary_layernorm": (["options/external_memory_8k.gin",
                                 "options/positions_rotary.gin"], [
        "decoder_stack.DecoderStack.memory_layer_indices = (0,)",
        "transformer_layer.TransformerLayer.memory_num_neighbors = 4",
        "memory_factory.memory_on_tpu_factory.database_size = 32",
        "nn_components.LayerNorm.use_mean = True",
        "nn_components.LayerNorm.use_bias = True",
        "nn_components.LayerNorm.use_scalar_scale_bias = True",
        "transformer_ffn/nn_components.MLP.initializer_scale = 0.5",
    ], False),
}

# Tiny sizes: E differs from H * d, segments hold two windows, the memory wraps around.
SIZE_BINDINGS = [
    "NUM_LAYERS = 2", "EMBED_DIM = 6", "NUM_HEADS = 2", "HEAD_DIM = 4", "MLP_DIM = 16",
    "NUM_EMBEDDINGS = 256", "DROPOUT_RATE = 0.0", "ATTN_DROPOUT_RATE = 0.0", "DTYPE = 'float32'",
    "decoder_stack.TransformerTaskConfig.sequence_length = 16",
    "decoder_stack.TransformerTaskConfig.batch_size = 2",
    "transformer_layer.TransformerLayer.window_length = 8",
    "transformer_layer.TransformerLayer.recurrent_num_states = 4",
    "training_loop.Trainer.num_steps = 100",
    "training_loop.Trainer.warmup_steps = 2",
]
# Applied last: the recurrent files set W = 512 and S = 512.
LATE_BINDINGS = [
    "transformer_layer.TransformerLayer.window_length = 8",
    "transformer_layer.TransformerLayer.recurrent_num_states = 4",
]
# Logits are stored for the first LOGIT_ROWS of the 256 vocabulary entries (Meliad's
# `synthetic` vocabulary, which the converted run's data iterators read), to keep the files
# small; the token losses cover the whole softmax.
LOGIT_ROWS = 16
# Arrangements whose parameter names and shapes are recorded (no outputs): gin files after
# base_htrans.gin, and bindings after SIZE_BINDINGS.
SHAPE_ARRANGEMENTS = {
    f"recurrent_{gate}_{arrangement}": ([f"recurrent/{gate}_{arrangement}.gin"], [
        "decoder_stack.DecoderStack.recurrent_layer_indices = (1,)"])
    for gate in ("bias", "lstm") for arrangement in ("dual", "single", "skip")
}
SHAPE_ARRANGEMENTS.update({
    "recurrent_full_dual": (["recurrent/bias_dual.gin"], [
        "decoder_stack.DecoderStack.recurrent_layer_indices = (0,)",
        "transformer_layer.TransformerLayer.recurrent_gate_type = 'full'"]),
    "block_feedback_lstm_skip": (["recurrent/lstm_skip.gin", "recurrent/block_feedback_512.gin"], [
        "decoder_stack.DecoderStack.recurrent_layer_indices = (0,)",
        "decoder_stack.DecoderStack.dstack_window_length = 8"]),
    "fourier_layernorm_bias": (["options/positions_fourier.gin"], [
        "nn_components.LayerNorm.use_bias = True"]),
})
TRAIN_STEPS = 2
NUM_SEGMENTS = 3
SEED = 1234


def eval_batches(rng, batch_size, length, vocab_size):
  """NUM_SEGMENTS consecutive batches; see the module docstring."""
  targets = rng.integers(1, vocab_size, size=(NUM_SEGMENTS, batch_size, length), dtype=np.int32)
  starts = np.zeros((NUM_SEGMENTS, batch_size), bool)
  starts[0, :] = True
  # Stream 1: its first document ends inside segment 1 (zero padding), the next starts at 2.
  targets[1, 1, length - 5:] = 0
  starts[2, 1] = True
  return targets, starts


def build(meliad_dir, files, bindings):
  """Parses Meliad's gin files and bindings (after the tiny sizes); returns its Trainer."""
  import gin  # pylint: disable=g-import-not-at-top
  from transformer import launcher  # pylint: disable=g-import-not-at-top,unused-import
  import training_loop  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  gin.add_config_file_search_path(os.path.join(meliad_dir, "transformer", "configs"))
  gin.parse_config_files_and_bindings(["base_htrans.gin"] + files,
                                      SIZE_BINDINGS + bindings + LATE_BINDINGS)
  # The arguments Meliad's launcher passes, so that the operative config is a launcher's.
  return training_loop.Trainer(get_training_dataset_iterator=lambda: None,
                               get_test_dataset_iterator=None,
                               pretty_print_input_function=None,
                               process_summaries_function=None, load_dir="", workdir="",
                               replicate_mode=False)


def run_family(meliad_dir, family, output_dir):
  """Trains, checkpoints and records one family's outputs."""
  import flax  # pylint: disable=g-import-not-at-top
  from flax.training import checkpoints  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  files, bindings, orbax = FAMILIES[family]
  trainer = build(meliad_dir, files, bindings)
  flax.config.update("flax_use_orbax_checkpointing", orbax)
  tstate, _, imodel, prngs = trainer.initialize_model()
  task_config = imodel.task_config
  batch_size, length, vocab_size = (task_config.batch_size, task_config.sequence_length,
                                    task_config.vocab_size)
  rng = np.random.default_rng(SEED)

  def batch(targets, starts):
    return {"targets": jnp.asarray(targets), "start_of_sequence": jnp.asarray(starts),
            "epoch": jnp.ones([batch_size], jnp.int32)}

  train_fn = trainer._compile_step_function("train")  # pylint: disable=protected-access
  for step in range(TRAIN_STEPS):
    targets = rng.integers(1, vocab_size, size=(batch_size, length), dtype=np.int32)
    starts = np.full([batch_size], step == 0)
    tstate, _ = train_fn(tstate, batch(targets, starts), prngs)

  directory = os.path.join(output_dir, family)
  os.makedirs(directory, exist_ok=True)
  for name in os.listdir(directory):
    if name.startswith("checkpoint_"):
      raise FileExistsError(f"{directory} holds {name}: remove the old goldens first")
  # Meliad's loop saves loop step s with optimizer step s + 1 (the next step to run).
  checkpoints.save_checkpoint(directory, tstate, TRAIN_STEPS - 1)
  with open(os.path.join(directory, "config.gin"), "w") as f:
    f.write(gin.operative_config_str())

  outputs = {}
  # Test steps on consecutive segments, carrying the test state. The token losses are asked
  # for here only, so that config.gin is that of an ordinary training run.
  with gin.unlock_config():
    gin.bind_parameter("models.DecoderOnlyLanguageModel.output_token_losses", True)
  test_model = trainer.model_definition(mode="test")
  params = tstate.optimizer.target
  state = tstate.state
  mutable = list(state.keys())

  def logits_method(module, x):
    tokens = x["targets"] % module.task_config.vocab_size
    shifted = jnp.pad(tokens[:, 1:], [(0, 0), (0, 1)])
    logits, _, _ = module.decoder(input_tokens=tokens, target_tokens=shifted,
                                  start_of_sequence=x["start_of_sequence"])
    return logits

  targets, starts = eval_batches(rng, batch_size, length, vocab_size)
  logits_all, token_losses, losses = [], [], []
  for segment in range(NUM_SEGMENTS):
    x = batch(targets[segment], starts[segment])
    logits, _ = test_model.apply({"params": params, **state}, x, method=logits_method,
                                 mutable=mutable)
    (loss, metrics), state = test_model.apply({"params": params, **state}, x,
                                              mutable=mutable)
    logits_all.append(np.asarray(logits)[..., :LOGIT_ROWS])
    token_losses.append(np.asarray(metrics["token_losses"]))
    losses.append(float(loss))
  outputs.update(eval_targets=targets, eval_start_of_sequence=starts,
                 eval_logits=np.stack(logits_all).astype(np.float32),
                 eval_token_losses=np.stack(token_losses).astype(np.float32),
                 eval_loss=np.asarray(losses, np.float32))

  # One training step from the checkpointed state, every stream starting a document.
  train_targets = rng.integers(1, vocab_size, size=(batch_size, length), dtype=np.int32)
  train_starts = np.ones([batch_size], bool)
  step = int(tstate.optimizer.state.step)
  learning_rate = float(trainer.learning_rate_schedule_fn(step))
  new_tstate, metrics = train_fn(tstate, batch(train_targets, train_starts), prngs)
  outputs.update(train_targets=train_targets, train_start_of_sequence=train_starts,
                 train_loss=np.float32(metrics["loss"]),
                 train_learning_rate=np.float32(learning_rate))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(new_tstate.optimizer.target))
  for path, value in flat.items():
    outputs["param/" + "/".join(path)] = np.asarray(value, np.float32)
  np.savez_compressed(os.path.join(directory, "outputs.npz"), **outputs)
  print(f"{family}: checkpoint at optimizer step {step}, eval losses {losses}, "
        f"train loss {float(metrics['loss']):.6f}")


def parameter_shapes(meliad_dir, output_dir):
  """Writes parameter_shapes.json.gz (see the module docstring)."""
  import flax  # pylint: disable=g-import-not-at-top
  records = {"common_bindings": SIZE_BINDINGS, "late_bindings": LATE_BINDINGS,
             "arrangements": {}}
  for name, (files, bindings) in SHAPE_ARRANGEMENTS.items():
    tstate, _, _, _ = build(meliad_dir, files, bindings).initialize_model()
    state_dict = flax.core.unfreeze(flax.serialization.to_state_dict(tstate.optimizer))
    params = flax.traverse_util.flatten_dict(state_dict["target"])
    slots = flax.traverse_util.flatten_dict(state_dict["state"]["param_states"])
    records["arrangements"][name] = {
        "gin_files": files, "bindings": bindings,
        "params": {"/".join(p): list(np.shape(v)) for p, v in sorted(params.items())},
        # Flax keeps every slot; the unused ones are zeros of shape (1,), left out here.
        "slots": {"/".join(p): list(np.shape(v)) for p, v in sorted(slots.items())
                  if np.shape(v) != (1,)}}
  with gzip.open(os.path.join(output_dir, "parameter_shapes.json.gz"), "wt") as f:
    json.dump(records, f, sort_keys=True)


ADAFACTOR_SHAPES = ((128, 136), (136, 128))
ADAFACTOR_LEARNING_RATES = (0.01, 0.02)
ADAFACTOR_ROWS = 4


def adafactor_inputs(shape, step):
  """A parameter and the gradient of a step, from integer formulas (exact in float32), so that
  the test makes the same inputs without storing them."""
  i = np.arange(shape[0])[:, None]
  j = np.arange(shape[1])[None, :]
  param = (((i * 37 + j * 11) % 101) - 50).astype(np.float32) / np.float32(50)
  grad = (((i * 13 + j * 7 + step * 5) % 97) - 48).astype(np.float32) / np.float32(480)
  return param, grad


def adafactor_factored(output_dir):
  """Writes adafactor_factored.npz: two steps of Meliad's optimizer (flax.optim.Adafactor
  with beta1 0.9, as FlaxAdafactorConfig creates it) on parameters large enough to be
  factored (the model goldens' are not), in both orientations. Stored per shape: the first
  ADAFACTOR_ROWS rows of the parameter and of m after the steps, and v_row and v_col."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optimizer_config  # pylint: disable=g-import-not-at-top
  outputs = {"learning_rates": np.asarray(ADAFACTOR_LEARNING_RATES, np.float32)}
  for shape in ADAFACTOR_SHAPES:
    param, _ = adafactor_inputs(shape, 0)
    optimizer = optimizer_config.FlaxAdafactorConfig().create_optimizer_def().create(
        jnp.asarray(param))
    for step, learning_rate in enumerate(ADAFACTOR_LEARNING_RATES):
      _, grad = adafactor_inputs(shape, step)
      optimizer = optimizer.apply_gradient(jnp.asarray(grad), learning_rate=learning_rate)
    state = optimizer.state.param_states
    key = "x".join(map(str, shape))
    outputs[f"{key}/param"] = np.asarray(optimizer.target)[:ADAFACTOR_ROWS]
    outputs[f"{key}/m"] = np.asarray(state.m)[:ADAFACTOR_ROWS]
    outputs[f"{key}/v_row"] = np.asarray(state.v_row)
    outputs[f"{key}/v_col"] = np.asarray(state.v_col)
  np.savez_compressed(os.path.join(output_dir, "adafactor_factored.npz"), **outputs)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--meliad_dir", required=True,
                      help="a writable copy of Meliad's repository (also on PYTHONPATH)")
  parser.add_argument("--output_dir", default=os.path.dirname(os.path.abspath(__file__)))
  parser.add_argument("--families", default=",".join(FAMILIES))
  args = parser.parse_args()
  sys.path.insert(0, args.meliad_dir)
  os.chdir(args.meliad_dir)
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS(["make_goldens"])
  for family in args.families.split(","):
    if family:
      run_family(args.meliad_dir, family, args.output_dir)
  parameter_shapes(args.meliad_dir, args.output_dir)
  adafactor_factored(args.output_dir)


if __name__ == "__main__":
  main()
