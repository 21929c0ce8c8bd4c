"""meliad-bench train: training and evaluation speed of the XL model, as JSON.

  meliad-bench train [--configs=tiny_test,small_test] [--rounds=5] [--jit=xla|graph|both]
                     [--noreference] [--variant=NAME:BINDING;...] [--gin_param=...]
                     [--device_bench]

Per size config, the model as configured ("optimised") and, unless --noreference, the
same model on the unoptimised paths ("reference": attention window by window against 2W
keys with TensorFlow's gradient, one matmul per projection kernel), built and compiled
once each, then timed in alternation, round after round, so that both see the same load;
the ratios reference / optimised come from the same run. Step times are the best of the
rounds (medians too); `input_ms_per_train_step` is the host's input work in a step of the
training loop (the next batch from the prefetching pipeline, split into the replicas'
streams), timed on its own. MFU is against a matmul peak measured in the same process.

--device_bench times on the first GPU in bfloat16 (options/bfloat16.gin), with a peak
measured there; it stops with an error when TensorFlow sees no GPU.
"""

import json
import sys

from absl import app
from absl import flags
import tensorflow as tf

from meliad_tf.benchmarks import timing as benchmark
from meliad_tools import shared_flags


FLAGS = flags.FLAGS
shared_flags.define("configs", "gin_param")
flags.DEFINE_integer("rounds", 5, "Timed rounds; each times one step of every model.")
flags.DEFINE_enum("jit", "xla", ["xla", "graph", "both"],
                  "Compile the steps with XLA, as plain graphs, or time both.")
flags.DEFINE_bool("reference", True, "Also time the unoptimised paths (REFERENCE_PARAMS).")
flags.DEFINE_multi_string("variant", [], "More variants to time alongside, as "
                          "NAME:BINDING[;BINDING...], e.g. 'no_fusion:TransformerBase."
                          "fuse_projections = False'.")
flags.DEFINE_bool("device_bench", False, "Time on the first GPU in bfloat16 instead of the "
                  "CPU in float32.")

# The unoptimised paths: Meliad's arithmetic op by op.
REFERENCE_PARAMS = ["TransformerLayer.attention_block_length = 0",
                    "TransformerBase.fuse_projections = False"]


def compare(size, jit_modes, reference, extra_files, extra_params, rounds, peak,
            more_variants=None):
  """Times the variants of one size config in alternation; returns their summaries."""
  files = ["base_htrans.gin", f"size/{size}.gin"] + extra_files
  variants = {}
  for jit in jit_modes:
    name = "optimised" if jit else "optimised_graph"
    variants[name] = benchmark.TimedTrainer(
        files, extra_params + [f"Trainer.jit_compile = {jit}"], time_input=True)
  if reference:
    variants["reference"] = benchmark.TimedTrainer(
        files, extra_params + ["Trainer.jit_compile = True"] + REFERENCE_PARAMS)
  for name, bindings in (more_variants or {}).items():
    variants[name] = benchmark.TimedTrainer(files, extra_params + bindings)
  benchmark.alternate(variants, rounds)
  result = {"config": size}
  for name, timed in variants.items():
    result[name] = timed.summary(peak["xla" if timed.trainer.jit_compile else "tensorflow"])
  if reference:
    result["reference_over_optimised"] = {
        "train_step": benchmark.ratio(result["reference"], result["optimised"],
                                      "ms_per_train_step"),
        "eval_step": benchmark.ratio(result["reference"], result["optimised"],
                                     "ms_per_eval_step"),
        "compile_train": benchmark.ratio(result["reference"], result["optimised"],
                                         "compile_seconds_train"),
    }
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  extra_files, dtype = benchmark.select_device(FLAGS.device_bench)
  peak = benchmark.matmul_peak_gflops(dtype=dtype)
  modes = {"xla": [True], "graph": [False], "both": [True, False]}[FLAGS.jit]
  try:
    more_variants = benchmark.parse_variants(FLAGS.variant)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  results = [compare(size, modes, FLAGS.reference and True in modes, extra_files,
                     list(FLAGS.gin_param), FLAGS.rounds, peak, more_variants)
             for size in FLAGS.configs]
  print(json.dumps({"benchmark": "train", "device": benchmark.device_name(),
                    "dtype": tf.as_dtype(dtype).name, "rounds": FLAGS.rounds,
                    "matmul_peak_gflops": peak, "results": results}, indent=1))


def run():
  shared_flags.run(main)


if __name__ == "__main__":
  sys.exit(run())
