"""meliad-export: write a trained model as a SavedModel that plain TensorFlow can run.

  meliad-export --workdir=runs/tiny --output=exported/tiny [--batch_size=4]

The model comes from the latest checkpoint of --workdir (or of --load_dir if --workdir
has none) and the run's config.gin. The SavedModel has the signatures score, reset,
reset_all and generate, and assets config.gin, metadata.json and the vocabulary (see
meliad_tf/serving/export.py). It is written atomically: nothing appears under --output unless
the export completes.
"""

import sys

from absl import app
from absl import flags
import tensorflow as tf

from meliad_tf.serving import export
from meliad_tools import shared_flags


FLAGS = flags.FLAGS
shared_flags.define("workdir", "load_dir", "output", "batch_size", "jit_compile", "gin_param")
flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.output:
    raise app.UsageError("--output is required: the SavedModel directory to write")
  if not (FLAGS.workdir or FLAGS.load_dir):
    raise app.UsageError("--workdir (or --load_dir) is required: the training run to export")
  try:
    handle = export.open_model(workdir=FLAGS.workdir, load_dir=FLAGS.load_dir,
                               batch_size=shared_flags.value("batch_size", 0),
                               jit_compile=export.resolve_jit_compile(FLAGS.jit_compile),
                               gin_params=FLAGS.gin_param)
    meta = export.export(handle.module, FLAGS.output, vocabulary=handle.vocabulary,
                         config_text=handle.config_text, task_name=handle.metadata["task"],
                         step=handle.metadata["step"], overwrite=FLAGS.overwrite)
  except (ValueError, export.ExportError) as e:
    raise app.UsageError(str(e)) from e
  except (OSError, tf.errors.OpError) as e:  # a full disk, a read-only directory
    raise app.UsageError(f"could not write the SavedModel {FLAGS.output}: "
                         f"{getattr(e, 'message', e)}; {FLAGS.output} was left as it was") from e
  print(f"exported {FLAGS.workdir or FLAGS.load_dir} ({meta['family']}, step {meta['step']}, "
        f"B={meta['batch_size']}, L={meta['sequence_length']}, W={meta['window_length']}) "
        f"to {FLAGS.output}")
  if not meta["supports_generate"]:
    print(f"no generate signature: {meta['generate_unsupported_reason']}")


def run():
  shared_flags.run(main)


if __name__ == "__main__":
  sys.exit(run())
