"""meliad-bench memory: cost of the kNN memory per backend and size, and recall, as JSON.

  meliad-bench memory [--config=small_test] [--sizes=8,32,64,128]
                      [--backends=bucketed,exact,approx_max_k,scann] [--rounds=3]
                      [--recall_sizes=8,32,128] [--gin_param=...] [--skip_timing]
                      [--skip_recall]

Step times: the config with options/external_memory_<n>k.gin and each backend, against
the same config without memory, all in one run. The memory is filled with random unit
keys before timing (a full memory is the costly case: the dense search does not care,
but ScaNN does), and documents are made long enough that no stream resets while timed.
All steps are XLA's (with scann, everything in them but the host's search: see
steps.xla_around_host_calls). Each configuration is timed in alternation with the
baseline, one step of each per round, so that both see the same machine load; times are
the best of the rounds, with medians.

Recall@K against exact search, on keys drawn around 64 random centres (unit vectors
with noise, a clustered set like real attention keys) with queries from the same
distribution: bucketed, approx_max_k (exact off TPU) and scann.
"""

import json
import sys
import time

from absl import flags
import numpy as np
import tensorflow as tf

from meliad_tf.benchmarks import timing as benchmark
from meliad_tf.layers import host_search
from meliad_tf.layers import memory as memory_lib
from meliad_tools import shared_flags


FLAGS = flags.FLAGS
shared_flags.define()
flags.DEFINE_string("config", "small_test", "Size config under configs/size/.")
flags.DEFINE_list("sizes", ["8", "32", "64", "128"], "Memory sizes in thousands of entries.")
flags.DEFINE_list("backends", list(memory_lib.BACKENDS), "Backends to time.")
flags.DEFINE_integer("rounds", 3, "Timed rounds per memory configuration, each one step "
                     "of it and one of its baseline (the best is reported).")
flags.DEFINE_list("recall_sizes", ["8", "32", "128"], "Memory sizes for recall, thousands.")
flags.DEFINE_integer("recall_queries", 512, "Queries per recall measurement.")
flags.DEFINE_integer("num_neighbors", 128, "K for the recall measurement.")
flags.DEFINE_multi_string("gin_param", [], "Extra gin bindings for every timed configuration "
                          "(e.g. 'NUM_LAYERS = 4' for tiny_test, whose 2 layers have no -4).")
flags.DEFINE_bool("skip_timing", False, "Only measure recall.")
flags.DEFINE_bool("skip_recall", False, "Only time steps.")

# Long documents, so that no stream starts a new one (and empties its memory) while timed.
_LONG_DOCUMENTS = ["pipelines.synthetic.document_length = 2_000_000",
                   "pipelines.synthetic.num_documents = 2",
                   "pipelines.synthetic.num_eval_documents = 2"]


def _fill_memories(trainer, rng):
  """Random unit keys and values in every slot of every memory, counters at N."""
  for state in (trainer.train_state, trainer.test_state):
    for layer_state in state.checkpointable.variables_by_name.values():
      memory = layer_state.get("memory")
      if memory is None:
        continue
      shape = memory["keys"].shape
      keys = rng.standard_normal(shape, dtype=np.float32)
      memory["keys"].assign(keys / np.linalg.norm(keys, axis=-1, keepdims=True))
      memory["values"].assign(rng.standard_normal(shape, dtype=np.float32))
      memory["index"].assign(np.full(memory["index"].shape, shape[2], np.int32))
    state.after_restore()


def _timed(gin_files, gin_params=()):
  """A TimedTrainer of one configuration, memory full."""
  return benchmark.TimedTrainer(
      gin_files, list(gin_params) + _LONG_DOCUMENTS + FLAGS.gin_param,
      prepare=lambda trainer: _fill_memories(trainer, np.random.default_rng(0)))


def _ratios(result, baseline):
  return {f"{key}_ratio": benchmark.ratio(result, baseline, key)
          for key in ("ms_per_train_step", "ms_per_eval_step")}


def timings():
  """Each memory configuration timed in alternation with the baseline.

  The baseline lives through the whole sweep; each memory configuration is built, timed
  for --rounds rounds against it and released before the next.
  """
  base = ["base_htrans.gin", f"size/{FLAGS.config}.gin"]
  baseline = _timed(base)
  results = []
  for size in FLAGS.sizes:
    for backend in FLAGS.backends:
      timed = _timed(base + [f"options/external_memory_{size}k.gin",
                             f"options/memory_backend_{backend}.gin"])
      before = len(baseline.train_times)
      benchmark.alternate([baseline, timed], FLAGS.rounds)
      result = timed.summary()
      # The baseline's rounds alongside this configuration only.
      paired = baseline.summary(first_round=before)
      result.update(size=f"{size}k", backend=backend, baseline=paired)
      result.update(_ratios(result, paired))
      results.append(result)
      print(json.dumps({k: v for k, v in result.items() if k != "baseline"}), file=sys.stderr)
      del timed
  return {"baseline": baseline.summary(), "memory": results}


def _clustered(rng, count, dim, centres):
  x = centres[rng.integers(0, len(centres), count)] + 0.6 * _unit(
      rng.standard_normal((count, dim), dtype=np.float32))
  return _unit(x)


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def recall(size, num_queries, num_neighbors, dim=128, seed=0):
  """Recall@K of bucketed, approx_max_k and scann against exact for one (stream, head)."""
  rng = np.random.default_rng(seed)
  centres = _unit(rng.standard_normal((64, dim), dtype=np.float32))
  keys = _clustered(rng, size, dim, centres)
  queries = _clustered(rng, num_queries, dim, centres)
  state = {"keys": tf.constant(keys[None, None]), "values": tf.zeros([1, 1, size, 1]),
           "index": tf.constant([size])}

  def on_device(backend):
    memory = memory_lib.ExternalMemory(1, dim, 1, size, backend=backend)
    search = tf.function(lambda q: memory.search(state, q, num_neighbors)[0], jit_compile=True)
    return search(tf.constant(queries[None, :, None]))[0, 0].numpy()

  exact = on_device("exact")
  found = {backend: on_device(backend) for backend in ("bucketed", "approx_max_k")}
  index = host_search.ScannIndex(size, dim, num_neighbors, host_search.ScannOptions())
  start = time.perf_counter()
  index.upsert(np.arange(size), keys)
  if index.wants_tree:
    index.train(keys)
  build = time.perf_counter() - start
  start = time.perf_counter()
  found["scann"] = index.search(queries)
  search_seconds = time.perf_counter() - start
  result = {"size": size, "num_neighbors": num_neighbors}
  for backend, slots in found.items():
    result[f"recall_{backend}"] = round(float(np.mean(
        [len(set(a) & set(e)) / num_neighbors for a, e in zip(slots, exact)])), 4)
  result["scann"] = {"leaves": index.leaves, "leaves_to_search": index.leaves_to_search,
                     "reorder": index.reorder, "build_seconds": round(build, 2),
                     "search_seconds": round(search_seconds, 3)}
  return result


def main(argv):
  del argv
  output = {"benchmark": "memory", "config": FLAGS.config}
  if not FLAGS.skip_recall:
    output["recall"] = [recall(int(size) * 1024, FLAGS.recall_queries, FLAGS.num_neighbors)
                        for size in FLAGS.recall_sizes]
  if not FLAGS.skip_timing:
    output["timing"] = timings()
  print(json.dumps(output, indent=1))


def run():
  shared_flags.run(main)


if __name__ == "__main__":
  sys.exit(run())
