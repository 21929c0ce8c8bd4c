"""Parity with Meliad's own code: its checkpoints, converted, give Meliad's outputs here.

Each folder of tests/meliad_goldens holds a tiny checkpoint and config.gin written by
Meliad's JAX training loop, and what Meliad computed from them (make_goldens.py there says
how): per-token logits, token losses and summed losses on three consecutive segments per
stream in test mode (caches, memories and recurrent states carried, one stream starting a
new document beside one that continues), and one Adafactor training step. The tests convert
each checkpoint with `meliad_tf.convert` and compare.

Tolerances. Both sides compute in float32 but sum in different orders (XLA's dot products
and reductions against TensorFlow's, oneDNN's matmuls), so a reduction of n terms may differ
by about n * 2^-24 of the magnitudes summed. The longest reductions here are a few dozen
terms (F = 16, 2W = 16 keys, S = 4 states, V = 256 in the softmax), chained through two
layers and a few norms, so logits of magnitude about 1 may differ by some 1e-6; measured,
they differ by at most 5e-7, except where Meliad's bucketed search meets a near-tie: in
memory_bucketed one query finds two entries of a bucket whose scores differ by 6e-6, which
Meliad mixes (softmax(1e6 x score): weights 0.997 and 0.003) where we take the best, and
that moves one position's logits by 1.3e-5 (a documented deviation). LOGIT_TOLERANCE, 2e-5,
allows both, while any error of modelling (a mask off by one token, a gate reversed, a
query not rotated) moves logits by 1e-3 or more (0.07 for the unrotated memory query). The
summed loss adds ~90 token losses of about 5 nats, each good to ~1e-6 relative: 2e-5
relative. The optimizer step is compared as the change of every parameter (the update, a small
fraction of the parameter) relative to that change's largest magnitude: Adafactor divides the gradient
by the root of its mean square, from gradients that each carry the forward pass's relative
error amplified by the backward pass; measured differences are at most 1.2e-4 of the
update, and 1e-3 still separates them from a wrong slot, learning rate or clipping (each
changes the update by far more than 1e-3 of it).
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from meliad_tf.serving import loading as checkpoint_loading
from meliad_tf.training import convert


GOLDENS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meliad_goldens")
FAMILIES = sorted(name for name in os.listdir(GOLDENS)
                  if os.path.isfile(os.path.join(GOLDENS, name, "outputs.npz")))
LOGIT_TOLERANCE = 2e-5
LOSS_RELATIVE_TOLERANCE = 2e-5
UPDATE_RELATIVE_TOLERANCE = 1e-3


def _golden_file(path):
  with np.load(os.path.join(GOLDENS, path)) as data:
    return dict(data)


def _golden(family):
  return _golden_file(os.path.join(family, "outputs.npz"))


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
  """(family, golden outputs, our converted workdir)."""
  workdir = str(tmp_path_factory.mktemp(request.param) / "workdir")
  convert.convert(os.path.join(GOLDENS, request.param), workdir)
  return request.param, _golden(request.param), workdir


def test_goldens_cover_every_family():
  assert {"xl_t5", "memory_bucketed", "recurrent_bias_skip", "recurrent_lstm_dual",
          "block_feedback_bias_single", "memory_rotary_layernorm"} <= set(FAMILIES)


def test_logits_and_losses_equal_meliads_over_consecutive_segments(converted, clean_gin):
  family, golden, workdir = converted
  loaded = checkpoint_loading.load_model(workdir)
  model = loaded.model
  targets, starts = golden["eval_targets"], golden["eval_start_of_sequence"]
  state = model.initial_state(targets.shape[1])
  differences = []
  for segment in range(targets.shape[0]):
    batch = {"targets": tf.constant(targets[segment]),
             "start_of_sequence": tf.constant(starts[segment])}
    tokens = tf.math.floormod(batch["targets"], model.vocab_size)
    logits, _ = model.decoder(tokens, batch["start_of_sequence"], state)
    loss, metrics, state = model(batch, state)
    logits = logits[..., :golden["eval_logits"].shape[-1]]
    np.testing.assert_allclose(logits.numpy(), golden["eval_logits"][segment],
                               atol=LOGIT_TOLERANCE, rtol=0,
                               err_msg=f"{family}: logits of segment {segment}")
    np.testing.assert_allclose(metrics["token_losses"].numpy(),
                               golden["eval_token_losses"][segment], atol=LOGIT_TOLERANCE,
                               rtol=0, err_msg=f"{family}: token losses of segment {segment}")
    np.testing.assert_allclose(float(loss), golden["eval_loss"][segment],
                               rtol=LOSS_RELATIVE_TOLERANCE,
                               err_msg=f"{family}: loss of segment {segment}")
    differences.append(np.max(np.abs(logits.numpy() - golden["eval_logits"][segment])))
  print(f"{family}: largest logit difference {max(differences):.3g}")


def test_one_adafactor_step_equals_meliads(converted, clean_gin):
  family, golden, workdir = converted
  trainer = _restored_trainer(workdir)
  model = trainer.model
  batch = {"targets": tf.constant(golden["train_targets"]),
           "start_of_sequence": tf.constant(golden["train_start_of_sequence"])}
  learning_rate = trainer.learning_rate(tf.constant(trainer.step, tf.int64))
  np.testing.assert_allclose(float(learning_rate), golden["train_learning_rate"], rtol=1e-6)
  pairs = convert.parameter_paths(model)
  before = {path: variable.numpy() for path, variable in pairs.items()}
  with tf.GradientTape() as tape:
    loss, _, _ = model(batch, model.initial_state(batch["targets"].shape[0]), training=True,
                       seed=tf.constant([0, 0], tf.int64))
  grads = tape.gradient(loss, trainer.params)
  np.testing.assert_allclose(float(loss), golden["train_loss"], rtol=LOSS_RELATIVE_TOLERANCE)
  trainer.optimizer.apply_gradients(grads, trainer.params, learning_rate)
  worst = 0.0
  for path, variable in pairs.items():
    expected = golden["param/" + path] - before[path]
    scale = np.max(np.abs(expected))
    assert scale > 0, f"{family}: Meliad's step left {path} unchanged"
    error = np.max(np.abs((variable.numpy() - before[path]) - expected)) / scale
    worst = max(worst, error)
    assert error < UPDATE_RELATIVE_TOLERANCE, f"{family}: update of {path} off by {error:.3g}"
  print(f"{family}: largest relative update difference {worst:.3g}")


def _restored_trainer(workdir):
  """Our trainer built from the converted workdir's config, restored as a resume would."""
  import gin  # pylint: disable=g-import-not-at-top
  from meliad_tf.training import gin_setup  # pylint: disable=g-import-not-at-top
  from meliad_tf.training import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  gin_setup.parse([os.path.join(workdir, "config.gin")])
  trainer = trainer_lib.Trainer().build()
  assert trainer.checkpoint_keeper(workdir).restore()
  return trainer


def _adafactor_inputs(shape, step):
  """The inputs make_goldens.py's adafactor_inputs makes: integer formulas, exact in float32."""
  i = np.arange(shape[0])[:, None]
  j = np.arange(shape[1])[None, :]
  param = (((i * 37 + j * 11) % 101) - 50).astype(np.float32) / np.float32(50)
  grad = (((i * 13 + j * 7 + step * 5) % 97) - 48).astype(np.float32) / np.float32(480)
  return param, grad


@pytest.mark.parametrize("shape", [(128, 136), (136, 128)])
def test_factored_adafactor_steps_equal_meliads(shape):
  """The model goldens' parameters are too small to be factored; these are (both
  orientations of the second-moment factors), over two steps with momentum."""
  golden = _golden_file("adafactor_factored.npz")
  key = "x".join(map(str, shape))
  rows = golden[f"{key}/param"].shape[0]
  from meliad_tf.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  param = tf.Variable(_adafactor_inputs(shape, 0)[0], name=f"factored_{key}")
  optimizer = optimizer_lib.FlaxAdafactorConfig().create()
  optimizer.build([param])
  for step, learning_rate in enumerate(golden["learning_rates"]):
    optimizer.apply_gradients([tf.constant(_adafactor_inputs(shape, step)[1])], [param],
                              float(learning_rate))
  slots = optimizer.slots_for(param)
  # Relative to the values' scale: one step's float32 rounding, through a root and a clip.
  for name, ours, theirs in (("v_row", slots["v_row"].numpy(), golden[f"{key}/v_row"]),
                             ("v_col", slots["v_col"].numpy(), golden[f"{key}/v_col"]),
                             ("m", slots["m"].numpy()[:rows], golden[f"{key}/m"])):
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.max(np.abs(theirs)),
                               err_msg=name)
  update = param.numpy()[:rows] - _adafactor_inputs(shape, 0)[0][:rows]
  expected = golden[f"{key}/param"] - _adafactor_inputs(shape, 0)[0][:rows]
  np.testing.assert_allclose(update, expected, rtol=0,
                             atol=UPDATE_RELATIVE_TOLERANCE * np.max(np.abs(expected)))


def test_in_meliad_the_memory_gate_moves_at_adafactors_floor():
  """Meliad's own Adafactor step (memory_bucketed, at learning rate lr): the memory gate's
  bias, initialised to 0, moves by under lr x 1e-3 (its RMS is floored at 1e-3), the
  projections next to it by lr x several 1e-2: the slow gate is Meliad's behaviour, which
  options/gates_unscaled.gin changes."""
  golden = _golden("memory_bucketed")
  before = convert.flatten(convert.read_flax_checkpoint(
      convert.latest_checkpoint(os.path.join(GOLDENS, "memory_bucketed"))))
  learning_rate = float(golden["train_learning_rate"])

  def moved(path):
    old = next(v for k, v in before.items() if k.endswith(path) and "target" in k)
    return np.abs(golden["param/" + path] - old).max() / learning_rate

  gate = moved("decoder/transformer1/external_memory_bias")
  kernel = moved("decoder/transformer1/tbase/post_attn_mlp/output_layer/kernel")
  assert 0 < gate < 1e-3 and kernel > 1e-2, (gate, kernel)
