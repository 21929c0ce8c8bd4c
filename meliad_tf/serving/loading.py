"""A trained model from a work directory: its config.gin and its latest checkpoint.

The trainer writes the operative gin configuration to `<workdir>/config.gin` and
checkpoints to `<workdir>/checkpoints` (`tf.train.Checkpoint(model=..., optimizer=...,
...)`). Loading parses that configuration, builds the model it describes and restores
only the model's variables; optimizer slots, per-stream training state and data
iterators in the checkpoint are left alone.
"""

import dataclasses
import json
import os
import re

import gin
import tensorflow as tf

from meliad_tf.model import language_model as model_lib
from meliad_tf.training import checkpoints
from meliad_tf.training import gin_setup


CONFIG_FILE = "config.gin"


class WorkdirError(ValueError):
  """A work directory without a usable configuration or checkpoint."""


@dataclasses.dataclass
class LoadedModel:
  """A restored model and where it came from.

  Attributes:
    model: the `DecoderOnlyLanguageModel`, built with `output_token_losses=True`.
    workdir: the directory it was loaded from.
    checkpoint: the checkpoint path restored.
    step: the training step the checkpoint was written at (the next step to run).
    config_text: the operative gin configuration of the run.
  """
  model: model_lib.DecoderOnlyLanguageModel
  workdir: str
  checkpoint: str
  step: int
  config_text: str

  @property
  def task_config(self):
    return self.model.task_config


def resolve_workdir(workdir="", load_dir=""):
  """The directory to load: `workdir` if it holds a checkpoint, else `load_dir`.

  Raises:
    WorkdirError: naming the directories when neither holds a checkpoint.
  """
  candidates = [d for d in (workdir, load_dir) if d]
  if not candidates:
    raise WorkdirError("give --workdir (or --load_dir): the training run to load")
  for directory in candidates:
    if not tf.io.gfile.isdir(directory):
      raise WorkdirError(f"{directory} does not exist or is not a directory")
    if checkpoints.latest_checkpoint(directory):
      return directory
  where = " or ".join(os.path.join(d, checkpoints.CHECKPOINT_DIRECTORY) for d in candidates)
  raise WorkdirError(f"no checkpoint in {where}: train first (meliad-train --workdir=...)")


def _check_parameters(model, directory):
  """Compares the model's parameters with the run's model_signature.json, if present."""
  path = os.path.join(directory, checkpoints.SIGNATURE_FILE)
  if not tf.io.gfile.exists(path):
    return
  with tf.io.gfile.GFile(path) as f:
    saved = json.load(f)
  # The signature also lists the per-stream training state, whose batch size is the
  # trainer's; only parameters must match.
  saved = {k: v for k, v in saved.items() if not k.startswith("state_")}
  current = {v.name: list(v.shape) for v in model.trainable_variables}
  checkpoints.compare_signatures(saved, current, directory)


def load_model(workdir="", load_dir="", gin_params=()):
  """Builds the model of a training run and restores its latest checkpoint.

  This replaces the process's gin configuration with the run's (plus `gin_params`).

  Args:
    workdir: a training work directory.
    load_dir: used when `workdir` is empty or holds no checkpoint.
    gin_params: extra bindings applied after the run's configuration.
  Returns:
    A `LoadedModel`.
  Raises:
    WorkdirError: no checkpoint, no config.gin, or a checkpoint that does not fit it.
  """
  directory = resolve_workdir(workdir, load_dir)
  config_path = os.path.join(directory, CONFIG_FILE)
  if not tf.io.gfile.exists(config_path):
    raise WorkdirError(f"{config_path} is missing: the model's configuration is written there "
                       "by meliad-train at the start of training")
  with tf.io.gfile.GFile(config_path) as f:
    config_text = f.read()
  gin.clear_config()
  gin_setup.parse([config_path], gin_params)
  model = model_lib.DecoderOnlyLanguageModel(output_token_losses=True)
  _check_parameters(model, directory)
  path = checkpoints.latest_checkpoint(directory)
  status = tf.train.Checkpoint(model=model).restore(path).expect_partial()
  try:
    status.assert_existing_objects_matched()
  except AssertionError as e:
    raise WorkdirError(f"the checkpoint {path} does not hold this model's variables "
                       f"(configuration {config_path}): {e}") from e
  match = re.search(r"-(\d+)$", path)
  step = int(match.group(1)) if match else 0
  return LoadedModel(model=model, workdir=directory, checkpoint=path, step=step,
                     config_text=config_text)
