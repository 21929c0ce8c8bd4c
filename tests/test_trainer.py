"""The trainer: restore continues the run, and two replicas equal one device (invariant 6)."""

import json
import os

import gin
import numpy as np
import pytest
from tensorboard.plugins.hparams import plugin_data_pb2
import tensorflow as tf

from meliad_tf.training import checkpoints
from meliad_tf.training import gin_setup
from meliad_tf.training import optimizer as optimizer_lib
from meliad_tf.training import plots
from meliad_tf.training import step_losses
from meliad_tf.training import trainer as trainer_lib


TINY = ["base_htrans.gin", "size/tiny_test.gin"]


def configure(*params):
  gin.clear_config()
  gin_setup.parse(TINY, ["NUM_LAYERS = 1", "EMBED_DIM = 32", "NUM_HEADS = 2", "HEAD_DIM = 16",
                         "MLP_DIM = 64", "Trainer.warmup_steps = 2", "Trainer.max_scheduled_steps = 100",
                         "Trainer.status_every_steps = 0", "Trainer.log_every_steps = 0",
                         "Trainer.print_input_every_steps = 0",
                         "Trainer.generate_every_steps = 0",
                         # Graph mode compiles in a second; XLA is pinned by its own test.
                         "Trainer.jit_compile = False"] + list(params))


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  gin.clear_config()


def build(*params, strategy=None):
  configure(*params)
  return trainer_lib.Trainer().build(strategy)


def test_restore_continues_step_count_and_losses(tmp_path):
  params = ["Trainer.num_steps = 6", "Trainer.checkpoint_every_steps = 3",
            "Trainer.test_every_steps = 0"]
  straight = build(*params)
  straight_losses = [straight.train_step()[1]["loss"] for _ in range(6)]

  first = build(*params)
  first.train(str(tmp_path))
  assert first.step == 6
  resumed = build("Trainer.num_steps = 6", "Trainer.test_every_steps = 0")
  keeper = resumed.checkpoint_keeper(str(tmp_path))
  assert keeper.restore()
  assert resumed.step == 6

  # Resume from the checkpoint taken after step 3 (the oldest is gone with keep=1, so
  # train a fresh run to 3 and restart it).
  workdir = tmp_path / "mid"
  build("Trainer.num_steps = 3", "Trainer.test_every_steps = 0").train(str(workdir))
  continued = build(*params)
  keeper = continued.checkpoint_keeper(str(workdir))
  keeper.restore()
  assert continued.step == 3
  continued_losses = [continued.train_step()[1]["loss"] for _ in range(3)]
  np.testing.assert_allclose(continued_losses, straight_losses[3:], rtol=1e-6)


def test_checkpoint_of_another_model_is_refused(tmp_path):
  build("Trainer.num_steps = 1", "Trainer.test_every_steps = 0").train(str(tmp_path))
  other = build("Trainer.num_steps = 1", "EMBED_DIM = 48", "Trainer.test_every_steps = 0")
  with pytest.raises(checkpoints.IncompatibleCheckpointError, match="embedding"):
    other.train(str(tmp_path))


def test_mirrored_strategy_over_two_cpus_equals_one_device():
  params = ["Trainer.num_steps = 2", "Trainer.test_every_steps = 0"]
  single = build("TransformerTaskConfig.batch_size = 2", *params)
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  mirrored = build("TransformerTaskConfig.batch_size = 1", *params, strategy=strategy)
  for _ in range(2):
    host_single, metrics_single = single.train_step()
    host_mirrored, metrics_mirrored = mirrored.train_step()
    np.testing.assert_array_equal(host_single["targets"], host_mirrored["targets"])
    np.testing.assert_allclose(metrics_mirrored["loss"], metrics_single["loss"], rtol=1e-5)
  for a, b in zip(single.params, mirrored.params):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=a.name)
  single_state = single.train_state.values()
  mirrored_state = mirrored.train_state.values()
  tf.nest.map_structure(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                        single_state, mirrored_state)
  # The replicas really hold different streams.
  keys = mirrored_state["layer_0"]["keys"]
  assert not np.allclose(keys[0], keys[1])


def test_mirrored_state_round_trips_through_a_checkpoint(tmp_path):
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  params = ["TransformerTaskConfig.batch_size = 1", "Trainer.num_steps = 2",
            "Trainer.test_every_steps = 0"]
  trained = build(*params, strategy=strategy)
  trained.train(str(tmp_path))
  saved = trained.train_state.values()
  restored = build(*params, strategy=strategy)
  restored.checkpoint_keeper(str(tmp_path)).restore()
  per_replica = [c.numpy() for c in strategy.experimental_local_results(
      restored.train_state.live["layer_0"]["keys"])]
  np.testing.assert_array_equal(per_replica[0], saved["layer_0"]["keys"][:1])
  np.testing.assert_array_equal(per_replica[1], saved["layer_0"]["keys"][1:])


def test_xla_step_equals_graph_step():
  params = ["Trainer.num_steps = 2", "Trainer.test_every_steps = 0"]
  graph = build(*params)
  xla = build("Trainer.jit_compile = True", *params)
  for _ in range(2):
    np.testing.assert_allclose(xla.train_step()[1]["loss"], graph.train_step()[1]["loss"],
                               rtol=1e-5)
  for a, b in zip(graph.params, xla.params):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=a.name)


def test_should_run_follows_meliad():
  assert not trainer_lib.should_run(0, 10)
  assert trainer_lib.should_run(10, 10)
  assert not trainer_lib.should_run(10, 0)


@pytest.mark.parametrize("jit_compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_steps_per_loop_keeps_losses_summaries_tests_and_checkpoints(jit_compile, tmp_path):
  """Ten steps per call give the losses of one, and periodic work comes at the same steps."""
  runs = {}
  for steps_per_loop in (1, 10):
    workdir = str(tmp_path / str(steps_per_loop))
    trainer = build("Trainer.num_steps = 23", "Trainer.log_every_steps = 5",
                    "Trainer.test_every_steps = 7", "Trainer.num_test_steps = 1",
                    "Trainer.checkpoint_every_steps = 10", "Trainer.max_checkpoints_to_keep = 5",
                    "Trainer.record_step_losses = True", f"Trainer.jit_compile = {jit_compile}",
                    f"Trainer.steps_per_loop = {steps_per_loop}")
    calls = []
    run_steps = trainer.train_steps
    trainer.train_steps = lambda n, signal=None: calls.append(n) or run_steps(n, signal)
    trainer.train(workdir)
    losses = [json.loads(line)["loss"] for line in
              open(os.path.join(workdir, step_losses.FILE_NAME)).read().splitlines()]
    scalars = plots.read_scalars(workdir)
    state = tf.train.get_checkpoint_state(os.path.join(workdir, checkpoints.CHECKPOINT_DIRECTORY))
    runs[steps_per_loop] = (calls, losses, scalars,
                            [os.path.basename(p) for p in state.all_model_checkpoint_paths])
  (calls_1, losses_1, scalars_1, saved_1), (calls_10, losses_10, scalars_10, saved_10) = (
      runs[1], runs[10])
  assert calls_1 == [1] * 23
  # Calls end after the steps with periodic work (5, 7, 10, 14, 15, 20, 21) and the last.
  assert calls_10 == [6, 2, 3, 4, 1, 5, 1, 1]
  assert len(losses_10) == 23
  np.testing.assert_allclose(losses_10, losses_1, rtol=1e-6)
  assert saved_10 == saved_1 == ["ckpt-11", "ckpt-21", "ckpt-23"]
  assert sorted(scalars_10) == sorted(scalars_1)
  for tag, points in scalars_1.items():
    assert [step for step, _ in scalars_10[tag]] == [step for step, _ in points], tag
    if not tag.endswith(("tokens_per_second", "std", "mean")):
      np.testing.assert_allclose([v for _, v in scalars_10[tag]], [v for _, v in points],
                                 rtol=1e-5, err_msg=tag)


def test_test_loss_is_the_mean_over_the_cycle_of_each_steps_summed_loss(tmp_path):
  """As Meliad reports it; the per-token rates weigh every token of the cycle."""
  trainer = build("Trainer.num_steps = 1", "Trainer.test_every_steps = 1",
                  "Trainer.num_test_steps = 3")
  metrics = trainer.train(str(tmp_path))
  total = metrics["nats_per_token"] * (metrics["token_count"] + 1e-6)
  np.testing.assert_allclose(metrics["loss"], total / 3, rtol=1e-5)
  (step, logged), = plots.read_scalars(str(tmp_path))["test/loss"]
  assert step == 0
  np.testing.assert_allclose(logged, total / 3, rtol=1e-5)


def test_the_run_records_its_config_and_hyperparameters(tmp_path):
  """As Meliad writes it, the operative config as a text summary; and TensorBoard's HParams."""
  trainer = build("Trainer.num_steps = 1", "Trainer.test_every_steps = 0")
  trainer.train(str(tmp_path))
  tags = {}
  for path in tf.io.gfile.glob(str(tmp_path / "events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        tags[value.tag] = value
  config = tf.make_ndarray(tags["config"].tensor).item().decode()
  assert "Trainer.num_steps = 1" in config and "NUM_LAYERS = 1" in config
  assert tags["config"].metadata.plugin_data.plugin_name == "text"
  session = tags["_hparams_/session_start_info"]
  assert session.metadata.plugin_data.plugin_name == "hparams"
  content = plugin_data_pb2.HParamsPluginData.FromString(session.metadata.plugin_data.content)
  hparams = content.session_start_info.hparams
  assert hparams["num_layers"].number_value == 1
  assert hparams["dataset"].string_value == "synthetic"


def test_test_cycle_reports_the_answer_tokens_apart(tmp_path):
  """On the synthetic fact-recall documents, the values asked again are scored apart."""
  facts_params = ["pipelines.synthetic.document_length = 250", "pipelines.synthetic.num_facts = 3"]
  trainer = build("Trainer.num_steps = 1", "Trainer.test_every_steps = 1",
                  "Trainer.num_test_steps = 4", *facts_params)
  # Each test document fits one segment, so every byte of its three 8-byte values is predicted.
  source = trainer.data.task.source
  assert max(len(source.generate("test", i)) for i in range(16)) < trainer.sequence_length
  metrics = trainer.train(str(tmp_path))
  assert metrics["answer_token_count"] == 4 * 3 * 8
  answer_bits = metrics["answer_bits_per_token"] * metrics["answer_token_count"]
  other_bits = metrics["non_answer_bits_per_token"] * (metrics["token_count"] - 4 * 3 * 8)
  np.testing.assert_allclose(answer_bits + other_bits,
                             metrics["bits_per_token"] * metrics["token_count"], rtol=1e-4)
  assert metrics["answer_bits_per_token"] > metrics["non_answer_bits_per_token"]
  scalars = plots.read_scalars(str(tmp_path))
  (_, logged), = scalars["test/answer_bits_per_token"]
  np.testing.assert_allclose(logged, metrics["answer_bits_per_token"], rtol=1e-6)


@pytest.mark.slow
def test_the_trainer_leaves_the_named_gates_unscaled():
  """options/gates_unscaled.gin: after two steps (the first has learning rate 0), the memory
  gate, which starts at 0, has moved 1000 times as far as at Adafactor's floor of 1e-3, and
  nothing else differs."""
  import tiny_run  # pylint: disable=g-import-not-at-top
  moved = {}
  for option in ([], ["include 'options/gates_unscaled.gin'"]):
    tiny_run.configure("Trainer.num_steps = 2", "Trainer.jit_compile = False",
                       *tiny_run.MEMORIZING)
    if option:
      gin.parse_config(option)
    trainer = trainer_lib.Trainer().build()
    for _ in range(2):
      trainer.train_step()
    moved[bool(option)] = {v.name: v.numpy() for v in trainer.params}
  gate = next(name for name in moved[True] if "external_memory_bias" in name)
  assert np.abs(moved[False][gate]).max() > 0
  np.testing.assert_allclose(moved[True][gate], 1000 * moved[False][gate], rtol=1e-3)
  for name, value in moved[False].items():
    if name != gate:
      np.testing.assert_array_equal(moved[True][name], value, err_msg=name)


_RECURRENT = ["DecoderStack.recurrent_layer_indices = (-1,)",
              "TransformerLayer.recurrent_num_states = 8"]


@pytest.mark.parametrize("family, gates", [
    ("memory", {"external_memory_bias"}),
    ("recurrent_bias", {"recurrent_tbase/post_attn_mlp/gate_bias", "recurrent_tbase/ffn/gate_bias"}),
    ("recurrent_lstm", {f"recurrent_tbase/{mlp}/{gate}_gate/bias"
                        for mlp in ("post_attn_mlp", "ffn") for gate in ("forget", "input")}),
])
def test_gates_unscaled_names_the_gates_and_nothing_else(family, gates):
  import tiny_run  # pylint: disable=g-import-not-at-top
  from meliad_tf.model import language_model  # pylint: disable=g-import-not-at-top
  params = {"memory": tiny_run.MEMORIZING, "recurrent_bias": _RECURRENT,
            "recurrent_lstm": _RECURRENT + ["TransformerLayer.recurrent_gate_type = 'lstm'"]}
  tiny_run.configure(*params[family])
  gin.parse_config("include 'options/gates_unscaled.gin'")
  names = [optimizer_lib.param_key(v)
           for v in language_model.DecoderOnlyLanguageModel().trainable_variables]
  adafactor = optimizer_lib.FlaxAdafactorConfig().create()
  unscaled = {name.split("/layer_1/")[-1] for name in names
              if not adafactor.scales_by_parameter(name)}
  assert unscaled == gates
