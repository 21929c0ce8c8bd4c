"""A tiny training run on disk, for the export, evaluation and generation tests.

Two Transformer-XL layers of width 32 with segments of 32 tokens and windows of 16, on
short synthetic documents, trained for a couple of steps in graph mode (no XLA) so that
the parameters are not those of the initialisation. `shared_run` and `shared_export`
build it once per test process and share it between the test files.
"""

import atexit
import functools
import os
import shutil
import tempfile

import gin

from meliad_tf.serving import export
from meliad_tf.training import gin_setup
from meliad_tf.training import trainer as trainer_lib


SEQUENCE_LENGTH = 32
WINDOW = 16
BATCH = 2
VOCAB_SIZE = 256

PARAMS = [
    "NUM_LAYERS = 2", "EMBED_DIM = 32", "NUM_HEADS = 2", "HEAD_DIM = 16", "MLP_DIM = 64",
    f"TransformerTaskConfig.sequence_length = {SEQUENCE_LENGTH}",
    f"TransformerTaskConfig.batch_size = {BATCH}",
    f"TransformerLayer.window_length = {WINDOW}",
    "Trainer.warmup_steps = 1", "Trainer.max_scheduled_steps = 100",
    "Trainer.test_every_steps = 0", "Trainer.status_every_steps = 0",
    "Trainer.log_every_steps = 0", "Trainer.print_input_every_steps = 0",
    "Trainer.generate_every_steps = 0", "Trainer.jit_compile = False",
    "pipelines.synthetic.num_documents = 4", "pipelines.synthetic.num_eval_documents = 3",
    "pipelines.synthetic.document_length = 400", "pipelines.synthetic.num_facts = 4",
]

# Bindings that turn the last layer into a memory layer of 32 entries: two segments of the
# 16 tokens that the family tests use.
MEMORIZING = ["TransformerLayer.window_length = 16",
              "DecoderStack.memory_layer_indices = (-1,)",
              "TransformerLayer.memory_num_neighbors = 4",
              "DecoderStack.memory_factory = @memory_on_tpu_factory",
              "memory_on_tpu_factory.num_heads = 2", "memory_on_tpu_factory.key_size = 16",
              "memory_on_tpu_factory.value_size = 16",
              "memory_on_tpu_factory.database_size = 32",
              "memory_on_tpu_factory.dtype = 'float32'"]


def configure(*params):
  """Parses the tiny configuration (plus `params`) into a cleared gin config."""
  gin.clear_config()
  gin_setup.parse(["base_htrans.gin", "size/tiny_test.gin"], PARAMS + list(params))


def train(workdir, *params, num_steps=2):
  """Trains the tiny model for `num_steps` steps into `workdir`; clears gin afterwards."""
  configure(f"Trainer.num_steps = {num_steps}", *params)
  try:
    trainer_lib.Trainer().build().train(str(workdir))
  finally:
    gin.clear_config()
  return str(workdir)


@functools.lru_cache(maxsize=None)
def _scratch():
  directory = tempfile.mkdtemp(prefix="meliad-tiny-run-")
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  return directory


@functools.lru_cache(maxsize=None)
def shared_run():
  """The tiny run's workdir, trained once per process."""
  return train(os.path.join(_scratch(), "run"))


@functools.lru_cache(maxsize=None)
def shared_export():
  """The tiny run exported as a SavedModel (B = 2), once per process."""
  path = os.path.join(_scratch(), "saved_model")
  handle = export.open_model(workdir=shared_run())
  gin.clear_config()
  export.export(handle.module, path, vocabulary=handle.vocabulary,
                config_text=handle.config_text, task_name=handle.metadata["task"],
                step=handle.metadata["step"])
  return path
