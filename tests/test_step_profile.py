"""step_profile: a profiler trace of the real train step, summed per XLA op and named by the model code."""

from flax_detector import config_validation, onednn, step_profile, throughput, train

_HLO = """
%fused_computation.1 (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %add.1 = f32[4]{0} add(%param_0, %param_0), metadata={op_name="jit(train_step)/jvp(VGG16)/BatchNorm_2/add"}
}

%fused_computation.2 (param_0: f32[8,8,4,4], param_1: f32[8,8,4,4]) -> f32[4,3,3,4] {
  ROOT %convolution.7 = f32[4,3,3,4]{3,2,1,0} convolution(%param_0, %param_1), window={size=8x8 pad=1_1x1_1}
}

ENTRY %main.3 (p: f32[4]) -> f32[4] {
  %add_fusion.1 = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused_computation.1
  %ynn_fusion.2 = f32[4,3,3,4]{3,2,1,0} fusion(%p, %p), kind=kCustom, calls=%fused_computation.2
  ROOT %multiply.3 = f32[4]{0} multiply(%p, %p), metadata={op_name="jit(train_step)/mul"}
}
"""


def test_hlo_sources_name_fusions_by_their_inner_metadata_or_root():
  sources = step_profile.hlo_sources(_HLO)
  assert sources["add_fusion.1"] == "jit(train_step)/jvp(VGG16)/BatchNorm_2/add"
  assert sources["ynn_fusion.2"] == "convolution f32[4,3,3,4]"
  assert sources["multiply.3"] == "jit(train_step)/mul"


def test_model_part_tells_direction_and_layer():
  assert step_profile.model_part("jit(train_step)/jvp(VGG16)/BatchNorm_2/add") == "BatchNorm forward"
  assert step_profile.model_part("jit(train_step)/transpose(jvp(VGG16))/Conv_4/rev") == "Conv backward"
  assert step_profile.model_part("convolution f32[4,3,3,4]") == "Conv backward"
  assert step_profile.model_part("jit(train_step)/jvp(VGG16)/jit(relu)/max") == "activations and pooling forward"
  assert step_profile.model_part("jit(train_step)/mul") == "loss, optimizer and the rest"


def _launch(op, start, duration, module="jit_train_step", thread=1):
  args = {"hlo_module": module, "hlo_op": op}
  return {"ph": "X", "ts": start, "dur": duration, "name": op, "pid": 7, "tid": thread, "args": args}


def _completion(op, at):
  return {"ph": "X", "ts": at, "dur": 0.0, "name": f"end: {op}", "args": {}}


def test_an_op_is_in_flight_from_its_launch_to_its_end_event():
  events = [
    _launch("conv.1", 0.0, 0.1),  # launched, then runs on the thread pool until its end event
    _launch("add.2", 1.0, 2.0),
    _completion("add.2", 3.0),
    _completion("conv.1", 8.0),
    _launch("mul.3", 9.0, 1.0),  # no end event: its own event is its time
    _launch("conv.1", 20.0, 0.1, module="jit_other"),  # another program's op of the same name
  ]
  intervals = sorted(step_profile.in_flight_intervals(events, "train_step"))
  assert intervals == [(0.0, 8.0, "conv.1"), (1.0, 3.0, "add.2"), (9.0, 10.0, "mul.3")]


def _running(start, duration, thread):
  return {"ph": "X", "ts": start, "dur": duration, "name": onednn.RUNNING_EVENT, "pid": 7, "tid": thread}


def test_a_onednn_call_waiting_for_the_lock_is_in_flight_only_once_it_runs():
  events = [
    _launch("ffi_call.1", 0.0, 5.0, thread=1),  # holds the lock from the start
    _running(0.1, 4.8, thread=1),
    _launch("ffi_call.2", 0.5, 6.5, thread=2),  # waits for ffi_call.1, then runs 5-7
    _running(5.0, 2.0, thread=2),
    _launch("add.3", 5.5, 1.0, thread=1),  # no oneDNN call on its thread inside it
    _running(9.0, 1.0, thread=2),  # another call, after ffi_call.2's launch event
  ]
  intervals = sorted(step_profile.in_flight_intervals(events, "train_step"))
  assert intervals == [(0.1, 5.0, "ffi_call.1"), (5.0, 7.0, "ffi_call.2"), (5.5, 6.5, "add.3")]


def test_time_is_split_evenly_among_the_ops_in_flight():
  shares = step_profile.split_among_ops_in_flight([(0.0, 8.0, "conv.1"), (1.0, 3.0, "add.2"), (9.0, 10.0, "mul.3")])
  # conv alone 0-1 and 3-8, shared with add 1-3; nothing in flight 8-9.
  assert shares == {"conv.1": 1.0 + 1.0 + 5.0, "add.2": 1.0, "mul.3": 1.0}
  assert sum(shares.values()) == 9.0  # the time some op was in flight: 0-8 and 9-10


def test_profile_of_the_train_step_accounts_for_its_ops(make_config, tmp_path):
  experiment = train.build_experiment(config_validation.validate(make_config()))
  timer = throughput.TrainStepTimer.create(experiment, warmup=1)
  times = step_profile.profile_train_step(timer, steps=2, trace_dir=tmp_path)

  compiled_text = timer.compiled.as_text()
  assert times and all(f"%{entry.op} " in compiled_text for entry in times)
  assert abs(sum(entry.share for entry in times) - 1.0) < 1e-6
  assert times == sorted(times, key=lambda entry: -entry.seconds_per_step)
  parts = {entry.op for entry in step_profile.by_model_part(times)}
  assert {"Conv forward", "Conv backward", "BatchNorm forward", "BatchNorm backward"} <= parts
  top = step_profile.longest(times, 3)
  assert len(top) == 4 and top[-1].op == f"{len(times) - 3} other ops"
  assert abs(sum(entry.seconds_per_step for entry in top) - sum(entry.seconds_per_step for entry in times)) < 1e-9
