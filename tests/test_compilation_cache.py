"""The CLIs keep compiled programs on disk between runs (flax_detector.compilation_cache)."""

import json
import os
import subprocess
import sys

_COMPILE_AND_COUNT_CACHE_HITS = """
import json
import jax
import jax.numpy as jnp
from flax_detector import compilation_cache
compilation_cache.keep_compiled_programs()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # this program compiles in milliseconds
hits = []
jax.monitoring.register_event_listener(
  lambda event, **kwargs: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None
)
value = float(jax.jit(lambda x: (jnp.sin(x) * 3).sum())(jnp.arange(10.0)))
print(json.dumps({"value": value, "cache_hits": len(hits)}))
"""


def _run_in_a_fresh_process(env: dict[str, str]) -> dict:
  done = subprocess.run(
    [sys.executable, "-c", _COMPILE_AND_COUNT_CACHE_HITS], env=env, capture_output=True, text=True, check=True
  )
  return json.loads(done.stdout.strip().splitlines()[-1])


def _environment(tmp_path, **overrides: str) -> dict[str, str]:
  env = {key: value for key, value in os.environ.items() if key != "JAX_COMPILATION_CACHE_DIR"}
  return env | {"XDG_CACHE_HOME": str(tmp_path / "cache"), **overrides}


def test_a_second_process_reads_the_program_the_first_compiled(tmp_path):
  env = _environment(tmp_path)
  first, second = _run_in_a_fresh_process(env), _run_in_a_fresh_process(env)
  assert first["cache_hits"] == 0 and second["cache_hits"] >= 1
  assert second["value"] == first["value"]
  assert any((tmp_path / "cache" / "flax_detector" / "jax").iterdir())


def test_an_empty_jax_compilation_cache_dir_turns_the_cache_off(tmp_path):
  env = _environment(tmp_path, JAX_COMPILATION_CACHE_DIR="")
  assert [_run_in_a_fresh_process(env)["cache_hits"] for _ in range(2)] == [0, 0]
  assert not (tmp_path / "cache").exists()
