"""meliad-recall: its statistics, the gates it reads, its flags, and a tiny comparison end to
end."""

import json
import math
import os
import statistics
import subprocess
import sys

from absl import app
from absl.testing import flagsaver
import numpy as np
import pytest
import tensorflow as tf

from meliad_tf.training import summaries
from meliad_tools import recall_comparison as recall


def _record(variant, seed, answer, other, gate_rms):
  return {"variant": variant, "seed": seed, "steps": 10, "answer_bits_per_token": answer,
          "non_answer_bits_per_token": other, "bits_per_token": (answer + 15 * other) / 16,
          "gates": {"memory_gate": {"bias_rms": gate_rms}}}


def test_summary_has_each_variants_mean_and_sample_deviation_over_seeds():
  answers, others, rms = [5.1, 4.7, 4.9], [2.0, 2.2, 2.1], [1e-3, 2e-3, 4e-3]
  records = [_record("memorizing", seed, a, o, g)
             for seed, a, o, g in zip((1, 2, 3), answers, others, rms)]
  records.append(_record("transformer_xl", 1, 6.0, 2.5, 0.0))
  summary = recall.summarize(records)
  memorizing = summary["memorizing"]
  assert memorizing["seeds"] == [1, 2, 3] and memorizing["steps"] == 10
  for key, values in (("answer_bits_per_token", answers), ("non_answer_bits_per_token", others),
                      ("memory_gate_bias_rms", rms)):
    assert memorizing[key]["mean"] == pytest.approx(statistics.mean(values))
    assert memorizing[key]["std"] == pytest.approx(statistics.stdev(values))
    assert memorizing[key]["values"] == values
  # One seed has no spread to report.
  assert summary["transformer_xl"]["answer_bits_per_token"] == {
      "mean": 6.0, "std": None, "values": [6.0]}


def test_gates_are_read_from_the_checkpoints_model_not_its_optimizer(tmp_path):
  memory_bias = [0.5, -1.0, 0.0, 2.0]
  gate_bias = [[0.1, -0.2], [0.3, 0.0]]  # two recurrent layers' gates, read as one
  model = tf.Module()
  model.layer_1 = tf.Module()
  model.layer_1.external_memory_bias = tf.Variable(memory_bias)
  model.layer_1.recurrent = tf.Module()
  model.layer_1.recurrent.gate_bias = tf.Variable(gate_bias[0])
  model.layer_2 = tf.Module()
  model.layer_2.gate_bias = tf.Variable(gate_bias[1])
  optimizer = tf.Module()
  optimizer.slot_external_memory_bias = tf.Variable([9.0, 9.0, 9.0, 9.0])
  tf.train.Checkpoint(model=model, optimizer=optimizer).save(
      os.path.join(tmp_path, "checkpoints", "ckpt"))
  gates = recall._gates(str(tmp_path))

  def expected(biases):
    sigmoids = [1 / (1 + math.exp(-b)) for b in biases]
    return {"mean": statistics.mean(sigmoids), "min": min(sigmoids), "max": max(sigmoids),
            "bias_mean_abs": statistics.mean(abs(b) for b in biases),
            "bias_rms": math.sqrt(statistics.mean(b * b for b in biases))}

  assert set(gates) == {"memory_gate", "recurrent_gate"}
  for label, biases in (("memory_gate", memory_bias),
                        ("recurrent_gate", gate_bias[0] + gate_bias[1])):
    for key, value in expected(biases).items():
      assert gates[label][key] == pytest.approx(value, rel=1e-6), (label, key)


def test_bias_rms_curve_comes_from_the_parameter_summaries(tmp_path):
  steps = {50: np.array([0.1, -0.3, 0.2, 0.0]), 100: np.array([1.0, -2.0, 0.5, 0.5])}
  writer = summaries.SummaryWriter(str(tmp_path))
  for step, bias in steps.items():
    writer.scalars("params", {"model/layer_1/external_memory_bias/mean": bias.mean(),
                              "model/layer_1/external_memory_bias/std": bias.std(),
                              "model/layer_1/other/mean": 7.0}, step)
  writer.flush()
  from meliad_tf.training import plots  # pylint: disable=g-import-not-at-top
  rms = recall._bias_rms(plots.read_scalars(str(tmp_path)), "external_memory_bias")
  assert set(rms) == set(steps)
  for step, bias in steps.items():
    assert rms[step] == pytest.approx(math.sqrt(sum(b * b for b in bias) / len(bias)), rel=1e-5)
  assert recall._bias_rms(plots.read_scalars(str(tmp_path)), "gate_bias") is None


def test_progress_names_the_run_its_step_and_the_time_left(capsys):
  progress = recall.Progress(num_runs=4)
  progress.start("memorizing", 2)
  progress.step(50, 100)
  progress.finish(reused=False)
  progress.start("recurrent", 2)
  progress.finish(reused=True)
  lines = capsys.readouterr().err.splitlines()
  assert lines[0].startswith("recall_comparison: run 1/4 memorizing seed 2: step 50/100, ")
  assert "left for all runs" in lines[0]
  assert lines[1].startswith("recall_comparison: run 1/4 memorizing seed 2: done in ")
  assert lines[2] == "recall_comparison: run 2/4 recurrent seed 2: reused"


@pytest.mark.parametrize("settings, message", [
    ({}, "--root"),
    ({"root": "r", "variants": ["memorizing", "lstm"]}, "--variants: unknown \\['lstm'\\]"),
    ({"root": "r", "seeds": ["1", "x"]}, "--seeds: whole numbers"),
    ({"root": "r", "seeds": ["1", "1"]}, "--seeds: give distinct seeds"),
    ({"root": "r", "num_steps": 0}, "--num_steps must be positive"),
])
def test_bad_flags_stop_before_any_run(settings, message, tmp_path, clean_gin):
  del clean_gin
  with flagsaver.flagsaver(**settings):
    with pytest.raises(app.UsageError, match=message):
      recall.main(["meliad-recall"])
  assert not os.listdir(tmp_path)


def test_an_output_that_is_a_directory_stops_before_any_run(tmp_path, clean_gin):
  del clean_gin
  with flagsaver.flagsaver(root=str(tmp_path / "runs"), output=str(tmp_path)):
    with pytest.raises(app.UsageError, match="is a directory"):
      recall.main(["meliad-recall"])
  assert not (tmp_path / "runs").exists()


def test_a_finished_run_of_other_steps_is_not_reused(tmp_path, clean_gin):
  del clean_gin
  record = tmp_path / "memorizing" / "seed_1" / "record.json"
  record.parent.mkdir(parents=True)
  record.write_text(json.dumps(_record("memorizing", 1, 5.0, 2.0, 0.0)))
  with flagsaver.flagsaver(root=str(tmp_path), num_steps=20):
    with pytest.raises(ValueError, match="trained for 10 steps, not --num_steps=20"):
      recall.run_one("memorizing", 1, recall.Progress(1))


# A smaller model and fewer, shorter documents; the facts no longer fit the documents, which
# is all the better for a quick try: every stated fact is asked again.
_TINY = ["NUM_LAYERS = 2", "EMBED_DIM = 32", "MLP_DIM = 64",
         "pipelines.synthetic.num_documents = 4", "pipelines.synthetic.num_eval_documents = 2",
         "pipelines.synthetic.document_length = 512",
         "decoder_stack.TransformerTaskConfig.batch_size = 2",
         "training_loop.Trainer.num_test_steps = 1", "training_loop.Trainer.jit_compile = False"]


@pytest.mark.slow
def test_a_tiny_comparison_runs_end_to_end_and_is_reused(tmp_path):
  figure = tmp_path / "figures" / "recall.png"
  command = [sys.executable, "-m", "meliad_tools.recall_comparison", f"--root={tmp_path}",
             "--seeds=1", "--variants=memorizing_unscaled_gate,recurrent", "--num_steps=3",
             f"--output={figure}"] + [f"--gin_param={p}" for p in _TINY]
  first = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
  report = json.loads(first.stdout)
  assert report["num_steps"] == 3
  memorizing, recurrent = report["runs"]
  assert (memorizing["variant"], recurrent["variant"]) == ("memorizing_unscaled_gate", "recurrent")
  assert set(memorizing["gates"]) == {"memory_gate"}
  assert set(recurrent["gates"]) == {"recurrent_gate"}
  for run in report["runs"]:
    # Every test document's answers, 2 documents of 16 facts of 8 characters, but those that a
    # segment's unscored first position predicts (the documents span 5 segments each).
    assert 2 * 16 * 8 - 2 * 5 <= run["answer_tokens"] <= 2 * 16 * 8 < run["tokens"]
    assert run["answer_bits_per_token"] > 0 and run["non_answer_bits_per_token"] > 0
    evaluation = json.loads((tmp_path / run["variant"] / "seed_1" / "eval.json").read_text())
    assert evaluation["aggregate"]["answer_bits_per_token"] == run["answer_bits_per_token"]
  assert set(report["summary"]) == {"memorizing_unscaled_gate", "recurrent"}
  assert "run 1/2 memorizing_unscaled_gate seed 1: step 3/3" in first.stderr
  assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  figure.unlink()
  again = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
  assert json.loads(again.stdout)["runs"] == report["runs"]
  assert "run 2/2 recurrent seed 1: reused" in again.stderr
  assert "step 3/3" not in again.stderr
  assert figure.exists()
