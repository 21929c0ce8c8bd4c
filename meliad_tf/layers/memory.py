"""The Memorizing Transformer's external memory: a kNN database of past keys and values.

A memory layer keeps, per stream and per head, a database of the N most recent
(normalised key, value) pairs of its document. It is per-stream state, like the XL cache:
`{"keys": [B, H, N, d], "values": [B, H, N, d], "index": int32 [B]}`, where `index`
counts the entries written since the stream's document started (all heads of a stream
move together; Meliad keeps one counter per (stream, head) with equal values). Writes go
to slots `index mod N`: a ring buffer that overwrites the oldest segment once full.

Per layer call, over the whole segment (Meliad's order):
  1. `reset`: streams whose document starts get zero keys and values and index 0;
  2. `retrieve`: the top K entries for every query, from the memory as it was before
     this segment (so a token never retrieves its own segment);
  3. `write`: this segment's keys and values.
Everything read or written is constant to the gradient.

A slot is empty when its key sums to exactly 0 (Meliad's test; empty slots hold zeros).
Every backend returns a zero key and a zero value for a neighbour that is an empty slot,
so an empty memory gives zeros, as Meliad's bucketed search does.

Backends (`memory_on_tpu_factory.backend`):
  bucketed      Meliad's approximate top K: slot s belongs to bucket s mod K and each of
                the K buckets returns its best entry. N must be a multiple of K.
  exact         the true top K of the dense scores (`tf.math.top_k`).
  approx_max_k  `tf.math.approx_max_k` with `recall_target` (approximate on TPU only).
  scann         a ScaNN index per (stream, head) on the host, searched by a host call
                inside a graph-mode (not XLA) step; see `host_search.py`.

Decoding one token at a time reads the memory as the segment step does (`search` and
`attend` take any number of queries; `host_lookup` for scann) and writes a segment once it
is complete (`write` with `streams`, `host_write` for scann), so that a generated text
meets the memory its forward pass would.
"""

import gin
import numpy as np
import tensorflow as tf

from meliad_tf.layers import host_search
from meliad_tf.layers import initializers
from meliad_tf.layers import scopes


BACKENDS = ("bucketed", "exact", "approx_max_k", "scann")
# Added to the score of an empty slot (Meliad's value): below any real dot product of
# normalised vectors, so an empty slot is chosen only where nothing else is left.
EMPTY_SLOT_SCORE = -1e6


@gin.configurable(module="memory_factory")
def memory_on_tpu_factory(num_heads=gin.REQUIRED, key_size=gin.REQUIRED,
                          value_size=gin.REQUIRED, database_size=gin.REQUIRED,
                          dtype=gin.REQUIRED, backend="bucketed", recall_target=0.95,
                          search_chunk_size=1024, scann_num_leaves=0, scann_leaves_to_search=0,
                          scann_reorder_neighbors=0):
  """Meliad's factory of the on-device memory, plus the choice of search backend.

  Args:
    num_heads: H of the memory layer (NUM_MEMORY_HEADS; must equal the layer's heads).
    key_size, value_size: d of the keys and values (MEMORY_HEAD_DIM; the layer's d).
    database_size: N, entries per (stream, head).
    dtype: dtype of the stored keys and values.
    backend: "bucketed", "exact", "approx_max_k" or "scann".
    recall_target: for approx_max_k.
    search_chunk_size: slots scored at a time by the on-device backends (see
      `ExternalMemory.search`); 0 scores the whole database at once (for approx_max_k on
      TPU, where XLA fuses the matmul with the approximate top K).
    scann_num_leaves, scann_leaves_to_search, scann_reorder_neighbors: the ScaNN tree and
      re-scoring; 0 picks them from N (see `host_search.ScannOptions`).
  Returns:
    An ExternalMemory.
  """
  if num_heads is gin.REQUIRED:
    raise ValueError("memory_factory.memory_on_tpu_factory.num_heads is required: set "
                     "NUM_MEMORY_HEADS (options/external_memory_*.gin set it to %NUM_HEADS)")
  return ExternalMemory(num_heads=num_heads, key_size=key_size, value_size=value_size,
                        database_size=database_size, dtype=dtype, backend=backend,
                        recall_target=recall_target, search_chunk_size=search_chunk_size,
                        scann_options=dict(num_leaves=scann_num_leaves,
                                           leaves_to_search=scann_leaves_to_search,
                                           reorder_neighbors=scann_reorder_neighbors))


class ExternalMemory:
  """Configuration and pure functions of one layer's memory (the data lives in the state).

  Args:
    num_heads: H.
    key_size, value_size: d of keys and values.
    database_size: N.
    dtype: dtype of the stored keys and values.
    backend: one of BACKENDS.
    recall_target: approx_max_k's recall target, in (0, 1].
    search_chunk_size: slots scored at a time on device (0: all).
    scann_options: dict of ScaNN settings (the fields of host_search.ScannOptions).
  """

  def __init__(self, num_heads, key_size, value_size, database_size, dtype="float32",
               backend="bucketed", recall_target=0.95, search_chunk_size=1024,
               scann_options=None):
    if backend not in BACKENDS:
      raise ValueError(f"memory_factory.memory_on_tpu_factory.backend must be one of "
                       f"{BACKENDS}, got {backend!r}")
    if backend == "scann":
      host_search.require_scann()
    for name, value in (("num_heads", num_heads), ("key_size", key_size),
                        ("value_size", value_size), ("database_size", database_size)):
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"memory_factory.memory_on_tpu_factory.{name} must be a positive "
                         f"integer, got {value!r}")
    if not 0.0 < recall_target <= 1.0:
      raise ValueError(f"memory_factory.memory_on_tpu_factory.recall_target must be in "
                       f"(0, 1], got {recall_target}")
    self.num_heads = num_heads
    self.key_size = key_size
    self.value_size = value_size
    self.database_size = database_size
    self.dtype = initializers.as_dtype(dtype)
    self.backend = backend
    self.recall_target = recall_target
    self.search_chunk_size = search_chunk_size
    self.scann_options = host_search.ScannOptions(**(scann_options or {}))
    self._host_search = None

  @property
  def searches_on_host(self):
    """True when ScaNN finds the neighbours on the host (a Python call inside the step,
    which therefore cannot be compiled with XLA)."""
    return self.backend == "scann"

  def check_layer(self, num_heads, head_size, num_neighbors):
    """Raises ValueError unless a layer with these settings can use this memory."""
    if num_heads != self.num_heads:
      raise ValueError(
          f"memory_factory.memory_on_tpu_factory.num_heads (NUM_MEMORY_HEADS = "
          f"{self.num_heads}) must equal the memory layer's TransformerLayer.num_heads "
          f"({num_heads})")
    for name, size in (("key_size", self.key_size), ("value_size", self.value_size)):
      if size != head_size:
        raise ValueError(
            f"memory_factory.memory_on_tpu_factory.{name} (MEMORY_HEAD_DIM = {size}) must "
            f"equal the memory layer's TransformerLayer.head_size ({head_size})")
    if num_neighbors <= 0:
      raise ValueError(
          f"TransformerLayer.memory_num_neighbors must be positive for a memory layer "
          f"(DecoderStack.memory_layer_indices), got {num_neighbors}")
    if num_neighbors > self.database_size:
      raise ValueError(
          f"TransformerLayer.memory_num_neighbors (K = {num_neighbors}) cannot exceed "
          f"memory_factory.memory_on_tpu_factory.database_size (N = {self.database_size})")
    if self.backend == "bucketed" and self.database_size % num_neighbors:
      raise ValueError(
          f"memory_factory.memory_on_tpu_factory.database_size (N = {self.database_size}) "
          f"must be a multiple of TransformerLayer.memory_num_neighbors (K = "
          f"{num_neighbors}) for the bucketed backend (K strided buckets of N / K slots)")

  def check_sequence_length(self, sequence_length):
    """Raises ValueError unless whole segments fit the ring buffer."""
    if self.database_size % sequence_length:
      raise ValueError(
          f"memory_factory.memory_on_tpu_factory.database_size (N = {self.database_size}) "
          f"must be a multiple of the segment length (TransformerTaskConfig.sequence_length "
          f"= {sequence_length}): the ring buffer writes whole segments")

  def state_spec(self, batch_size):
    """The per-stream memory: keys, values [B, H, N, d] and the write counter [B]."""
    rows = [batch_size, self.num_heads, self.database_size]
    return {"keys": tf.TensorSpec(rows + [self.key_size], self.dtype),
            "values": tf.TensorSpec(rows + [self.value_size], self.dtype),
            "index": tf.TensorSpec([batch_size], tf.int32)}

  @scopes.scoped("reset")
  def reset(self, state, start_of_sequence):
    """Empties the memory of every stream whose document starts here (others untouched).

    The databases are rewritten only in a step where some document starts: a `where` over
    them reads and writes all of every stream's memory (2 x 268 MB for small_test at 32k),
    while a step without a start, the usual case, passes them through.
    """
    start = tf.convert_to_tensor(start_of_sequence)
    rows = start[:, None, None, None]

    def emptied():
      return (tf.where(rows, tf.zeros_like(state["keys"]), state["keys"]),
              tf.where(rows, tf.zeros_like(state["values"]), state["values"]))

    keys, values = tf.cond(tf.reduce_any(start), emptied,
                           lambda: (tf.identity(state["keys"]), tf.identity(state["values"])))
    return {"keys": keys, "values": values,
            "index": tf.where(start, tf.zeros_like(state["index"]), state["index"])}

  def empty_slots(self, state):
    """bool [B, H, N]: the slots of each stream's memory that hold no entry (see the
    module's `empty_slots`)."""
    return empty_slots(tf.stop_gradient(state["keys"]))

  @scopes.scoped("search")
  def search(self, state, queries, num_neighbors, empty=None):
    """Slots and scores of the K neighbours of each query, on device.

    The database is scored `search_chunk_size` slots at a time, keeping the best K so
    far: the same result as scoring it whole, without a [B, H, n, N] score tensor (4 GiB
    for small_test at N = 128k) and about twice as fast on CPU, where the scores of a
    chunk stay in cache. A single query (a decoding step's) scores it whole: its scores are
    no larger than a segment's for one chunk, and the loop's steps would cost more than
    the scoring (twice as much for tiny_test's one token against 8k entries).

    Args:
      state: the memory state.
      queries: [B, n, H, d] normalised queries.
      num_neighbors: K.
      empty: optional `empty_slots(state)`, when already computed.
    Returns:
      (slots int32 [B, H, n, K], scores float32 [B, H, n, K]): the neighbours' slots and
      their dot products with the query (EMPTY_SLOT_SCORE for an empty slot).
    """
    if self.searches_on_host:
      raise ValueError("the scann memory backend searches on the host: use host_search")
    keys = tf.stop_gradient(state["keys"])
    queries = tf.transpose(tf.cast(tf.stop_gradient(queries), keys.dtype),
                           [0, 2, 1, 3])  # [B, H, n, d]
    batch_size, num_heads, num_queries, key_size = queries.shape.as_list()
    chunk = self._chunk_size(num_neighbors, num_queries)
    best_shape = [batch_size, num_heads, num_queries, num_neighbors]

    def chunk_scores(start):
      block = tf.slice(keys, [0, 0, start, 0],
                       [batch_size, num_heads, chunk, key_size])  # [B, H, c, d]
      scores = tf.cast(tf.einsum("bhqd,bhsd->bhqs", queries, block), tf.float32)
      empty_block = (empty_slots(block) if empty is None else
                     tf.slice(empty, [0, 0, start], [batch_size, num_heads, chunk]))
      return scores + tf.where(empty_block, EMPTY_SLOT_SCORE, 0.0)[:, :, None, :]

    select = ((lambda x: tf.math.top_k(x, num_neighbors, sorted=False))
              if self.backend == "exact" else
              (lambda x: tf.math.approx_max_k(x, num_neighbors,
                                              recall_target=self.recall_target)))
    if chunk == self.database_size:
      # The database in one chunk (a decoding step's query): nothing to carry in a loop.
      scores = chunk_scores(0)
      if self.backend == "bucketed":
        rows = tf.reshape(scores, best_shape[:-1] + [chunk // num_neighbors, num_neighbors])
        return bucketed_top_k(rows), tf.reduce_max(rows, axis=-2)
      scores, slots = select(scores)
      return slots, scores

    if self.backend == "bucketed":
      def body(i, best_scores, best_slots):
        scores = chunk_scores(i * chunk)
        rows = tf.reshape(scores, best_shape[:-1] + [chunk // num_neighbors, num_neighbors])
        scores = tf.reduce_max(rows, axis=-2)
        slots = bucketed_top_k(rows, i * (chunk // num_neighbors))
        # Strictly better only: a tie keeps the earlier slot, as one argmax over all would.
        better = scores > best_scores
        return i + 1, tf.where(better, scores, best_scores), tf.where(better, slots, best_slots)
    else:
      def body(i, best_scores, best_slots):
        scores = tf.concat([best_scores, chunk_scores(i * chunk)], axis=-1)  # [.., K + c]
        slots = tf.concat([best_slots, tf.broadcast_to(i * chunk + tf.range(chunk),
                                                       best_shape[:-1] + [chunk])], axis=-1)
        scores, picked = select(scores)
        return i + 1, scores, tf.gather(slots, picked, batch_dims=3)

    _, scores, slots = tf.while_loop(
        lambda i, *_: i < self.database_size // chunk, body,
        (tf.constant(0), tf.fill(best_shape, -float("inf")), tf.zeros(best_shape, tf.int32)))
    return slots, scores

  @scopes.scoped("search")
  def host_search(self, state, queries, keys, num_neighbors, mode):
    """Slots of the K neighbours of each query, found by ScaNN on the host (scann backend).

    Also indexes this segment's keys for the next one (see host_search.py). The indices
    are kept per mode and per replica, since each holds its own streams' memories.

    Args:
      state: the memory state (after the resets of this segment).
      queries, keys: [B, n, H, d], the segment's queries and keys.
      num_neighbors: K.
      mode: "train" or "test": whose indices to use.
    Returns:
      int32 [B, H, n, K] slots, host_search.MISSING where fewer than K entries exist.
    """
    searcher = self._host_search_of(num_neighbors)

    def search(replica, queries, keys, index, memory_keys):
      return searcher((mode, int(replica)), queries, keys, index, memory_keys)

    as_float = lambda x: tf.cast(tf.stop_gradient(x), tf.float32)
    slots = tf.numpy_function(
        search, [self._replica(), as_float(queries), as_float(keys),
                 state["index"], as_float(state["keys"])],
        tf.int32, stateful=True, name="scann_search")
    batch_size, length, num_heads, _ = queries.shape.as_list()
    return tf.ensure_shape(slots, [batch_size, num_heads, length, num_neighbors])

  def _host_search_of(self, num_neighbors):
    if self._host_search is None:
      self._host_search = host_search.HostSearch(self.database_size, self.key_size,
                                                 num_neighbors, self.scann_options)
    return self._host_search

  @staticmethod
  def _replica():
    context = tf.distribute.get_replica_context()
    return tf.convert_to_tensor(context.replica_id_in_sync_group if context is not None else 0)

  @scopes.scoped("search")
  def host_lookup(self, state, queries, num_neighbors, mode):
    """`host_search` without indexing anything: the K neighbours of a decoding step's
    queries [B, n, H, d] (scann backend). Returns int32 [B, H, n, K] slots."""
    searcher = self._host_search_of(num_neighbors)

    def lookup(replica, queries, index, memory_keys):
      return searcher.lookup((mode, int(replica)), queries, index, memory_keys)

    as_float = lambda x: tf.cast(tf.stop_gradient(x), tf.float32)
    slots = tf.numpy_function(
        lookup, [self._replica(), as_float(queries), state["index"], as_float(state["keys"])],
        tf.int32, stateful=True, name="scann_lookup")
    batch_size, length, num_heads, _ = queries.shape.as_list()
    return tf.ensure_shape(slots, [batch_size, num_heads, length, num_neighbors])

  def host_write(self, state, keys, num_neighbors, mode, streams):
    """Indexes `keys` [B, n, H, d] on the host where `write(state, keys, ..., streams)`
    puts them on the device (scann backend), so that the indices stay in step with the
    memory. Returns an op to run before the next `host_lookup`."""
    searcher = self._host_search_of(num_neighbors)

    def write(replica, keys, index, memory_keys, streams):
      searcher.write((mode, int(replica)), keys, index, memory_keys, streams)
      return np.int32(0)

    as_float = lambda x: tf.cast(tf.stop_gradient(x), tf.float32)
    return tf.numpy_function(
        write, [self._replica(), as_float(keys), state["index"], as_float(state["keys"]),
                streams], tf.int32, stateful=True, name="scann_write")

  def _chunk_size(self, num_neighbors, num_queries):
    """Slots scored at a time: `search_chunk_size` when it divides N into chunks that
    hold whole buckets (a multiple of K), otherwise the whole database; the whole database
    too for a single query."""
    chunk = self.search_chunk_size
    if (chunk <= 0 or chunk >= self.database_size or self.database_size % chunk
        or chunk % num_neighbors or num_queries == 1):
      return self.database_size
    return chunk

  def gather(self, state, slots):
    """Keys and values at `slots` [B, H, n, K], constant to the gradient.

    An empty slot holds a zero key and a zero value (the state starts at zeros, a reset
    writes zeros and every write fills both), so a neighbour that is an empty slot
    comes back as zeros from every backend without a mask. The host search marks
    missing neighbours (fewer than K entries) with a negative slot; they come back as
    zeros too.

    Returns:
      (keys, values), each [B, H, n, K, d] (heads before queries, as the search works).
    """
    return self._gather(state["keys"], slots), self._gather(state["values"], slots)

  def _gather(self, database, slots):
    rows = tf.gather(tf.stop_gradient(database), tf.maximum(slots, 0), batch_dims=2)
    if self.searches_on_host:
      rows *= tf.cast(slots >= 0, rows.dtype)[..., None]
    return rows

  def retrieve(self, state, queries, num_neighbors):
    """The K neighbours of each of n queries [B, n, H, d] (a segment, or one token when
    decoding): (keys, values), each [B, H, n, K, d]."""
    return self.gather(state, self.search(state, queries, num_neighbors)[0])

  @scopes.scoped("attend")
  def attend(self, state, queries, slots, scores=None, scale=None, empty=None):
    """Attention of each query over its K neighbours: softmax over K, no bias, no mask.

    Meliad's logits are q . k_i of the retrieved keys, times the layer's scale. When the
    search's `scores` are given they are those dot products already, so the keys are
    gathered only for the gradient into the queries (under a training tape), not to
    recompute them: on CPU the gathered keys, [B, H, n, K, d], cost as much as the
    search of an 8k memory.

    Args:
      state: the memory state the neighbours were found in.
      queries: [B, n, H, d], with their gradient.
      slots: [B, H, n, K] neighbours.
      scores: optional float32 [B, H, n, K] from `search`.
      scale: optional [H], the layer's learned attention scale.
      empty: optional `empty_slots(state)`, when already computed.
    Returns:
      [B, n, H, d] in the dtype of the stored values.
    """
    keys = tf.stop_gradient(state["keys"])
    heads_first = tf.transpose(queries, [0, 2, 1, 3])  # [B, H, n, d]
    if scores is None:
      logits = tf.einsum("bhqd,bhqkd->bhqk", heads_first,
                         tf.cast(self._gather(keys, slots), queries.dtype))
    else:
      # An empty neighbour's key is zero: logit 0, as Meliad's zero rows give.
      empty = self.empty_slots(state) if empty is None else empty
      scores = tf.where(tf.gather(empty, slots, batch_dims=2), 0.0, scores)
      logits = _logits_from_scores(heads_first, scores, lambda: self._gather(keys, slots))
    logits = tf.cast(logits, tf.float32)
    if scale is not None:
      logits *= tf.cast(scale, tf.float32)[:, None, None]
    probs = tf.nn.softmax(logits, axis=-1)
    values = self._gather(state["values"], slots)
    # Heads first, as gathered: an output in [B, n, H, d] would have XLA transpose the
    # gathered values, [B, H, n, K, d], rather than this product.
    weighted = tf.einsum("bhqk,bhqkd->bhqd", tf.cast(probs, values.dtype), values)
    return tf.transpose(weighted, [0, 2, 1, 3])

  @scopes.scoped("write")
  def write(self, state, keys, values, streams=None):
    """Appends n entries per stream at slots (index + i) mod N and advances the index.

    Args:
      state: the memory state.
      keys, values: [B, n, H, d] (normalised keys; values as computed).
      streams: optional bool [B]; only these streams are written, the others keep their
        memory and counter (a decoder writes each stream's segment when it completes).
    Returns:
      The new state. The writes are constant to the gradient.
    """
    batch_size, length = keys.shape[0], keys.shape[1]
    slots = tf.math.floormod(state["index"][:, None] + tf.range(length)[None, :],
                             self.database_size)  # [B, n]
    shape = [batch_size, self.num_heads, length]
    positions = tf.stack([
        tf.broadcast_to(tf.range(batch_size)[:, None, None], shape),
        tf.broadcast_to(tf.range(self.num_heads)[None, :, None], shape),
        tf.broadcast_to(slots[:, None, :], shape)], axis=-1)  # [B, H, n, 3]

    def scatter(database, rows):
      rows = tf.transpose(tf.cast(tf.stop_gradient(rows), database.dtype),
                          [0, 2, 1, 3])  # [B, H, n, d]
      if streams is not None:
        # Streams left alone write back the rows they hold: no pass over whole databases.
        rows = tf.where(streams[:, None, None, None], rows,
                        tf.gather_nd(database, positions))
      return tf.tensor_scatter_nd_update(database, positions, rows)

    advance = length if streams is None else tf.where(streams, length, 0)
    return {"keys": scatter(state["keys"], keys), "values": scatter(state["values"], values),
            "index": state["index"] + advance}


def empty_slots(keys):
  """bool [..., N]: slots whose key sums to exactly 0 (Meliad's test for an empty slot)."""
  return tf.equal(tf.reduce_sum(keys, axis=-1), tf.zeros([], keys.dtype))


def bucketed_top_k(rows, first_row=0):
  """Meliad's approximate top K: the best slot of each strided bucket.

  Slot s belongs to bucket s mod K, so the buckets interleave over the database; viewed
  as rows of K slots, bucket c is column c. Ties inside a bucket go to the lowest slot
  (Meliad averages tied rows; ties of real scores do not occur in practice, and an
  all-empty bucket gives a zero row either way).

  Args:
    rows: scores [..., R, K] of slots (first_row + r) * K + c.
    first_row: row offset of `rows` in the database (when scoring it in chunks).
  Returns:
    int32 [..., K]: the chosen slot of bucket c at position c.
  """
  num_rows, num_neighbors = rows.shape[-2:]
  # The lowest row holding each column's maximum: two plain reductions, which XLA vectorises
  # on CPU, where an argmax (a reduction of value and index pairs) runs element by element
  # (three times slower for one token's search of an 8k memory).
  row_index = tf.range(num_rows)[:, None]  # [R, 1]
  at_max = tf.equal(rows, tf.reduce_max(rows, axis=-2, keepdims=True))
  # A column without a maximum (NaN scores of a diverged model) still names one of its slots.
  best_row = tf.minimum(tf.reduce_min(tf.where(at_max, row_index, num_rows), axis=-2),
                        num_rows - 1) + first_row
  return best_row * num_neighbors + tf.range(num_neighbors)


def _logits_from_scores(queries, scores, neighbour_keys):
  """`scores` as the logits q . k [B, H, n, K], with the gradient into `queries` [B, H, n, d]
  computed from the keys that `neighbour_keys()` gathers ([B, H, n, K, d])."""

  # Named as TensorFlow names the gradients it derives (see attention.attend_heads_first).
  backward_scope = f"{scopes.BACKWARD_PREFIX}{tf.get_current_name_scope()}/"

  @tf.custom_gradient
  def logits(queries):
    def grad(upstream):
      with tf.name_scope(backward_scope):
        keys = tf.cast(neighbour_keys(), upstream.dtype)
        return tf.cast(tf.einsum("bhqk,bhqkd->bhqd", upstream, keys), queries.dtype)
    return tf.identity(scores), grad

  return logits(queries)
