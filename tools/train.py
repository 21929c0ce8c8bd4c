"""meliad-train: train a model from gin files, as Meliad's launcher does.

  meliad-train --gin_file=base_htrans.gin --gin_file=size/small_test.gin --workdir=DIR

Running the same command again continues a stopped or killed run from its last checkpoint.
Exit status: 0 when training is done; 1 with a message and no traceback for bad input (gin,
flags, data, workdir, a full disk) or a non-finite loss (`--verbosity=1` logs the
traceback too); 128 + the signal number (143 for SIGTERM, 130 for SIGINT) when a signal
stopped the run at a step boundary after saving a checkpoint.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

import pipelines
from meliad_tf.training import distribution
from meliad_tf.training import gin_setup
from meliad_tf.training import trainer as trainer_lib
from meliad_tools import shared_flags


FLAGS = flags.FLAGS
shared_flags.define("workdir", "load_dir", "default_data_dir", "gin_param")
flags.DEFINE_multi_string("gin_file", ["base_htrans.gin"],
                          "Gin files, in order; base_htrans.gin must come first.")
flags.DEFINE_list("gin_search_paths", [], "Extra directories searched for gin files and "
                  "includes (the shipped configs are always searched).")
flags.DEFINE_bool("force", False, "Take the workdir over from the run whose lock holds it "
                  "(after a crash on another host; see meliad_tf/training/workdir_lock.py).")
flags.DEFINE_string("tpu", "", "TPU name or address ('local' on a TPU VM); implies "
                    "--strategy=tpu.")
flags.DEFINE_enum("strategy", "default", list(distribution.STRATEGIES),
                  "tf.distribute strategy: one device, all local GPUs (mirrored), several "
                  "hosts (multi_worker, from TF_CONFIG) or a TPU.")


def _train():
  for path in FLAGS.gin_search_paths:
    if not tf.io.gfile.isdir(path):
      raise ValueError(f"--gin_search_paths: {path} is not a directory")
  gin_setup.parse(FLAGS.gin_file, FLAGS.gin_param, FLAGS.gin_search_paths)
  if FLAGS.default_data_dir:
    pipelines.set_default_data_directory(FLAGS.default_data_dir)
  strategy = distribution.make_strategy(FLAGS.strategy, FLAGS.tpu)
  trainer = trainer_lib.Trainer().build(strategy)
  return trainer, trainer.train(FLAGS.workdir, FLAGS.load_dir, force=FLAGS.force)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    trainer, test_metrics = _train()
  except trainer_lib.TrainingInterrupted as e:
    logging.warning("%s", e)
    print(f"meliad-train: {e}", file=sys.stderr)
    sys.exit(128 + e.signal_number)
  except trainer_lib.USER_ERRORS as e:
    logging.debug("traceback of the error below", exc_info=True)
    sys.exit(f"meliad-train: error: {e}")
  if test_metrics:
    summary = (f"test after step {trainer.step}: "
               f"{test_metrics.get('bits_per_char', float('nan')):.4f} bits per byte, "
               f"{test_metrics['bits_per_token']:.4f} bits per token")
    logging.info("%s", summary)
    print(summary)
  if FLAGS.workdir and trainer.is_chief:
    print(f"TensorBoard logs: tensorboard --logdir={FLAGS.workdir}")


def run():
  shared_flags.run(main)


if __name__ == "__main__":
  sys.exit(run())
