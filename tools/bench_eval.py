"""meliad-bench eval: scoring and generation speed, in process and through the SavedModel.

  meliad-bench eval [--configs=tiny_test,small_test] [--eval_segments=8] \
      [--generate_tokens=64] [--xla]

Per size config (float32, untrained parameters, the config's own B and L): the model is
wrapped for scoring in process, exported to a temporary SavedModel and loaded back, and
both score the same segments with the state carried (evaluation tokens per second, and
their ratio). With --xla the in-process scoring step and decode step are also timed
compiled with XLA.
Generation tokens per second are timed from a one-token prompt, so they measure the
decode step alone (a prompt's whole segments cost what scoring them costs).
Each figure is the best of --repeats timed runs after an untimed warm-up (tracing and
compilation). Prints one JSON object.
"""

import json
import os
import sys
import tempfile

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
shared_flags.define("configs")
flags.DEFINE_integer("eval_segments", 8, "Segments per stream scored in one timed run.")
flags.DEFINE_integer("generate_tokens", 64, "Tokens generated per stream in one timed run.")
flags.DEFINE_integer("repeats", 3, "Timed runs per figure (the best is reported).")
flags.DEFINE_bool("xla", True, "Also time in-process scoring and generation compiled with XLA.")


def _scoring_rate(module, segments, repeats):
  """Tokens per second of `score` over segments [S, B, L], from a document start."""

  def score_all():
    module.reset_all()
    for s, segment in enumerate(segments):
      module.score(segment, tf.fill([segment.shape[0]], s == 0))["loss"].numpy()

  return int(tf.size(segments)) / benchmark.best_seconds(score_all, repeats)


def _generation_rate(module, prompt, num_tokens, repeats):
  """Generated tokens per second (all streams) after `prompt` [B, P]."""
  batch_size, length = prompt.shape

  def generate():
    module.generate(prompt, tf.fill([batch_size], length), tf.constant(num_tokens),
                    tf.constant(1.0), tf.constant(0), tf.constant([0, 0], tf.int64)
                    )["tokens"].numpy()

  return batch_size * num_tokens / benchmark.best_seconds(generate, repeats)


def measure(size, directory):
  """The figures of one size config."""
  gin.clear_config()
  gin_setup.parse(["base_htrans.gin", f"size/{size}.gin"], ["DTYPE = 'float32'"])
  tf.random.set_seed(0)
  model = model_lib.DecoderOnlyLanguageModel(output_token_losses=True)
  config = model.task_config
  batch_size, length = config.batch_size, config.sequence_length
  vocabulary = pipelines.get_task(config.dataset_name).vocabulary
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
  prompt = segments[0][:, :1]  # [B, 1]
  generation = {
      "prompt_tokens": 1,
      "generated_tokens_per_stream": FLAGS.generate_tokens,
      "in_process_tokens_per_second": _generation_rate(in_process, prompt,
                                                       FLAGS.generate_tokens, FLAGS.repeats),
      "saved_model_tokens_per_second": _generation_rate(loaded, prompt, FLAGS.generate_tokens,
                                                        FLAGS.repeats),
  }
  if FLAGS.xla:
    xla = export.ScoringModule(model, batch_size, vocabulary, jit_compile=True)
    evaluation["in_process_xla_tokens_per_second"] = _scoring_rate(xla, segments, FLAGS.repeats)
    generation["in_process_xla_tokens_per_second"] = _generation_rate(
        xla, prompt, FLAGS.generate_tokens, FLAGS.repeats)
  decoder = model.decoder
  return {
      "config": size,
      "batch_size": batch_size,
      "sequence_length": length,
      "window_length": decoder.layers[0].window_length,
      "parameters": sum(int(np.prod(v.shape)) for v in model.trainable_variables),
      "evaluation": {k: round(v, 2) for k, v in evaluation.items()},
      "generation": {k: round(v, 2) if isinstance(v, float) else v
                     for k, v in generation.items()},
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("eval_segments", "generate_tokens", "repeats"):
    if getattr(FLAGS, name) <= 0:
      raise app.UsageError(f"--{name} must be positive, got {getattr(FLAGS, name)}")
  with tempfile.TemporaryDirectory() as directory:
    results = [measure(size, directory) for size in FLAGS.configs]
  device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
  print(json.dumps({"benchmark": "eval", "dtype": "float32", "device": device,
                    "results": results}, indent=1))


def run():
  shared_flags.run(main)


if __name__ == "__main__":
  sys.exit(run())
