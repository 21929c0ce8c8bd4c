"""meliad-generate: continue a prompt with a trained model; the continuation goes to stdout.

  meliad-generate --saved_model=exported/tiny --prompt="key 3f" --max_length=200
  meliad-generate --workdir=runs/tiny --prompt_file=start.txt --sampling=sample \
      --temperature=0.8 --top_k=40 --seed=7
  meliad-generate --saved_model=exported/tiny --prompt_source=synthetic --prompt_split=test \
      --prompt_document=0 --prompt_tokens=1000

The prompt is text (--prompt), a file (--prompt_file), or the first --prompt_tokens
tokens of a document of a source (--prompt_source, a task or source name as meliad-eval
takes). Its whole segments go through the model's ordinary forward pass; for a
Transformer-XL model the rest is fed token by token, each token attending to exactly the W
previous ones, and memory and recurrent models re-run the current segment for
every token (see meliad_tf.generation). A memory model retrieves from the memory the
prompt's segments built; with --write_memory it also writes the segments it generates.
Decoding is greedy, or sampling with a temperature and optionally top-k, seeded.
"""

import sys

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

import pipelines
from meliad_tf.common import storage
from meliad_tf.serving import evaluation
from meliad_tf.serving import export
from meliad_tf.serving import generation
from meliad_tools import shared_flags


FLAGS = flags.FLAGS
shared_flags.define("saved_model", "workdir", "load_dir", "batch_size", "seed", "jit_compile",
                    "default_data_dir", "gin_param")
flags.DEFINE_string("prompt", None, "The prompt text.")
flags.DEFINE_string("prompt_file", None, "A file holding the prompt text.")
flags.DEFINE_string("prompt_source", None, "Take the prompt from a document of this task or "
                    "source (see meliad-eval --source).")
flags.DEFINE_string("prompt_split", "test", "Split of --prompt_source.")
flags.DEFINE_integer("prompt_document", 0, "Index of the document of --prompt_source.")
flags.DEFINE_integer("prompt_tokens", 512, "Tokens of the --prompt_source document to use.")
flags.DEFINE_integer("max_length", 200, "Tokens to generate.")
flags.DEFINE_enum("sampling", generation.GREEDY, generation.SAMPLING_METHODS,
                  "greedy: the most likely token; sample: draw from the distribution.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0) with --sampling=sample.")
flags.DEFINE_integer("top_k", 0, "With --sampling=sample, draw only among the k most likely "
                     "tokens (0: all).")
flags.DEFINE_bool("write_memory", False, "For a model with a memory: also write the segments "
                  "completed while generating to it (otherwise the continuation retrieves from "
                  "the prompt's segments only).")
flags.DEFINE_integer("num_samples", 1, "Continuations to generate (each stream of the model "
                     "continues the same prompt).")


def _check_flags():
  prompts = [name for name in ("prompt", "prompt_file", "prompt_source")
             if getattr(FLAGS, name) is not None]
  if len(prompts) != 1:
    raise app.UsageError("give exactly one of --prompt, --prompt_file and --prompt_source"
                         + (f" (got {', '.join('--' + p for p in prompts)})" if prompts else ""))
  if FLAGS.max_length <= 0:
    raise app.UsageError(f"--max_length must be >= 1, got {FLAGS.max_length}")
  if FLAGS.num_samples <= 0:
    raise app.UsageError(f"--num_samples must be >= 1, got {FLAGS.num_samples}")
  if FLAGS.top_k < 0:
    raise app.UsageError(f"--top_k must be >= 0 (0: no truncation), got {FLAGS.top_k}")
  if FLAGS.prompt_tokens <= 0:
    raise app.UsageError(f"--prompt_tokens must be >= 1, got {FLAGS.prompt_tokens}")
  if FLAGS.sampling == generation.SAMPLE and FLAGS.temperature <= 0:
    raise app.UsageError(f"--temperature must be > 0 with --sampling=sample, got "
                         f"{FLAGS.temperature}; use --sampling=greedy for argmax decoding")
  if FLAGS.sampling == generation.GREEDY and FLAGS.top_k:
    raise app.UsageError("--top_k applies to --sampling=sample, not to greedy decoding")


def _prompt_tokens(handle):
  """The prompt as token ids (host list), from whichever prompt flag is set."""
  if FLAGS.prompt_source is not None:
    handle.parse_config(FLAGS.gin_param)
    pipelines.set_default_data_directory(FLAGS.default_data_dir)
    task = evaluation.make_task(FLAGS.prompt_source, handle.vocabulary)
    documents = task.source.documents(FLAGS.prompt_split).skip(FLAGS.prompt_document).take(1)
    texts = [document["text"] for document in documents]
    if not texts:
      raise ValueError(f"--prompt_source={FLAGS.prompt_source} split {FLAGS.prompt_split} has no "
                       f"document {FLAGS.prompt_document}")
    return handle.module.encode(texts[0]).numpy()[:FLAGS.prompt_tokens]
  if FLAGS.prompt_file is not None:
    try:
      text = storage.read_bytes(FLAGS.prompt_file)
    except tf.errors.OpError as e:
      raise ValueError(f"--prompt_file={FLAGS.prompt_file}: {e.message}") from e
  else:
    text = FLAGS.prompt.encode("utf-8")
  return handle.module.encode(tf.constant(text)).numpy()


def continuations(handle, prompt, num_samples):
  """Generates from the prompt in `num_samples` streams; returns their token arrays."""
  batch_size = handle.batch_size
  if num_samples > batch_size:
    raise ValueError(f"--num_samples={num_samples} exceeds the {batch_size} streams of the model")
  if not handle.metadata["supports_generate"]:
    raise ValueError("this model cannot generate: "
                     f"{handle.metadata['generate_unsupported_reason']}")
  if not len(prompt):
    raise ValueError("the prompt is empty; generation needs at least one token to continue")
  vocab_size = handle.metadata["vocab_size"]
  if FLAGS.top_k > vocab_size:
    raise ValueError(f"--top_k={FLAGS.top_k} exceeds the vocabulary ({vocab_size} ids)")
  # Passed only when set: the generate of an XL model exported before write_memory existed
  # takes six arguments.
  options = {}
  if FLAGS.write_memory:
    if not handle.metadata["memory_layers"]:
      raise ValueError("--write_memory applies to a model with a memory "
                       f"(this one is {handle.metadata['family']})")
    options["write_memory"] = tf.constant(True)
  tokens = np.tile(np.asarray(prompt, np.int32)[None], [batch_size, 1])
  temperature = FLAGS.temperature if FLAGS.sampling == generation.SAMPLE else 0.0
  generated = handle.module.generate(
      tf.constant(tokens), tf.fill([batch_size], len(prompt)), tf.constant(FLAGS.max_length),
      tf.constant(temperature, tf.float32), tf.constant(FLAGS.top_k),
      tf.constant([shared_flags.value("seed", 0), 0], tf.int64), **options)["tokens"].numpy()
  return generated[:num_samples]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _check_flags()
  try:
    handle = export.open_model(
        saved_model=FLAGS.saved_model, workdir=FLAGS.workdir, load_dir=FLAGS.load_dir,
        batch_size=0 if FLAGS.saved_model else shared_flags.value("batch_size", 0) or FLAGS.num_samples,
        jit_compile=export.resolve_jit_compile(FLAGS.jit_compile),
        gin_params=FLAGS.gin_param)
    prompt = _prompt_tokens(handle)
    samples = continuations(handle, prompt, FLAGS.num_samples)
  except (ValueError, OSError) as e:
    raise app.UsageError(str(e)) from e
  for i, tokens in enumerate(samples):
    if len(samples) > 1:
      print(f"--- sample {i} ---")
    text = handle.module.decode(tf.constant(tokens)).numpy()
    print(text.decode("utf-8", errors="replace"))


def run():
  shared_flags.run(main)


if __name__ == "__main__":
  sys.exit(run())
