"""Command line entry point: `python -m flax_detector.main --config=configs/vgg16.py --workdir=DIR`.

Intentionally short: flags, logging, the workdir lock, then train.train_and_evaluate. Everything
else is importable and testable on its own.

Exit codes: 0 done (or stopped cleanly by a preemption, resumable), 2 a user error (a config value,
a path, a workdir in use: one message naming it and the fix), 1 a run stopped by its environment
(a full disk, a diverged loss: one message). Anything else is a bug and shows its traceback.
`--verbose` adds tracebacks to those messages and keeps the INFO lines of JAX, Orbax and Grain.
"""

import gc
import sys
import traceback
from typing import NoReturn

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from flax_detector import compilation, config_overrides, distributed, errors, host_allocator, library_logs, run_lock

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and final_metrics.json.")
config_flags.DEFINE_config_file(
  "config", None, "Training configuration, e.g. configs/vgg16.py or configs/vgg16.py:cpu.", lock_config=True
)
flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0, for a multi-process job on a cluster JAX does not detect by itself "
  "(SLURM and Cloud TPU VMs are detected; then leave the three flags unset).",
)
flags.DEFINE_integer("num_processes", None, "Number of processes of the job (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index in 0..num_processes-1 (with --coordinator_address).")
flags.DEFINE_bool(
  "verbose",
  False,
  "Show the traceback of user errors and keep the INFO log lines of JAX, Orbax and "
  "Grain (checkpoint internals, backend probing).",
  allow_override=True,
)
flags.mark_flags_as_required(["config", "workdir"])


def _fail(error: Exception, exit_code: int) -> NoReturn:
  if FLAGS.verbose:
    traceback.print_exception(error)
  print(f"error: {error}", file=sys.stderr)
  sys.exit(exit_code)


def _load_config() -> ml_collections.ConfigDict:
  """FLAGS.config, loaded; a config file that cannot be loaded is a user error."""
  try:
    FLAGS.config.keys()  # loading is lazy and fails on first use
  except OSError as error:
    last_line = str(error).strip().splitlines()[-1].strip()
    raise errors.UserError(f"--config: cannot load {FLAGS['config'].config_filename}: {last_line}") from error
  return FLAGS.config


def _run() -> None:
  with errors.as_user_errors():
    config = _load_config()
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  with run_lock.hold(FLAGS.workdir, jax.process_index()):
    # Imported here, not at the top: Grain's worker processes re-import this module when they start,
    # and should not pay for TensorFlow (pulled in by CLU's writers) to decode images.
    from flax_detector import train  # pylint: disable=g-import-not-at-top

    logging.info(
      "JAX process %d of %d, local devices %s", jax.process_index(), jax.process_count(), jax.local_devices()
    )
    train.train_and_evaluate(config, FLAGS.workdir)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  host_allocator.keep_freed_memory_mapped()  # before JAX starts
  compilation.keep_compiled_programs()
  compilation.generate_cpu_code_at_o2()
  if not FLAGS.verbose:
    library_logs.hide_library_logs(keep_from=logging.logging.WARNING)
  # A Grain batch still in flight when an iterator closes is unlinked at exit by multiprocessing's resource
  # tracker, which warns about "leaked shared_memory objects" though nothing is lost. The tracker process
  # (started with the first Grain worker) takes its warning filters from this process's -W options.
  sys.warnoptions.append("ignore:resource_tracker:UserWarning")
  try:
    _run()
  except errors.UserError as error:
    _fail(error, 2)
  except errors.RunStoppedError as error:
    _fail(error, 1)
  finally:
    # Grain's last batch of each iterator sits in a reference cycle (a prefetch thread's frame kept by its
    # final exception) and frees its shared memory only when collected; the collector does not run before
    # exit, and the resource tracker would then warn about "leaked shared_memory objects".
    gc.collect()


if __name__ == "__main__":
  app.run(main, flags_parser=config_overrides.parse_flags)
