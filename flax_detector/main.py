"""Command line entry point: `python -m flax_detector.main --config=configs/vgg16.py --workdir=DIR`.

Intentionally short: flags, logging, then train.train_and_evaluate. Everything else is importable
and testable on its own.
"""

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from flax_detector import distributed


FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and final_metrics.json.")
config_flags.DEFINE_config_file("config", None, "Training configuration, e.g. configs/vgg16.py or configs/vgg16.py:cpu.",
                                 lock_config=True)
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for a multi-process job on a cluster JAX does not detect by itself "
                    "(SLURM and Cloud TPU VMs are detected; then leave the three flags unset).")
flags.DEFINE_integer("num_processes", None, "Number of processes of the job (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index in 0..num_processes-1 (with --coordinator_address).")
flags.DEFINE_bool("verbose_libraries", False, "Keep Orbax's and Grain's INFO log lines (checkpoint internals).")
flags.mark_flags_as_required(["config", "workdir"])


class _LibraryInfoFilter(logging.logging.Filter):
  """Drops Orbax's and Grain's INFO chatter (dozens of lines per checkpoint); their warnings still pass."""

  _QUIET = ("/orbax/", "/grain/")

  def filter(self, record: logging.logging.LogRecord) -> bool:
    return record.levelno >= logging.logging.WARNING or not any(part in record.pathname for part in self._QUIET)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.verbose_libraries:
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  # Imported here, not at the top: Grain's worker processes re-import this module when they start,
  # and should not pay for TensorFlow (pulled in by CLU's writers) to decode images.
  from flax_detector import train  # pylint: disable=g-import-not-at-top

  logging.info("JAX process %d of %d, local devices %s", jax.process_index(), jax.process_count(), jax.local_devices())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
