"""The public API for reuse: the README's example runs as written, a user's own sources, and
registering a task that gin files, meliad-train and meliad-eval can name."""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

import pipelines
from pipeline_helpers import check_epochs, check_evaluation, reconstruct, take


README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def _readme_example():
  text = README.read_text(encoding="utf-8")
  match = re.search(r"<!-- reuse-example -->\n```python\n(.*?)```", text, re.S)
  assert match, "README.md has no reuse example"
  return match.group(1)


def test_readme_reuse_example_runs():
  namespace = {}
  try:
    exec(compile(_readme_example(), "README.md reuse example", "exec"), namespace)  # pylint: disable=exec-used
    assert pipelines.get_task("my_books").source is namespace["source"]
  finally:
    pipelines.tasks._USER_TASKS.pop("my_books", None)  # pylint: disable=protected-access


def test_dataset_of_strings_and_of_dicts_keep_the_stream_invariants():
  texts = [f"text number {i} " * (3 * i + 2) for i in range(9)]
  strings = pipelines.DatasetSource(
      {"train": tf.data.Dataset.from_tensor_slices(texts),
       "test": tf.data.Dataset.from_tensor_slices({"text": texts[:4], "document_id": ["a", "b", "c", "d"]})},
      name="mine")
  task = pipelines.Task("mine", strings, pipelines.ByteVocabulary())
  check_epochs(take(pipelines.load_text_dataset(task, "train", sequence_length=16, batch_size=3), 300),
               [t.encode() for t in texts], task.vocabulary)
  evaluation = take(pipelines.load_text_dataset(task, "test", sequence_length=16, batch_size=3,
                                                training=False), 1000)
  check_evaluation(evaluation, [t.encode() for t in texts[:4]], task.vocabulary)
  assert sorted(d.document_id for d in reconstruct(evaluation, ended=True)) == [b"a", b"b", b"c", b"d"]
  training_names = take(pipelines.load_text_dataset(task, "train", sequence_length=16, batch_size=3,
                                                    document_names=True), 1)[0]["document_id"]
  assert all(name.startswith(b"mine/train/") for name in training_names)


def test_evaluation_takes_the_first_documents_of_a_dataset_of_strings():
  from meliad_tf.serving import evaluation  # pylint: disable=g-import-not-at-top
  texts = [f"text {i} " * 20 for i in range(5)]
  source = evaluation.first_documents(
      pipelines.DatasetSource(tf.data.Dataset.from_tensor_slices(texts), name="mine"), 2)
  task = pipelines.Task("mine", source, pipelines.ByteVocabulary())
  batches = take(pipelines.load_text_dataset(task, "train", sequence_length=16, batch_size=3,
                                             training=False), 1000)
  check_evaluation(batches, [t.encode() for t in texts[:2]], task.vocabulary)


def test_dataset_source_errors_name_the_split_and_source():
  with pytest.raises(ValueError, match="Split 'train' of source 'nums' must hold tf.string scalars"):
    pipelines.DatasetSource(tf.data.Dataset.range(3), name="nums")
  source = pipelines.DatasetSource(tf.data.Dataset.from_tensor_slices(["x"]), name="one")
  with pytest.raises(ValueError, match="Unknown split 'test' for source 'one'; it has train"):
    pipelines.load_text_dataset(pipelines.Task("one", source, pipelines.ByteVocabulary()), "test",
                                sequence_length=8, batch_size=1, training=False)


def test_a_list_of_files_is_a_source(tmp_path):
  paths = []
  for i in range(6):
    path = tmp_path / f"notes_{i}.txt"
    path.write_text(f"note {i}\n" * (i + 1))
    paths.append(str(path))
  source = pipelines.TextFilesSource(paths)
  split = pipelines.hash_split(paths[0])
  names = [p for p in paths if pipelines.hash_split(p) == split]
  task = pipelines.Task("notes", source, pipelines.ByteVocabulary())
  batches = take(pipelines.load_text_dataset(task, split, sequence_length=8, batch_size=1, training=False), 100)
  assert sorted(d.document_id.decode() for d in reconstruct(batches, ended=True)) == sorted(names)
  with pytest.raises(ValueError, match="missing.txt does not exist"):
    pipelines.TextFilesSource([str(tmp_path / "missing.txt")])


def test_register_task_rejects_builtin_names_and_unknown_vocabularies():
  source = pipelines.DatasetSource(tf.data.Dataset.from_tensor_slices(["x"]))
  with pytest.raises(ValueError, match="Cannot register task 'pg19_bytes'"):
    pipelines.register_task("pg19_bytes", source)
  with pytest.raises(ValueError, match="unknown vocabulary 'words'"):
    pipelines.register_task("mine", source, "words")


_MY_TASKS = textwrap.dedent("""
    import tensorflow as tf
    import pipelines

    def _books(split, count):
      return tf.data.Dataset.from_tensor_slices(
          {"text": [f"{split} book {i}. " + "la " * (40 + 9 * i) for i in range(count)],
           "document_id": [f"{split}-{i}" for i in range(count)]})

    pipelines.register_task(
        "registered_books",
        lambda: pipelines.DatasetSource({"train": _books("train", 6), "test": _books("test", 3)},
                                        name="registered_books"),
        "raw_bytes")
""")


@pytest.mark.slow
def test_a_task_registered_by_a_module_imported_from_gin_trains_and_evaluates(tmp_path):
  from tiny_run import PARAMS  # pylint: disable=g-import-not-at-top
  (tmp_path / "my_registered_tasks.py").write_text(_MY_TASKS)
  (tmp_path / "my_books.gin").write_text(
      'import my_registered_tasks\ndecoder_stack.TransformerTaskConfig.dataset_name = "registered_books"\n')
  workdir = tmp_path / "run"
  params = [f"--gin_param={p}" for p in PARAMS if not p.startswith("pipelines.synthetic")]
  environment = {"PYTHONPATH": str(tmp_path)}
  train = [sys.executable, "-m", "meliad_tools.train", "--gin_file=base_htrans.gin",
           "--gin_file=size/tiny_test.gin", f"--gin_file={tmp_path / 'my_books.gin'}",
           "--gin_param=Trainer.num_steps = 2", f"--workdir={workdir}"] + params
  run_python(train, environment)
  assert "import my_registered_tasks" in (workdir / "config.gin").read_text()
  output = tmp_path / "eval.json"
  run_python([sys.executable, "-m", "meliad_tools.eval", f"--workdir={workdir}", "--noprogress",
              f"--output={output}"], environment)
  results = json.loads(output.read_text())
  assert sorted(d["document_id"] for d in results["documents"]) == ["test-0", "test-1", "test-2"]


def run_python(command, environment):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [environment["PYTHONPATH"], env.get("PYTHONPATH")]))
  result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
