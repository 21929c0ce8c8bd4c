"""The step profiler: HLO parsing, categories, the wall-clock sweep, trace reading, end to end."""

import json
import subprocess
import sys

import pytest
import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from meliad_tf.benchmarks import profiling
from meliad_tf.layers import scopes


HLO = """
HloModule example

%attention_softmax_Sum-reduction.7 (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%x, %y)
}

ENTRY %main (a: f32[4,8], b: f32[8,16]) -> f32[4] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,16]{1,0} parameter(1)
  %dot.3 = f32[4,16]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_type="MatMul" op_name="gradient_tape/layer_0/ffn_2/MatMul"}
  %copy.4 = f32[4,16]{0,1} copy(%dot.3)
  %zero = f32[] constant(0)
  ROOT %reduce.5 = f32[4]{0} reduce(%copy.4, %zero), dimensions={1}, to_apply=%attention_softmax_Sum-reduction.7
}
"""


def test_parse_hlo_reads_opcodes_shapes_op_names_and_matmul_flops():
  instructions = profiling.parse_hlo(HLO)
  dot = instructions["dot.3"]
  assert (dot.opcode, dot.shape, dot.op_name) == ("dot", "f32[4,16]",
                                                  "gradient_tape/layer_0/ffn_2/MatMul")
  assert dot.operands == ["a", "b"]
  assert dot.flops == 2 * 4 * 16 * 8
  assert instructions["reduce.5"].applies == "attention_softmax_Sum-reduction.7"
  assert instructions["copy.4"].op_name == ""


def test_instructions_without_an_op_name_take_their_operand_s_or_their_reduction_s():
  instructions = profiling.parse_hlo(HLO)
  assert profiling._op_name(instructions, "copy.4") == "gradient_tape/layer_0/ffn_2/MatMul"  # pylint: disable=protected-access
  instructions["copy.4"].operands = []
  assert profiling.category(profiling._op_name(instructions, "reduce.5")) == (  # pylint: disable=protected-access
      "attention/softmax", "forward")


@pytest.mark.parametrize("op_name,expected", [
    ("gradient_tape/layer_0/attention_3/softmax/Exp", ("attention/softmax", "backward")),
    ("ffn_2/dropout/mul", ("ffn/dropout", "forward")),
    ("layer_1/recurrence/cross_attention_4/scores/einsum", ("recurrence/cross_attention/scores",
                                                            "forward")),
    ("memory/memory_1/search/while/einsum", ("memory/search", "forward")),
    ("MatMul_7", ("other", "forward")),
])
def test_category_is_the_scope_path_without_unique_suffixes(op_name, expected):
  assert profiling.category(op_name) == expected


def test_scoped_names_ops_and_refuses_unknown_scopes():
  @scopes.scoped("ffn")
  def double(x):
    return x * 2.0

  graph = tf.function(double).get_concrete_function(tf.TensorSpec([2])).graph
  assert any(op.name.startswith("ffn/") for op in graph.get_operations())
  with pytest.raises(ValueError, match="unknown profile scope"):
    scopes.scoped("everything")


def test_concurrent_instructions_share_the_time_they_overlap():
  instructions = profiling.parse_hlo(HLO)
  instructions["call.9"] = profiling.HloInstruction("call.9", "call", "f32[4]", "", [], "")
  instructions["while.8"] = profiling.HloInstruction("while.8", "while", "f32[4]", "", [], "")
  executions = [("dot.3", 0, 10), ("copy.4", 5, 15), ("call.9", 0, 15), ("while.8", 0, 40),
                ("dot.3", 30, 40), ("mystery", 20, 24)]
  shares, counts, busy, unknown = profiling.attribute(executions, instructions)
  assert shares == {"dot.3": 17.5, "copy.4": 7.5}
  assert counts == {"dot.3": 2, "copy.4": 1}
  assert (busy, unknown) == (25, 4)


def _write_trace(directory, events):
  """An XSpace with one line per thread: events are (thread, name, start ps, duration ps)."""
  space = xplane_pb2.XSpace()
  plane = space.planes.add(name="/host:CPU")
  lines, ids = {}, {}
  for thread, name, start, duration in events:
    if name not in ids:
      ids[name] = len(ids) + 1
      plane.event_metadata[ids[name]].name = name
    if thread not in lines:
      lines[thread] = plane.lines.add(name=thread, timestamp_ns=0)
    lines[thread].events.add(metadata_id=ids[name], offset_ps=start, duration_ps=duration)
  path = directory / "plugins" / "profile" / "run"
  path.mkdir(parents=True)
  (path / "host.xplane.pb").write_bytes(space.SerializeToString())


def test_an_instruction_runs_until_its_completion_event_on_any_thread(tmp_path):
  _write_trace(tmp_path, [
      ("worker_0", "ThunkExecutor::Execute", 0, 100),
      ("worker_0", "ThunkExecutor::Execute", 45, 30),  # a loop body's own executor
      ("worker_0", "dot.3", 10, 5),        # handed to the pool, completes later elsewhere
      ("worker_1", "end: dot.3", 40, 2),
      ("worker_0", "copy.4", 50, 20),      # no completion event: its own duration
      ("worker_0", "dot.3", 80, 5),        # a second execution with its own completion
      ("worker_1", "end: dot.3", 90, 1),
      ("worker_0", "train_step", 0, 120),  # not inside an executor: not an instruction
  ])
  executions = sorted(profiling.read_trace(str(tmp_path)))
  assert executions == [("copy.4", 50, 70), ("dot.3", 10, 42), ("dot.3", 80, 91)]


@pytest.mark.slow
def test_profile_of_a_training_step_attributes_its_time_to_model_parts():
  result = subprocess.run(
      [sys.executable, "-m", "meliad_tools.bench_profile", "--gin_file=base_htrans.gin",
       "--gin_file=size/tiny_test.gin", "--steps=1", "--top=5"],
      capture_output=True, text=True, timeout=600, check=True)
  report = json.loads(result.stdout[result.stdout.index("{"):])
  assert report["unmatched_event_share"] < 0.05
  categories = {(row["category"], row["pass"]) for row in report["by_category"]}
  for expected in [("attention/scores", "forward"), ("attention/scores", "backward"),
                   ("ffn", "backward"), ("optimizer", "forward"), ("kvq", "forward")]:
    assert expected in categories
  total = sum(row["ms_per_step"] for row in report["by_category"])
  assert total == pytest.approx(report["instruction_ms_per_step"], rel=0.01)
  assert 0 < report["instruction_ms_per_step"] <= report["wall_ms_per_step"] * 1.01
  assert len(report["costliest"]) == 5 and report["matmul"]["gflops_per_second"] > 0
  assert "train step" in result.stderr  # the table


def test_profile_refuses_a_step_that_calls_the_host():
  files = ["base_htrans.gin", "size/tiny_test.gin", "options/external_memory_8k.gin",
           "options/memory_backend_scann.gin"]
  result = subprocess.run(
      [sys.executable, "-m", "meliad_tools.bench_profile", "--gin_param=NUM_LAYERS = 4"]
      + [f"--gin_file={name}" for name in files],
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode != 0
  assert "layer_0 search their memory on the host" in result.stderr
