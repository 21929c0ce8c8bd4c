"""meliad-tf: Transformer-XL, Memorizing and Block-Recurrent Transformers in TensorFlow 2.

The library is laid out in floors, each importing only from the floors below it:

  common/      files on any filesystem (storage)
  layers/      attention, positions, norms, MLP, dropout, initializers, the kNN memory and
               its host search, the recurrent cell, the profiler's name scopes
  model/       the transformer layer, the decoder stack, the language model, task config
  training/    distribution, per-stream state, optimizer, schedules, checkpoints, summaries,
               the trainer, gin set-up, Meliad checkpoint conversion, training curves
  serving/     the exported SavedModel, document evaluation, generation, loading a workdir
  benchmarks/  step timing and the profiler's trace analysis

`meliad_tf.training.gin_setup` registers every gin configurable under Meliad's names.
"""

__version__ = "0.1.0"
