"""meliad-plot: training curves of one or more workdirs as a PNG.

  meliad-plot --run=baseline:runs/xl --run=memory:runs/mem \
    --tags=test/bits_per_token,train/bits_per_token --output=curves.png
"""

import sys

from absl import app
from absl import flags

from meliad_tf.training import plots
from meliad_tools import shared_flags


FLAGS = flags.FLAGS
shared_flags.define("output")
flags.DEFINE_multi_string("run", [], "LABEL:WORKDIR (repeatable); a bare WORKDIR, also "
                          "gs://BUCKET/RUN, is its own label.")
flags.DEFINE_list("tags", ["train/bits_per_token", "test/bits_per_token"], "Scalar tags to plot.")
flags.DEFINE_string("title", None, "Figure title.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.run:
    raise app.UsageError("give at least one --run=LABEL:WORKDIR")
  runs = dict(plots.parse_run(spec) for spec in FLAGS.run)
  try:
    plots.plot_curves(runs, FLAGS.tags, shared_flags.value("output", "curves.png"), FLAGS.title)
  except OSError as e:
    raise app.UsageError(str(e)) from e
  print(shared_flags.value("output", "curves.png"))


def run():
  shared_flags.run(main)


if __name__ == "__main__":
  sys.exit(run())
