#!/usr/bin/env bash
# Train flax_detector on a Cloud TPU VM slice: one `python -m flax_detector.main` per TPU worker.
#
# What it does, in order:
#   1. packs the project (`git archive HEAD`, or a tar of the folder when it is not a git checkout);
#   2. creates the TPU: a plain TPU VM (`gcloud compute tpus tpu-vm create`), or with --queued a
#      queued resource (`gcloud compute tpus queued-resources create --node-id=...`), and waits
#      until it is READY / ACTIVE (an existing healthy TPU of the same name is reused);
#   3. copies the tarball to every worker (`tpu-vm scp --worker=all`) and installs it there in a
#      Python 3.12 virtualenv made by uv (`pip install -e .` plus `jax[tpu]`): JAX needs Python
#      >= 3.11 and the TPU images ship 3.10;
#   4. runs the same main on every worker (`tpu-vm ssh --worker=all --command=...`, which streams
#      the logs of all workers here). main calls jax.distributed.initialize() itself, which on a
#      TPU VM finds the other workers on its own: no coordinator flags are passed;
#   5. if that fails and the TPU is no longer healthy (PREEMPTED, gone, suspended: anything but
#      READY / ACTIVE), deletes and recreates it and runs the same command again, up to
#      --max-retries times; the trainer resumes from the newest checkpoint in --workdir. A failure
#      on a healthy TPU is the trainer's own and is not retried;
#   6. deletes the TPU (or queued resource) at the end, on success, failure or Ctrl-C, unless --keep.
#
# Usage:
#   launch/tpu_vm.sh --zone=ZONE --workdir=gs://BUCKET/RUN [options] [-- MAIN_ARGS...]
#
#   launch/tpu_vm.sh --zone=us-west4-a --accelerator-type=v5litepod-16 --queued --spot \
#       --workdir=gs://my-bucket/runs/vgg16 -- --config.data.dir=gs://my-bucket/anime-art
#
# Every option can also come from an environment variable (shown in --help). --dry-run prints the
# commands, shell-quoted, one per line after "+ ", and runs none of them (no gcloud, no network).
# Written for bash 3.2 (macOS) and later (no bash 4 features); tested with bash 5.

set -euo pipefail

readonly SCRIPT_NAME="tpu_vm.sh"
# The helpers log, die, usage_error, quote_cmd, is_true and option_value.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PROJECT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly PROJECT_ROOT
# Where the project and its virtualenv live on every worker (relative to the worker's home).
readonly REMOTE_TARBALL="flax_detector.tar.gz"
# shellcheck disable=SC2088  # the tilde is for the workers' shell, not this one
readonly REMOTE_DIR="~/flax_detector" REMOTE_VENV="~/flax_detector_venv"

usage() {
  cat <<EOF
Usage: launch/$SCRIPT_NAME --zone=ZONE --workdir=gs://BUCKET/RUN [options] [-- MAIN_ARGS...]

Creates a Cloud TPU VM slice, installs this project on every worker, runs
'python -m flax_detector.main --config=CONFIG --workdir=WORKDIR MAIN_ARGS...' on all of them,
recreates the TPU and resumes after a preemption, and deletes the TPU at the end.

Options (environment variable in brackets):
  --zone=ZONE              TPU zone, required                       [TPU_ZONE]
  --workdir=DIR            checkpoints and logs; a gs:// path, shared
                           by all workers, required                 [WORKDIR]
  --name=NAME              TPU (and queued resource) name           [TPU_NAME]   (flax-detector-\$USER)
  --accelerator-type=TYPE  e.g. v4-32, v5litepod-16, v5p-16, v6e-16 [TPU_ACCELERATOR_TYPE] (v5litepod-16)
  --runtime-version=V      TPU software version; the default follows
                           the accelerator generation               [TPU_RUNTIME_VERSION]
  --project=PROJECT        GCP project (default: gcloud's)          [TPU_PROJECT]
  --queued                 create through a queued resource and wait
                           until it is ACTIVE                       [TPU_QUEUED=1]
  --spot                   Spot VMs (cheaper, can be preempted)     [TPU_SPOT=1]
  --preemptible            preemptible VMs (plain TPU VMs only)     [TPU_PREEMPTIBLE=1]
  --create-arg=ARG         extra argument for the create command,
                           repeatable (e.g. --create-arg=--reserved)
  --config=PATH            config inside this repository            [CONFIG] (configs/vgg16.py)
  --python-version=V       Python of the workers' virtualenv        [TPU_PYTHON_VERSION] (3.12)
  --max-retries=N          recreations after preemptions            [MAX_RETRIES] (3)
  --keep                   do not delete the TPU at the end         [TPU_KEEP=1]
  --dry-run                print the commands, run none             [DRY_RUN=1]
  -h, --help               this help
Arguments after '--' are passed to flax_detector.main, e.g. -- --config.data.dir=gs://BUCKET/data
Polling interval while waiting for the TPU: TPU_POLL_SECONDS (30).
EOF
}

# Shows a command ("+ cmd": on stdout in a dry run, on stderr otherwise), then runs it unless this
# is a dry run. Returns the command's exit status. Dry-run output goes to file descriptor 3, a copy
# of the original stdout, so that it also shows from inside $(...).
run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote_cmd "$@")" >&3
    return 0
  fi
  printf '+ %s\n' "$(quote_cmd "$@")" >&2
  "$@"
}

# ---------------------------------------------------------------------------------------------
# Options

NAME_DEFAULT="flax-detector-$(printf '%s' "${USER:-user}" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9-' '-')"
NAME="${TPU_NAME:-$NAME_DEFAULT}"
ZONE="${TPU_ZONE:-}"
ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-v5litepod-16}"
RUNTIME_VERSION="${TPU_RUNTIME_VERSION:-}"
PROJECT="${TPU_PROJECT:-}"
QUEUED=0; is_true "${TPU_QUEUED:-0}" && QUEUED=1
SPOT=0; is_true "${TPU_SPOT:-0}" && SPOT=1
PREEMPTIBLE=0; is_true "${TPU_PREEMPTIBLE:-0}" && PREEMPTIBLE=1
KEEP=0; is_true "${TPU_KEEP:-0}" && KEEP=1
DRY_RUN_ENV="${DRY_RUN:-0}"; DRY_RUN=0; is_true "$DRY_RUN_ENV" && DRY_RUN=1
WORKDIR="${WORKDIR:-}"
CONFIG="${CONFIG:-configs/vgg16.py}"
PYTHON_VERSION="${TPU_PYTHON_VERSION:-3.12}"
MAX_RETRIES="${MAX_RETRIES:-3}"
POLL_SECONDS="${TPU_POLL_SECONDS:-30}"
CREATE_ARGS=()
MAIN_ARGS=()

parse_args() {
  while (($# > 0)); do
    case "$1" in
      --name|--name=*) option_value --name "$@"; NAME="$OPT_VALUE" ;;
      --zone|--zone=*) option_value --zone "$@"; ZONE="$OPT_VALUE" ;;
      --accelerator-type|--accelerator-type=*) option_value --accelerator-type "$@"; ACCELERATOR_TYPE="$OPT_VALUE" ;;
      --runtime-version|--runtime-version=*) option_value --runtime-version "$@"; RUNTIME_VERSION="$OPT_VALUE" ;;
      --project|--project=*) option_value --project "$@"; PROJECT="$OPT_VALUE" ;;
      --workdir|--workdir=*) option_value --workdir "$@"; WORKDIR="$OPT_VALUE" ;;
      --config|--config=*) option_value --config "$@"; CONFIG="$OPT_VALUE" ;;
      --python-version|--python-version=*) option_value --python-version "$@"; PYTHON_VERSION="$OPT_VALUE" ;;
      --max-retries|--max-retries=*) option_value --max-retries "$@"; MAX_RETRIES="$OPT_VALUE" ;;
      --create-arg|--create-arg=*) option_value --create-arg "$@"; CREATE_ARGS+=("$OPT_VALUE") ;;
      --queued) QUEUED=1; OPT_SHIFT=1 ;;
      --spot) SPOT=1; OPT_SHIFT=1 ;;
      --preemptible) PREEMPTIBLE=1; OPT_SHIFT=1 ;;
      --keep) KEEP=1; OPT_SHIFT=1 ;;
      --dry-run) DRY_RUN=1; OPT_SHIFT=1 ;;
      -h|--help) usage; exit 0 ;;
      --) shift; MAIN_ARGS=("$@"); return 0 ;;
      *) usage_error "unknown option '$1' (arguments for flax_detector.main go after '--')" ;;
    esac
    shift "$OPT_SHIFT"
  done
}

# The TPU software image for each generation (https://cloud.google.com/tpu/docs/runtimes).
default_runtime_version() {
  case "$1" in
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) return 1 ;;
  esac
}

validate_args() {
  [[ -n $ZONE ]] || usage_error "--zone is required (or set TPU_ZONE), e.g. --zone=us-central2-b"
  [[ -n $WORKDIR ]] || usage_error "--workdir is required (or set WORKDIR), e.g. --workdir=gs://my-bucket/runs/vgg16"
  [[ -n $NAME ]] || usage_error "--name must not be empty"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || usage_error "--name='$NAME' is not a valid TPU name: lowercase letters, digits and '-', starting with a letter"
  [[ -n $ACCELERATOR_TYPE ]] || usage_error "--accelerator-type must not be empty, e.g. --accelerator-type=v5litepod-16"
  if [[ -z $RUNTIME_VERSION ]]; then
    RUNTIME_VERSION="$(default_runtime_version "$ACCELERATOR_TYPE")" \
      || usage_error "no default --runtime-version for --accelerator-type=$ACCELERATOR_TYPE: pass --runtime-version"
  fi
  [[ $MAX_RETRIES =~ ^[0-9]+$ ]] || usage_error "--max-retries must be a whole number >= 0, got '$MAX_RETRIES'"
  [[ $POLL_SECONDS =~ ^[0-9]+$ ]] || usage_error "TPU_POLL_SECONDS must be a whole number, got '$POLL_SECONDS'"
  if ((SPOT && PREEMPTIBLE)); then
    usage_error "--spot and --preemptible exclude each other"
  fi
  if ((QUEUED && PREEMPTIBLE)); then
    usage_error "--preemptible is for plain TPU VMs; queued resources take --spot"
  fi
  [[ -n $CONFIG ]] || usage_error "--config must not be empty"
  if [[ $WORKDIR != gs://* ]]; then
    log "warning: --workdir=$WORKDIR is not a gs:// path; every worker must see the same checkpoints"
  fi
}

# ---------------------------------------------------------------------------------------------
# gcloud commands

LOCATION_ARGS=()   # --zone and --project for every gcloud command, set in main
DELETE_CMD=()
TPU_MAY_EXIST=0    # set once we created or adopted the TPU: the cleanup deletes it
DRY_EXISTS=0       # a dry run's stand-in for the TPU's existence
TMP_DIR=""
TARBALL=""

# Prints the state of the TPU VM node (READY, CREATING, PREEMPTED, ...) or of the queued resource
# (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...), NOT_FOUND when it does not exist, UNKNOWN when
# gcloud fails for another reason. In a dry run: the state a healthy run would see.
query_state() {
  local kind="$1" out err_file status=0
  local cmd
  if [[ $kind == queued ]]; then
    cmd=(gcloud compute tpus queued-resources describe "$NAME" "${LOCATION_ARGS[@]}" --format='value(state.state)')
  else
    cmd=(gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION_ARGS[@]}" --format='value(state)')
  fi
  if ((DRY_RUN)); then
    run "${cmd[@]}"
    if ((!DRY_EXISTS)); then echo NOT_FOUND
    elif [[ $kind == queued ]]; then echo ACTIVE
    else echo READY
    fi
    return 0
  fi
  err_file="$(mktemp)"
  out="$("${cmd[@]}" 2>"$err_file")" || status=$?
  if ((status == 0)) && [[ -n $out ]]; then
    printf '%s\n' "$out" | tr '[:lower:]' '[:upper:]'
  elif grep -qiE 'NOT_FOUND|not found|was not found' "$err_file"; then
    echo NOT_FOUND
  else
    sed "s/^/[$SCRIPT_NAME] gcloud: /" "$err_file" >&2
    echo UNKNOWN
  fi
  rm -f "$err_file"
}

resource_kind() { if ((QUEUED)); then echo queued; else echo node; fi; }

# READY node (and, for a queued resource, ACTIVE resource): the TPU can run the trainer.
tpu_healthy() {
  local state
  if ((QUEUED)); then
    state="$(query_state queued)"
    [[ $state == ACTIVE ]] || return 1
  fi
  state="$(query_state node)"
  [[ $state == READY ]]
}

# States from which the TPU still becomes usable by itself: keep waiting.
is_transitional() {
  case "$1" in
    CREATING|STARTING|RESTARTING|REIMAGING|REPAIRING|UNHIDING|STATE_UNSPECIFIED) return 0 ;;  # nodes
    ACCEPTED|WAITING_FOR_RESOURCES|PROVISIONING) return 0 ;;                                   # queued resources
    *) return 1 ;;
  esac
}

# Waits until the TPU can run the trainer; returns 1 when it ends up in a state it will not leave
# by itself (FAILED, SUSPENDED, PREEMPTED, gone...).
wait_until_ready() {
  local kind state kinds=(node)
  if ((QUEUED)); then kinds=(queued node); fi
  for kind in "${kinds[@]}"; do
    while :; do
      state="$(query_state "$kind")"
      if [[ $state == READY || $state == ACTIVE ]]; then
        break
      elif is_transitional "$state" || { [[ $kind == node && $state == NOT_FOUND ]] && ((QUEUED)); }; then
        # A queued resource that just became ACTIVE may list its node a moment later.
        log "waiting for the $(describe_kind "$kind") $NAME: $state (next check in ${POLL_SECONDS}s)"
        sleep "$POLL_SECONDS"
      else
        log "the $(describe_kind "$kind") $NAME is $state"
        return 1
      fi
    done
  done
}

describe_kind() { if [[ $1 == queued ]]; then echo "queued resource"; else echo "TPU VM"; fi; }

create_tpu() {
  local cmd
  if ((QUEUED)); then
    cmd=(gcloud compute tpus queued-resources create "$NAME" "${LOCATION_ARGS[@]}" --node-id="$NAME"
         --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
    if ((SPOT)); then cmd+=(--spot); fi
  else
    cmd=(gcloud compute tpus tpu-vm create "$NAME" "${LOCATION_ARGS[@]}"
         --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
    if ((SPOT)); then cmd+=(--spot); fi
    if ((PREEMPTIBLE)); then cmd+=(--preemptible); fi
  fi
  cmd+=(${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"})
  TPU_MAY_EXIST=1   # even a failed create can leave a resource behind
  log "creating the $(describe_kind "$(resource_kind)") $NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION)"
  run "${cmd[@]}" || die "could not create the $(describe_kind "$(resource_kind)") $NAME (see gcloud's message above: quota, capacity, zone, permissions?)"
  DRY_EXISTS=1
}

# Sets DELETE_CMD to the command that deletes the TPU (or the queued resource and its node).
set_delete_cmd() {
  if ((QUEUED)); then
    # --force also deletes the node the queued resource made.
    DELETE_CMD=(gcloud compute tpus queued-resources delete "$NAME" "${LOCATION_ARGS[@]}" --force --quiet)
  else
    DELETE_CMD=(gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION_ARGS[@]}" --quiet)
  fi
}

# Deletes the TPU (or queued resource) and waits until it is gone, so a new one can take its name.
# Returns 1 if it is still there and not being deleted.
delete_tpu() {
  local state deleted=0
  log "deleting the $(describe_kind "$(resource_kind)") $NAME"
  # The delete fails when the TPU is already gone: the state decides.
  if run "${DELETE_CMD[@]}"; then deleted=1; fi
  DRY_EXISTS=0
  while :; do
    state="$(query_state "$(resource_kind)")"
    if [[ $state == NOT_FOUND ]]; then
      return 0
    elif [[ $state == UNKNOWN ]] || { ((!deleted)) && [[ $state != DELETING ]]; }; then
      return 1
    fi
    log "waiting for $NAME to be deleted: $state (next check in ${POLL_SECONDS}s)"
    sleep "$POLL_SECONDS"
  done
}

# Creates the TPU, or adopts a healthy one of the same name (e.g. left by --keep), then waits for it.
ensure_tpu() {
  local state
  state="$(query_state "$(resource_kind)")"
  if [[ $state == NOT_FOUND ]]; then
    create_tpu
  elif [[ $state == READY || $state == ACTIVE ]] || is_transitional "$state"; then
    log "reusing the existing $(describe_kind "$(resource_kind)") $NAME ($state)"
    TPU_MAY_EXIST=1
  elif [[ $state == UNKNOWN ]]; then
    die "could not query the TPU $NAME in zone $ZONE (is gcloud authenticated, is the project set?)"
  else
    log "an earlier $(describe_kind "$(resource_kind)") $NAME is $state: replacing it"
    TPU_MAY_EXIST=1
    delete_tpu || die "could not delete the old $NAME"
    create_tpu
  fi
  wait_until_ready || die "the TPU $NAME did not become ready"
}

# ---------------------------------------------------------------------------------------------
# The project on the workers

make_tarball() {
  if ((DRY_RUN)); then
    TARBALL="${TMPDIR:-/tmp}/$REMOTE_TARBALL"
  else
    TMP_DIR="$(mktemp -d)"
    TARBALL="$TMP_DIR/$REMOTE_TARBALL"
  fi
  if [[ -e $PROJECT_ROOT/.git ]]; then
    if ((!DRY_RUN)) && [[ -n "$(git -C "$PROJECT_ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
      log "warning: uncommitted changes are not shipped: the workers get HEAD ($(git -C "$PROJECT_ROOT" rev-parse --short HEAD))"
    fi
    run git -C "$PROJECT_ROOT" archive --format=tar.gz --output="$TARBALL" HEAD || die "git archive failed"
  else
    run tar -czf "$TARBALL" -C "$PROJECT_ROOT" --exclude=.git --exclude=.venv --exclude=runs \
      --exclude=__pycache__ . || die "could not pack $PROJECT_ROOT"
  fi
}

# Joins words into one string for the remote shell, each word quoted.
remote_words() { quote_cmd "$@"; }

copy_project() {
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:$REMOTE_TARBALL" --worker=all "${LOCATION_ARGS[@]}"
}

install_project() {
  # Runs on every worker. uv brings a Python >= 3.11 (JAX's minimum) next to the image's 3.10.
  local script
  script="set -euo pipefail"
  script+="; rm -rf $REMOTE_DIR $REMOTE_VENV && mkdir -p $REMOTE_DIR"
  script+=" && tar -xzf ~/$REMOTE_TARBALL -C $REMOTE_DIR"
  script+=" && { python3 -m pip install --user --quiet --upgrade uv || python3 -m pip install --user --quiet --upgrade --break-system-packages uv; }"
  script+=" && python3 -m uv venv --quiet --python $(remote_words "$PYTHON_VERSION") $REMOTE_VENV"
  script+=" && python3 -m uv pip install --quiet --python $REMOTE_VENV/bin/python -e $REMOTE_DIR \"jax[tpu]\""
  script+=" && $REMOTE_VENV/bin/python -c \"import jax, flax_detector; print(jax.__version__)\""
  run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${LOCATION_ARGS[@]}" --command="$script"
}

train() {
  local script
  script="cd $REMOTE_DIR && exec $REMOTE_VENV/bin/python -m flax_detector.main"
  script+=" $(remote_words --config="$CONFIG" --workdir="$WORKDIR" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})"
  run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${LOCATION_ARGS[@]}" \
    --ssh-flag=-oServerAliveInterval=60 --command="$script"
}

# One attempt on a ready TPU. Returns the first failing step's status (set -e does not apply in
# functions called from a condition, hence the explicit returns).
deploy_and_train() {
  log "copying the project to every worker of $NAME"
  copy_project || return $?
  log "installing the project on every worker"
  install_project || return $?
  log "training on every worker of $NAME (workdir $WORKDIR)"
  train || return $?
}

# ---------------------------------------------------------------------------------------------

cleanup() {
  local status=$?
  set +e
  trap - EXIT INT TERM
  [[ -n $TMP_DIR ]] && rm -rf "$TMP_DIR"
  if ((TPU_MAY_EXIST)); then
    if ((KEEP)); then
      log "--keep: $NAME is left running. Log in: $(quote_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION_ARGS[@]}")"
      log "delete it when done: $(quote_cmd "${DELETE_CMD[@]}")"
    elif ! delete_tpu; then
      log "error: could not delete $NAME; it may still cost money. Delete it by hand: $(quote_cmd "${DELETE_CMD[@]}")"
      ((status == 0)) && status=1
    fi
  fi
  exit "$status"
}

main() {
  parse_args "$@"
  validate_args
  LOCATION_ARGS=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then LOCATION_ARGS+=(--project="$PROJECT"); fi
  set_delete_cmd
  if ((!DRY_RUN)); then
    command -v gcloud >/dev/null 2>&1 || die "gcloud not found: install the Google Cloud CLI (or use --dry-run)"
  fi
  exec 3>&1
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  make_tarball
  local retries=0 status state
  while :; do
    ensure_tpu
    status=0
    deploy_and_train || status=$?
    if ((status == 0)); then
      log "training finished; results in $WORKDIR"
      return 0
    fi
    if tpu_healthy; then
      die "the run failed (exit status $status) on a healthy TPU, so not a preemption: not retrying." \
          "Fix the cause and run the same command again: training resumes from $WORKDIR"
    fi
    state="$(query_state "$(resource_kind)")"
    if ((retries >= MAX_RETRIES)); then
      die "the TPU $NAME was lost ($state) and the $MAX_RETRIES retries are used up; run the same command again to resume from $WORKDIR"
    fi
    retries=$((retries + 1))
    log "the TPU $NAME was lost ($state), probably preempted: recreating it (retry $retries of $MAX_RETRIES)"
    delete_tpu || die "could not delete the lost TPU $NAME"
  done
}

main "$@"
