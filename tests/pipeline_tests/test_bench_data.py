"""The data benchmark runs end to end and reports tokens per second for both vocabularies."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_data_prints_rates_for_bytes_and_sentencepiece():
  result = subprocess.run(
      [sys.executable, "-m", "meliad_tools.bench_data", "--num_batches=10", "--warmup_batches=2",
       "--sentencepiece_vocab_size=800", "--sentencepiece_documents=5"],
      capture_output=True, text=True, timeout=600, check=True)
  report = json.loads(result.stdout[result.stdout.index("{"):])
  for vocab in ("bytes", "sentencepiece"):
    assert report[vocab]["tokens_per_second"] > 0 and report[vocab]["batches"] == 10
