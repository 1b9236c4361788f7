#!/usr/bin/env bash
# Usage: launch/local_multiprocess.sh --workdir=DIR [options] [-- MAIN_ARGS...]
#
# Tries the multi-host code path on one machine: N local processes join one JAX job. For i in 0..N-1
# it starts, in the background, from the repository root,
#   python -m flax_detector.main --config=CONFIG --workdir=WORKDIR \
#       --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i [MAIN_ARGS...]
# with JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=D, so the job has N*D
# CPU devices, exactly as N hosts would. Process 0 is the coordinator. The log of process i goes to
# LOG_DIR/process_i.log; process 0's is also shown here unless --quiet.
#
# Ctrl-C or SIGTERM is passed on to every process as SIGTERM (the trainer checkpoints and stops; a
# second Ctrl-C kills them), and the same command resumes. When one process fails, the others are
# stopped too. The script waits for all and exits non-zero if any failed (130/143 when interrupted).
#
# Options (environment variable in brackets, default in parentheses):
#   --workdir=DIR                 run directory, required                  [WORKDIR]
#   -n, --num-processes=N         number of processes                      [NUM_PROCESSES] (2)
#   -d, --devices-per-process=D   simulated CPU devices per process        [DEVICES_PER_PROCESS] (2)
#   --config=PATH                 config                                   [CONFIG] (configs/vgg16.py:cpu)
#   --port=PORT                   coordinator port                         [COORDINATOR_PORT] (a free one)
#   --python=PYTHON               interpreter                              [PYTHON] (python, else python3)
#   --jax-platforms=P             JAX_PLATFORMS of the processes           [JAX_PLATFORMS] (cpu)
#   --log-dir=DIR                 where process_i.log go; needed for a gs:// workdir (WORKDIR/logs)
#   --quiet                       do not show process 0's log here
#   --dry-run                     print the commands, run none             [DRY_RUN=1]
#   -h, --help                    this help
# Options take --opt=value or --opt value; a value that starts with '-' needs the '=' form.
# Arguments after '--' go to every process, e.g. -- --config.num_train_steps=20
#
# Examples:
#   launch/local_multiprocess.sh --workdir=runs/multi -n 2 -- --config.num_epochs=1
#   launch/local_multiprocess.sh --workdir=runs/multi --dry-run     # print the commands only
# Written for bash 3.2 (macOS) and later (no bash 4 features); tested with bash 5.

set -euo pipefail

readonly SCRIPT_NAME="local_multiprocess.sh"
# The helpers log, die, usage_error, usage, quote_cmd, is_true, is_url and option_value.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PROJECT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly PROJECT_ROOT

# ---------------------------------------------------------------------------------------------
# Options

WORKDIR="${WORKDIR:-}"
NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES="${DEVICES_PER_PROCESS:-2}"
CONFIG="${CONFIG:-configs/vgg16.py:cpu}"
PORT="${COORDINATOR_PORT:-}"
PYTHON="${PYTHON:-}"
PLATFORMS="${JAX_PLATFORMS:-cpu}"
LOG_DIR=""
QUIET=0
if is_true "${DRY_RUN:-0}"; then DRY_RUN=1; else DRY_RUN=0; fi
MAIN_ARGS=()

parse_args() {
  while (($# > 0)); do
    case "$1" in
      --workdir|--workdir=*) option_value --workdir "$@"; WORKDIR="$OPT_VALUE" ;;
      -n|--num-processes|--num-processes=*) option_value --num-processes "$@"; NUM_PROCESSES="$OPT_VALUE" ;;
      -d|--devices-per-process|--devices-per-process=*) option_value --devices-per-process "$@"; DEVICES="$OPT_VALUE" ;;
      --config|--config=*) option_value --config "$@"; CONFIG="$OPT_VALUE" ;;
      --port|--port=*) option_value --port "$@"; PORT="$OPT_VALUE" ;;
      --python|--python=*) option_value --python "$@"; PYTHON="$OPT_VALUE" ;;
      --jax-platforms|--jax-platforms=*) option_value --jax-platforms "$@"; PLATFORMS="$OPT_VALUE" ;;
      --log-dir|--log-dir=*) option_value --log-dir "$@"; LOG_DIR="$OPT_VALUE" ;;
      --quiet) QUIET=1; OPT_SHIFT=1 ;;
      --dry-run) DRY_RUN=1; OPT_SHIFT=1 ;;
      -h|--help) usage; exit 0 ;;
      --) shift; MAIN_ARGS=("$@"); return 0 ;;
      *) usage_error "unknown option '$1' (arguments for flax_detector.main go after '--')" ;;
    esac
    shift "$OPT_SHIFT"
  done
}

# The processes run from the project root (so `-m flax_detector.main` and configs/ resolve);
# paths given relative to the caller's directory are made absolute first.
from_caller_dir() {
  if [[ $1 == /* || $PWD == "$PROJECT_ROOT" ]] || is_url "$1"; then
    printf '%s' "$1"
  else
    printf '%s/%s' "$PWD" "$1"
  fi
}

validate_args() {
  [[ -n $WORKDIR ]] || usage_error "--workdir is required (or set WORKDIR), e.g. --workdir=runs/multi"
  [[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] \
    || usage_error "--num-processes must be a whole number >= 1, got '$NUM_PROCESSES'"
  [[ $DEVICES =~ ^[1-9][0-9]*$ ]] || usage_error "--devices-per-process must be a whole number >= 1, got '$DEVICES'"
  [[ -z $PORT || $PORT =~ ^[1-9][0-9]*$ ]] || usage_error "--port must be a port number, got '$PORT'"
  [[ -n $CONFIG ]] || usage_error "--config must not be empty"
  if is_url "$WORKDIR" && [[ -z $LOG_DIR ]]; then
    usage_error "--workdir=$WORKDIR is not local: give --log-dir for the logs"
  fi
  WORKDIR="$(from_caller_dir "$WORKDIR")"
  LOG_DIR="$(from_caller_dir "${LOG_DIR:-$WORKDIR/logs}")"
  if [[ -f ${CONFIG%%:*} ]]; then CONFIG="$(from_caller_dir "$CONFIG")"; fi
  if [[ -z $PYTHON ]]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
  fi
}

# A port the system reports free (the OS picks it), else a random one in 20000-39999.
free_port() {
  local port
  local bind='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
  port="$("$PYTHON" -c "$bind" 2>/dev/null)" || true
  if [[ $port =~ ^[1-9][0-9]*$ ]]; then echo "$port"; else echo $((20000 + RANDOM % 20000)); fi
}

# XLA_FLAGS of the processes: the caller's, with our device count instead of any other.
xla_flags() {
  local flags=() flag out=""
  read -r -a flags <<<"${XLA_FLAGS:-}"
  for flag in ${flags[@]+"${flags[@]}"}; do
    case "$flag" in --xla_force_host_platform_device_count=*) ;; *) out+="$flag " ;; esac
  done
  printf '%s--xla_force_host_platform_device_count=%s' "$out" "$DEVICES"
}

# ---------------------------------------------------------------------------------------------

PIDS=()        # process i's pid
STATUS=()      # process i's exit status, once it has exited
TAIL_PID=""
STOPPING=0     # SIGTERM was sent to the processes
INTERRUPTED=0  # exit status to report after Ctrl-C / SIGTERM (130 / 143)

# Sends a signal to every process still running.
signal_all() {
  local sig="$1" i
  for ((i = 0; i < ${#PIDS[@]}; i++)); do
    if [[ -z ${STATUS[i]:-} ]]; then kill "-$sig" "${PIDS[i]}" 2>/dev/null || true; fi
  done
}

# shellcheck disable=SC2317  # called by the traps
on_signal() {
  if ((STOPPING)); then
    log "second signal: killing every process"
    signal_all KILL
  else
    log "$1: passing SIGTERM to every process (they checkpoint and stop; again to kill)"
    STOPPING=1
    signal_all TERM
  fi
  if [[ $1 == SIGINT ]]; then INTERRUPTED=130; else INTERRUPTED=143; fi
}

# shellcheck disable=SC2317  # called by the trap
on_exit() {
  local status=$?
  trap - EXIT INT TERM
  signal_all TERM   # only if this script dies early: normally none is left
  if [[ -n $TAIL_PID ]]; then kill "$TAIL_PID" 2>/dev/null || true; fi
  exit "$status"
}

main() {
  parse_args "$@"
  validate_args
  if [[ -z $PORT ]]; then PORT="$(free_port)"; fi
  local env_vars=(JAX_PLATFORMS="$PLATFORMS" XLA_FLAGS="$(xla_flags)")
  local address="127.0.0.1:$PORT" i cmd logfile
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote_cmd mkdir -p "$LOG_DIR")" "$(quote_cmd cd "$PROJECT_ROOT")"
  else
    mkdir -p "$LOG_DIR" || die "cannot create the log folder $LOG_DIR"
    cd "$PROJECT_ROOT"
    trap on_exit EXIT
    trap 'on_signal SIGINT' INT
    trap 'on_signal SIGTERM' TERM
    log "$NUM_PROCESSES processes x $DEVICES CPU devices, coordinator $address, logs in $LOG_DIR"
  fi

  for ((i = 0; i < NUM_PROCESSES; i++)); do
    cmd=(env "${env_vars[@]}" "$PYTHON" -m flax_detector.main --config="$CONFIG" --workdir="$WORKDIR"
         --coordinator_address="$address" --num_processes="$NUM_PROCESSES" --process_id="$i"
         ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})
    logfile="$LOG_DIR/process_$i.log"
    if ((DRY_RUN)); then
      printf '+ %s > %s 2>&1 &\n' "$(quote_cmd "${cmd[@]}")" "$(quote_cmd "$logfile")"
      continue
    fi
    printf '+ %s > %s 2>&1 &\n' "$(quote_cmd "${cmd[@]}")" "$(quote_cmd "$logfile")" >&2
    : >"$logfile"   # exists even if the process is stopped before it starts
    "${cmd[@]}" >"$logfile" 2>&1 &
    PIDS[i]=$!
  done
  if ((DRY_RUN)); then
    printf '+ wait\n'
    return 0
  fi

  if ((!QUIET)); then
    tail -n +1 -f "$LOG_DIR/process_0.log" &
    TAIL_PID=$!
  fi

  # Poll rather than `wait -n` (bash >= 4.3): record each exit, stop the rest after a failure.
  # A process that exits non-zero after we asked it to stop is "stopped", not "failed".
  local running=$NUM_PROCESSES failed=0 status
  while ((running > 0)); do
    for ((i = 0; i < NUM_PROCESSES; i++)); do
      if [[ -n ${STATUS[i]:-} ]] || kill -0 "${PIDS[i]}" 2>/dev/null; then continue; fi
      status=0
      wait "${PIDS[i]}" || status=$?
      STATUS[i]=$status
      running=$((running - 1))
      if ((status == 0)); then
        continue
      elif ((STOPPING)); then
        log "process $i stopped with status $status"
      else
        failed=$((failed + 1))
        log "process $i exited with status $status; its log: $LOG_DIR/process_$i.log"
        if ((running > 0)); then
          log "stopping the other processes"
          STOPPING=1
          signal_all TERM
        fi
      fi
    done
    if ((running > 0)); then
      sleep 0.5 &
      wait $! || true   # interruptible by the traps, unlike a plain sleep
    fi
  done

  if ((failed)); then
    log "$failed of $NUM_PROCESSES processes failed (exit statuses: ${STATUS[*]})"
    exit 1
  fi
  if ((INTERRUPTED)); then
    log "interrupted; run the same command again to resume from $WORKDIR"
    exit "$INTERRUPTED"
  fi
  log "all $NUM_PROCESSES processes finished; results in $WORKDIR"
}

main "$@"
