# Helpers shared by launch/local_multiprocess.sh and launch/slurm.sbatch: sourced, not run. Each script
# sets SCRIPT_NAME (shown in the messages) before sourcing it. slurm.sbatch finds this file through
# the repository root, since sbatch runs a spooled copy of the script, far from this folder.
# Written for bash 3.2 (macOS) and later (no bash 4 features).
# shellcheck shell=bash

log() { printf '[%s] %s\n' "$SCRIPT_NAME" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$SCRIPT_NAME" "$*" >&2; exit 1; }
usage_error() { printf '[%s] error: %s\n(see launch/%s --help)\n' "$SCRIPT_NAME" "$*" "$SCRIPT_NAME" >&2; exit 2; }

# Prints the running script's header comment, from its second line to the first blank line, without
# the leading "# ": each launcher documents its options there, once, and --help shows exactly that.
usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }

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

# The rule of flax_detector.workdir.is_url, the one place the Python side decides it: a remote path
# such as gs://bucket/run has "://" in it (tests/test_launch.py checks the two agree).
is_url() { [[ $1 == *://* ]]; }

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
