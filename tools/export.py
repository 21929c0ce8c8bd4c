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


FLAGS = flags.FLAGS
# Flags allow overriding: the tools share flag names (with the same meanings), and one process
# (a test session) may import several of them.
flags.DEFINE_string("workdir", "", "The training run to export (its latest checkpoint).",
                    allow_override=True)
flags.DEFINE_string("load_dir", "", "A training run to export if --workdir has no checkpoint.",
                    allow_override=True)
flags.DEFINE_string("output", "", "The SavedModel directory to write.", allow_override=True)
flags.DEFINE_integer("batch_size", 0, "Streams the SavedModel scores at once (B of score "
                     "and generate); 0: the run's TransformerTaskConfig.batch_size.",
                     allow_override=True)
flags.DEFINE_bool("overwrite", False, "Replace an existing --output.", allow_override=True)
flags.DEFINE_bool("jit_compile", None, "Compile the scoring and decode steps with "
                  "XLA (default: with a GPU yes, on CPU no; see meliad-bench eval).",
                  allow_override=True)
flags.DEFINE_multi_string("gin_param", [], "Gin bindings applied after the run's config.gin "
                          "(e.g. the SentencePiece model path if it moved).", allow_override=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.output:
    raise app.UsageError("--output is required: the SavedModel directory to write")
  if not (FLAGS.workdir or FLAGS.load_dir):
    raise app.UsageError("--workdir (or --load_dir) is required: the training run to export")
  try:
    handle = export.open_model(workdir=FLAGS.workdir, load_dir=FLAGS.load_dir,
                               batch_size=FLAGS.batch_size,
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
  app.run(main)


if __name__ == "__main__":
  sys.exit(run())
