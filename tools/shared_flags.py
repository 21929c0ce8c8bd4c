"""The flags several programs take, each defined once, and the programs' entry point.

A program names the shared flags it takes with `define(...)` when it is imported; a flag that
another program imported in the same process (a test session, `meliad-bench`) has already
defined is not defined again, and means the same in both. Where the programs' defaults
differ, the flag's default is None and each program says what None means for it (`split`).
Every program answers `--version`.
"""

from absl import app
from absl import flags

import meliad_tf


FLAGS = flags.FLAGS

flags.DEFINE_bool("version", False, "Print the version of meliad-tf and exit.")

_DEFINITIONS = {
    "workdir": lambda: flags.DEFINE_string(
        "workdir", "", "A training run's directory (checkpoints, TensorBoard summaries, "
        "config.gin), on any filesystem TensorFlow reads (gs://...). Programs that use a "
        "trained model take its latest checkpoint."),
    "load_dir": lambda: flags.DEFINE_string(
        "load_dir", "", "A training run to use where --workdir holds no checkpoint (meliad-train: "
        "to start from)."),
    "saved_model": lambda: flags.DEFINE_string(
        "saved_model", "", "A SavedModel written by meliad-export."),
    "gin_param": lambda: flags.DEFINE_multi_string(
        "gin_param", [], "Gin bindings, applied after the gin files (or after the run's "
        "config.gin, for a trained model; meliad-recall: to every run, after its own)."),
    "default_data_dir": lambda: flags.DEFINE_string(
        "default_data_dir", None, "TensorFlow Datasets data directory (e.g. where pg19 is "
        "prepared)."),
    "jit_compile": lambda: flags.DEFINE_bool(
        "jit_compile", None, "With --workdir, compile the scoring and decode steps with XLA "
        "(default: with a GPU yes, on CPU no; see meliad-bench eval)."),
    "batch_size": lambda: flags.DEFINE_integer(
        "batch_size", None, "B, streams read or scored at once. Default: meliad-data 4; "
        "meliad-eval and meliad-export the run's TransformerTaskConfig.batch_size; "
        "meliad-generate --num_samples. A SavedModel keeps the number it was exported with."),
    "seed": lambda: flags.DEFINE_integer(
        "seed", None, "Seed: meliad-data of the training document order (default 42), "
        "meliad-generate of the sampling (default 0)."),
    "source": lambda: flags.DEFINE_string(
        "source", None, "A task name (pg19_bytes, files_tokens:/data/*.txt, ...) or a source "
        "short name (python_stdlib, synthetic, files:GLOB, tree:DIR, tfds:NAME:FEATURE). "
        "Default: meliad-eval the model's task, meliad-data and meliad-vocab python_stdlib."),
    "split": lambda: flags.DEFINE_string(
        "split", None, "The split to read. Default: meliad-eval test, meliad-data and "
        "meliad-vocab train."),
    "max_documents": lambda: flags.DEFINE_integer(
        "max_documents", 0, "Read the first N documents of the split (0: all)."),
    "output": lambda: flags.DEFINE_string(
        "output", None, "What the program writes: meliad-eval the results as JSON, "
        "meliad-export the SavedModel, meliad-convert the new workdir, meliad-vocab the model "
        "prefix (PREFIX.model, PREFIX.vocab), meliad-plot the PNG (default curves.png), "
        "meliad-recall the figure's PNG (none by default)."),
    "configs": lambda: flags.DEFINE_list(
        "configs", ["tiny_test", "small_test"], "Size configs under configs/size/ to time."),
}


def define(*names):
  """Defines the named shared flags that this process has not defined yet."""
  for name in names:
    if name not in FLAGS:
      _DEFINITIONS[name]()


def value(name, program_default):
  """A shared flag's value, or the program's own default where the flag was not given."""
  given = FLAGS[name].value
  return program_default if given is None else given


def run(main):
  """Runs a program's `main(argv)` under absl, answering --version first."""

  def main_or_version(argv):
    if FLAGS.version:
      print(f"meliad-tf {meliad_tf.__version__}")
      return 0
    return main(argv)

  app.run(main_or_version)
