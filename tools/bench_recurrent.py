"""meliad-bench recurrent: the Block-Recurrent Transformer's step time against the baseline.

  meliad-bench recurrent [--rounds=8] [--windows=256,512] [--jit=xla]

For each window W, builds small_test (6 layers, L = 512, 2 streams) as the XL baseline and
with recurrent/bias_skip.gin (layer -3 recurrent, S = 512 states, one update per window of
W tokens), compiles both, then times them in alternation, round after round, so that both
see the same load on a shared machine. Prints one JSON object: per window the best and the
median step times of each model, the ratios recurrent / baseline of the training and
evaluation steps, tokens per second, and the model FLOPs utilisation against this
machine's matmul peak. Meliad's JAX code takes 1.25x its baseline at W = 512; the paper
reports a recurrent layer costing about as much as an ordinary one.
"""

import json
import sys

from absl import flags

from meliad_tf.benchmarks import timing as benchmark
from meliad_tools import shared_flags


FLAGS = flags.FLAGS
shared_flags.define()
flags.DEFINE_integer("rounds", 8, "Timed rounds; each times one step of every model.")
flags.DEFINE_list("windows", ["256", "512"], "Window lengths W (the segment is 512 tokens).")
flags.DEFINE_enum("jit", "xla", ["xla", "graph"],
                  "Compile the steps with XLA or run them as plain graphs.")
flags.DEFINE_string("gate_file", "recurrent/bias_skip.gin",
                    "The recurrent configuration to compare with the baseline.")

BASE = ["base_htrans.gin", "size/small_test.gin"]


def main(argv):
  del argv
  jit = FLAGS.jit == "xla"
  peak = benchmark.matmul_peak_gflops()
  peak_gflops = peak["xla" if jit else "tensorflow"]
  params = [f"Trainer.jit_compile = {jit}"]
  comparisons = []
  for window in (int(w) for w in FLAGS.windows):
    # The gate file sets W = 512; the window option after it sets W, as Meliad composes.
    window_file = f"options/window_{window}.gin"
    baseline = benchmark.TimedTrainer(BASE + [window_file], params)
    recurrent = benchmark.TimedTrainer(BASE + [FLAGS.gate_file, window_file], params)
    benchmark.alternate([baseline, recurrent], FLAGS.rounds)
    base, rec = baseline.summary(peak_gflops), recurrent.summary(peak_gflops)
    comparisons.append({
        "window": window,
        "train_step_ratio": benchmark.ratio(rec, base, "ms_per_train_step"),
        "train_step_ratio_median": benchmark.ratio(rec, base, "ms_per_train_step_median"),
        "eval_step_ratio": benchmark.ratio(rec, base, "ms_per_eval_step"),
        "eval_step_ratio_median": benchmark.ratio(rec, base, "ms_per_eval_step_median"),
        "flop_ratio": benchmark.ratio(rec, base, "train_gflop_per_step"),
        "baseline": base,
        "recurrent": rec,
    })
    del baseline, recurrent
  print(json.dumps({"benchmark": "recurrent", "jit_compile": jit, "rounds": FLAGS.rounds,
                    "matmul_peak_gflops": peak, "comparisons": comparisons}, indent=1))


def run():
  shared_flags.run(main)


if __name__ == "__main__":
  sys.exit(run())
