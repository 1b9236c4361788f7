"""Where does the train step's time go, operation by operation? A jax.profiler trace, summed per XLA op.

Issue 10 asks where the step's time goes before any change to it: BatchNorm statistics passes, layout
transposes, the classifier's matmuls, the optimizer update. The profiler records every executed XLA
operation (a CPU thunk, a GPU kernel) with the compiled module and HLO instruction it came from; this
module sums those durations per instruction over a few steps and names each one with the model line it
was lowered from (the `op_name` XLA keeps in the instruction's metadata), so a table of the top entries
says "BatchNorm_3 backward, 12%" instead of a kernel name. The raw trace stays in the directory given,
for TensorBoard's profile plugin or Perfetto.

On CPU an op's own trace event is not its duration. XLA:CPU launches some ops and returns at once: its
own (Eigen) convolutions, which take every convolution YNNPACK does not (those with at most 16 feature
channels: the `cpu` preset's first four layers), and loops split over its thread pool. Their events last
microseconds while the work goes on for milliseconds; the thunk executor marks the moment each op
completes with an `end: <op>` event. So on CPU an op is in flight from its launch to that event, and
every moment of the trace is split evenly among the ops in flight then: ops that run at once on XLA's
threads share the time, and the ops' times add up to the steps' wall time. Where a trace has no `end:`
events (GPU kernels are timed as they run), each event's own duration is the op's time. A oneDNN custom
call first waits for the lock that runs one primitive at a time (flax_detector.onednn): it is in flight
only from the event it records once it holds the lock, so a call waiting takes no share of the one running.
"""

import bisect
import collections
import dataclasses
import gzip
import json
import pathlib
import re
from typing import Any

import jax

from flax_detector.onednn import RUNNING_EVENT

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(?P<name>[\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(?P<op>[\w.\-]+) = ")
_OP_NAME = re.compile(r"metadata=\{op_name=\"(?P<source>[^\"]*)\"")
_ROOT = re.compile(r"^\s*ROOT %[\w.\-]+ = (?P<shape>\S+) (?P<opcode>[\w\-]+)\(")
_CALLS = re.compile(r"calls=%(?P<computation>[\w.\-]+)")
_COMPLETION = "end: "  # XLA:CPU's thunk executor: the event "end: <op>" marks the moment <op> completed


@dataclasses.dataclass(frozen=True)
class OpTime:
  """One XLA instruction's measured time per step, and the model code it was lowered from."""

  op: str
  seconds_per_step: float
  share: float
  source: str


def hlo_sources(compiled_text: str) -> dict[str, str]:
  """HLO instruction name -> the op_name metadata JAX attached (e.g. jit(train_step)/jvp(VGG16)/Conv_0/...).

  A fusion without metadata of its own takes the first op_name inside the computation it calls, or failing
  that its root's opcode and shape (XLA keeps no metadata on the convolutions of weight gradients).
  """
  own: dict[str, str] = {}
  calls: dict[str, str] = {}
  first_in_computation: dict[str, str] = {}
  root_description: dict[str, str] = {}
  computation = ""
  for line in compiled_text.splitlines():
    if header := _COMPUTATION.match(line):
      computation = header["name"]
    elif instruction := _INSTRUCTION.match(line):
      if root := _ROOT.match(line):
        root_description.setdefault(computation, f"{root['opcode']} {root['shape'].split('{')[0]}")
      if op_name := _OP_NAME.search(line):
        own[instruction["op"]] = op_name["source"]
        first_in_computation.setdefault(computation, op_name["source"])
      if called := _CALLS.search(line):
        calls[instruction["op"]] = called["computation"]
  fused = {
    op: first_in_computation.get(computation) or root_description.get(computation, "")
    for op, computation in calls.items()
  }
  return fused | own


def _trace_events(trace_dir: pathlib.Path) -> list[dict[str, Any]]:
  paths = sorted(trace_dir.glob("**/*.trace.json.gz"), key=lambda path: path.stat().st_mtime)
  if not paths:
    raise FileNotFoundError(f"jax.profiler wrote no *.trace.json.gz under {trace_dir}")
  with gzip.open(paths[-1]) as file:
    trace = json.load(file)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def _running_starts(events: list[dict[str, Any]]) -> dict[Any, list[float]]:
  """(pid, tid) -> the sorted start times of the oneDNN calls' RUNNING_EVENTs on that thread."""
  starts: dict[Any, list[float]] = collections.defaultdict(list)
  for event in events:
    if event.get("ph") == "X" and event.get("name") == RUNNING_EVENT:
      starts[(event.get("pid"), event.get("tid"))].append(float(event.get("ts", 0.0)))
  return {thread: sorted(times) for thread, times in starts.items()}


def in_flight_intervals(events: list[dict[str, Any]], module: str) -> list[tuple[float, float, str]]:
  """(start, end, op) in microseconds for each execution of an instruction of `module`: launch to `end: op`.

  An execution without an `end:` event of its own (none in the trace, or fewer than its launches) ends
  with its launch event. A launch that contains a oneDNN call's RUNNING_EVENT on its thread starts there.
  """
  running = _running_starts(events)
  launches: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
  completions: dict[str, list[float]] = collections.defaultdict(list)
  for event in events:
    if event.get("ph") != "X":
      continue
    args, start = event.get("args") or {}, float(event.get("ts", 0.0))
    if module in str(args.get("hlo_module", "")) and args.get("hlo_op"):
      end = start + float(event.get("dur", 0.0))
      starts = running.get((event.get("pid"), event.get("tid")), [])
      first = bisect.bisect_left(starts, start)
      if first < len(starts) and starts[first] <= end:
        start = starts[first]
      launches[args["hlo_op"]].append((start, end))
    elif str(event.get("name", "")).startswith(_COMPLETION):
      completions[event["name"].removeprefix(_COMPLETION)].append(start + float(event.get("dur", 0.0)))
  intervals = []
  for op, runs in launches.items():
    runs.sort()
    ends = sorted(completions.get(op, []))
    complete = len(ends) == len(runs) and all(start <= end for (start, _), end in zip(runs, ends, strict=True))
    intervals += [(start, ends[i] if complete else own_end, op) for i, (start, own_end) in enumerate(runs)]
  return intervals


def split_among_ops_in_flight(intervals: list[tuple[float, float, str]]) -> collections.Counter[str]:
  """Microseconds per op when every moment is shared evenly among the ops in flight at that moment."""
  boundaries = sorted({time for start, end, _ in intervals for time in (start, end)})
  starting: dict[float, list[str]] = collections.defaultdict(list)
  ending: dict[float, list[str]] = collections.defaultdict(list)
  for start, end, op in intervals:
    if end > start:
      starting[start].append(op)
      ending[end].append(op)
  shares: collections.Counter[str] = collections.Counter()
  in_flight: collections.Counter[str] = collections.Counter()  # op -> executions in flight, none kept at 0
  for time, following in zip(boundaries, boundaries[1:], strict=False):
    in_flight.update(starting[time])
    for op in ending[time]:
      in_flight[op] -= 1
      if not in_flight[op]:
        del in_flight[op]
    count = in_flight.total()
    for op, running in in_flight.items():
      shares[op] += (following - time) * running / count
  return shares


def op_times(events: list[dict[str, Any]], module: str, steps: int, sources: dict[str, str]) -> list[OpTime]:
  """Time per step of each instruction of the compiled `module` in the trace, longest first (module docstring)."""
  totals = split_among_ops_in_flight(in_flight_intervals(events, module))
  overall = sum(totals.values()) or 1.0
  return [
    OpTime(op, micros * 1e-6 / steps, micros / overall, sources.get(op, "")) for op, micros in totals.most_common()
  ]


def profile_train_step(timer: Any, steps: int, trace_dir: pathlib.Path) -> list[OpTime]:
  """Runs `steps` of a throughput.TrainStepTimer under the profiler and returns its ops' times, longest first."""
  with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
    timer.run(steps)
  sources = hlo_sources(timer.compiled.as_text())
  return op_times(_trace_events(trace_dir), "train_step", steps, sources)


def model_part(source: str) -> str:
  """The part of the step an op belongs to, from its source: "BatchNorm backward", "Conv forward", "optimizer"..."""
  if not source.startswith("jit("):
    # Only weight-gradient convolutions lose their metadata; other fallbacks are copies between layouts.
    return "Conv backward" if source.startswith("convolution") else "layout copies"
  if "VGG16" not in source:
    return "loss, optimizer and the rest"
  direction = "backward" if "transpose(" in source else "forward"
  layer = re.search(r"VGG16\)\)?/(?P<layer>[A-Za-z]+)_\d+", source)
  return f"{layer['layer'] if layer else 'activations and pooling'} {direction}"


def by_model_part(times: list[OpTime]) -> list[OpTime]:
  """The ops' times summed per model_part, longest first."""
  seconds: collections.Counter[str] = collections.Counter()
  shares: collections.Counter[str] = collections.Counter()
  for entry in times:
    seconds[model_part(entry.source)] += entry.seconds_per_step
    shares[model_part(entry.source)] += entry.share
  return [OpTime(part, total, shares[part], "") for part, total in seconds.most_common()]


def longest(times: list[OpTime], top: int) -> list[OpTime]:
  """The `top` longest ops, then one entry for what the others add up to."""
  rest = times[top:]
  if not rest:
    return times
  other = OpTime(
    f"{len(rest)} other ops", sum(t.seconds_per_step for t in rest), sum(t.share for t in rest), "rest of the step"
  )
  return [*times[:top], other]


def table(times: list[OpTime]) -> list[str]:
  """Aligned lines: time per step, share of the step's op time, op, and the model code it came from."""
  lines = [f"{'ms/step':>9} {'share':>6}  op  (model source)"]
  for entry in times:
    source = re.sub(r"^jit\(train_step\)/", "", entry.source)
    lines.append(
      f"{entry.seconds_per_step * 1e3:9.2f} {entry.share:6.1%}  {entry.op}" + (f"  ({source})" if source else "")
    )
  return lines
