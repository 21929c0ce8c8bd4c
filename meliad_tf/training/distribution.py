"""Choosing a tf.distribute strategy, and moving per-stream data between hosts and replicas.

Stream b of the global batch always lives on replica b // B (B streams per replica), so
each replica's caches, recurrent states and memories keep following their documents.

Hosts. A MultiWorkerMirroredStrategy cluster runs one process per host; each reads its own
streams (host h serves replicas h * R .. h * R + R - 1, R replicas per host) through its own
input pipeline. The chief (task "chief", else worker 0) alone writes the workdir; every host
takes part in the collectives that gather what the chief saves. TPUStrategy and the
single-host strategies run one process, which is the chief.
"""

import numpy as np
import tensorflow as tf


STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def make_strategy(name="default", tpu=""):
  """Builds the strategy named by `--strategy` (or TPUStrategy when `--tpu` is given).

  Args:
    name: "default" (one device), "mirrored" (all local GPUs, or all logical CPUs),
      "multi_worker" (MultiWorkerMirroredStrategy from TF_CONFIG), or "tpu".
    tpu: TPU name or address for TPUClusterResolver; "local" on a TPU VM.
  """
  if tpu and name == "default":
    name = "tpu"
  if name not in STRATEGIES:
    raise ValueError(f"--strategy must be one of {STRATEGIES}, got {name!r}")
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    return tf.distribute.MirroredStrategy()
  if name == "multi_worker":
    return tf.distribute.MultiWorkerMirroredStrategy()
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "local")
  tf.config.experimental_connect_to_cluster(resolver)
  tf.tpu.experimental.initialize_tpu_system(resolver)
  return tf.distribute.TPUStrategy(resolver)


def local_replica_count(strategy):
  """Replicas on this host (the default strategy has one and no device list)."""
  if strategy.num_replicas_in_sync == 1:
    return 1
  return len(strategy.extended.worker_devices)


def num_hosts(strategy):
  """Processes of the cluster, each with its own input pipeline."""
  return strategy.num_replicas_in_sync // local_replica_count(strategy)


def host_index(strategy):
  """This process's index among the hosts, in the order of their streams."""
  if num_hosts(strategy) == 1:
    return 0
  resolver = strategy.cluster_resolver
  workers = resolver.cluster_spec().as_dict()
  # A cluster with a chief numbers it first, then the workers.
  has_chief = "chief" in workers
  if resolver.task_type == "chief":
    return 0
  return resolver.task_id + (1 if has_chief else 0)


def is_chief(strategy):
  """Whether this process writes the workdir (the only process, or the cluster's chief)."""
  return host_index(strategy) == 0


def host_input_context(strategy):
  """The InputContext of this host's pipeline, which yields one batch of all its streams.

  The trainer reads host batches through an ordinary (checkpointable) iterator and splits
  them across local replicas itself, so each pipeline serves as a single consumer.
  """
  hosts = num_hosts(strategy)
  return tf.distribute.InputContext(num_input_pipelines=hosts,
                                    input_pipeline_id=host_index(strategy),
                                    num_replicas_in_sync=hosts)


def split_streams(strategy, host_values, per_replica_batch_size, axis=0):
  """Host tensors whose `axis` runs over this host's streams -> per-replica slices.

  With one replica the values are returned unchanged.
  """
  if strategy.num_replicas_in_sync == 1:
    return host_values
  local_count = local_replica_count(strategy)

  def slice_for(context):
    local_index = context.replica_id_in_sync_group % local_count
    start = local_index * per_replica_batch_size

    def take(x):
      index = [slice(None)] * axis + [slice(start, start + per_replica_batch_size)]
      return x[tuple(index)]

    return tf.nest.map_structure(take, host_values)

  return strategy.experimental_distribute_values_from_function(slice_for)


def on_every_replica(strategy, value):
  """The same host value on each of this host's replicas (a PerReplica value)."""
  if strategy.num_replicas_in_sync == 1:
    return value
  return strategy.experimental_distribute_values_from_function(lambda _: value)


def _gather_rows(strategy, rows):
  """Every host's [local_replicas, n] int32 rows, concatenated in host order (a collective)."""
  local_count = local_replica_count(strategy)
  values = strategy.experimental_distribute_values_from_function(
      lambda context: rows[context.replica_id_in_sync_group % local_count][tf.newaxis])
  return strategy.gather(values, axis=0).numpy()


def gather_host_bytes(strategy, data):
  """Each host's `data` (bytes), as a list in host order, on every host.

  A collective: every host must call it at the same point. With one host it is local.
  """
  hosts = num_hosts(strategy)
  if hosts == 1:
    return [data]
  local_count = local_replica_count(strategy)
  # Collectives carry numbers of one shape: lengths first, then the bytes padded to the
  # longest and packed four to an int32. Only each host's first replica carries them.
  lengths = _gather_rows(strategy, [tf.constant([len(data)], tf.int32)] * local_count)
  lengths = lengths[::local_count, 0]
  padded_length = -(-int(lengths.max()) // 4) * 4
  words = np.frombuffer(data.ljust(padded_length, b"\0"), dtype="<i4")
  rows = _gather_rows(strategy, [tf.constant(words, tf.int32)] * local_count)
  return [rows[h * local_count].astype("<i4").tobytes()[:lengths[h]] for h in range(hosts)]
