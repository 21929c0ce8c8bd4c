"""meliad-bench train: training and evaluation speed of tiny_test and small_test, as JSON.

  meliad-bench train [--steps=5] [--configs=tiny_test,small_test] [--jit=both]
"""

import json
import sys

from absl import app
from absl import flags

from meliad_tf import benchmark

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 5, "Timed steps per measurement (the best is reported).")
flags.DEFINE_list("configs", ["tiny_test", "small_test"], "Size configs under configs/size/.")
flags.DEFINE_enum("jit", "both", ["xla", "graph", "both"],
                  "Compile the steps with XLA, as plain graphs, or time both.")


def main(argv):
  del argv
  peak = benchmark.matmul_peak_gflops()
  modes = {"xla": [True], "graph": [False], "both": [True, False]}[FLAGS.jit]
  results = []
  for size in FLAGS.configs:
    for jit in modes:
      results.append(benchmark.time_steps(
          ["base_htrans.gin", f"size/{size}.gin"], [f"Trainer.jit_compile = {jit}"],
          steps=FLAGS.steps, peak_gflops=peak["xla" if jit else "tensorflow"]))
  print(json.dumps({"benchmark": "train", "matmul_peak_gflops": peak, "results": results},
                   indent=1))


def run():
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())
