"""Per-stream model state (XL caches, recurrent states, memories) held in tf.Variables.

One `StreamState` per mode (train, test), and one in every scoring module (the exported
SavedModel, evaluation, generation). With one replica its variables are plain and are
checkpointed directly. With several, each replica keeps its own streams in a
SyncOnRead variable; a checkpoint cannot hold per-replica values (it would keep one
replica's copy or a reduction), so the state is gathered into host variables shaped by
the global batch before a save and split back after a restore. Either way a checkpoint
holds `[global_batch, ...]` tensors, so it is portable between replica counts.
"""

import tensorflow as tf

from meliad_tf.training import distribution


class _CheckpointedState(tf.Module):
  """The variables a checkpoint sees: one nested dict shaped by the global batch."""

  def __init__(self, variables, name):
    super().__init__(name=name)
    self.variables_by_name = variables


def _zeros_variables(spec, name, **kwargs):
  return tf.nest.map_structure(
      lambda s: tf.Variable(tf.zeros(s.shape, s.dtype), trainable=False, name=name, **kwargs),
      spec)


class StreamState(tf.Module):
  """The state of every stream for one mode: training, testing, or a scoring module's.

  Args:
    spec_fn: batch_size -> nested dict of tf.TensorSpec (the model's `state_spec`).
    per_replica_batch_size: B, streams per replica.
    strategy: the tf.distribute strategy the steps run under (None: the default, one
      device).
    mode: "train", "test", "scoring"; names the variables.
  """

  def __init__(self, spec_fn, per_replica_batch_size, strategy=None, mode="state"):
    super().__init__(name=f"stream_state_{mode}")
    strategy = strategy or tf.distribute.get_strategy()
    self.strategy = strategy
    self.mode = mode
    self.per_replica_batch_size = per_replica_batch_size
    self.num_replicas = strategy.num_replicas_in_sync
    global_spec = spec_fn(per_replica_batch_size * self.num_replicas)
    if self.num_replicas == 1:
      with strategy.scope():
        self.live = _zeros_variables(global_spec, f"state_{mode}")
      self.checkpointable = _CheckpointedState(self.live, f"state_{mode}")
    else:
      with strategy.scope():
        self.live = _zeros_variables(
            spec_fn(per_replica_batch_size), f"state_{mode}",
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
      # Created outside the strategy scope: plain host variables, one copy.
      self.checkpointable = _CheckpointedState(
          _zeros_variables(global_spec, f"state_{mode}_saved"), f"state_{mode}")

  def read(self):
    """The state as tensors, with no gradient into the previous step (replica context)."""
    return tf.nest.map_structure(lambda v: tf.stop_gradient(v.read_value()), self.live)

  def assign(self, new_state):
    """Stores this step's final state (replica context)."""
    tf.nest.map_structure(lambda v, x: v.assign(x), self.live, new_state)

  def before_save(self):
    """Gathers every replica's streams into the checkpointed host variables."""
    if self.num_replicas == 1:
      return
    if distribution.local_replica_count(self.strategy) == self.num_replicas:
      # Every replica is on this host: concatenate their copies, no collective needed.
      gather = lambda live: tf.concat(self.strategy.experimental_local_results(live), axis=0)
    else:
      gather = lambda live: self.strategy.gather(live, axis=0)
    tf.nest.map_structure(lambda saved, live: saved.assign(gather(live)),
                          self.checkpointable.variables_by_name, self.live)

  def after_restore(self):
    """Splits the restored global state back into each replica's streams."""
    if self.num_replicas == 1:
      return
    size = self.per_replica_batch_size
    local_count = distribution.local_replica_count(self.strategy)
    first_replica = distribution.host_input_context(self.strategy).input_pipeline_id * local_count

    def split(saved, live):
      for index, component in enumerate(self.strategy.experimental_local_results(live)):
        start = (first_replica + index) * size
        component.assign(saved[start:start + size])

    tf.nest.map_structure(split, self.checkpointable.variables_by_name, self.live)

  def values(self):
    """The global state as host numpy arrays (for tests and inspection)."""
    self.before_save()
    return tf.nest.map_structure(lambda v: v.numpy(), self.checkpointable.variables_by_name)
