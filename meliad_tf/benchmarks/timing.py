"""Timing helpers shared by the `meliad-bench` programs: matmul peak, step times, MFU.

Numbers are measured in-process on whatever device TensorFlow uses; compare variants as
ratios from one run, on an otherwise idle machine.
"""

import statistics
import time

import gin
import numpy as np
import tensorflow as tf

from meliad_tf.training import gin_setup
from meliad_tf.training import trainer as trainer_lib


def best_seconds(fn, repeats):
  """The fastest of `repeats` timed calls of `fn`, after one untimed call."""
  fn()  # warm-up and compilation
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak_gflops(size=2048, repeats=5, dtype=tf.float32):
  """Square matmul throughput in `dtype`: TensorFlow graph, TensorFlow XLA, and numpy (for
  float32 on the CPU), in GFLOP/s, on the device TensorFlow places ops on."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((size, size), dtype=np.float32)
  b = rng.standard_normal((size, size), dtype=np.float32)
  flops = 2.0 * size ** 3
  ta, tb = tf.cast(a, dtype), tf.cast(b, dtype)
  product = lambda: tf.reduce_sum(tf.cast(tf.matmul(ta, tb), tf.float32))
  graph = tf.function(product)
  xla = tf.function(product, jit_compile=True)
  peak = {
      "tensorflow": flops / best_seconds(lambda: graph().numpy(), repeats) / 1e9,
      "xla": flops / best_seconds(lambda: xla().numpy(), repeats) / 1e9,
  }
  if tf.as_dtype(dtype) == tf.float32 and not tf.config.list_logical_devices("GPU"):
    peak["numpy"] = flops / best_seconds(lambda: a @ b, repeats) / 1e9
  return {name: round(value, 1) for name, value in peak.items()}


def parse_variants(specs):
  """{name: [gin bindings]} from NAME:BINDING[;BINDING...] strings."""
  variants = {}
  for spec in specs:
    name, sep, bindings = spec.partition(":")
    if not sep or not name or name in variants:
      raise ValueError(f"--variant must be NAME:BINDING[;BINDING...] with a new NAME, "
                       f"got {spec!r}")
    variants[name] = [b.strip() for b in bindings.split(";") if b.strip()]
  return variants


def select_device(device_bench):
  """What a benchmark adds for its device: (extra gin files, compute dtype).

  With `device_bench`, the first GPU in bfloat16; it raises SystemExit with a message when
  TensorFlow sees no GPU. Otherwise the CPU in float32, GPUs hidden (call before any op).
  """
  if device_bench:
    if not tf.config.list_physical_devices("GPU"):
      raise SystemExit("--device_bench needs a GPU, and TensorFlow sees none "
                       "(tf.config.list_physical_devices('GPU') is empty)")
    return ["options/bfloat16.gin"], tf.bfloat16
  tf.config.set_visible_devices([], "GPU")
  return [], tf.float32


def device_name():
  """The device the benchmark ran on, as TensorFlow names it."""
  gpus = tf.config.list_logical_devices("GPU")
  return gpus[0].name if gpus else "CPU"


def model_flops_per_token(trainer):
  """Forward FLOPs per token: 2 per weight (embedding as the output layer) + attention.

  Attention counts the score and value products as computed: over the 2W keys each window
  attends to (W without the XL cache), masked half included, or over the W + b keys of
  each block of b queries in the blocked sliding-window attention. A recurrent
  cell runs once per window on its S states (see `_recurrent_cell_flops_per_token`), and
  tokens that cross-attend to a state add 4 S H d.
  """
  decoder = trainer.model.decoder
  cells = [layer.recurrent for layer in decoder.layers if layer.recurrent is not None]
  cell_variables = {id(v) for cell in cells for v in cell.trainable_variables}
  weights = sum(int(np.prod(v.shape)) for v in trainer.params
                if v is not decoder.embedding and len(v.shape) == 2
                and id(v) not in cell_variables)
  output_layer = int(np.prod(decoder.embedding.shape))
  attention = 0
  for layer in decoder.layers:
    keys = 2 * layer.window_length if layer.use_long_xl_architecture else layer.window_length
    block = layer.attention_block_length
    computed_keys = (layer.window_length + block
                     if layer.use_long_xl_architecture and 0 < block < layer.window_length
                     else keys)
    attention += 4 * layer.num_heads * layer.head_size * computed_keys
    if layer.recurrent is not None:
      attention += _recurrent_cell_flops_per_token(layer, keys)
    states = layer.recurrent.num_states if layer.recurrent is not None else (
        cells[-1].num_states if layer.cross_attention else 0)
    attention += 4 * layer.num_heads * layer.head_size * states
  return 2 * (weights + output_layer) + attention


def _recurrent_cell_flops_per_token(layer, keys):
  """The cell's work per window, over the W tokens of the window.

  Its matrices act on S states (2 FLOPs per weight each; position embeddings and the
  initial state are added, not multiplied); the states attend to themselves and to the
  window's keys.
  """
  cell = layer.recurrent
  matrices = sum(int(np.prod(v.shape)) for v in cell.trainable_variables
                 if len(v.shape) == 2 and v is not cell.recurrent_initial_state
                 and v is not cell.recurrent_tbase.position_embeddings)
  states = cell.num_states
  per_window = (2 * states * matrices
                + 4 * layer.num_heads * layer.head_size * states * (states + keys))
  return per_window / layer.window_length


def configure(gin_files, gin_params=()):
  gin.clear_config()
  gin_setup.parse(gin_files, list(gin_params) + ["Trainer.status_every_steps = 0",
                                                 "Trainer.log_every_steps = 0",
                                                 "Trainer.test_every_steps = 0"])


class TimedTrainer:
  """A trainer built and compiled under its own gin configuration, then timed step by step.

  Building and the first call of each step (which traces and compiles it) happen while its
  configuration is parsed; later calls reuse the compiled steps, so several TimedTrainers
  can be timed in alternation (`alternate`), each round seeing the same machine load.

  Args:
    gin_files, gin_params: the configuration.
    prepare: optional function called with the built trainer before compiling (e.g. to
      fill its memories).
    time_input: each round also times the host's part of a training step on its own:
      taking the next batch from the (prefetching) pipeline and handing its streams to
      the replicas (`input_ms_per_train_step`).
  """

  def __init__(self, gin_files, gin_params=(), prepare=None, time_input=False):
    self.config = list(gin_files) + list(gin_params)
    configure(gin_files, gin_params)
    self.trainer = trainer_lib.Trainer().build()
    if prepare is not None:
      prepare(self.trainer)
    self.tokens = self.trainer.data.global_batch_size * self.trainer.sequence_length
    self.flops_per_token = model_flops_per_token(self.trainer)
    self.batch = self.trainer.steps.model_inputs(self.trainer.data.next_training_batches(1)[0])
    self.compile_train = _seconds(self.train_step)
    self.compile_eval = _seconds(self.eval_step)
    gin.clear_config()
    self.time_input = time_input
    self.train_times, self.eval_times, self.input_times = [], [], []

  def train_step(self):
    """One call of the training loop (`Trainer.steps_per_loop` steps): the next batches from
    the pipeline, the compiled steps, and their metrics fetched to the host."""
    self.trainer.train_steps(self.trainer.steps_per_loop)

  def next_batch(self):
    self.trainer.steps.model_inputs(self.trainer.data.next_training_batches(1)[0])

  def eval_step(self):
    for value in self.trainer.steps.test_function(self.batch).values():
      value.numpy()  # waits for the step to finish

  def time_round(self):
    self.train_times.append(_seconds(self.train_step) / self.trainer.steps_per_loop)
    if self.time_input:
      self.input_times.append(_seconds(self.next_batch))
    self.eval_times.append(_seconds(self.eval_step))

  def summary(self, peak_gflops=None, first_round=0):
    """Step times (best and median over the rounds from `first_round` on), tokens per
    second and MFU.

    With `time_input`, also the median time of the host's input work per step.
    """
    train_times = self.train_times[first_round:]
    eval_times = self.eval_times[first_round:]
    input_times = self.input_times[first_round:]
    train, evaluation = min(train_times), min(eval_times)
    flops = self.flops_per_token * self.tokens
    result = {
        "config": self.config,
        "jit_compile": self.trainer.jit_compile,
        "tokens_per_step": self.tokens,
        "compile_seconds_train": round(self.compile_train, 2),
        "compile_seconds_eval": round(self.compile_eval, 2),
        "ms_per_train_step": round(train * 1e3, 1),
        "ms_per_train_step_median": round(statistics.median(train_times) * 1e3, 1),
        "ms_per_eval_step": round(evaluation * 1e3, 1),
        "ms_per_eval_step_median": round(statistics.median(eval_times) * 1e3, 1),
        "train_tokens_per_second": round(self.tokens / train, 1),
        "eval_tokens_per_second": round(self.tokens / evaluation, 1),
        "eval_over_train_tokens_per_second": round(train / evaluation, 2),
        "train_gflop_per_step": round(3 * flops / 1e9, 2),
    }
    if input_times:
      result["input_ms_per_train_step"] = round(statistics.median(input_times) * 1e3, 2)
    if peak_gflops:
      result["train_mfu"] = round(3 * flops / train / 1e9 / peak_gflops, 3)
      result["eval_mfu"] = round(flops / evaluation / 1e9 / peak_gflops, 3)
    return result


def alternate(timed, rounds):
  """Times one round of every TimedTrainer in `timed` (a dict or list), `rounds` times."""
  for _ in range(rounds):
    for t in (timed.values() if isinstance(timed, dict) else timed):
      t.time_round()


def ratio(numerator, denominator, key):
  return round(numerator[key] / denominator[key], 3)


def _seconds(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start
