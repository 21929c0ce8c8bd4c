"""meliad-bench: variants, the training benchmark end to end, and the summary of `all`."""

import json
import subprocess
import sys

import pytest

from meliad_tf.benchmarks import timing as benchmark
from meliad_tools import bench


def test_variants_parse_names_and_bindings():
  assert benchmark.parse_variants(["a:X = 1; Y = 'b'", "c:"]) == {"a": ["X = 1", "Y = 'b'"],
                                                                   "c": []}
  for bad in (["no_colon"], [":X = 1"], ["a:X = 1", "a:Y = 2"]):
    with pytest.raises(ValueError, match="NAME:BINDING"):
      benchmark.parse_variants(bad)


@pytest.mark.slow
def test_train_benchmark_times_the_optimised_and_reference_paths_alternately():
  result = subprocess.run(
      [sys.executable, "-m", "meliad_tools.bench_train", "--configs=tiny_test", "--rounds=1"],
      capture_output=True, text=True, timeout=600, check=True)
  report = json.loads(result.stdout[result.stdout.index("{"):])
  assert report["device"] == "CPU" and report["dtype"] == "float32"
  assert report["matmul_peak_gflops"]["xla"] > 0
  (tiny,) = report["results"]
  for name in ("optimised", "reference"):
    assert tiny[name]["ms_per_train_step"] > 0 and tiny[name]["ms_per_eval_step"] > 0
  assert tiny["reference"]["config"][-2:] == [
      "TransformerLayer.attention_block_length = 0", "TransformerBase.fuse_projections = False"]
  assert tiny["optimised"]["input_ms_per_train_step"] >= 0
  assert 0 < tiny["optimised"]["train_mfu"] < 1
  assert tiny["reference_over_optimised"]["train_step"] == pytest.approx(
      tiny["reference"]["ms_per_train_step"] / tiny["optimised"]["ms_per_train_step"], abs=1e-3)


@pytest.mark.slow
def test_device_bench_without_a_gpu_stops_with_a_message():
  result = subprocess.run(
      [sys.executable, "-m", "meliad_tools.bench_train", "--configs=tiny_test",
       "--device_bench"], capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0
  assert "--device_bench needs a GPU" in result.stderr


def test_summary_table_of_all_has_the_headline_numbers():
  optimised = {"ms_per_train_step": 1310.3, "ms_per_eval_step": 406.4,
               "eval_over_train_tokens_per_second": 3.22, "train_mfu": 0.648,
               "compile_seconds_train": 27.2}
  results = {
      "data": {"bytes": {"tokens_per_second": 3850000.0},
               "sentencepiece": {"tokens_per_second": 406000.0}},
      "train": {"results": [{"config": "small_test", "optimised": optimised,
                             "reference_over_optimised": {"train_step": 1.171}}]},
      "memory": {"timing": {"memory": [{"size": "32k", "backend": "bucketed",
                                        "ms_per_train_step_ratio": 1.4,
                                        "ms_per_eval_step_ratio": 2.1}]}},
      "recurrent": {"comparisons": [{"window": 512, "train_step_ratio": 1.05,
                                     "train_step_ratio_median": 1.07}]},
      "eval": {"error": ["ValueError: no"]},
  }
  table = bench.summary_table(results)
  assert "3,850,000 / 406,000" in table
  assert "1310 ms train, 406 ms eval (3.22x the tokens/s), MFU 0.65, compile 27 s" in table
  assert "reference paths 1.171x" in table
  memory_row = next(line for line in table.splitlines() if "32k memory" in line)
  assert memory_row.startswith("+ 32k memory, bucketed") and memory_row.endswith(
      "1.4x train, 2.1x eval")
  assert "1.05x train (median 1.07x)" in table
  assert "eval" in table and "failed: ValueError: no" in table


@pytest.mark.slow
def test_eval_benchmark_times_generation_of_every_family():
  result = subprocess.run(
      [sys.executable, "-m", "meliad_tools.bench_eval", "--configs=tiny_test",
       "--families=xl,memory_exact,recurrent,block_feedback", "--generate_tokens=3",
       "--repeats=1", "--eval_segments=1", "--noxla"],
      capture_output=True, text=True, timeout=900, check=True)
  report = json.loads(result.stdout[result.stdout.index("{"):])
  (tiny,) = report["results"]
  generation = tiny["generation"]
  assert generation["generated_tokens_per_stream"] == 3
  for family in ("xl", "memory_exact", "recurrent", "block_feedback"):
    assert generation[family]["in_process_tokens_per_second"] > 0
  assert generation["xl"]["in_process_over_xl"] == 1.0
  assert tiny["evaluation"]["saved_model_tokens_per_second"] > 0


def test_eval_benchmark_refuses_an_unknown_family():
  result = subprocess.run(
      [sys.executable, "-m", "meliad_tools.bench_eval", "--families=xl,lstm"],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0
  assert "--families: unknown lstm" in result.stderr
