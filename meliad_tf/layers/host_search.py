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
the write counter and the rows this host wrote last (a document start, which zeroes the
device memory, a restored checkpoint or the first step all fail the check, and the indices
are rebuilt from the device keys); search the segment's queries; upsert the segment's keys
at their slots (a ScaNN upsert of an existing id replaces the entry the ring buffer
overwrites). A decoder searches one token's queries at a time (`lookup`) and indexes a
segment when it writes it (`write`).

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
# Newest entries compared to tell whether a rebuilt index still holds the device memory.
SYNC_ROWS = 256


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
    # (mode, replica) -> per stream, (counter after, slots, keys [H, n, d]) of the last
    # write its indices hold.
    self._last_write = {}

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
    self._make_indices(owner, queries.shape[0], queries.shape[2])
    slots = self._search(owner, queries, index, memory_keys)
    for b in range(queries.shape[0]):
      self._write(owner, b, keys[b], index[b], memory_keys[b])
    return slots

  def lookup(self, owner, queries, index, memory_keys):
    """Searches a decoding step's queries [B, n, H, d]; indexes nothing (see `write`).

    Returns:
      int32 [B, H, n, K], as `__call__`.
    """
    self._make_indices(owner, queries.shape[0], queries.shape[2])
    return self._search(owner, queries, index, memory_keys)

  def write(self, owner, keys, index, memory_keys, streams):
    """Indexes the keys [B, n, H, d] that a decoder writes to the memories of `streams`
    (bool [B]) at their counters `index`; `memory_keys` [B, H, N, d] is the device memory
    before the write."""
    self._make_indices(owner, keys.shape[0], keys.shape[2])
    for b in np.flatnonzero(streams):
      self._sync(owner, b, index[b], memory_keys[b])
      self._write(owner, b, keys[b], index[b], memory_keys[b])

  def _make_indices(self, owner, batch_size, num_heads):
    if owner not in self._indices:
      self._indices[owner] = [[ScannIndex(self.database_size, self.key_size,
                                          self.num_neighbors, self.options)
                               for _ in range(num_heads)] for _ in range(batch_size)]
      self._last_write[owner] = [None] * batch_size

  def _search(self, owner, queries, index, memory_keys):
    batch_size, length, num_heads, _ = queries.shape
    slots = np.empty((batch_size, num_heads, length, self.num_neighbors), np.int32)
    for b in range(batch_size):
      self._sync(owner, b, index[b], memory_keys[b])
      for h in range(num_heads):
        slots[b, h] = self._indices[owner][b][h].search(queries[b, :, h])
    return slots

  def _sync(self, owner, b, index, memory_keys):
    """Rebuilds stream b's indices from the device memory [H, N, d] unless they hold it."""
    last_write = self._last_write[owner]
    if self._in_sync(last_write[b], index, memory_keys):
      return
    self._reload(self._indices[owner][b], memory_keys)
    # The newest entries stand for the last write, so that the next call finds the indices
    # in sync without comparing the whole memory.
    count = min(int(index), self.database_size, SYNC_ROWS)
    slots = np.arange(int(index) - count, int(index)) % self.database_size
    last_write[b] = (int(index), slots, memory_keys[:, slots].copy())

  def _write(self, owner, b, keys, index, memory_keys):
    """Upserts stream b's keys [n, H, d] at the slots from `index` (after a `_sync`)."""
    stream_indices = self._indices[owner][b]
    length = keys.shape[0]
    start = int(index) % self.database_size
    write_slots = np.arange(start, start + length)
    for h, head_index in enumerate(stream_indices):
      head_index.upsert(write_slots, keys[:, h])
      if head_index.wants_tree:
        full = memory_keys[h].copy()
        full[write_slots] = keys[:, h]
        head_index.train(full)
    self._last_write[owner][b] = (int(index) + length, write_slots,
                                  np.transpose(keys, [1, 0, 2]).copy())

  def _in_sync(self, last_write, index, memory_keys):
    """Whether the device memory is the one this host indexed last: its counter is where
    the last write left it, and the slots written then still hold those keys."""
    if last_write is None:
      return False
    written_index, write_slots, keys = last_write
    return written_index == int(index) and np.array_equal(memory_keys[:, write_slots], keys)

  def _reload(self, stream_indices, memory_keys):
    """Indexes the device memory of one stream [H, N, d] (its non-empty slots)."""
    for h, index in enumerate(stream_indices):
      filled = np.flatnonzero(memory_keys[h].sum(-1) != 0)
      if index.leaves and len(filled) == self.database_size:
        index.train(memory_keys[h])
      else:
        index.load(filled, memory_keys[h, filled])
