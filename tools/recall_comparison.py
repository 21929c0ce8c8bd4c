"""meliad-recall: fact recall on the synthetic documents, the three families and the gates.

  meliad-recall --root=/tmp/recall --seeds=1,2,3 --num_steps=400 \
      --output=docs/figures/recall_synthetic.png > recall.json

The synthetic documents state facts ("key k = value v.") and ask them again at their end; the
values asked again, the answer tokens, are the only tokens that need what a window cannot see.
Every variant is the same 3-layer tiny model (E 128, 4 heads, W 128, segments of 256 tokens, 8
streams, no dropout) trained for the same steps on the same documents (256 for training, 16 for
testing, 2048 bytes each with 16 facts, whose 128 answer tokens are 6 % of the document; a fact
is asked again 1000 to 2000 tokens after it was stated, far beyond the window of 128):

* transformer_xl: the baseline;
* memorizing: a kNN memory of 2048 entries per stream and head at layer 1 (K 32, bucketed),
  which holds the whole document;
* memorizing_unscaled_gate: the same with `options/gates_unscaled.gin`;
* recurrent: layer 1 recurrent, bias_skip, S 64 states, one update per window;
* recurrent_unscaled_gate: the same with `options/gates_unscaled.gin`.

Each (variant, seed) runs `meliad-train` into ROOT/<variant>/seed_<s> (the seed sets the
initialisation and the data order; the documents are the same) and then `meliad-eval` over
every test document once. A run whose record.json exists is reused, so an interrupted
comparison continues where it stopped; progress (the run, its step, the time left) goes to
stderr. Prints one JSON object: per run the answer tokens' and the other tokens' bits per
token, the gates at the end, and the wall time; per variant the mean and sample standard
deviation over seeds. The figure shows the answer tokens' test loss and the gate biases' RMS
against the step (mean and min-max band over seeds) and the final evaluation of every seed.
"""

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from meliad_tf.common import storage
from meliad_tf.training import plots
from meliad_tf.training import summaries
from meliad_tools import shared_flags

FLAGS = flags.FLAGS
shared_flags.define("gin_param", "output")
flags.DEFINE_string("root", "", "Folder of the runs (one workdir per variant and seed).")
flags.DEFINE_list("seeds", ["1", "2", "3"], "Trainer.random_seed of each run.")
flags.DEFINE_list("variants", [], "Variants to run (default: all).")
flags.DEFINE_integer("num_steps", 400, "Training steps of every run.")

_STEPS_BETWEEN_TESTS = 100
_TEST_DOCUMENTS = 16
_DOCUMENT_LENGTH = 2048
_SEQUENCE_LENGTH = 256
_BATCH_SIZE = 8

COMMON_FILES = ["base_htrans.gin", "size/tiny_test.gin"]
COMMON_PARAMS = [
    "NUM_LAYERS = 3",
    # Short runs of a tiny model underfit; dropout would only slow them down.
    "DROPOUT_RATE = 0.0",
    "ATTN_DROPOUT_RATE = 0.0",
    f"decoder_stack.TransformerTaskConfig.sequence_length = {_SEQUENCE_LENGTH}",
    f"decoder_stack.TransformerTaskConfig.batch_size = {_BATCH_SIZE}",
    "decoder_stack.TransformerTaskConfig.dataset_name = 'synthetic'",
    "pipelines.synthetic.num_documents = 256",
    f"pipelines.synthetic.num_eval_documents = {_TEST_DOCUMENTS}",
    f"pipelines.synthetic.document_length = {_DOCUMENT_LENGTH}",
    "pipelines.synthetic.num_facts = 16",
    "training_loop.Trainer.warmup_steps = 100",
    "training_loop.Trainer.status_every_steps = 50",
    "training_loop.Trainer.log_every_steps = 50",
    f"training_loop.Trainer.test_every_steps = {_STEPS_BETWEEN_TESTS}",
    # The gate curves of the figure.
    "training_loop.Trainer.parameter_metrics_every_steps = 50",
    # One test cycle reads as many segments as the test documents hold.
    "training_loop.Trainer.num_test_steps = "
    f"{_TEST_DOCUMENTS * _DOCUMENT_LENGTH // _SEQUENCE_LENGTH // _BATCH_SIZE}",
    "training_loop.Trainer.print_input_every_steps = 0",
    "training_loop.Trainer.generate_every_steps = 0",
]
MEMORY = (["options/external_memory_8k.gin"],
          ["decoder_stack.DecoderStack.memory_layer_indices = (1,)",
           "transformer_layer.TransformerLayer.memory_num_neighbors = 32",
           f"memory_factory.memory_on_tpu_factory.database_size = {_DOCUMENT_LENGTH}"])
RECURRENT = (["recurrent/bias_skip.gin", "options/window_128.gin"],
             ["decoder_stack.DecoderStack.recurrent_layer_indices = (1,)",
              "transformer_layer.TransformerLayer.recurrent_num_states = 64"])
UNSCALED = "options/gates_unscaled.gin"
VARIANTS = {
    "transformer_xl": ([], []),
    "memorizing": MEMORY,
    "memorizing_unscaled_gate": (MEMORY[0] + [UNSCALED], MEMORY[1]),
    "recurrent": RECURRENT,
    "recurrent_unscaled_gate": (RECURRENT[0] + [UNSCALED], RECURRENT[1]),
}
# The gates' parameters, by the end of their names (as options/gates_unscaled.gin names them).
_GATES = {"memory_gate": "external_memory_bias", "recurrent_gate": "gate_bias"}
_STATUS = re.compile(r"step (\d+)/(\d+)")


class Progress:
  """Lines on stderr saying which run is going, its step, and the time left."""

  def __init__(self, num_runs):
    self.num_runs = num_runs
    self.index = 0
    self.label = ""
    self.run_start = 0.0
    self.run_seconds = []  # of the runs trained here, not those reused

  def start(self, variant, seed):
    self.index += 1
    self.label = f"run {self.index}/{self.num_runs} {variant} seed {seed}"
    self.run_start = time.perf_counter()

  def say(self, text):
    print(f"recall_comparison: {self.label}: {text}", file=sys.stderr, flush=True)

  def step(self, step, num_steps):
    """Reports the trainer's step; the run's total is extrapolated from its steps so far."""
    elapsed = time.perf_counter() - self.run_start
    this_run = elapsed * num_steps / max(step, 1)
    per_run = np.mean(self.run_seconds) if self.run_seconds else this_run
    left = max(this_run - elapsed, 0) + per_run * (self.num_runs - self.index)
    self.say(f"step {step}/{num_steps}, {summaries.format_duration(elapsed)} in; "
             f"about {summaries.format_duration(left)} left for all runs")

  def finish(self, reused):
    if reused:
      self.say("reused")
      return
    self.run_seconds.append(time.perf_counter() - self.run_start)
    self.say(f"done in {summaries.format_duration(self.run_seconds[-1])}")


def _tool(name, *arguments, on_step=None):
  """Runs a meliad program in a process of its own, passing its step lines to `on_step`.

  Raises:
    RuntimeError: with the end of its output, if it fails.
  """
  command = [sys.executable, "-m", f"meliad_tools.{name}", *arguments]
  tail = collections.deque(maxlen=60)
  # One pipe for both streams: reading two pipes in turn can block on the one not read.
  with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True) as process:
    try:
      for line in process.stdout:
        tail.append(line)
        match = _STATUS.search(line)
        if match and on_step:
          on_step(int(match.group(1)), int(match.group(2)))
    except BaseException:
      # Stopped (SIGTERM, Ctrl-C): the trainer saves a checkpoint on SIGTERM, which the next
      # comparison continues from, rather than training on unwatched.
      process.terminate()
      process.wait()
      raise
  if process.returncode:
    raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n"
                       f"{''.join(tail)}")


def _gates(workdir):
  """Per gate, sigmoid of its biases in the run's last checkpoint: mean, min, max; and the
  biases' mean absolute value and RMS."""
  checkpoint = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
  reader = tf.train.load_checkpoint(checkpoint)
  biases = {}
  for name, _ in tf.train.list_variables(checkpoint):
    if name.startswith("optimizer"):
      continue
    for label, suffix in _GATES.items():
      if name.split("/.ATTRIBUTES")[0].endswith(suffix):
        biases.setdefault(label, []).append(reader.get_tensor(name).ravel())
  gates = {}
  for label, parts in biases.items():
    bias = np.concatenate(parts)
    gate = 1 / (1 + np.exp(-bias))
    gates[label] = {"mean": float(gate.mean()), "min": float(gate.min()),
                    "max": float(gate.max()), "bias_mean_abs": float(np.abs(bias).mean()),
                    "bias_rms": float(np.sqrt(np.mean(bias ** 2)))}
  return gates


def run_one(variant, seed, progress):
  """Trains and evaluates one run (or reads a finished one); returns its record.

  Raises:
    ValueError: if a finished run at the same place trained for another number of steps.
  """
  workdir = os.path.join(FLAGS.root, variant, f"seed_{seed}")
  record_path = os.path.join(workdir, "record.json")
  progress.start(variant, seed)
  if tf.io.gfile.exists(record_path):
    record = json.loads(storage.read_text(record_path))
    if record["steps"] != FLAGS.num_steps:
      raise ValueError(f"{record_path} trained for {record['steps']} steps, not --num_steps="
                       f"{FLAGS.num_steps}: give another --root")
    progress.finish(reused=True)
    return record
  files, params = VARIANTS[variant]
  start = time.perf_counter()
  _tool("train", *[f"--gin_file={f}" for f in COMMON_FILES + files],
        *[f"--gin_param={p}" for p in COMMON_PARAMS + params + [
            f"training_loop.Trainer.num_steps = {FLAGS.num_steps}",
            f"training_loop.Trainer.checkpoint_every_steps = {FLAGS.num_steps}",
            # --gin_param last: a smaller model for a quick try, say.
            f"training_loop.Trainer.random_seed = {seed}"] + FLAGS.gin_param],
        f"--workdir={workdir}", "--alsologtostderr", on_step=progress.step)
  train_seconds = time.perf_counter() - start
  progress.say("evaluating every test document")
  eval_path = os.path.join(workdir, "eval.json")
  _tool("eval", f"--workdir={workdir}", "--split=test", f"--output={eval_path}",
        "--noprogress", "--print_documents=0")
  aggregate = json.loads(storage.read_text(eval_path))["aggregate"]
  record = {
      "variant": variant, "seed": seed, "steps": FLAGS.num_steps,
      "answer_bits_per_token": aggregate["answer_bits_per_token"],
      "non_answer_bits_per_token": aggregate["non_answer_bits_per_token"],
      "bits_per_token": aggregate["bits_per_token"],
      "answer_tokens": aggregate["answer_tokens"], "tokens": aggregate["tokens"],
      "gates": _gates(workdir), "train_seconds": round(train_seconds),
  }
  storage.write_atomically(record_path, json.dumps(record, indent=1))
  progress.finish(reused=False)
  return record


def summarize(records):
  """Per variant: mean and sample standard deviation over seeds of the evaluated rates and of
  the gates' bias RMS."""
  summary = {}
  for variant in dict.fromkeys(r["variant"] for r in records):
    runs = [r for r in records if r["variant"] == variant]
    entry = {"seeds": [r["seed"] for r in runs], "steps": runs[0]["steps"]}
    series = {key: [r[key] for r in runs]
              for key in ("answer_bits_per_token", "non_answer_bits_per_token", "bits_per_token")}
    for gate in runs[0]["gates"]:
      series[f"{gate}_bias_rms"] = [r["gates"][gate]["bias_rms"] for r in runs]
    for key, values in series.items():
      values = np.array(values)
      entry[key] = {"mean": float(values.mean()),
                    "std": float(values.std(ddof=1)) if len(values) > 1 else None,
                    "values": values.tolist()}
    summary[variant] = entry
  return summary


def _band(axis, series, color, label):
  """Mean over runs of {step: value} series at their common steps, and the min-max band."""
  steps = sorted(set.intersection(*(set(s) for s in series)))
  values = np.array([[s[step] for step in steps] for s in series])
  axis.plot(steps, values.mean(axis=0), color=color, marker=".", label=label)
  axis.fill_between(steps, values.min(axis=0), values.max(axis=0), color=color, alpha=0.2)


def _bias_rms(scalars, suffix):
  """{step: RMS of the parameter whose name ends with `suffix`}, from its mean and std."""
  means = [tag for tag in scalars
           if tag.startswith("params/") and tag.endswith(f"/{suffix}/mean")]
  if not means:
    return None
  (mean,) = means
  std = dict(scalars[mean[:-len("mean")] + "std"])
  return {step: float(np.hypot(value, std[step])) for step, value in scalars[mean]}


def plot(records, path):
  """Left: test answer bits per token against the step; middle: the gate biases' RMS; right:
  the final evaluation, answer and other tokens, one dot per seed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

  variants = list(dict.fromkeys(r["variant"] for r in records))
  figure, (curves, gates, finals) = pyplot.subplots(
      1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1.1, 1, 1]})
  for index, variant in enumerate(variants):
    color = f"C{index}"
    runs = [r for r in records if r["variant"] == variant]
    scalars = [plots.read_scalars(os.path.join(FLAGS.root, variant, f"seed_{r['seed']}"))
               for r in runs]
    _band(curves, [dict(s["test/answer_bits_per_token"]) for s in scalars], color, variant)
    for label, suffix in _GATES.items():
      if all(label in r["gates"] for r in runs):
        # The summaries' steps, then the last checkpoint's, which they do not include.
        rms = [{**(_bias_rms(s, suffix) or {}), r["steps"]: r["gates"][label]["bias_rms"]}
               for s, r in zip(scalars, runs)]
        _band(gates, rms, color, variant)
    for offset, key, marker in ((-0.12, "answer_bits_per_token", "o"),
                                (0.12, "non_answer_bits_per_token", "x")):
      points = [r[key] for r in runs]
      finals.scatter([index + offset] * len(points), points, color=color, marker=marker)
      finals.hlines(np.mean(points), index + offset - 0.1, index + offset + 0.1, color=color)
  # A value's characters are drawn uniformly from 36: what a model that lost the fact can do.
  for axis in (curves, finals):
    axis.axhline(np.log2(36), color="grey", linestyle=":", label="log2 36, no recall")
  curves.set_xlabel("step")
  curves.set_ylabel("answer tokens, test bits per token")
  curves.set_title("test cycles: mean over seeds, band = min to max", fontsize=10)
  curves.grid(alpha=0.3)
  curves.legend(fontsize=8)
  gates.set_yscale("log")
  gates.set_xlabel("step")
  gates.set_ylabel("RMS of the gate's biases")
  gates.set_title("memory gate (starts at 0), recurrent gate (N(0, 0.1))", fontsize=10)
  gates.grid(alpha=0.3)
  if gates.lines:
    gates.legend(fontsize=8)
  finals.set_xticks(range(len(variants)))
  finals.set_xticklabels([v.replace("_", "\n", 1) for v in variants], fontsize=8)
  finals.set_ylabel("bits per token (meliad-eval, every test document)")
  finals.set_title("end: o answer tokens, x the others; line = mean", fontsize=10)
  finals.grid(alpha=0.3)
  figure.tight_layout()
  storage.save_figure(figure, path, dpi=72)
  pyplot.close(figure)


def _seeds():
  try:
    return [int(s) for s in FLAGS.seeds]
  except ValueError:
    raise app.UsageError(f"--seeds: whole numbers, got {','.join(FLAGS.seeds)}") from None


def _exit_on_sigterm(signal_number, frame):
  del frame
  sys.exit(128 + signal_number)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.root:
    raise app.UsageError("give --root, the folder of the runs")
  if FLAGS.num_steps <= 0:
    raise app.UsageError(f"--num_steps must be positive, got {FLAGS.num_steps}")
  seeds = _seeds()
  if not seeds or len(set(seeds)) != len(seeds):
    raise app.UsageError(f"--seeds: give distinct seeds, got {FLAGS.seeds}")
  unknown = sorted(set(FLAGS.variants) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
  output = shared_flags.value("output", "")
  if output:
    try:
      storage.check_writable(output)
    except ValueError as e:
      raise app.UsageError(f"--output={output}: {e}") from None
  variants = FLAGS.variants or list(VARIANTS)
  signal.signal(signal.SIGTERM, _exit_on_sigterm)
  progress = Progress(len(seeds) * len(variants))
  # Seed by seed, so that a comparison stopped early has every variant at the same seeds.
  records = [run_one(variant, seed, progress) for seed in seeds for variant in variants]
  if output:
    plot(records, output)
  print(json.dumps({"benchmark": "recall_comparison", "num_steps": FLAGS.num_steps,
                    "runs": records, "summary": summarize(records)}, indent=1))


def run():
  shared_flags.run(main)


if __name__ == "__main__":
  sys.exit(run())
