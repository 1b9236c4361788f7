#!/usr/bin/env python3
"""Trains flax_detector on a Cloud TPU VM slice: the same `python -m flax_detector.main` on every worker.

  launch/tpu_vm.py --zone=us-west4-a --workdir=gs://my-bucket/runs/vgg16 -- --config.data.dir=gs://my-bucket/data

In order, it
  1. packs the project: `git archive HEAD` (the last commit), or a tar of the folder outside a checkout;
  2. creates the TPU with `gcloud compute tpus tpu-vm create` (with --queued, a queued resource) and waits
     until it is READY (ACTIVE); a healthy TPU of the same name, say one left by --keep, is reused;
  3. copies the tarball to every worker and installs it there in a virtualenv made by uv (JAX needs
     Python >= 3.11, the TPU images ship 3.10);
  4. runs main on every worker over `tpu-vm ssh --worker=all`, which streams their logs here; main calls
     jax.distributed.initialize(), which on a TPU VM finds the other workers by itself;
  5. when that fails and the TPU is no longer healthy (preempted, suspended, gone), deletes and recreates
     it and runs again, at most --max-retries times: the trainer resumes from the newest checkpoint in
     --workdir. A failure on a healthy TPU is the trainer's own and is not retried;
  6. deletes the TPU at the end, on success, failure or Ctrl-C, unless --keep.

Every option can also come from the environment variable in brackets. --dry-run prints the commands,
shell-quoted, one per line after "+ ", and runs none (no gcloud, no network); its state queries are
answered as a healthy run would see them. Needs only Python's standard library.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
TARBALL = "flax_detector.tar.gz"
# Where the project and its virtualenv live on every worker; the tilde is for the workers' shell.
REMOTE_DIR, REMOTE_VENV = "~/flax_detector", "~/flax_detector_venv"
# The TPU software image of each generation (https://cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {
  "v2-": "tpu-ubuntu2204-base",
  "v3-": "tpu-ubuntu2204-base",
  "v4-": "tpu-ubuntu2204-base",
  "v5litepod-": "v2-alpha-tpuv5-lite",
  "v5e-": "v2-alpha-tpuv5-lite",
  "v5p-": "v2-alpha-tpuv5",
  "v6e-": "v2-alpha-tpuv6e",
}
READY = ("READY", "ACTIVE")  # a node's, a queued resource's
# States a TPU leaves by itself on its way to READY / ACTIVE: keep waiting.
TRANSITIONAL = (
  "CREATING",
  "STARTING",
  "RESTARTING",
  "REIMAGING",
  "REPAIRING",
  "UNHIDING",
  "STATE_UNSPECIFIED",
  "ACCEPTED",
  "WAITING_FOR_RESOURCES",
  "PROVISIONING",
)
TRUE_WORDS = ("1", "true", "TRUE", "True", "yes", "YES", "on", "ON")  # the words is_true in common.sh accepts


class Failure(Exception):
  """A step that failed; the message says what happened and what to do."""


class Terminated(Exception):
  """SIGTERM, handled like Ctrl-C: stop and delete the TPU."""


def log(message: str) -> None:
  print(f"[tpu_vm.py] {message}", file=sys.stderr, flush=True)


def run(command: list[str], dry_run: bool) -> int:
  """Shows the command after "+ " (on stdout in a dry run, else stderr), runs it unless a dry run; its status."""
  print(f"+ {shlex.join(command)}", file=sys.stdout if dry_run else sys.stderr, flush=True)
  return 0 if dry_run else subprocess.run(command, check=False).returncode


# ---------------------------------------------------------------------------------------------------------------
# Options


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):
    # argparse's "argument --workdir: expected one argument", in the words of common.sh's option_value.
    message = re.sub(
      r"argument (\S+): expected one argument",
      r"\1 needs a value (write \1=VALUE for a value that starts with '-')",
      message,
    )
    super().error(message)


def _whole_number(text: str) -> int:
  if not text.isdigit():
    raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
  return int(text)


def _option(
  parser: argparse.ArgumentParser, flag: str, variable: str, meaning: str, default: str | None = None, **kwargs
) -> None:
  """An option whose default the environment variable overrides; --help names both, once."""
  parser.add_argument(
    flag,
    default=os.environ.get(variable, default),
    **kwargs,
    help=f"{meaning} [{variable}]" + (f" ({default})" if default else ""),
  )


def _switch(parser: argparse.ArgumentParser, flag: str, variable: str, meaning: str) -> None:
  """An on/off option that variable=1 (or true, yes, on) also turns on."""
  parser.add_argument(
    flag, action="store_true", default=os.environ.get(variable, "0") in TRUE_WORDS, help=f"{meaning} [{variable}=1]"
  )


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(
    prog="launch/tpu_vm.py",
    description=__doc__,
    allow_abbrev=False,
    usage="%(prog)s --zone=ZONE --workdir=gs://BUCKET/RUN [options] [-- MAIN_ARGS...]",
    epilog="Arguments after '--' go to flax_detector.main, e.g. -- --config.num_epochs=10",
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  user = re.sub("[^a-z0-9-]", "-", os.environ.get("USER", "user").lower())
  by_generation = {version: [] for version in RUNTIME_VERSIONS.values()}
  for prefix, version in RUNTIME_VERSIONS.items():
    by_generation[version].append(prefix.rstrip("-"))
  _option(parser, "--zone", "TPU_ZONE", "TPU zone, required")
  _option(
    parser, "--workdir", "WORKDIR", "checkpoints, events, final_metrics.json: a gs:// path every worker sees, required"
  )
  _option(parser, "--name", "TPU_NAME", "TPU (and queued resource) name", f"flax-detector-{user}")
  _option(
    parser,
    "--accelerator-type",
    "TPU_ACCELERATOR_TYPE",
    "slice type: v4-32, v5litepod-16, v5p-16, v6e-16...",
    "v5litepod-16",
  )
  _option(
    parser,
    "--runtime-version",
    "TPU_RUNTIME_VERSION",
    "TPU software version (by generation: "
    + "; ".join(f"{version} for {', '.join(prefixes)}" for version, prefixes in by_generation.items())
    + ")",
  )
  _option(parser, "--project", "TPU_PROJECT", "GCP project (default: gcloud's)")
  _option(parser, "--config", "CONFIG", "config, a path inside this repository", "configs/vgg16.py")
  _option(parser, "--python-version", "TPU_PYTHON_VERSION", "Python of the workers' virtualenv", "3.12")
  _option(
    parser, "--max-retries", "MAX_RETRIES", "how often to recreate a lost (preempted) TPU", "3", type=_whole_number
  )
  _option(
    parser, "--poll-seconds", "TPU_POLL_SECONDS", "seconds between state checks while waiting", "30", type=_whole_number
  )
  parser.add_argument(
    "--create-arg",
    action="append",
    default=[],
    metavar="ARG",
    help="extra argument for the create command, repeatable, e.g. --create-arg=--reserved or "
    "--create-arg=--service-account=SA",
  )
  _switch(parser, "--queued", "TPU_QUEUED", "create through a queued resource and wait in the queue until ACTIVE")
  _switch(parser, "--spot", "TPU_SPOT", "Spot VMs: cheaper, can be preempted at any time")
  _switch(
    parser, "--preemptible", "TPU_PREEMPTIBLE", "preemptible VMs (plain TPU VMs only; queued resources take --spot)"
  )
  _switch(parser, "--keep", "TPU_KEEP", "leave the TPU running at the end; the next run with the same --name reuses it")
  _switch(parser, "--dry-run", "DRY_RUN", "print the commands, run none")
  return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """The options, and the arguments for flax_detector.main: everything after the first '--'."""
  split = argv.index("--") if "--" in argv else len(argv)
  parser = _parser()
  args = parser.parse_args(argv[:split])
  if not args.zone:
    parser.error("--zone is required (or set TPU_ZONE), e.g. --zone=us-central2-b")
  if not args.workdir:
    parser.error("--workdir is required (or set WORKDIR), e.g. --workdir=gs://my-bucket/runs/vgg16")
  if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", args.name):
    parser.error(f"--name={args.name!r} is not a TPU name: lowercase letters, digits and '-', starting with a letter")
  if not args.runtime_version:
    args.runtime_version = next(
      (version for prefix, version in RUNTIME_VERSIONS.items() if args.accelerator_type.startswith(prefix)), None
    )
    if args.runtime_version is None:
      parser.error(f"no default --runtime-version for --accelerator-type={args.accelerator_type}: pass one")
  if args.spot and args.preemptible:
    parser.error("--spot and --preemptible exclude each other")
  if args.queued and args.preemptible:
    parser.error("--preemptible is for plain TPU VMs; queued resources take --spot")
  if not args.workdir.startswith("gs://"):
    log(f"warning: --workdir={args.workdir} is not a gs:// path; every worker must see the same checkpoints")
  return args, argv[split + 1 :]


# ---------------------------------------------------------------------------------------------------------------
# The TPU


class Tpu:
  """One TPU VM, or a queued resource and the node it makes, driven through gcloud.

  In a dry run the commands are printed, not run, and the state queries answer as a healthy run sees
  them: absent until created, then READY / ACTIVE.
  """

  def __init__(self, args: argparse.Namespace):
    self.args, self.name = args, args.name
    self.location = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
    self.kinds = ("queued", "node") if args.queued else ("node",)  # the first is what gets created and deleted
    self.may_exist = False  # created or adopted: deleted at the end
    self._exists_in_dry_run = False

  def _gcloud(self, kind: str, verb: str, *words: str) -> list[str]:
    group = "queued-resources" if kind == "queued" else "tpu-vm"
    return ["gcloud", "compute", "tpus", group, verb, self.name, *self.location, *words]

  def _noun(self, kind: str | None = None) -> str:
    return f"{'queued resource' if (kind or self.kinds[0]) == 'queued' else 'TPU VM'} {self.name}"

  def state(self, kind: str) -> str:
    """READY, PREEMPTED, ACTIVE, SUSPENDED...; NOT_FOUND when it does not exist; UNKNOWN when gcloud fails."""
    command = self._gcloud(
      kind, "describe", "--format=value(state.state)" if kind == "queued" else "--format=value(state)"
    )
    if self.args.dry_run:
      run(command, dry_run=True)
      return ("ACTIVE" if kind == "queued" else "READY") if self._exists_in_dry_run else "NOT_FOUND"
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode == 0 and result.stdout.strip():
      return result.stdout.strip().upper()
    if re.search("not.found", result.stderr, re.IGNORECASE):
      return "NOT_FOUND"
    for line in result.stderr.splitlines():
      log(f"gcloud: {line}")
    return "UNKNOWN"

  def healthy(self) -> bool:
    return all(self.state(kind) in READY for kind in self.kinds)

  def create(self) -> None:
    args = self.args
    if args.queued:
      command = self._gcloud(
        "queued",
        "create",
        f"--node-id={self.name}",
        f"--accelerator-type={args.accelerator_type}",
        f"--runtime-version={args.runtime_version}",
      )
    else:
      command = self._gcloud(
        "node", "create", f"--accelerator-type={args.accelerator_type}", f"--version={args.runtime_version}"
      )
    command += ["--spot"] * args.spot + ["--preemptible"] * args.preemptible + args.create_arg
    self.may_exist = True  # even a failed create can leave a resource behind
    log(f"creating the {self._noun()} ({args.accelerator_type}, {args.runtime_version})")
    if run(command, args.dry_run):
      raise Failure(
        f"could not create the {self._noun()} (see gcloud's message above: quota, capacity, zone, permissions?)"
      )
    self._exists_in_dry_run = True

  def wait_until_ready(self) -> None:
    for kind in self.kinds:
      while (state := self.state(kind)) not in READY:
        # A queued resource that just became ACTIVE may list its node a moment later.
        if state not in TRANSITIONAL and not (kind == "node" and self.args.queued and state == "NOT_FOUND"):
          raise Failure(f"the {self._noun(kind)} is {state}: it did not become ready")
        log(f"waiting for the {self._noun(kind)}: {state} (next check in {self.args.poll_seconds}s)")
        time.sleep(self.args.poll_seconds)

  def delete_command(self) -> list[str]:
    if self.args.queued:
      return self._gcloud("queued", "delete", "--force", "--quiet")  # --force: the node it made goes too
    return self._gcloud("node", "delete", "--quiet")

  def delete(self) -> bool:
    """Deletes it and waits until it is gone, so that a new one can take its name; False if it stays."""
    log(f"deleting the {self._noun()}")
    deleted = run(self.delete_command(), self.args.dry_run) == 0  # fails when it is gone already: the state decides
    self._exists_in_dry_run = False
    while (state := self.state(self.kinds[0])) != "NOT_FOUND":
      if state == "UNKNOWN" or (not deleted and state != "DELETING"):
        return False
      log(f"waiting for {self.name} to be deleted: {state} (next check in {self.args.poll_seconds}s)")
      time.sleep(self.args.poll_seconds)
    return True

  def ensure_ready(self) -> None:
    """Creates the TPU, or adopts a healthy one of the same name, replaces a dead one; waits until it is ready."""
    state = self.state(self.kinds[0])
    if state == "UNKNOWN":
      raise Failure(
        f"could not query the TPU {self.name} in zone {self.args.zone} (is gcloud authenticated, is the project set?)"
      )
    if state in READY or state in TRANSITIONAL:
      log(f"reusing the existing {self._noun()} ({state})")
      self.may_exist = True
    else:
      if state != "NOT_FOUND":
        log(f"an earlier {self._noun()} is {state}: replacing it")
        self.may_exist = True
        if not self.delete():
          raise Failure(f"could not delete the old {self.name}")
      self.create()
    self.wait_until_ready()

  def release(self) -> bool:
    """Deletes the TPU at the end unless --keep; False when it could not, after saying how to by hand."""
    if not self.may_exist:
      return True
    if self.args.keep:
      log(f"--keep: {self.name} is left running. Log in: {shlex.join(self._gcloud('node', 'ssh'))}")
      log(f"delete it when done: {shlex.join(self.delete_command())}")
      return True
    if self.delete():
      return True
    log(
      f"error: could not delete {self.name}; it may still cost money. Delete it by hand: "
      f"{shlex.join(self.delete_command())}"
    )
    return False

  def scp_command(self, local_file: str) -> list[str]:
    return [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "scp",
      local_file,
      f"{self.name}:{TARBALL}",
      "--worker=all",
      *self.location,
    ]

  def ssh_command(self, script: str, *options: str) -> list[str]:
    return [*self._gcloud("node", "ssh"), "--worker=all", *options, f"--command={script}"]


# ---------------------------------------------------------------------------------------------------------------
# The project on the workers


def pack_project(folder: str, dry_run: bool) -> str:
  """Writes the project's tarball into folder and returns its path."""
  tarball = os.path.join(folder, TARBALL)
  if (PROJECT_ROOT / ".git").exists():
    changes = (
      ""
      if dry_run
      else subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
      ).stdout
    )
    if changes.strip():
      log("warning: uncommitted changes are not shipped: the workers get the last commit (HEAD)")
    command = ["git", "-C", str(PROJECT_ROOT), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"]
  else:
    command = [
      "tar",
      "-czf",
      tarball,
      "-C",
      str(PROJECT_ROOT),
      "--exclude=.git",
      "--exclude=.venv",
      "--exclude=runs",
      "--exclude=__pycache__",
      ".",
    ]
  if run(command, dry_run):
    raise Failure(f"could not pack {PROJECT_ROOT}")
  return tarball


def install_script(python_version: str) -> str:
  """The shell command every worker runs to unpack the project and install it with jax[tpu]."""
  get_uv = "python3 -m pip install --user --quiet --upgrade uv"
  return " && ".join(
    [
      f"set -euo pipefail; rm -rf {REMOTE_DIR} {REMOTE_VENV}",
      f"mkdir -p {REMOTE_DIR}",
      f"tar -xzf ~/{TARBALL} -C {REMOTE_DIR}",
      f"{{ {get_uv} || {get_uv} --break-system-packages; }}",
      f"python3 -m uv venv --quiet --python {shlex.quote(python_version)} {REMOTE_VENV}",
      f'python3 -m uv pip install --quiet --python {REMOTE_VENV}/bin/python -e {REMOTE_DIR} "jax[tpu]"',
      f'{REMOTE_VENV}/bin/python -c "import jax, flax_detector; print(jax.__version__)"',
    ]
  )


def train_script(config: str, workdir: str, main_args: list[str]) -> str:
  main = shlex.join([f"--config={config}", f"--workdir={workdir}", *main_args])
  return f"cd {REMOTE_DIR} && exec {REMOTE_VENV}/bin/python -m flax_detector.main {main}"


def deploy_and_train(tpu: Tpu, tarball: str, args: argparse.Namespace, main_args: list[str]) -> int:
  """One attempt on a ready TPU: copy, install, train. The first failing step's exit status, else 0."""
  steps = (
    (f"copying the project to every worker of {tpu.name}", tpu.scp_command(tarball)),
    ("installing the project on every worker", tpu.ssh_command(install_script(args.python_version))),
    (
      f"training on every worker of {tpu.name} (workdir {args.workdir})",
      tpu.ssh_command(train_script(args.config, args.workdir, main_args), "--ssh-flag=-oServerAliveInterval=60"),
    ),
  )
  for message, command in steps:
    log(message)
    status = run(command, args.dry_run)
    if status:
      return status
  return 0


def train_with_retries(tpu: Tpu, tarball: str, args: argparse.Namespace, main_args: list[str]) -> None:
  """Trains until done, recreating the TPU when it was lost; the trainer resumes from --workdir each time."""
  retries = 0
  while True:
    tpu.ensure_ready()
    status = deploy_and_train(tpu, tarball, args, main_args)
    if status == 0:
      log(f"training finished; results in {args.workdir}")
      return
    if tpu.healthy():
      raise Failure(
        f"the run failed (exit status {status}) on a healthy TPU, so not a preemption: not retrying. "
        f"Fix the cause and run the same command again: training resumes from {args.workdir}"
      )
    state = tpu.state(tpu.kinds[0])
    if retries == args.max_retries:
      raise Failure(
        f"the TPU {tpu.name} was lost ({state}) and the {args.max_retries} retries are used up; run the "
        f"same command again to resume from {args.workdir}"
      )
    retries += 1
    log(
      f"the TPU {tpu.name} was lost ({state}), probably preempted: recreating it (retry {retries} of "
      f"{args.max_retries})"
    )
    if not tpu.delete():
      raise Failure(f"could not delete the lost TPU {tpu.name}")


def _terminate(signum: int, frame: object) -> None:
  raise Terminated


def main(argv: list[str]) -> int:
  args, main_args = parse_args(argv)
  if not args.dry_run and shutil.which("gcloud") is None:
    log("error: gcloud not found: install the Google Cloud CLI (or use --dry-run)")
    return 1
  tpu = Tpu(args)
  signal.signal(signal.SIGTERM, _terminate)
  status = 0
  try:
    with tempfile.TemporaryDirectory(prefix="flax_detector_tpu_") as folder:
      train_with_retries(tpu, pack_project(folder, args.dry_run), args, main_args)
  except Failure as error:
    log(f"error: {error}")
    status = 1
  except KeyboardInterrupt:
    status = 130
  except Terminated:
    status = 143
  if not tpu.release():
    status = status or 1
  return status


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
