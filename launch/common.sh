# Helpers shared by launch/tpu_vm.sh and launch/local_multiprocess.sh. Sourced by those scripts,
# not run: each one sets SCRIPT_NAME (shown in the messages) before sourcing it.
# slurm.sbatch keeps its own copies: sbatch runs a spooled copy of the script, where a path
# relative to the script's directory does not lead here.
# Written for bash 3.2 (macOS) and later (no bash 4 features).
# shellcheck shell=bash

log() { printf '[%s] %s\n' "$SCRIPT_NAME" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$SCRIPT_NAME" "$*" >&2; exit 1; }
usage_error() { printf '[%s] error: %s\n(see launch/%s --help)\n' "$SCRIPT_NAME" "$*" "$SCRIPT_NAME" >&2; exit 2; }

# Prints its arguments as one shell-quoted command line that can be copied and pasted: words made
# only of safe characters stay bare, anything else is single-quoted.
quote_cmd() {
  local out="" arg safe='^[A-Za-z0-9_./:=@%+,-]+$'
  for arg in "$@"; do
    if [[ $arg =~ $safe ]]; then
      out+="$arg "
    else
      out+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  printf '%s' "${out% }"
}

is_true() { case "${1:-0}" in 1|true|TRUE|True|yes|YES|on|ON) return 0 ;; *) return 1 ;; esac; }

# Takes the value of option $1 from "--opt=value" ($2 is the whole word) or from the next word ($3),
# which must not look like an option: "--workdir --dry-run" is an error, not a workdir.
# Sets OPT_VALUE and OPT_SHIFT (how many words were used).
# shellcheck disable=SC2034  # OPT_VALUE and OPT_SHIFT are read by the caller
option_value() {
  local name="$1" word="$2"
  if [[ $word == --*=* ]]; then
    OPT_VALUE="${word#*=}"; OPT_SHIFT=1
  elif (($# >= 3)) && [[ $3 != -* ]]; then
    OPT_VALUE="$3"; OPT_SHIFT=2
  else
    usage_error "$name needs a value (write $name=VALUE for a value that starts with '-')"
  fi
}
