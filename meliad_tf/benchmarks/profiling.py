"""Where a compiled step spends its time: a TF profiler trace read against the step's HLO.

The model's code runs its parts under a fixed vocabulary of name scopes (`scoped`). XLA
keeps each TensorFlow op's name in the metadata of the HLO instructions made from it, and
with `--xla_cpu_enable_xprof_traceme` the CPU runtime records one trace event per executed
instruction. `profile_step` joins the two: the time of every instruction, grouped by the
scopes it came from (`attention/softmax`, `ffn`, `optimizer`, ...) and by forward or
backward pass (gradients carry the `gradient_tape/` prefix), with the achieved GFLOP/s of
every matrix product. On devices other than the CPU the trace names differ; the report then
says how little of the time it could attribute.

The trace flag must be in XLA_FLAGS before XLA first compiles (`enable_tracing`).

Hand-written because TensorBoard's profiler shows an XLA step as its executed instructions
(fusions, custom calls), not as the model's parts: the join with the HLO's op names is ours.
"""

import bisect
import collections
import math
import os
import re
import tempfile
import time

import tensorflow as tf

from meliad_tf.layers import scopes


TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
# Events of the runtime itself, not of an HLO instruction.
_RUNTIME_EVENTS = ("ThreadpoolListener", "ThunkExecutor")
_EXECUTOR = "ThunkExecutor::Execute"
_COMPLETION = "end: "
_CONTAINERS = ("call", "while", "conditional")


def enable_tracing():
  """Adds the CPU runtime's per-instruction trace events to XLA_FLAGS.

  XLA reads its flags once, at its first compilation in the process: call this before. A
  profile taken without them matches no instruction (`unmatched_event_share` 1.0).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if TRACE_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {TRACE_FLAG}".strip()


class HloInstruction:
  """What a profile needs of one instruction of an optimised HLO module."""

  __slots__ = ("name", "opcode", "shape", "op_name", "operands", "applies", "flops")

  def __init__(self, name, opcode, shape, op_name, operands, applies):
    self.name = name
    self.opcode = opcode
    self.shape = shape
    self.op_name = op_name
    self.operands = operands
    # The name of a reduction's computation, which XLA derives from the TF op's scopes (for
    # instructions without an op_name).
    self.applies = applies
    self.flops = 0


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_OPERAND = re.compile(r"%([\w.\-]+)")
_DIMS = re.compile(r"\[([0-9,]*)\]")
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([0-9,]*)\}")
_APPLIES = re.compile(r"to_apply=%([\w.\-]+)")
# A scope inside a name where XLA joined the scopes with "_" (reduction computations); the
# longer names first, so that "cross_attention" is not read as "attention".
_SCOPE_IN_NAME = re.compile(r"(?<![a-z])(%s)(?:_\d+)?(?![a-z])" % "|".join(
    sorted(scopes.SCOPES, key=len, reverse=True)))
_UNIQUE_SUFFIX = re.compile(r"_\d+$")


def _dims(shape):
  match = _DIMS.search(shape)
  if not match or not match.group(1):
    return []
  return [int(d) for d in match.group(1).split(",")]


def parse_hlo(text):
  """{instruction name: HloInstruction} over every computation of an HLO module's text.

  Matrix products get their FLOPs: 2 x the output size x the contracted size.
  """
  instructions = {}
  contracting = {}
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode, rest = match.groups()
    op_name = _OP_NAME.search(rest)
    applies = _APPLIES.search(rest)
    instructions[name] = HloInstruction(name, opcode, shape.split("{")[0],
                                        op_name.group(1) if op_name else "",
                                        _OPERAND.findall(rest.split(")", 1)[0]),
                                        applies.group(1) if applies else "")
    dims = _CONTRACTING.search(rest) if opcode == "dot" else None
    if dims:
      contracting[name] = [int(axis) for axis in dims.group(1).split(",") if axis]
  for name, axes in contracting.items():
    instruction = instructions[name]
    lhs = instructions.get(instruction.operands[0]) if instruction.operands else None
    if lhs is None:
      continue
    lhs_dims = _dims(lhs.shape)
    instruction.flops = 2 * math.prod(_dims(instruction.shape)) * math.prod(
        lhs_dims[axis] for axis in axes if axis < len(lhs_dims))
  return instructions


def category(op_name):
  """(scope path, pass) of a TensorFlow op name: ("attention/softmax", "backward").

  TensorFlow makes a scope entered again unique with a suffix ("attention_3"); it is dropped.
  """
  backward = op_name.startswith(scopes.BACKWARD_PREFIX)
  parts = [_UNIQUE_SUFFIX.sub("", part) for part in op_name.split("/")]
  found = []
  for part in parts:
    # A scoped function called from another of the same scope adds nothing.
    if part in scopes.SCOPES and (not found or found[-1] != part):
      found.append(part)
  return "/".join(found) or "other", "backward" if backward else "forward"


def _op_name(instructions, name, depth=3):
  """The TF op an instruction came from.

  For one that XLA made without an op name (a copy, a reduction split in two), that of its
  first operand that has one, else the scopes in its reduction computation's name.
  """
  instruction = instructions.get(name)
  first = instruction
  while instruction is not None and not instruction.op_name and depth:
    instruction = instructions.get(instruction.operands[0]) if instruction.operands else None
    depth -= 1
  if instruction is not None and instruction.op_name:
    return instruction.op_name
  if first is None or not first.applies:
    return ""
  prefix = scopes.BACKWARD_PREFIX if first.applies.startswith("gradient_tape") else ""
  return prefix + "/".join(m.group(1) for m in _SCOPE_IN_NAME.finditer(first.applies))


def read_trace(logdir):
  """The executed instructions in the newest profile under `logdir`.

  The CPU runtime marks each instruction's start with an event named after it and its
  completion with an "end: <name>" event, which for a matrix product handed to the thread
  pool may come later and on another thread; an instruction runs from its start to the end
  of its completion event (or of its own event where there is none).

  Returns:
    A list of (name, start picoseconds, end picoseconds), one per execution.
  """
  # pylint: disable-next=import-outside-toplevel
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  paths = sorted(tf.io.gfile.glob(os.path.join(logdir, "plugins", "profile", "*",
                                                "*.xplane.pb")))
  if not paths:
    raise FileNotFoundError(f"no profile was written under {logdir}")
  space = xplane_pb2.XSpace()
  with tf.io.gfile.GFile(paths[-1], "rb") as f:
    space.ParseFromString(f.read())
  starts, completions = collections.defaultdict(list), collections.defaultdict(list)
  for plane in space.planes:
    names = plane.event_metadata
    for line in plane.lines:
      # Instructions run inside the runtime's executor events; the rest of a thread's events
      # (the Python call, the input pipeline) are not the step's instructions.
      executing = _union([(e.offset_ps, e.offset_ps + e.duration_ps) for e in line.events
                          if names[e.metadata_id].name == _EXECUTOR])
      for event in line.events:
        name = names[event.metadata_id].name
        begin = line.timestamp_ns * 1000 + event.offset_ps
        if name.startswith(_COMPLETION):
          completions[name[len(_COMPLETION):]].append(begin + event.duration_ps)
        elif (not name.startswith(_RUNTIME_EVENTS)
              and _within(executing, event.offset_ps, event.offset_ps + event.duration_ps)):
          starts[name].append((begin, begin + event.duration_ps))
  executions = []
  for name, runs in starts.items():
    runs.sort()
    ends = sorted(completions.get(name, ()))
    next_end = 0
    for begin, own_end in runs:
      while next_end < len(ends) and ends[next_end] < begin:
        next_end += 1
      end = own_end
      if next_end < len(ends):
        end = max(end, ends[next_end])
        next_end += 1
      executions.append((name, begin, end))
  return executions


def _union(intervals):
  """Sorted, non-overlapping intervals covering the same time as `intervals` (executors
  nest: a loop's body runs in an executor of its own)."""
  merged = []
  for begin, end in sorted(intervals):
    if merged and begin <= merged[-1][1]:
      merged[-1] = (merged[-1][0], max(merged[-1][1], end))
    else:
      merged.append((begin, end))
  return merged


def _within(intervals, begin, end):
  """Whether [begin, end] lies inside one of the sorted, non-overlapping `intervals`."""
  i = bisect.bisect_right(intervals, (begin, float("inf"))) - 1
  return i >= 0 and intervals[i][0] <= begin and end <= intervals[i][1]


def attribute(executions, instructions):
  """Wall-clock picoseconds per instruction: each moment is shared equally by the
  instructions running then, so the shares add up to the time anything ran.

  Instructions that only run others (the calls that hand an instruction's parts to
  threads, loops, conditionals) are skipped, since what they run is timed itself.

  Returns:
    (Counter {name: picoseconds}, Counter {name: executions}, busy picoseconds, picoseconds
    of unknown events).
  """
  edges = []
  counts = collections.Counter()
  unknown = 0
  for name, begin, end in executions:
    instruction = instructions.get(name)
    if instruction is None:
      unknown += end - begin
    elif instruction.opcode not in _CONTAINERS:
      edges.append((begin, 1, name))
      edges.append((end, -1, name))
      counts[name] += 1
  edges.sort(key=lambda edge: (edge[0], edge[1]))
  shares = collections.Counter()
  running = collections.Counter()
  busy = 0
  previous = None
  for time_ps, change, name in edges:
    if previous is not None and running and time_ps > previous:
      width = (time_ps - previous) / sum(running.values())
      for active, count in running.items():
        shares[active] += width * count
      busy += time_ps - previous
    running[name] += change
    if not running[name]:
      del running[name]
    previous = time_ps
  return shares, counts, busy, unknown


def summarize(executions, instructions, wall_seconds, steps, top=15):
  """A profile from the executed instructions and the HLO they came from.

  Args:
    executions: from `read_trace`.
    instructions: from `parse_hlo`.
    wall_seconds: wall-clock time of the traced steps.
    steps: how many steps were traced (times are per step).
    top: how many of the costliest instructions to list.
  Returns:
    A JSON-ready dict: per category (scope path and pass) the wall-clock milliseconds per
    step and the share of the time any instruction ran; the same per pass; the time no
    instruction ran (the runtime between instructions, the host); the costliest
    instructions with their TF op, shape and, for matrix products, GFLOP/s; the matrix
    products' total; and the share of trace events that matched no instruction.
  """
  shares, counts, busy, unknown = attribute(executions, instructions)
  to_seconds = 1e-12
  by_category = collections.Counter()
  by_pass = collections.Counter()
  dot_seconds = dot_flops = 0.0
  for name, picoseconds in shares.items():
    scope, direction = category(_op_name(instructions, name))
    by_category[(scope, direction)] += picoseconds * to_seconds
    by_pass[direction] += picoseconds * to_seconds
    instruction = instructions[name]
    if instruction.opcode == "dot":
      dot_seconds += picoseconds * to_seconds
      dot_flops += instruction.flops * counts[name]  # a loop's body runs several times
  total = busy * to_seconds
  per_step = lambda seconds: round(seconds / steps * 1e3, 2)
  share = lambda seconds: round(seconds / total, 4) if total else 0.0
  costliest = []
  for name, picoseconds in shares.most_common(top):
    instruction = instructions[name]
    seconds = picoseconds * to_seconds
    row = {"instruction": name, "opcode": instruction.opcode, "shape": instruction.shape,
           "op_name": _op_name(instructions, name), "ms_per_step": per_step(seconds)}
    if instruction.opcode == "dot" and seconds:
      row["gflops_per_second"] = round(instruction.flops * counts[name] / seconds / 1e9, 1)
    costliest.append(row)
  return {
      "wall_ms_per_step": round(wall_seconds / steps * 1e3, 1),
      "instruction_ms_per_step": per_step(total),
      "idle_ms_per_step": per_step(max(wall_seconds - total, 0.0)),
      "unmatched_event_share": round(unknown / (unknown + busy), 4) if busy else 1.0,
      "by_pass": {direction: {"ms_per_step": per_step(seconds), "share": share(seconds)}
                  for direction, seconds in by_pass.most_common()},
      "by_category": [{"category": scope, "pass": direction, "ms_per_step": per_step(seconds),
                       "share": share(seconds)}
                      for (scope, direction), seconds in by_category.most_common()],
      "matmul": {"ms_per_step": per_step(dot_seconds), "share": share(dot_seconds),
                 "gflops_per_second": round(dot_flops / dot_seconds / 1e9, 1)
                                      if dot_seconds else 0.0},
      "costliest": costliest,
  }


def profile_step(step_fn, compiled_fn, args, steps=2, logdir=None, top=15):
  """Traces `steps` calls of `step_fn` and attributes their time to `compiled_fn`'s HLO.

  Args:
    step_fn: a callable that runs one step and waits for it (called once untraced first).
    compiled_fn: the `tf.function(jit_compile=True)` the step runs.
    args: the arguments `compiled_fn` is called with (for its optimised HLO).
    steps: traced steps.
    logdir: where the trace goes (a temporary directory when None); it can be opened in
      TensorBoard's profile plugin.
    top: costliest instructions to list.
  Returns:
    The `summarize` dict, with "trace_dir".
  """
  hlo = compiled_fn.experimental_get_compiler_ir(*args)(stage="optimized_hlo")
  instructions = parse_hlo(hlo)
  step_fn()
  logdir = logdir or tempfile.mkdtemp(prefix="meliad_profile_")
  tf.profiler.experimental.start(logdir)
  start = time.perf_counter()
  try:
    for _ in range(steps):
      step_fn()
  finally:
    wall = time.perf_counter() - start
    tf.profiler.experimental.stop()
  result = summarize(read_trace(logdir), instructions, wall, steps, top=top)
  result["trace_dir"] = logdir
  return result
