"""meliad-bench eval: scoring and generation speed, in process and through the SavedModel.

  meliad-bench eval [--configs=tiny_test,small_test] [--eval_segments=8] \
      [--families=xl,memory_bucketed,memory_exact,recurrent] [--generate_tokens=0] [--xla]

Per size config (float32, untrained parameters, the config's own B and L): the model is
wrapped for scoring in process, exported to a temporary SavedModel and loaded back, and
both score the same segments with the state carried (evaluation tokens per second, and
their ratio). With --xla the in-process scoring step is also timed compiled with XLA.

Generation, per family (`FAMILIES`: the size config with an 8k memory at layer -4, or
recurrent/bias_skip.gin at layer -3, keeping the size's window; the first layer where the
config has fewer layers): tokens per second of the decode step, in process and with --xla
compiled, from a one-token prompt and with `write_memory`. A token's cost is the
difference between generating --generate_tokens and one token, over the tokens between
(start-up cancels); the default, one segment per stream, crosses every block boundary and
writes the memory once, as generating a long text does per segment. Each family's figure
is also given over Transformer-XL's.
Each time is the best of --repeats timed runs after an untimed warm-up (tracing and
compilation); generation times every family and mode in turn, round by round, so that a
slow spell of a shared machine falls on all of them. Prints one JSON object.
"""

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import gin
import numpy as np
import tensorflow as tf

import pipelines
from meliad_tf.benchmarks import timing as benchmark
from meliad_tf.model import language_model as model_lib
from meliad_tf.serving import export
from meliad_tf.training import gin_setup
from meliad_tools import shared_flags


FLAGS = flags.FLAGS

# Per family: (gin files after the size config, the special layer's index from the top).
FAMILIES = {
    "xl": ([], None),
    "memory_bucketed": (["options/external_memory_8k.gin",
                         "options/memory_backend_bucketed.gin"], -4),
    "memory_exact": (["options/external_memory_8k.gin", "options/memory_backend_exact.gin"], -4),
    "recurrent": (["recurrent/bias_skip.gin"], -3),
    "block_feedback": (["recurrent/bias_skip.gin", "recurrent/block_feedback_512.gin"], -3),
}
shared_flags.define("configs")
flags.DEFINE_integer("eval_segments", 8, "Segments per stream scored in one timed run.")
flags.DEFINE_list("families", ["xl", "memory_bucketed", "memory_exact", "recurrent"],
                  "Model families whose generation is timed (see FAMILIES).")
flags.DEFINE_integer("generate_tokens", 0, "Tokens generated per stream in the longer timed "
                     "run (at least 2; 0: the segment length).")
flags.DEFINE_integer("repeats", 3, "Timed runs per figure (the best is reported).")
flags.DEFINE_bool("xla", True, "Also time in-process scoring and generation compiled with XLA.")


def _scoring_rate(module, segments, repeats):
  """Tokens per second of `score` over segments [S, B, L], from a document start."""

  def score_all():
    module.reset_all()
    for s, segment in enumerate(segments):
      module.score(segment, tf.fill([segment.shape[0]], s == 0))["loss"].numpy()

  return int(tf.size(segments)) / benchmark.best_seconds(score_all, repeats)


def _generator(module, prompt, num_tokens):
  """A call generating `num_tokens` per stream after `prompt` [B, P]."""
  batch_size, length = prompt.shape

  def generate():
    module.generate(prompt, tf.fill([batch_size], length), tf.constant(num_tokens),
                    tf.constant(1.0), tf.constant(0), tf.constant([0, 0], tf.int64),
                    tf.constant(True))["tokens"].numpy()

  return generate


def _generation_rates(modules, prompt, num_tokens, repeats):
  """Generated tokens per second (all streams) of each module's decode step: the time of
  `num_tokens` tokens per stream less that of one, over the tokens between, each the best
  of `repeats` rounds. A round times every module in turn, so that a slow spell of the
  machine falls on all of them rather than on one."""
  calls = {key: (_generator(module, prompt, num_tokens), _generator(module, prompt, 1))
           for key, module in modules.items()}
  best = {key: [float("inf"), float("inf")] for key in calls}
  for key, pair in calls.items():
    for call in pair:
      call()  # tracing and compilation
  for _ in range(repeats):
    for key, pair in calls.items():
      for i, call in enumerate(pair):
        start = time.perf_counter()
        call()
        best[key][i] = min(best[key][i], time.perf_counter() - start)
  return {key: prompt.shape[0] * (num_tokens - 1) / max(longer - one, 1e-9)
          for key, (longer, one) in best.items()}


def family_config(size, family):
  """(gin files, gin bindings) of `family` at `size`."""
  gin.clear_config()
  gin_setup.parse(["base_htrans.gin", f"size/{size}.gin"])
  num_layers = gin.query_parameter("%NUM_LAYERS")
  window = gin.query_parameter("transformer_layer.TransformerLayer.window_length")
  gin.clear_config()
  files, index = FAMILIES[family]
  params = ["DTYPE = 'float32'"]
  if index is not None:
    index = max(index, -num_layers)
    kind = "memory" if family.startswith("memory") else "recurrent"
    params += [f"DecoderStack.{kind}_layer_indices = ({index},)",
               f"TransformerLayer.window_length = {window}"]
  if family == "block_feedback":
    params.append(f"DecoderStack.dstack_window_length = {window}")
  return ["base_htrans.gin", f"size/{size}.gin"] + files, params


def _model(size, family):
  files, params = family_config(size, family)
  gin.clear_config()
  gin_setup.parse(files, params)
  tf.random.set_seed(0)
  model = model_lib.DecoderOnlyLanguageModel(output_token_losses=True)
  return model, pipelines.get_task(model.task_config.dataset_name).vocabulary


def measure(size, directory):
  """The figures of one size config."""
  model, vocabulary = _model(size, "xl")
  config = model.task_config
  batch_size, length = config.batch_size, config.sequence_length
  in_process = export.ScoringModule(model, batch_size, vocabulary)
  path = os.path.join(directory, size)
  export.export(export.ScoringModule(model, batch_size, vocabulary), path, vocabulary=vocabulary,
                config_text=gin.config_str(), task_name=config.dataset_name, step=0)
  loaded, _ = export.load(path)
  rng = np.random.default_rng(0)
  segments = tf.constant(rng.integers(1, vocabulary.vocab_size,
                                      size=[FLAGS.eval_segments, batch_size, length],
                                      dtype=np.int32))
  evaluation = {
      "in_process_tokens_per_second": _scoring_rate(in_process, segments, FLAGS.repeats),
      "saved_model_tokens_per_second": _scoring_rate(loaded, segments, FLAGS.repeats),
  }
  evaluation["saved_model_over_in_process"] = (evaluation["saved_model_tokens_per_second"]
                                               / evaluation["in_process_tokens_per_second"])
  if FLAGS.xla:
    xla = export.ScoringModule(model, batch_size, vocabulary, jit_compile=True)
    evaluation["in_process_xla_tokens_per_second"] = _scoring_rate(xla, segments, FLAGS.repeats)
  prompt = segments[0][:, :1]  # [B, 1]
  num_tokens = FLAGS.generate_tokens or length
  generation = {"prompt_tokens": 1, "generated_tokens_per_stream": num_tokens}
  modes = {"in_process": False, **({"in_process_xla": True} if FLAGS.xla else {})}
  modules = {}
  for family in FLAGS.families:
    family_model, _ = _model(size, family)
    for mode, jit_compile in modes.items():
      modules[family, mode] = export.ScoringModule(family_model, batch_size, vocabulary,
                                                   jit_compile=jit_compile)
  rates = _generation_rates(modules, prompt, num_tokens, FLAGS.repeats)
  for family in FLAGS.families:
    generation[family] = {f"{mode}_tokens_per_second": rates[family, mode] for mode in modes}
  if "xl" in generation:
    for family in FLAGS.families:
      for mode in modes:
        generation[family][f"{mode}_over_xl"] = (
            generation[family][f"{mode}_tokens_per_second"]
            / generation["xl"][f"{mode}_tokens_per_second"])
  return {
      "config": size,
      "batch_size": batch_size,
      "sequence_length": length,
      "window_length": model.decoder.layers[0].window_length,
      "parameters": sum(int(np.prod(v.shape)) for v in model.trainable_variables),
      "evaluation": {k: round(v, 2) for k, v in evaluation.items()},
      "generation": {k: ({name: round(value, 3) for name, value in v.items()}
                         if isinstance(v, dict) else v)
                     for k, v in generation.items()},
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("eval_segments", "repeats"):
    if getattr(FLAGS, name) <= 0:
      raise app.UsageError(f"--{name} must be positive, got {getattr(FLAGS, name)}")
  if FLAGS.generate_tokens == 1 or FLAGS.generate_tokens < 0:
    raise app.UsageError(f"--generate_tokens must be at least 2 (or 0: the segment length), "
                         f"got {FLAGS.generate_tokens}")
  unknown = [family for family in FLAGS.families if family not in FAMILIES]
  if unknown:
    raise app.UsageError(f"--families: unknown {', '.join(unknown)}; known: "
                         f"{', '.join(FAMILIES)}")
  with tempfile.TemporaryDirectory() as directory:
    results = [measure(size, directory) for size in FLAGS.configs]
  device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
  print(json.dumps({"benchmark": "eval", "dtype": "float32", "device": device,
                    "results": results}, indent=1))


def run():
  shared_flags.run(main)


if __name__ == "__main__":
  sys.exit(run())
