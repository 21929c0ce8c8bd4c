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
import statistics
import sys
import time

from absl import app
from absl import flags
import gin

from meliad_tf import benchmark
from meliad_tf import trainer as trainer_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 8, "Timed rounds; each times one step of every model.")
flags.DEFINE_list("windows", ["256", "512"], "Window lengths W (the segment is 512 tokens).")
flags.DEFINE_enum("jit", "xla", ["xla", "graph"],
                  "Compile the steps with XLA or run them as plain graphs.")
flags.DEFINE_string("gate_file", "recurrent/bias_skip.gin",
                    "The recurrent configuration to compare with the baseline.")

BASE = ["base_htrans.gin", "size/small_test.gin"]


class _Timed:
  """A trainer built and compiled under its own gin configuration, then timed step by step.

  Building and the first call of each step (which traces and compiles it) happen while its
  configuration is parsed; later calls reuse the compiled steps.
  """

  def __init__(self, gin_files, gin_params):
    self.config = list(gin_files) + list(gin_params)
    benchmark.configure(gin_files, gin_params)
    self.trainer = trainer_lib.Trainer().build()
    self.tokens = self.trainer.global_batch_size * self.trainer.sequence_length
    self.flops_per_token = benchmark.model_flops_per_token(self.trainer)
    # pylint: disable-next=protected-access
    _, self.batch = self.trainer._next_batch(self.trainer.train_iterator)
    self.compile_train = _seconds(self.train_step)
    self.compile_eval = _seconds(self.eval_step)
    gin.clear_config()
    self.train_times, self.eval_times = [], []

  def train_step(self):
    self.trainer.train_step()

  def eval_step(self):
    for value in self.trainer._test_step(self.batch).values():  # pylint: disable=protected-access
      value.numpy()  # waits for the step to finish

  def time_round(self):
    self.train_times.append(_seconds(self.train_step))
    self.eval_times.append(_seconds(self.eval_step))

  def summary(self, peak_gflops):
    train, evaluation = min(self.train_times), min(self.eval_times)
    flops = self.flops_per_token * self.tokens
    return {
        "config": self.config,
        "compile_seconds_train": round(self.compile_train, 2),
        "compile_seconds_eval": round(self.compile_eval, 2),
        "ms_per_train_step": round(train * 1e3, 1),
        "ms_per_train_step_median": round(statistics.median(self.train_times) * 1e3, 1),
        "ms_per_eval_step": round(evaluation * 1e3, 1),
        "ms_per_eval_step_median": round(statistics.median(self.eval_times) * 1e3, 1),
        "train_tokens_per_second": round(self.tokens / train, 1),
        "eval_tokens_per_second": round(self.tokens / evaluation, 1),
        "train_gflop_per_step": round(3 * flops / 1e9, 2),
        "train_mfu": round(3 * flops / train / 1e9 / peak_gflops, 3),
        "eval_mfu": round(flops / evaluation / 1e9 / peak_gflops, 3),
    }


def _seconds(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _ratio(recurrent, baseline, key):
  return round(recurrent[key] / baseline[key], 3)


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
    baseline = _Timed(BASE + [window_file], params)
    recurrent = _Timed(BASE + [FLAGS.gate_file, window_file], params)
    for _ in range(FLAGS.rounds):
      baseline.time_round()
      recurrent.time_round()
    base, rec = baseline.summary(peak_gflops), recurrent.summary(peak_gflops)
    comparisons.append({
        "window": window,
        "train_step_ratio": _ratio(rec, base, "ms_per_train_step"),
        "train_step_ratio_median": _ratio(rec, base, "ms_per_train_step_median"),
        "eval_step_ratio": _ratio(rec, base, "ms_per_eval_step"),
        "eval_step_ratio_median": _ratio(rec, base, "ms_per_eval_step_median"),
        "flop_ratio": _ratio(rec, base, "train_gflop_per_step"),
        "baseline": base,
        "recurrent": rec,
    })
    del baseline, recurrent
  print(json.dumps({"benchmark": "recurrent", "jit_compile": jit, "rounds": FLAGS.rounds,
                    "matmul_peak_gflops": peak, "comparisons": comparisons}, indent=1))


def run():
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())
