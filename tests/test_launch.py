"""The launch/ scripts: dry runs print the right commands; the real paths run against stand-ins.

No gcloud, SLURM or network: the dry runs find poisoned `gcloud`, `srun`, `scontrol` and `sbatch`
first on PATH (any call fails the test), and the real-mode tests put small fakes there instead
(a gcloud that simulates a TPU and its preemption, an srun that waits for SIGTERM, a python that
records its arguments), so the retry, requeue and signal logic runs for real in a few seconds.
"""

import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flax_detector import workdir

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU_VM = LAUNCH / "tpu_vm.py"
SLURM = LAUNCH / "slurm.sbatch"
LOCAL = LAUNCH / "local_multiprocess.sh"
COMMON = LAUNCH / "common.sh"  # sourced by slurm.sbatch and local_multiprocess.sh, not run
SHELL_SCRIPTS = [SLURM, LOCAL]
# Not a launcher, but a shell script CI should lint all the same: the prepared run for a lent GPU machine.
GPU_SESSION = ROOT / "benchmarks" / "gpu_session.sh"
SCRIPTS = [TPU_VM, *SHELL_SCRIPTS]
GCLOUD_TPU_VM = ("gcloud", "compute", "tpus", "tpu-vm")
GCLOUD_QUEUED = ("gcloud", "compute", "tpus", "queued-resources")

POISON = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$POISON_LOG"
echo "a dry run must not call $(basename "$0")" >&2
exit 99
"""


@pytest.fixture
def sandbox(tmp_path):
  """A clean environment whose PATH starts with poisoned cluster tools; returns (env, bin, tmp)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("gcloud", "srun", "scontrol", "sbatch"):
    _write_executable(bin_dir / tool, POISON)
  env = {
    "PATH": f"{bin_dir}:{os.environ['PATH']}",
    "HOME": str(tmp_path),
    "USER": "tester",
    "POISON_LOG": str(tmp_path / "poison.log"),
    "LC_ALL": "C",
  }
  yield env, bin_dir, tmp_path
  assert not (tmp_path / "poison.log").exists(), (tmp_path / "poison.log").read_text()


def _write_executable(path: Path, text: str) -> None:
  path.write_text(text)
  path.chmod(0o755)


def _run(script: Path, *args: str, env: dict[str, str], cwd: Path = ROOT, timeout: float = 20):
  """Runs the script as a user does, through its #! line (bash, or python3 for tpu_vm.py)."""
  return subprocess.run(
    [str(script), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
  )


def _start(script: Path, *args: str, env: dict[str, str]) -> subprocess.Popen:
  """_run in the background, for the tests that signal the script."""
  return subprocess.Popen(
    [str(script), *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def _dry_run(script: Path, *args: str, env: dict[str, str], cwd: Path = ROOT):
  """Runs a dry run that must succeed; returns (result, its "+ cmd" lines split)."""
  result = _run(script, *args, env=env, cwd=cwd)
  assert result.returncode == 0, result.stderr
  return result, _commands(result.stdout)


def _commands(stdout: str) -> list[list[str]]:
  """The "+ cmd" lines of a dry run, each split as the shell would (so they must be well quoted)."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _find(commands: list[list[str]], *prefix: str) -> list[int]:
  return [i for i, cmd in enumerate(commands) if cmd[: len(prefix)] == list(prefix)]


def _option(cmd: list[str], name: str) -> str:
  values = [word.split("=", 1)[1] for word in cmd if word.startswith(name + "=")]
  assert len(values) == 1, (name, cmd)
  return values[0]


# ------------------------------------------------------------------------------------------------
# All scripts


@pytest.mark.parametrize("script", [*SCRIPTS, COMMON], ids=lambda p: p.name)
def test_scripts_are_executable_and_parse(script):
  assert os.access(script, os.X_OK) == (script != COMMON)
  if script.suffix == ".py":
    compile(script.read_text(), str(script), "exec")
  else:
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_is_clean():
  # -x: follow the scripts into the common.sh they source.
  result = subprocess.run(
    ["shellcheck", "-x", *map(str, [*SHELL_SCRIPTS, COMMON, GPU_SESSION])], capture_output=True, text=True, check=False
  )
  assert result.returncode == 0, result.stdout


def test_common_helpers(tmp_path):
  script = f"""SCRIPT_NAME=x.sh; source {shlex.quote(str(COMMON))}
quote_cmd plain 'two words' "it's" --a=b; echo
option_value --opt --opt=v=w; echo "$OPT_VALUE $OPT_SHIFT"
option_value --opt --opt value --next; echo "$OPT_VALUE $OPT_SHIFT"
is_true yes && ! is_true 0 && ! is_true '' && echo bools
option_value --opt --opt --dry-run"""
  result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False)
  lines = result.stdout.splitlines()
  assert shlex.split(lines[0]) == ["plain", "two words", "it's", "--a=b"] and lines[0].startswith("plain ")
  assert lines[1:] == ["v=w 1", "value 2", "bools"]
  assert result.returncode == 2
  assert result.stderr.startswith("[x.sh] error: --opt needs a value") and "see launch/x.sh --help" in result.stderr


def test_common_is_url_agrees_with_workdir_is_url():
  paths = ["gs://bucket/run", "s3://b/k", "runs/x", "/abs/path", "file:///tmp/x", "weird:name", "", "a//b"]
  script = (
    f"source {shlex.quote(str(COMMON))}; for p in "
    + " ".join(map(shlex.quote, paths))
    + '; do is_url "$p" && echo 1 || echo 0; done'
  )
  result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
  assert result.stdout.split() == [str(int(workdir.is_url(path))) for path in paths]


def test_tpu_vm_py_takes_the_same_true_words_as_common_sh():
  spec = importlib.util.spec_from_file_location("tpu_vm", TPU_VM)
  tpu_vm = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tpu_vm)
  [words] = re.findall(r"is_true\(\) \{ case \"\$\{1:-0\}\" in ([^)]+)\)", COMMON.read_text())
  assert set(words.split("|")) == set(tpu_vm.TRUE_WORDS)


@pytest.mark.parametrize("script", [TPU_VM, LOCAL], ids=lambda p: p.name)
def test_help_documents_every_option_the_script_parses(sandbox, script):
  """--help is the one place options are documented: it must name every option the parser accepts."""
  env, _, _ = sandbox
  result = _run(script, "--help", env=env)
  assert result.returncode == 0, result.stderr
  if script.suffix == ".py":
    parsed = set(re.findall(r'parser, "(--[a-z-]+)"', script.read_text()))
    parsed |= set(re.findall(r'add_argument\("(--[a-z-]+)"', script.read_text()))
  else:
    parse_args = script.read_text().split("parse_args() {", 1)[1].split("\n}\n", 1)[0]
    parsed = set(re.findall(r"(?:^|\|)\s*(--?[a-z][a-z-]*)(?=[|)=])", parse_args, re.MULTILINE))
  assert len(parsed) >= 8
  assert not {option for option in parsed if option not in result.stdout}


# ------------------------------------------------------------------------------------------------
# tpu_vm.py, dry run

TPU_ARGS = ("--zone=us-west4-a", "--workdir=gs://bucket/runs/vgg16", "--name=my-tpu", "--dry-run")


def test_tpu_dry_run_creates_copies_installs_trains_and_deletes(sandbox):
  env, _, _ = sandbox
  _, commands = _dry_run(
    TPU_VM, *TPU_ARGS, "--", "--config.data.dir=gs://bucket/data", "--config.note=two words", env=env
  )

  [create] = _find(commands, *GCLOUD_TPU_VM, "create")
  assert commands[create][5] == "my-tpu"
  assert "--zone=us-west4-a" in commands[create]
  assert _option(commands[create], "--accelerator-type") == "v5litepod-16"
  assert _option(commands[create], "--version") == "v2-alpha-tpuv5-lite"
  assert not _find(commands, *GCLOUD_QUEUED)

  # `git archive HEAD` in a checkout, else a tar of the folder.
  [archive] = _find(commands, "git", "-C", str(ROOT), "archive") or _find(commands, "tar", "-czf")
  if commands[archive][0] == "git":
    assert commands[archive][-1] == "HEAD"
    tarball = _option(commands[archive], "--output")
  else:
    tarball = commands[archive][2]
  [scp] = _find(commands, *GCLOUD_TPU_VM, "scp")
  assert commands[scp][5:7] == [tarball, "my-tpu:flax_detector.tar.gz"]
  assert "--worker=all" in commands[scp]

  install, train = _find(commands, *GCLOUD_TPU_VM, "ssh")
  for i in (install, train):
    assert commands[i][5] == "my-tpu" and "--worker=all" in commands[i] and "--zone=us-west4-a" in commands[i]
  install_script = _option(commands[install], "--command")
  assert "pip install" in install_script and "-e ~/flax_detector" in install_script
  assert '"jax[tpu]"' in install_script

  # The remote command itself must survive the worker's shell: split it a second time.
  remote = shlex.split(_option(commands[train], "--command"))
  main = remote.index("-m")
  assert remote[main : main + 2] == ["-m", "flax_detector.main"]
  assert remote[main + 2 :] == [
    "--config=configs/vgg16.py",
    "--workdir=gs://bucket/runs/vgg16",
    "--config.data.dir=gs://bucket/data",
    "--config.note=two words",
  ]
  assert not any(word.startswith(("--coordinator_address", "--process_id")) for word in remote)

  [delete] = _find(commands, *GCLOUD_TPU_VM, "delete")
  assert commands[delete][5] == "my-tpu" and "--quiet" in commands[delete]
  assert archive < create < scp < install < train < delete


def test_tpu_dry_run_keep_does_not_delete(sandbox):
  env, _, _ = sandbox
  result, commands = _dry_run(TPU_VM, *TPU_ARGS, "--keep", env=env)
  assert _find(commands, *GCLOUD_TPU_VM, "create")
  assert not [cmd for cmd in commands if "delete" in cmd]
  assert "left running" in result.stderr


def test_tpu_dry_run_queued_resource(sandbox):
  env, _, _ = sandbox
  _, commands = _dry_run(
    TPU_VM, *TPU_ARGS, "--queued", "--spot", "--project=my-project", "--accelerator-type=v4-32", env=env
  )
  [create] = _find(commands, *GCLOUD_QUEUED, "create")
  assert commands[create][5] == "my-tpu"
  assert _option(commands[create], "--node-id") == "my-tpu"
  assert _option(commands[create], "--runtime-version") == "tpu-ubuntu2204-base"
  assert "--spot" in commands[create]
  assert not _find(commands, *GCLOUD_TPU_VM, "create")
  # It waits on the queued resource's state, then runs on the node it made.
  assert _find(commands, *GCLOUD_QUEUED, "describe")
  assert all("--project=my-project" in cmd for cmd in commands if cmd[0] == "gcloud")
  [delete] = _find(commands, *GCLOUD_QUEUED, "delete")
  assert "--force" in commands[delete]


def test_tpu_options_from_environment(sandbox):
  env, _, _ = sandbox
  env = {
    **env,
    "TPU_ZONE": "europe-west4-a",
    "WORKDIR": "gs://b/w",
    "TPU_NAME": "env-tpu",
    "DRY_RUN": "1",
    "TPU_ACCELERATOR_TYPE": "v6e-16",
    "TPU_PREEMPTIBLE": "1",
    "CONFIG": "configs/vgg16.py:cpu",
  }
  _, commands = _dry_run(TPU_VM, env=env)
  [create] = _find(commands, *GCLOUD_TPU_VM, "create")
  assert commands[create][5] == "env-tpu" and "--zone=europe-west4-a" in commands[create]
  assert _option(commands[create], "--version") == "v2-alpha-tpuv6e" and "--preemptible" in commands[create]
  train = _find(commands, *GCLOUD_TPU_VM, "ssh")[-1]
  assert "--config=configs/vgg16.py:cpu --workdir=gs://b/w" in _option(commands[train], "--command")


@pytest.mark.parametrize(
  "script, args, message",
  [
    (TPU_VM, ("--workdir=gs://b/w",), "--zone is required"),
    (TPU_VM, ("--zone=us-west4-a",), "--workdir is required"),
    (TPU_VM, ("--zone=z", "--workdir=gs://b/w", "--accelerator-type=v9-8"), "--runtime-version"),
    (TPU_VM, ("--zone=z", "--workdir=gs://b/w", "--spot", "--preemptible"), "--preemptible"),
    (TPU_VM, ("--zone=z", "--workdir=gs://b/w", "--max-retries=many"), "--max-retries"),
    (TPU_VM, ("--zone=z", "--workdir=gs://b/w", "--name=Bad_Name"), "--name"),
    (TPU_VM, ("--zone=z", "--workdir=gs://b/w", "--bogus"), "--bogus"),
    (TPU_VM, ("--zone=z", "--workdir"), "--workdir needs a value"),
    (LOCAL, (), "--workdir is required"),
    (LOCAL, ("--workdir=w", "-n", "0"), "--num-processes"),
    (LOCAL, ("--workdir=w", "--port=http"), "--port"),
  ],
  ids=lambda value: value.name if isinstance(value, Path) else None,
)
def test_bad_options_fail_naming_the_option(sandbox, script, args, message):
  env, _, _ = sandbox
  result = _run(script, "--dry-run", *args, env=env)
  assert result.returncode != 0
  assert message in result.stderr
  assert not _commands(result.stdout)


# ------------------------------------------------------------------------------------------------
# tpu_vm.py, for real, against a fake gcloud that simulates one TPU

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# A TPU in a file: "absent", "ready" or "preempted". Training outcomes, one per attempt, in $FAKE_TRAIN.
echo "$*" >> "$FAKE_DIR/calls.log"
state="$(cat "$FAKE_DIR/state" 2>/dev/null || echo absent)"
case "$*" in
  *" describe "*)
    if [[ $state == absent ]]; then echo "ERROR: (gcloud) NOT_FOUND: Resource not found" >&2; exit 1; fi
    if [[ $* == *queued-resources* ]]; then
      [[ $state == ready ]] && echo ACTIVE || echo SUSPENDED
    else
      [[ $state == ready ]] && echo READY || echo PREEMPTED
    fi ;;
  *" create "*) echo ready > "$FAKE_DIR/state" ;;
  *" delete "*)
    if [[ ${FAKE_DELETE:-} == fail ]]; then echo "ERROR: (gcloud) PERMISSION_DENIED" >&2; exit 1; fi
    echo absent > "$FAKE_DIR/state" ;;
  *" scp "*) ;;
  *" ssh "*flax_detector.main*)
    attempt=$(( $(cat "$FAKE_DIR/attempts" 2>/dev/null || echo 0) + 1 ))
    echo "$attempt" > "$FAKE_DIR/attempts"
    read -r -a outcomes <<< "$FAKE_TRAIN"
    outcome="${outcomes[attempt - 1]:-${outcomes[${#outcomes[@]} - 1]}}"
    case "$outcome" in
      ok) echo "worker 0: training done" ;;
      preempt) echo preempted > "$FAKE_DIR/state"; echo "Connection closed" >&2; exit 255 ;;
      fail) echo "Traceback: trainer crashed" >&2; exit 1 ;;
    esac ;;
  *" ssh "*) ;;
  *) echo "fake gcloud: unexpected $*" >&2; exit 98 ;;
esac
"""


def _install_fakes(sandbox, fakes: dict[str, str]) -> tuple[dict[str, str], Path]:
  """Puts the fake tools (name: script) first on the sandbox's PATH; returns (env, fake_dir), with
  FAKE_DIR=fake_dir in env, the folder where the fakes keep their state."""
  env, bin_dir, tmp_path = sandbox
  for name, text in fakes.items():
    _write_executable(bin_dir / name, text)
  fake_dir = tmp_path / "fake"
  fake_dir.mkdir()
  return {**env, "FAKE_DIR": str(fake_dir)}, fake_dir


@pytest.fixture
def fake_gcloud(sandbox):
  env, fake_dir = _install_fakes(sandbox, {"gcloud": FAKE_GCLOUD})
  env = {**env, "TPU_POLL_SECONDS": "0"}

  def run(outcomes: str, *args: str, **extra_env: str):
    result = _run(
      TPU_VM,
      "--zone=z",
      "--workdir=gs://b/w",
      "--name=fake-tpu",
      *args,
      env={**env, "FAKE_TRAIN": outcomes, **extra_env},
    )
    calls = (fake_dir / "calls.log").read_text().splitlines()
    verbs = [call.split()[3] for call in calls if call.split()[3] in ("create", "delete")]
    state = (fake_dir / "state").read_text().strip()
    return result, calls, verbs, state

  return run


def test_tpu_recreates_after_preemption_and_runs_again(fake_gcloud):
  result, calls, verbs, state = fake_gcloud("preempt preempt ok", "--max-retries=2")
  assert result.returncode == 0, result.stderr
  assert verbs == ["create", "delete", "create", "delete", "create", "delete"]
  assert sum("flax_detector.main" in call for call in calls) == 3
  assert sum(" scp " in call for call in calls) == 3  # the new TPU gets the project again
  assert "retry 2 of 2" in result.stderr and state == "absent"


def test_tpu_gives_up_after_max_retries_and_still_deletes(fake_gcloud):
  result, _, verbs, state = fake_gcloud("preempt", "--max-retries=1", "--queued")
  assert result.returncode != 0
  assert "retries are used up" in result.stderr
  assert verbs == ["create", "delete", "create", "delete"] and state == "absent"


def test_tpu_does_not_retry_a_trainer_failure(fake_gcloud):
  result, _, verbs, state = fake_gcloud("fail", "--max-retries=3")
  assert result.returncode != 0
  assert "healthy TPU" in result.stderr
  assert verbs == ["create", "delete"] and state == "absent"


def test_tpu_failed_delete_is_reported_with_the_command(fake_gcloud):
  result, _, verbs, state = fake_gcloud("ok", FAKE_DELETE="fail")
  assert result.returncode != 0
  assert "Delete it by hand: gcloud compute tpus tpu-vm delete fake-tpu --zone=z --quiet" in result.stderr
  assert verbs == ["create", "delete"] and state == "ready"


def test_tpu_keep_leaves_the_tpu_and_reuses_it(fake_gcloud):
  result, _, verbs, state = fake_gcloud("ok", "--keep")
  assert result.returncode == 0, result.stderr
  assert verbs == ["create"] and state == "ready"
  result, _, verbs, state = fake_gcloud("ok", "--keep")
  assert "reusing the existing TPU VM fake-tpu" in result.stderr
  assert verbs == ["create"] and state == "ready"  # the calls log is cumulative: no second create


# ------------------------------------------------------------------------------------------------
# slurm.sbatch


def test_slurm_header_requests_one_task_per_node_and_requeue():
  directives = [line.split(None, 1)[1] for line in SLURM.read_text().splitlines() if line.startswith("#SBATCH ")]
  names = {directive.split("=")[0] for directive in directives}
  assert {
    "--nodes",
    "--ntasks-per-node",
    "--gpus-per-node",
    "--cpus-per-task",
    "--time",
    "--output",
    "--requeue",
    "--signal",
  } <= names
  assert "--ntasks-per-node=1" in directives
  assert any(directive.startswith("--signal=B:TERM@") for directive in directives)


def test_slurm_dry_run_prints_srun(sandbox):
  env, _, tmp_path = sandbox
  env = {
    **env,
    "DRY_RUN": "1",
    "WORKDIR": "/shared/runs/x",
    "CONFIG": "configs/vgg16.py:cpu",
    "EXTRA_ARGS": "--config.num_epochs=3 --config.data.dir=/shared/data",
    "VENV": str(tmp_path / "venv"),
  }
  _, commands = _dry_run(SLURM, "--config.seed=7", env=env)
  [srun] = [cmd for cmd in commands if cmd[0] == "srun"]
  main = srun.index("-m")
  assert srun[main - 1 : main + 2] == ["python", "-m", "flax_detector.main"]
  assert srun[main + 2 :] == [
    "--config=configs/vgg16.py:cpu",
    "--workdir=/shared/runs/x",
    "--config.num_epochs=3",
    "--config.data.dir=/shared/data",
    "--config.seed=7",
  ]
  assert "--kill-on-bad-exit=1" in srun
  assert ["source", f"{tmp_path}/venv/bin/activate"] in commands
  # One process per node drives all its GPUs (JAX would otherwise give each process one).
  assert ["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"] in commands


def test_slurm_dry_run_one_task_per_gpu_leaves_jax_defaults(sandbox):
  env, _, _ = sandbox
  result, commands = _dry_run(SLURM, env={**env, "DRY_RUN": "1", "WORKDIR": "w", "SLURM_NTASKS_PER_NODE": "8"})
  assert "JAX_LOCAL_DEVICE_IDS" not in result.stdout
  assert commands[-1][:2] == ["srun", "--kill-on-bad-exit=1"]


def test_slurm_needs_workdir_and_a_job(sandbox):
  env, _, _ = sandbox
  result = _run(SLURM, env={**env, "DRY_RUN": "1"})
  assert result.returncode != 0 and "WORKDIR is required" in result.stderr
  result = _run(SLURM, env={**env, "WORKDIR": "w"})
  assert result.returncode != 0 and "not inside a SLURM job" in result.stderr


def test_slurm_finds_common_sh_from_a_spooled_copy(sandbox):
  """sbatch runs a copy of the script from its spool folder: common.sh comes from the submit folder."""
  env, _, tmp_path = sandbox
  spooled = tmp_path / "spool" / "slurm_script"
  spooled.parent.mkdir()
  shutil.copy(SLURM, spooled)
  env = {**env, "DRY_RUN": "1", "WORKDIR": "w"}
  _, commands = _dry_run(spooled, env={**env, "SLURM_SUBMIT_DIR": str(ROOT)}, cwd=tmp_path)
  assert ["cd", str(ROOT)] in commands and commands[-1][0] == "srun"
  result = _run(spooled, env={**env, "SLURM_SUBMIT_DIR": str(tmp_path)}, cwd=tmp_path)
  assert result.returncode == 1 and "set PROJECT_DIR" in result.stderr


def test_slurm_help_documents_every_variable_it_reads(sandbox):
  env, _, _ = sandbox
  result = _run(SLURM, "--help", env=env)
  assert result.returncode == 0 and result.stdout.startswith("Train flax_detector on several GPU nodes")
  read = set(re.findall(r"\$\{([A-Z_]+):", SLURM.read_text())) - {"JAX_LOCAL_DEVICE_IDS"}
  read = {name for name in read if not name.startswith("SLURM_") or name == "SLURM_SUBMIT_DIR"}
  assert {"WORKDIR", "EXTRA_ARGS", "MAX_RESTARTS"} <= read
  assert not {name for name in read if name not in result.stdout}


def test_slurm_knows_the_name_of_the_final_metrics_file():
  assert f"$WORKDIR/{workdir.FINAL_METRICS} ]]" in SLURM.read_text()


FAKE_SRUN = r"""#!/usr/bin/env bash
echo "$*" > "$FAKE_DIR/srun_args"
trap 'echo TERM > "$FAKE_DIR/srun_term"; exit 0' TERM
touch "$FAKE_DIR/srun_started"
if [[ $FAKE_SRUN == wait ]]; then for _ in $(seq 200); do sleep 0.05; done; exit 9; fi
exit "$FAKE_SRUN"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/scontrol"
"""


@pytest.fixture
def fake_slurm(sandbox):
  env, fake_dir = _install_fakes(sandbox, {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL})
  env = {
    **env,
    "WORKDIR": str(sandbox[2] / "run"),
    "SLURM_JOB_ID": "42",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NTASKS": "2",
    "SLURM_SUBMIT_DIR": str(ROOT),
  }
  return env, fake_dir


def test_slurm_forwards_sigterm_and_requeues(fake_slurm):
  env, fake_dir = fake_slurm
  process = _start(SLURM, env={**env, "FAKE_SRUN": "wait"})
  _wait_for(fake_dir / "srun_started")
  process.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 does before the time limit
  _, stderr = process.communicate(timeout=10)
  assert process.returncode == 0, stderr
  assert (fake_dir / "srun_term").exists()
  assert (fake_dir / "scontrol").read_text().split() == ["requeue", "42"]
  assert "flax_detector.main" in (fake_dir / "srun_args").read_text()


def test_slurm_passes_the_exit_status_without_requeue(fake_slurm):
  env, fake_dir = fake_slurm
  result = _run(SLURM, env={**env, "FAKE_SRUN": "3"})
  assert result.returncode == 3
  assert not (fake_dir / "scontrol").exists()


def _wait_for(path: Path, text: str = "", timeout: float = 10) -> None:
  """Waits until the file exists and contains text."""
  deadline = time.monotonic() + timeout
  while not (path.exists() and text in path.read_text()):
    assert time.monotonic() < deadline, f"{path} never appeared" if not path.exists() else f"no {text!r} in {path}"
    time.sleep(0.02)


# ------------------------------------------------------------------------------------------------
# local_multiprocess.sh


def test_local_dry_run_prints_one_command_per_process(sandbox):
  env, _, tmp_path = sandbox
  workdir = tmp_path / "run"
  result, commands = _dry_run(
    LOCAL,
    f"--workdir={workdir}",
    "-n",
    "3",
    "--devices-per-process=4",
    "--dry-run",
    "--",
    "--config.num_train_steps=5",
    env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
  )
  lines = [line for line in result.stdout.splitlines() if "flax_detector.main" in line]
  assert len(lines) == 3
  addresses, ids = set(), []
  for i, line in enumerate(lines):
    assert line.endswith(f" > {workdir}/logs/process_{i}.log 2>&1 &")
    cmd = shlex.split(line[2:].rsplit(" > ", 1)[0])
    assert cmd[:3] == ["env", "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=4"]
    assert _option(cmd, "--num_processes") == "3"
    assert _option(cmd, "--workdir") == str(workdir)
    assert _option(cmd, "--config") == "configs/vgg16.py:cpu"
    assert cmd[-1] == "--config.num_train_steps=5"
    addresses.add(_option(cmd, "--coordinator_address"))
    ids.append(_option(cmd, "--process_id"))
  assert ids == ["0", "1", "2"]
  [address] = addresses
  host, port = address.split(":")
  assert host == "127.0.0.1" and 0 < int(port) < 65536
  assert ["mkdir", "-p", f"{workdir}/logs"] in commands
  assert not (workdir / "logs").exists()


def test_local_dry_run_port_and_relative_paths(sandbox):
  env, _, tmp_path = sandbox
  _, all_commands = _dry_run(LOCAL, "--workdir", "rel/run", "--port=4567", "--dry-run", env=env, cwd=tmp_path)
  commands = [cmd for cmd in all_commands if "flax_detector.main" in cmd]
  assert len(commands) == 2
  # The processes run from the project root: a workdir relative to the caller is made absolute.
  assert {_option(cmd, "--workdir") for cmd in commands} == {f"{tmp_path}/rel/run"}
  assert {_option(cmd, "--coordinator_address") for cmd in commands} == {"127.0.0.1:4567"}
  assert ["cd", str(ROOT)] in all_commands


FAKE_PYTHON = r"""#!/usr/bin/env bash
# Records its arguments; FAKE_MODE: ok (exit 0), fail1 (process 1 exits 7 after a moment, when
# the others have set their trap), wait (until SIGTERM).
trap 'echo "got SIGTERM"; exit 0' TERM
echo "args: $*"
echo "XLA_FLAGS=$XLA_FLAGS JAX_PLATFORMS=$JAX_PLATFORMS"
[[ $FAKE_MODE == ok ]] && exit 0
[[ $FAKE_MODE == fail1 && " $* " == *" --process_id=1 "* ]] && { sleep 0.3; exit 7; }
for _ in $(seq 200); do sleep 0.05; done
exit 9
"""


@pytest.fixture
def fake_python(sandbox):
  env, _ = _install_fakes(sandbox, {"fake-python": FAKE_PYTHON})
  _, bin_dir, tmp_path = sandbox
  return env, str(bin_dir / "fake-python"), tmp_path / "run"


def _logs(workdir: Path, n: int) -> list[str]:
  return [(workdir / "logs" / f"process_{i}.log").read_text() for i in range(n)]


def test_local_runs_all_processes_and_writes_their_logs(fake_python):
  env, python, workdir = fake_python
  result = _run(
    LOCAL,
    f"--workdir={workdir}",
    "-n",
    "3",
    f"--python={python}",
    "--quiet",
    "--",
    "--config.seed=1",
    env={**env, "FAKE_MODE": "ok"},
  )
  assert result.returncode == 0, result.stderr
  for i, log in enumerate(_logs(workdir, 3)):
    assert f"--num_processes=3 --process_id={i} --config.seed=1" in log
    assert "xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu" in log


def test_local_failure_stops_the_others_and_exits_nonzero(fake_python):
  env, python, workdir = fake_python
  result = _run(
    LOCAL,
    f"--workdir={workdir}",
    "-n",
    "3",
    f"--python={python}",
    "--port=4567",
    "--quiet",
    env={**env, "FAKE_MODE": "fail1"},
  )
  assert result.returncode != 0
  assert "process 1 exited with status 7" in result.stderr
  logs = _logs(workdir, 3)
  assert "got SIGTERM" in logs[0] and "got SIGTERM" in logs[2]


def test_local_forwards_sigterm_to_every_process(fake_python):
  env, python, workdir = fake_python
  process = _start(
    LOCAL,
    f"--workdir={workdir}",
    "-n",
    "2",
    f"--python={python}",
    "--port=4567",
    "--quiet",
    env={**env, "FAKE_MODE": "wait"},
  )
  for i in range(2):
    _wait_for(workdir / "logs" / f"process_{i}.log", "JAX_PLATFORMS")  # printed once its TERM trap is set
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=10)
  assert process.returncode == 143, stderr
  assert all("got SIGTERM" in log for log in _logs(workdir, 2))
