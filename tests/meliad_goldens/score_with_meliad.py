"""Scores the first test document of a Meliad run with Meliad's own inference code.

Runs only where Meliad imports (see make_goldens.py). It evaluates the latest checkpoint of
a Meliad workdir with `inference_utils` (read_article, create_model_and_task, run_model,
get_token_losses: test steps carrying the caches from segment to segment), writes the
document's text to DOCUMENT (for `meliad-eval --source=files:DOCUMENT` on the converted
run) and prints Meliad's bits per token as JSON:

  cd MELIAD_COPY && PYTHONPATH=. MELIAD_PYTHON .../score_with_meliad.py \
      --load_dir=MELIAD_WORKDIR --document=/scratch/document.txt \
      --gin_file=base_htrans.gin --gin_file=size/tiny_test.gin --gin_param='DTYPE="float32"'

Only byte-level tasks whose vocabulary passes bytes through (Meliad's `synthetic`) are
written as text.
"""

import json
import math

from absl import app
from absl import flags
import numpy as np
from transformer import inference_utils
# The launcher defines --gin_file, --gin_param, --gin_search_paths and --load_dir.
from transformer import launcher  # pylint: disable=unused-import

flags.DEFINE_string("document", "", "Where to write the scored document's bytes.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  inference_utils.parse_gin_configuration(
      FLAGS.gin_file, list(FLAGS.gin_param or []) + [
          "DecoderOnlyLanguageModel.output_token_losses = True",
          "TransformerTaskConfig.batch_size = 1"], FLAGS.gin_search_paths)
  segments, vocab = inference_utils.read_article(verbose=False)
  task, task_state, _ = inference_utils.create_model_and_task(vocab, load_dir=FLAGS.load_dir)
  outputs = inference_utils.run_model(task, task_state, (segments, vocab))
  token_losses = inference_utils.get_token_losses(outputs)[0]  # [num_segments * L]
  tokens = np.concatenate([s["targets"][0] for s in segments])
  length = segments[0]["targets"].shape[1]
  per_segment = tokens.reshape(-1, length)
  targets = np.concatenate([per_segment[:, 1:], np.zeros_like(per_segment[:, :1])], axis=1)
  mask = ((per_segment > 0) & (targets > 0)).reshape(-1)
  nats = float(np.sum(token_losses[mask], dtype=np.float64))
  count = int(mask.sum())
  document = bytes(int(t) for t in tokens if t > 0)
  with open(FLAGS.document, "wb") as f:
    f.write(document)
  print(json.dumps({"segments": len(segments), "bytes": len(document), "tokens_scored": count,
                    "loss": nats, "bits_per_token": nats / count / math.log(2)}))


if __name__ == "__main__":
  app.run(main)
