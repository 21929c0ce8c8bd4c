"""Shared test set-up: quiet TensorFlow and two logical CPU devices for distribution tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gin  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture
def clean_gin():
  """Flags marked as parsed (the tools' main functions read them) and no gin bindings left
  behind by the test."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  yield
  gin.clear_config()


@pytest.fixture(scope="session")
def saved_model():
  """The tiny training run of tests/tiny_run.py, exported once per session."""
  import tiny_run  # pylint: disable=g-import-not-at-top
  return tiny_run.shared_export()
