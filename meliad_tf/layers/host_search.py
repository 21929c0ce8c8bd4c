"""ScaNN search for the external memory, on the host (the `scann` memory backend).

The memory itself stays per-stream state on the device, exactly as for the other backends
(keys, values [B, H, N, d], write counter [B]; checkpointed, per replica): ScaNN only
replaces the dense scan that finds the K neighbours. Each (stream, head) has a ScaNN
index over its stored keys whose document ids are the ring-buffer slots, so a search
returns slots and the step gathers the neighbours' keys and values from the device
memory as for any backend.

The search runs inside the training or evaluation step as a `tf.numpy_function` at the
memory layer. ScaNN cannot run under XLA, so the step of a model with this backend is a
TensorFlow graph whose ops on either side of the call XLA compiles in clusters
(`steps.xla_around_host_calls`; plain graph ops with `Trainer.jit_compile = False`); in
exchange there is no extra forward pass to compute the queries before the step. Each
call, per stream: check that the indices hold what the device memory holds, comparing
the rows this host wrote last (a document start, which zeroes the device memory, a
restored checkpoint or the first step all fail the check, and the indices are rebuilt
from the device keys); search the segment's queries; upsert the segment's keys at their
slots (a ScaNN upsert of an existing id replaces the entry the ring buffer overwrites).

An index starts as a brute-force ScaNN index, which accepts any number of entries. The
first time it holds N entries it is rebuilt as a tree (`num_leaves` partitions, searching
`leaves_to_search`) with asymmetric hashing and exact re-scoring of `reorder_neighbors`
candidates, trained on those N keys; later documents keep that trained tree and only
delete and upsert entries.

Not available: XLA steps, SavedModel export (the search is Python), TPUs.
"""

import dataclasses
import math

import numpy as np


# The slot returned for a neighbour that does not exist (fewer than K entries).
MISSING = -1
# Keys sampled to train the partitions and the hashing. Training on all of a 128k memory
# took four times as long (20 s against 5 s per index on a 2-core machine) for the same
# recall on clustered test keys (0.987 against 0.986 at 36 of 362 leaves).
TRAINING_SAMPLE_SIZE = 16384
# Queries per thread in ScaNN's parallel batched search.
SEARCH_BATCH = 64
# Below this many entries per (stream, head) a tree costs more than it saves.
MIN_TREE_SIZE = 8192


@dataclasses.dataclass(frozen=True)
class ScannOptions:
  """ScaNN settings for one memory (0 chooses from N and K).

  Attributes:
    num_leaves: tree partitions; 0: sqrt(N), or no tree below MIN_TREE_SIZE entries.
    leaves_to_search: partitions searched per query; 0: num_leaves / 10.
    reorder_neighbors: candidates re-scored exactly; 0: 4 K.
  """
  num_leaves: int = 0
  leaves_to_search: int = 0
  reorder_neighbors: int = 0

  def resolved(self, database_size, num_neighbors):
    """(num_leaves, leaves_to_search, reorder_neighbors) with the automatic choices made;
    num_leaves 0 means brute force."""
    leaves = self.num_leaves
    if not leaves and database_size >= MIN_TREE_SIZE:
      leaves = int(math.sqrt(database_size))
    search = self.leaves_to_search or max(1, leaves // 10)
    reorder = self.reorder_neighbors or 4 * num_neighbors
    return leaves, min(search, leaves), max(reorder, num_neighbors)


def _scann():
  # Imported on first use: ScaNN loads its TensorFlow ops library, which only the scann
  # backend needs, and it is an extra that installs on Linux x86-64 only.
  try:
    from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(
        "memory_factory.memory_on_tpu_factory.backend = 'scann' needs ScaNN, which does not "
        f"import here ({e}). Install the extra: pip install 'meliad-tf[scann]' (ScaNN has wheels "
        "for Linux x86-64 only), or choose another backend: options/memory_backend_bucketed.gin, "
        "_exact.gin or _approx_max_k.gin.") from e
  return scann_ops_pybind


def require_scann():
  """Raises ValueError naming the `scann` extra when ScaNN does not import."""
  _scann()


class ScannIndex:
  """The ScaNN index of one (stream, head); its document ids are ring-buffer slots."""

  def __init__(self, database_size, key_size, num_neighbors, options):
    self.database_size = database_size
    self.key_size = key_size
    self.num_neighbors = num_neighbors
    self.leaves, self.leaves_to_search, self.reorder = options.resolved(database_size,
                                                                        num_neighbors)
    self.trained = False
    self.searcher = (_scann().builder(np.zeros((0, key_size), np.float32), num_neighbors,
                                      "dot_product")
                     .score_brute_force().build(docids=[]))

  @property
  def size(self):
    return self.searcher.size()

  @property
  def wants_tree(self):
    """True when the index should now be trained as a tree: full and not yet trained."""
    return bool(self.leaves) and not self.trained and self.size == self.database_size

  def train(self, keys):
    """Rebuilds the index as a tree trained on the full memory `keys` [N, d] (slot order)."""
    builder = _scann().builder(keys, self.num_neighbors, "dot_product")
    sample = min(len(keys), TRAINING_SAMPLE_SIZE)
    builder = builder.tree(num_leaves=self.leaves, num_leaves_to_search=self.leaves_to_search,
                           training_sample_size=sample)
    builder = builder.score_ah(2, anisotropic_quantization_threshold=0.2,
                               training_sample_size=sample).reorder(self.reorder)
    self.searcher = builder.build(docids=list(range(len(keys))))
    self.trained = True

  def clear(self):
    """Removes every entry; a trained tree keeps its partitions."""
    if self.size:
      self.searcher.delete(list(self.searcher.docids))

  def load(self, slots, keys):
    """Replaces the contents with `keys` [n, d] at `slots` [n]."""
    self.clear()
    self.upsert(slots, keys)

  def upsert(self, slots, keys):
    """Writes `keys` [n, d] at `slots` [n], replacing what those slots held."""
    if len(slots):
      self.searcher.upsert([int(s) for s in slots], keys, batch_size=len(slots))

  def search(self, queries):
    """Slots [n, K] of the neighbours of `queries` [n, d]; -1 where fewer than K exist."""
    if not self.size:
      return np.full((len(queries), self.num_neighbors), MISSING, np.int32)
    ids, scores = self.searcher.searcher.search_batched(queries, self.num_neighbors, -1, -1,
                                                        True, SEARCH_BATCH)
    slots = np.asarray(self.searcher.docids, np.int32)[ids]
    return np.where(np.isnan(scores), MISSING, slots).astype(np.int32)


class HostSearch:
  """The ScaNN indices of one memory layer, per (mode, replica), stream and head.

  Args:
    database_size, key_size: N and d.
    num_neighbors: K.
    options: ScannOptions.
  """

  def __init__(self, database_size, key_size, num_neighbors, options):
    self.database_size = database_size
    self.key_size = key_size
    self.num_neighbors = num_neighbors
    self.options = options
    self._indices = {}  # (mode, replica) -> [B][H] ScannIndex
    self._last_write = {}  # (mode, replica) -> [B] (slots, keys [H, L, d]) written last

  def __call__(self, owner, queries, keys, index, memory_keys):
    """Searches the segment's queries, then indexes the segment's keys.

    Args:
      owner: (mode, replica) whose streams these are.
      queries, keys: [B, L, H, d] of the segment.
      index: int32 [B], the device write counters (after resets).
      memory_keys: [B, H, N, d], the device memory before this segment (after resets).
    Returns:
      int32 [B, H, L, K]: the neighbours' slots, MISSING where fewer than K exist.
    """
    batch_size, length, num_heads, _ = queries.shape
    num_neighbors = self.num_neighbors
    if owner not in self._indices:
      self._indices[owner] = [[ScannIndex(self.database_size, self.key_size, num_neighbors,
                                          self.options) for _ in range(num_heads)]
                              for _ in range(batch_size)]
      self._last_write[owner] = [None] * batch_size
    indices, last_write = self._indices[owner], self._last_write[owner]
    slots = np.empty((batch_size, num_heads, length, num_neighbors), np.int32)
    for b in range(batch_size):
      start = int(index[b]) % self.database_size
      if not self._in_sync(last_write[b], memory_keys[b]):
        self._reload(indices[b], memory_keys[b])
      write_slots = np.arange(start, start + length)
      for h in range(num_heads):
        slots[b, h] = indices[b][h].search(queries[b, :, h])
        indices[b][h].upsert(write_slots, keys[b, :, h])
        if indices[b][h].wants_tree:
          full = memory_keys[b, h].copy()
          full[write_slots] = keys[b, :, h]
          indices[b][h].train(full)
      last_write[b] = (write_slots, np.transpose(keys[b], [1, 0, 2]).copy())
    return slots

  def _in_sync(self, last_write, memory_keys):
    """Whether the device memory still ends with what this host indexed last."""
    if last_write is None:
      return False
    write_slots, keys = last_write
    return np.array_equal(memory_keys[:, write_slots], keys)

  def _reload(self, stream_indices, memory_keys):
    """Indexes the device memory of one stream [H, N, d] (its non-empty slots)."""
    for h, index in enumerate(stream_indices):
      filled = np.flatnonzero(memory_keys[h].sum(-1) != 0)
      if index.leaves and len(filled) == self.database_size:
        index.train(memory_keys[h])
      else:
        index.load(filled, memory_keys[h, filled])
