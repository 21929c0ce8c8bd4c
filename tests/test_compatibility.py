"""A workdir and a SavedModel written before the library was laid out in floors still load.

`tests/data/written_before_the_floors/` holds a one-layer tiny Transformer-XL (the settings of
`tiny_run.py`) trained for two steps, its SavedModel (batch 1), and the log-probabilities that
model gave for a fixed segment, all written by commit 4d42d2f. Checkpoint keys and gin names
come from attribute and configurable names, not module paths; these tests fail if a move
changes them.
"""

import os
import shutil

import gin
import numpy as np
import tensorflow as tf

from meliad_tf.serving import export
from meliad_tf.training import gin_setup
from meliad_tf.training import trainer as trainer_lib


DATA = os.path.join(os.path.dirname(__file__), "data", "written_before_the_floors")
EXPECTED = np.load(os.path.join(DATA, "expected.npz"))


def test_the_old_saved_model_scores_as_it_did():
  loaded, meta = export.load(os.path.join(DATA, "saved_model"))
  assert meta["family"] == "transformer_xl" and meta["step"] == 2
  result = loaded.score(tokens=tf.constant(EXPECTED["tokens"]),
                        start_of_sequence=tf.constant([True]))
  np.testing.assert_allclose(result["log_probs"].numpy(), EXPECTED["log_probs"], rtol=1e-5,
                             atol=1e-6)


def test_the_old_workdir_loads_and_scores_as_it_did(clean_gin):
  handle = export.open_model(workdir=os.path.join(DATA, "workdir"), batch_size=1)
  result = handle.module.score(tf.constant(EXPECTED["tokens"]), tf.constant([True]))
  np.testing.assert_allclose(result["log_probs"].numpy(), EXPECTED["log_probs"], rtol=1e-5,
                             atol=1e-6)


def test_the_old_workdir_resumes(tmp_path, clean_gin):
  workdir = str(tmp_path / "workdir")
  shutil.copytree(os.path.join(DATA, "workdir"), workdir)
  gin_setup.parse([os.path.join(workdir, "config.gin")], ["Trainer.num_steps = 3"])
  trainer = trainer_lib.Trainer().build()
  # Every variable of the checkpoint has its object, and every object its variable.
  assert trainer.checkpoint_keeper(workdir).restore()
  assert trainer.step == 2
  # Its data iterators were saved when documents were tokenized whole; they go on so.
  assert trainer.data.iterator_layout == 1
  trainer.train(workdir)
  assert trainer.step == 3
  gin.clear_config()
