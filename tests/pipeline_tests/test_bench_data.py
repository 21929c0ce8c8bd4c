"""The data benchmark runs end to end on a small generated book corpus and reports every measure."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_data_reports_speed_reading_checkpoints_and_memory(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "meliad_tools.bench_data", f"--corpus_dir={tmp_path}", "--corpus_megabytes=3",
       "--book_kilobytes=60", "--batch_size=4", "--sequence_length=256", "--num_batches=10",
       "--warmup_batches=2", "--read_batches=20", "--sentencepiece_vocab_size=800", "--sources=tfds,files"],
      capture_output=True, text=True, timeout=900, check=True)
  report = json.loads(result.stdout[result.stdout.index("{"):])
  assert report["corpus"]["file_bytes"] > 3_000_000
  for measured in (report["bytes"], report["sentencepiece"], report["files"]["bytes"]):
    assert measured["tokens_per_second"] > 0 and measured["batches"] == 10
    assert measured["restore_equals_uninterrupted"]
    assert 0 < measured["checkpoint_bytes"] < 100_000
    assert measured["peak_memory_bytes"] > 0
  assert report["bytes"]["epoch_pass"]["read_per_file_byte"] < 1.1
  # The default model is a unigram model, whose documents are tokenized whole.
  assert not report["sentencepiece"]["documents_cut_at_spaces"]


@pytest.mark.slow
@pytest.mark.parametrize("model", [["--sentencepiece_model_type=bpe"], ["--cut_unigram_at_spaces"]],
                         ids=["bpe", "unigram_cut"])
def test_bench_data_measures_documents_tokenized_in_pieces(tmp_path, model):
  result = subprocess.run(
      [sys.executable, "-m", "meliad_tools.bench_data", f"--corpus_dir={tmp_path}", "--corpus_megabytes=3",
       "--book_kilobytes=200", "--batch_size=4", "--sequence_length=256", "--num_batches=10",
       "--warmup_batches=30", "--sentencepiece_vocab_size=800", "--vocabularies=sentencepiece",
       "--epoch_pass=false"] + model,
      capture_output=True, text=True, timeout=900, check=True)
  measured = json.loads(result.stdout[result.stdout.index("{"):])["sentencepiece"]
  assert measured["documents_cut_at_spaces"] and measured["restore_equals_uninterrupted"]
  assert measured["tokens_per_second"] > 0 and 0 < measured["checkpoint_bytes"] < 100_000
