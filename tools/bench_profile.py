"""meliad-bench profile: where one compiled training or evaluation step spends its time.

  meliad-bench profile [--gin_file=base_htrans.gin --gin_file=size/small_test.gin ...]
                       [--gin_param=...] [--step=train|eval] [--steps=2] [--top=15]
                       [--variant=NAME:BINDING;...] [--trace_dir=DIR]

Builds the trainer from the gin files, compiles the step with XLA, traces `--steps` calls
with the TensorFlow profiler and attributes each executed HLO instruction's time to the
model part it came from (see meliad_tf/benchmarks/profiling.py): embedding, kvq, attention/scores,
attention/softmax, attention/weighted_values, memory/..., recurrence/..., projection, ffn,
dropout, output, loss, optimizer, each forward or backward. Prints one JSON object on
stdout and the same as a table on stderr. The trace stays in --trace_dir (a temporary
directory by default) for TensorBoard's profile plugin.

With --variant (repeatable), each variant is profiled too, in the same process, and a table
sets the categories of all of them side by side: the profile before and after an
optimisation, e.g. --variant='reference:TransformerLayer.attention_block_length = 0'.
"""

import json
import sys

from absl import app
from absl import flags

from meliad_tf.benchmarks import profiling
from meliad_tf.benchmarks import timing as benchmark
from meliad_tf.training import trainer as trainer_lib
from meliad_tools import shared_flags


FLAGS = flags.FLAGS
shared_flags.define()
flags.DEFINE_multi_string("gin_file", None, "Gin files, in order (default: base_htrans.gin "
                          "and size/small_test.gin).")
flags.DEFINE_multi_string("gin_param", [], "Gin bindings after the files.")
flags.DEFINE_enum("step", "train", ["train", "eval"], "The step to profile.")
flags.DEFINE_integer("steps", 2, "Traced steps (after one untraced).")
flags.DEFINE_integer("top", 15, "Costliest HLO instructions to list.")
flags.DEFINE_multi_string("variant", [], "Variants to profile as well, as "
                          "NAME:BINDING[;BINDING...].")
flags.DEFINE_string("trace_dir", None, "Where the profiler writes its trace (default: a "
                    "temporary directory).")

DEFAULT_GIN_FILES = ["base_htrans.gin", "size/small_test.gin"]


def profile(gin_files, gin_params, step, steps, top, trace_dir=None):
  """The `profiling.profile_step` report of one configuration's training or eval step."""
  benchmark.configure(gin_files, list(gin_params) + ["Trainer.jit_compile = True"])
  trainer = trainer_lib.Trainer().build()
  if trainer.calls_host:
    raise app.UsageError(
        f"profile: {', '.join(trainer.model.decoder.host_search_layers)} search their memory "
        "on the host (memory_on_tpu_factory.backend = 'scann'), so the step is XLA clusters "
        "around a host call rather than the one XLA program this profile reads; profile it "
        "with the bucketed or exact backend")
  batches = trainer.data.next_training_batches(1)
  if step == "train":
    compiled, run_step = trainer.steps.train_function, trainer.train_step
    arguments = trainer.steps.training_arguments(batches)
  else:
    compiled, arguments = trainer.steps.test_function, (trainer.steps.model_inputs(batches[0]),)
    run_step = lambda: {k: v.numpy() for k, v in compiled(*arguments).items()}
  result = profiling.profile_step(run_step, compiled, arguments, steps=steps,
                                  logdir=trace_dir, top=top)
  result.update(config=list(gin_files) + list(gin_params), step=step, steps=steps)
  return result


def format_table(result):
  """The report as fixed-width text: categories, then the costliest instructions."""
  lines = [f"{result['step']} step: {result['wall_ms_per_step']} ms wall, "
           f"{result['instruction_ms_per_step']} ms in HLO instructions "
           f"(matmuls {result['matmul']['ms_per_step']} ms at "
           f"{result['matmul']['gflops_per_second']} GFLOP/s)",
           f"{'category':34} {'pass':9} {'ms/step':>9} {'share':>7}"]
  for row in result["by_category"]:
    lines.append(f"{row['category']:34} {row['pass']:9} {row['ms_per_step']:9.2f} "
                 f"{row['share']:7.1%}")
  lines.append(f"\n{'instruction':32} {'shape':28} {'ms/step':>8} {'GFLOP/s':>8}  TF op")
  for row in result["costliest"]:
    rate = row.get("gflops_per_second", "")
    lines.append(f"{row['instruction'][:32]:32} {row['shape'][:28]:28} "
                 f"{row['ms_per_step']:8.2f} {rate!s:>8}  {row['op_name'][:60]}")
  return "\n".join(lines)


def format_comparison(results):
  """Milliseconds per step of every category, one column per profiled variant."""
  names = list(results)
  totals = {}
  for name, result in results.items():
    for row in result["by_category"]:
      totals.setdefault((row["category"], row["pass"]), {})[name] = row["ms_per_step"]
  header = f"{'category':34} {'pass':9}" + "".join(f" {n[:14]:>14}" for n in names)
  lines = [header]
  for (scope, direction), by_name in sorted(totals.items(),
                                            key=lambda item: -max(item[1].values())):
    lines.append(f"{scope:34} {direction:9}" +
                 "".join(f" {by_name.get(n, 0.0):14.2f}" for n in names))
  for key, label in (("instruction_ms_per_step", "all instructions"),
                     ("wall_ms_per_step", "wall clock")):
    lines.append(f"{label:44}" + "".join(f" {results[n][key]:14.2f}" for n in names))
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    variants = benchmark.parse_variants(FLAGS.variant)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  profiling.enable_tracing()
  files = FLAGS.gin_file or DEFAULT_GIN_FILES
  results = {"as_configured": profile(files, FLAGS.gin_param, FLAGS.step, FLAGS.steps,
                                      FLAGS.top, FLAGS.trace_dir)}
  for name, bindings in variants.items():
    results[name] = profile(files, list(FLAGS.gin_param) + bindings, FLAGS.step, FLAGS.steps,
                            FLAGS.top)
  for name, result in results.items():
    print(f"== {name}\n{format_table(result)}\n", file=sys.stderr)
  if variants:
    print(format_comparison(results), file=sys.stderr)
    print(json.dumps({"benchmark": "profile", "variants": results}, indent=1))
  else:
    print(json.dumps(results["as_configured"], indent=1))


def run():
  shared_flags.run(main)


if __name__ == "__main__":
  sys.exit(run())
