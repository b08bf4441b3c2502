"""Runs a flaxtl config.

    python launch.py --config configs/mnist_freeze8.py[:variant] \
        [--workdir DIR] [--config.KEY=VALUE ...]

All logic lives in `flaxtl.train.train_and_evaluate(config, workdir)`.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from flaxtl.errors import UserError, cli_logging
from flaxtl.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Path to a config file (with optional :variant).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory (default: workdirs/<config name>)."
)


def main(argv):
  del argv
  config = _CONFIG.value
  workdir = _WORKDIR.value or f"workdirs/{_config_name()}"
  cli_logging()
  try:
    train_and_evaluate(config, workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(
    f"report: {workdir}/summary.json (per-step metrics: "
    f"{workdir}/metrics.jsonl, "
    f"TensorBoard: {workdir}/tensorboard)"
  )
  print(
    f"checkpoint: {workdir}/checkpoints (resume: rerun the same command); "
    f"final params: {workdir}/params"
  )


def _config_name() -> str:
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  return path.rsplit("/", 1)[-1].removesuffix(".py")


def _parse_flags(argv):
  """absl's parser; a bad flag, config file or key is one line and exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # A config file that raised: its flag and the exception's own line.
    message = (
      f"{lines[0].split(':')[0]}: {lines[-1]}"
      if "Traceback" in str(e)
      else " ".join(lines)
    )
  except (AttributeError, KeyError) as e:  # ml_collections' unknown-key errors.
    bad = [a for a in argv if a.startswith("--config.")]
    message = f"unknown config key {str(e).strip(chr(34))} (in {' '.join(bad)})"
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run() -> None:
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
