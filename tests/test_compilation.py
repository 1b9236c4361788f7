"""What the commands set before JAX compiles (flax_detector.compilation)."""

import json
import os
import subprocess
import sys

import pytest

from flax_detector import compilation, host_allocator

_COMPILE_AND_COUNT_CACHE_HITS = """
import json
import jax
import jax.numpy as jnp
from flax_detector import compilation
compilation.keep_compiled_programs()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # this program compiles in milliseconds
hits = []
jax.monitoring.register_event_listener(
  lambda event, **kwargs: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None
)
value = float(jax.jit(lambda x: (jnp.sin(x) * 3).sum())(jnp.arange(10.0)))
print(json.dumps({"value": value, "cache_hits": len(hits)}))
"""


def _run_in_a_fresh_process(env: dict[str, str]) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", _COMPILE_AND_COUNT_CACHE_HITS], env=env, capture_output=True, text=True, check=True
  )


def _reported(done: subprocess.CompletedProcess) -> dict:
  return json.loads(done.stdout.strip().splitlines()[-1])


def _environment(tmp_path, **overrides: str) -> dict[str, str]:
  env = {key: value for key, value in os.environ.items() if key != "JAX_COMPILATION_CACHE_DIR"}
  return env | {"XDG_CACHE_HOME": str(tmp_path / "cache"), **overrides}


def test_a_second_process_reads_the_program_the_first_compiled(tmp_path):
  env = _environment(tmp_path)
  first, second = _reported(_run_in_a_fresh_process(env)), _reported(_run_in_a_fresh_process(env))
  assert first["cache_hits"] == 0 and second["cache_hits"] >= 1
  assert second["value"] == first["value"]
  assert any((tmp_path / "cache" / "flax_detector" / "jax").iterdir())


def test_an_empty_jax_compilation_cache_dir_turns_the_cache_off(tmp_path):
  env = _environment(tmp_path, JAX_COMPILATION_CACHE_DIR="")
  assert [_reported(_run_in_a_fresh_process(env))["cache_hits"] for _ in range(2)] == [0, 0]
  assert not (tmp_path / "cache").exists()


def test_an_unwritable_cache_folder_is_one_warning_and_no_cache(tmp_path):
  """Not a warning at every compilation that the cache cannot be read."""
  (tmp_path / "a_file").write_text("")
  env = _environment(tmp_path, XDG_CACHE_HOME=str(tmp_path / "a_file"))
  done = _run_in_a_fresh_process(env)
  assert _reported(done)["cache_hits"] == 0
  assert done.stderr.count("Compiled programs are not kept between runs: cannot create") == 1
  assert "persistent compilation cache" not in done.stderr


@pytest.mark.parametrize(
  ("xla_flags", "on_cpu", "expected"),
  [
    (
      "--xla_force_host_platform_device_count=8",
      True,
      "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=2",
    ),
    ("--xla_backend_optimization_level=3", True, "--xla_backend_optimization_level=3"),  # the user's level wins
    ("", False, ""),  # an accelerator's code keeps XLA's default
  ],
)
def test_cpu_code_is_generated_at_o2_unless_a_level_is_set(monkeypatch, xla_flags, on_cpu, expected):
  monkeypatch.setenv("XLA_FLAGS", xla_flags)
  monkeypatch.setattr(host_allocator, "jax_computes_on_cpu", lambda: on_cpu)
  assert compilation.generate_cpu_code_at_o2() == (expected != xla_flags)
  assert os.environ["XLA_FLAGS"] == expected


@pytest.mark.skipif(not host_allocator.jax_computes_on_cpu(), reason="JAX computes on an accelerator here")
def test_this_test_session_compiles_at_o2_as_the_commands_do():
  assert "--xla_backend_optimization_level=2" in os.environ["XLA_FLAGS"].split()
