"""Runs `python -m flax_detector.main` as a job of several local processes, as a cluster would."""

import os
import socket
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
from conftest import tiny_config
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def config_flags(**overrides) -> list[str]:
  """--config.* flags that turn configs/vgg16.py:cpu into tests' tiny_config(**overrides)."""
  tiny, preset = tiny_config(**overrides).to_dict(), tiny_config.__globals__["get_config"]("cpu").to_dict()
  flags = ["--config=configs/vgg16.py:cpu"]

  def walk(new, old, prefix):
    for key, value in new.items():
      if isinstance(value, dict):
        walk(value, old[key], f"{prefix}{key}.")
      elif value != old[key]:
        flags.append(f"--config.{prefix}{key}={','.join(map(str, value)) if isinstance(value, tuple) else value}")

  walk(tiny, preset, "")
  return flags


def start_job(workdir, num_processes: int, devices_per_process: int, flags: Sequence[str]) -> list[subprocess.Popen]:
  """Starts the processes of one job; process i logs to workdir/process_i.log."""
  os.makedirs(workdir, exist_ok=True)
  env = dict(
    os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}", TF_CPP_MIN_LOG_LEVEL="2"
  )
  if num_processes > 1:
    # JAX writes its compilation cache (conftest's) from process 0 only: process 0 would load its programs
    # while the others compile theirs, and wait for them at the first step past Gloo's 30 s connect timeout.
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  distributed = []
  port = free_port()
  processes = []
  for index in range(num_processes):
    if num_processes > 1:
      distributed = [
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={num_processes}",
        f"--process_id={index}",
      ]
    log = open(os.path.join(workdir, f"process_{index}.log"), "w")  # pylint: disable=consider-using-with
    processes.append(
      subprocess.Popen(
        [sys.executable, "-m", "flax_detector.main", f"--workdir={workdir}", *flags, *distributed],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
      )
    )
  return processes


def wait_job(processes: list[subprocess.Popen], workdir, timeout: float = 300) -> None:
  codes = [process.wait(timeout=timeout) for process in processes]
  if any(codes):
    logs = "\n".join(open(os.path.join(workdir, f"process_{i}.log")).read()[-3000:] for i in range(len(codes)))
    raise AssertionError(f"exit codes {codes}; log tails:\n{logs}")


def run_job(workdir, num_processes: int, devices_per_process: int, flags: Sequence[str]) -> None:
  wait_job(start_job(workdir, num_processes, devices_per_process, flags), workdir)


def read_scalars(workdir) -> dict[str, dict[int, float]]:
  """Every scalar CLU wrote to the TensorBoard event files in workdir: {name: {step: value}}."""
  accumulator = event_accumulator.EventAccumulator(str(workdir), size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  scalars: dict[str, dict[int, float]] = {}
  for tag in accumulator.Tags()["tensors"]:
    for event in accumulator.Tensors(tag):
      value = tensor_util.make_ndarray(event.tensor_proto)
      if value.ndim == 0 and value.dtype.kind == "f":
        scalars.setdefault(tag, {})[event.step] = float(value)
  return scalars


def series(workdir, name: str) -> np.ndarray:
  values = read_scalars(workdir)[name]
  return np.array([values[step] for step in sorted(values)])
