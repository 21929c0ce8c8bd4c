"""Input pipelines read disjoint documents whose union is the split, and with several replicas
each replica's slot b keeps its stream from step to step."""

import json
import subprocess
import sys
import textwrap

import tensorflow as tf

import pipelines
from pipeline_helpers import reconstruct, take


def _evaluation_documents(task, input_context):
  batches = take(pipelines.load_text_dataset(task, "train", sequence_length=64, batch_size=2,
                                             training=False, input_context=input_context), 10_000)
  return [d.document_id.decode() for d in reconstruct(batches, ended=True)]


def test_two_input_pipelines_read_disjoint_documents_covering_the_split(stdlib_source):
  task = pipelines.Task("stdlib", stdlib_source, pipelines.ByteVocabulary())
  first = _evaluation_documents(task, tf.distribute.InputContext(2, 0))
  second = _evaluation_documents(task, tf.distribute.InputContext(2, 1))
  assert not set(first) & set(second)
  assert sorted(first + second) == sorted(stdlib_source.document_names("train"))


def test_two_input_pipelines_train_on_disjoint_documents_in_an_epoch(stdlib_source):
  """Each epoch's order is dealt to all hosts' streams, so within an epoch hosts share none."""
  task = pipelines.Task("stdlib", stdlib_source, pipelines.ByteVocabulary())
  seen = []
  for pipeline_id in (0, 1):
    dataset = pipelines.load_text_dataset(task, "train", sequence_length=64, batch_size=2,
                                          input_context=tf.distribute.InputContext(2, pipeline_id))
    seen.append({doc for batch in take(dataset, 300)
                 for doc, epoch in zip(batch["document_index"], batch["epoch"]) if epoch == 0})
  assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_the_global_batch_does_not_depend_on_the_number_of_input_pipelines(stdlib_source):
  """Two hosts' batches side by side are the batches of one host running all the streams."""
  task = pipelines.Task("stdlib", stdlib_source, pipelines.ByteVocabulary())

  def batches(batch_size, context=None):
    return take(pipelines.load_text_dataset(task, "train", sequence_length=64,
                                            batch_size=batch_size, input_context=context), 40)

  halves = [batches(2, tf.distribute.InputContext(2, host)) for host in (0, 1)]
  for whole, first, second in zip(batches(4), *halves):
    for key in whole:
      assert (whole[key] == tf.concat([first[key], second[key]], axis=0).numpy()).all(), key


_MIRRORED = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import pipelines
    source = pipelines.PythonStdlibSource(include=tuple(sys.argv[1:]))
    task = pipelines.Task("stdlib", source, pipelines.ByteVocabulary())
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    dataset = strategy.distribute_datasets_from_function(
        lambda ctx: pipelines.load_text_dataset(task, "train", sequence_length=32, batch_size=2,
                                                input_context=ctx, document_names=True))
    steps = []
    for step, batch in zip(range(40), dataset):
      steps.append([{"doc": [d.decode() for d in r["document_id"].numpy()],
                     "start": r["start_of_sequence"].numpy().tolist(),
                     "targets": r["targets"].numpy().tolist()}
                    for r in strategy.experimental_local_results(batch)])
    print(json.dumps(steps))
""")


def test_mirrored_replicas_keep_their_streams(small_stdlib_modules):
  result = subprocess.run([sys.executable, "-c", _MIRRORED, *small_stdlib_modules],
                          capture_output=True, text=True, timeout=300, check=True)
  steps = json.loads(result.stdout.strip().splitlines()[-1])
  assert all(len(replicas) == 2 for replicas in steps)
  # The replicas' four slots are four streams: a slot only changes document at a start flag,
  # and the documents that run at once in different slots are different.
  for replica in range(2):
    for previous, current in zip(steps, steps[1:]):
      for slot in range(2):
        now, before = current[replica], previous[replica]
        if not now["start"][slot]:
          assert now["doc"][slot] == before["doc"][slot]
  for step in steps:
    running = [doc for replica in step for doc in replica["doc"]]
    assert len(set(running)) == 4
