"""Timing helpers shared by the `meliad-bench` programs: matmul peak, step times, MFU.

Numbers are measured in-process on whatever device TensorFlow uses; compare variants as
ratios from one run, on an otherwise idle machine.
"""

import time

import gin
import numpy as np
import tensorflow as tf

from meliad_tf import gin_setup
from meliad_tf import trainer as trainer_lib


def best_seconds(fn, repeats):
  """The fastest of `repeats` timed calls of `fn`, after one untimed call."""
  fn()  # warm-up and compilation
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak_gflops(size=2048, repeats=5):
  """Float32 square matmul throughput: numpy, TensorFlow graph, TensorFlow XLA."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((size, size), dtype=np.float32)
  b = rng.standard_normal((size, size), dtype=np.float32)
  flops = 2.0 * size ** 3
  ta, tb = tf.constant(a), tf.constant(b)
  graph = tf.function(lambda: tf.reduce_sum(tf.matmul(ta, tb)))
  xla = tf.function(lambda: tf.reduce_sum(tf.matmul(ta, tb)), jit_compile=True)
  return {
      "numpy": flops / best_seconds(lambda: a @ b, repeats) / 1e9,
      "tensorflow": flops / best_seconds(lambda: graph().numpy(), repeats) / 1e9,
      "xla": flops / best_seconds(lambda: xla().numpy(), repeats) / 1e9,
  }


def model_flops_per_token(trainer):
  """Forward FLOPs per token: 2 per weight (embedding as the output layer) + attention.

  Attention counts the dense score and value products over the 2W keys each window
  attends to (W without the XL cache), as computed, masked half included. A recurrent
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
    attention += 4 * layer.num_heads * layer.head_size * keys
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


def time_steps(gin_files, gin_params=(), steps=5, peak_gflops=None):
  """Builds a trainer from gin and times its training and evaluation steps.

  Returns a dict with compile seconds, milliseconds per step, tokens per second, and the
  model FLOPs utilisation against `peak_gflops` (training counts 3x the forward FLOPs).
  """
  configure(gin_files, gin_params)
  trainer = trainer_lib.Trainer().build()
  tokens = trainer.global_batch_size * trainer.sequence_length
  start = time.perf_counter()
  trainer.train_step()
  compile_train = time.perf_counter() - start
  train = min(_timed(trainer.train_step) for _ in range(steps))
  _, batch = trainer._next_batch(trainer.train_iterator)  # pylint: disable=protected-access
  start = time.perf_counter()
  _to_numpy(trainer._test_step(batch))  # pylint: disable=protected-access
  compile_eval = time.perf_counter() - start
  evaluation = min(_timed(lambda: _to_numpy(trainer._test_step(batch)))  # pylint: disable=protected-access
                   for _ in range(steps))
  flops = model_flops_per_token(trainer) * tokens
  result = {
      "config": list(gin_files) + list(gin_params),
      "jit_compile": trainer.jit_compile,
      "tokens_per_step": tokens,
      "compile_seconds_train": round(compile_train, 2),
      "compile_seconds_eval": round(compile_eval, 2),
      "ms_per_train_step": round(train * 1e3, 1),
      "ms_per_eval_step": round(evaluation * 1e3, 1),
      "train_tokens_per_second": round(tokens / train, 1),
      "eval_tokens_per_second": round(tokens / evaluation, 1),
      "train_gflop_per_step": round(3 * flops / 1e9, 2),
  }
  if peak_gflops:
    result["train_mfu"] = round(3 * flops / train / 1e9 / peak_gflops, 3)
    result["eval_mfu"] = round(flops / evaluation / 1e9 / peak_gflops, 3)
  gin.clear_config()
  return result


def _timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _to_numpy(metrics):
  return {k: v.numpy() for k, v in metrics.items()}
