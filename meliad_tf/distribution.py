"""Choosing a tf.distribute strategy, and moving per-stream data between host and replicas.

Stream b of the global batch always lives on replica b // B (B streams per replica), so
each replica's caches, recurrent states and memories keep following their documents.
"""

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


def host_input_context(strategy):
  """The InputContext of this host's pipeline, which yields one batch of all its streams.

  The trainer reads host batches through an ordinary (checkpointable) iterator and splits
  them across local replicas itself, so each pipeline serves as a single consumer.
  """
  num_workers = strategy.num_replicas_in_sync // local_replica_count(strategy)
  worker_index = strategy.cluster_resolver.task_id if num_workers > 1 else 0
  return tf.distribute.InputContext(num_input_pipelines=num_workers,
                                    input_pipeline_id=worker_index,
                                    num_replicas_in_sync=num_workers)


def split_streams(strategy, host_values, per_replica_batch_size):
  """Host tensors whose first axis is this host's streams -> per-replica slices.

  With one replica the values are returned unchanged.
  """
  if strategy.num_replicas_in_sync == 1:
    return host_values
  local_count = local_replica_count(strategy)

  def slice_for(context):
    local_index = context.replica_id_in_sync_group % local_count
    start = local_index * per_replica_batch_size
    return tf.nest.map_structure(lambda x: x[start:start + per_replica_batch_size],
                                 host_values)

  return strategy.experimental_distribute_values_from_function(slice_for)
