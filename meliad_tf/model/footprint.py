"""How much memory training a model needs, estimated before the big allocations are made.

A configuration too large for the machine (a segment of 10**9 tokens, a million streams)
should be refused with the estimate, not fail in the allocator. The estimate counts, in
bytes: the parameters, their gradients and two optimizer slots per parameter (Adafactor's
momentum and, at most, its second moments), every stream's state in both modes (XL caches,
recurrent states, memories), the dataset's host batch, and a training step's activations:
per token and layer the tensors the backward pass keeps (about 6E + 4Hd + 2F floats, plus the
attention weights of the window, H(W + 128)), a memory layer's retrieved keys and values
(2HKd), and the logits and their gradient (2V). It is rough, within a small factor; its use
is to catch sizes that are off by orders of magnitude.
"""

import dataclasses
import math
import os

import tensorflow as tf


_FLOAT = 4  # Bytes of the float32 everything is counted in.


@dataclasses.dataclass
class Footprint:
  """Bytes a training run needs, by part."""
  parameters: int
  optimizer: int
  state: int
  activations: int

  @property
  def total(self):
    return self.parameters + self.optimizer + self.state + self.activations

  def describe(self):
    parts = ", ".join(f"{name} {_gib(getattr(self, name))}" for name in (
        "parameters", "optimizer", "state", "activations"))
    return f"about {_gib(self.total)} ({parts})"


def _gib(size):
  return f"{size / 2**30:.3g} GiB"


def _spec_bytes(spec):
  return sum(math.prod(s.shape) * s.dtype.size for s in tf.nest.flatten(spec))


def training_footprint(model, batch_size, sequence_length):
  """The estimate for `model` training on `batch_size` streams of `sequence_length` tokens.

  Args:
    model: a built `DecoderOnlyLanguageModel` (its variables exist; nothing else is made).
    batch_size: streams on this host (all its replicas).
    sequence_length: L.
  """
  parameters = sum(math.prod(v.shape) for v in model.trainable_variables) * _FLOAT
  state = 2 * _spec_bytes(model.state_spec(batch_size))
  stack = model.decoder
  per_token = 2 * model.vocab_size
  for layer in stack.layers:
    hd = layer.num_heads * layer.head_size
    # The FFN's hidden width F is the widest dimension of the layer's kernels.
    width = max(max(v.shape) for v in layer.trainable_variables if len(v.shape) == 2)
    per_token += (6 * stack.embedding_size + 4 * hd + 2 * width
                  + layer.num_heads * (layer.window_length + 128))
    if layer.memory is not None:
      per_token += 2 * layer.num_heads * layer.memory_num_neighbors * layer.head_size
  activations = per_token * batch_size * sequence_length * _FLOAT
  return Footprint(parameters=parameters, optimizer=3 * parameters, state=state,
                   activations=activations)


def available_host_bytes():
  """Memory the host can still give (MemAvailable), or None where it cannot be read."""
  try:
    with open("/proc/meminfo") as f:  # The kernel's own file, not a user path.
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError):
    return None
