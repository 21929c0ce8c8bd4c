"""meliad-convert: turn a Meliad (JAX) training run into a workdir of ours.

  meliad-convert --meliad_workdir=MELIAD_DIR --output=DIR
  meliad-train --gin_file=DIR/config.gin --workdir=DIR     # continues the run
  meliad-eval --workdir=DIR                                # scores it
  meliad-export --workdir=DIR --output=EXPORTED           # exports it

Reads the latest `checkpoint_<step>` that Meliad's training loop wrote in MELIAD_DIR (a Flax
msgpack file, or Orbax's directory) and Meliad's `config.gin` beside it, and writes DIR: the
configuration translated to our gin names, and a checkpoint with the parameters, the
Adafactor (or Adam) state and the step. Bindings or parameters without a counterpart here
are refused by name, before anything is written. Building the run reads its data, as
meliad-train would: give --default_data_dir for PG19, or --gin_param to read other data.
Needs the `convert` extra (pip install 'meliad-tf[convert]', for msgpack).
"""

import sys

from absl import app
from absl import flags

from meliad_tools import shared_flags


FLAGS = flags.FLAGS
shared_flags.define("output", "default_data_dir", "gin_param")
# Flags allow overriding, as the other tools' do: one process (a test session) imports several.
flags.DEFINE_string("meliad_workdir", "", "Meliad's workdir: config.gin and checkpoint_<step>.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for flag in ("meliad_workdir", "output"):
    if not getattr(FLAGS, flag):
      raise app.UsageError(f"--{flag} is required")
  try:
    from meliad_tf.training import convert  # pylint: disable=g-import-not-at-top
    import pipelines  # pylint: disable=g-import-not-at-top
    convert.require_msgpack()
  except ImportError as e:
    sys.exit(f"meliad-convert: error: {e}")
  if FLAGS.default_data_dir:
    pipelines.set_default_data_directory(FLAGS.default_data_dir)
  try:
    path, step = convert.convert(FLAGS.meliad_workdir, FLAGS.output, FLAGS.gin_param)
  except (ValueError, OSError) as e:
    sys.exit(f"meliad-convert: error: {e}")
  print(f"converted {convert.latest_checkpoint(FLAGS.meliad_workdir)} (optimizer step {step}) "
        f"into {path}")
  print(f"continue training: meliad-train --gin_file={FLAGS.output}/config.gin "
        f"--workdir={FLAGS.output}")


def run():
  shared_flags.run(main)


if __name__ == "__main__":
  sys.exit(run())
