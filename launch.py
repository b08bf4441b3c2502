"""Runs a flaxtl config.

    python launch.py --config configs/mnist_freeze8.py[:variant] \
        [--workdir DIR] [--config.KEY=VALUE ...]

All logic lives in `flaxtl.train.train_and_evaluate(config, workdir)`.
"""

from pathlib import Path
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from flaxtl import config_files
from flaxtl.errors import EXIT_USER_ERROR, UserError, cli_logging
from flaxtl.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Path to a config file (with optional :variant).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Run directory: checkpoints, metrics, summary.json; rerunning resumes or "
  "reports it (default: workdirs/<config>[-<variant>]).",
)
_HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull", "-?")


def main(argv):
  del argv
  config = _CONFIG.value
  spec = config_flags.get_config_filename(flags.FLAGS["config"])
  workdir = _WORKDIR.value or f"workdirs/{config_files.run_name(spec)}"
  cli_logging()
  try:
    result = train_and_evaluate(config, workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  if result["interrupted"]:
    # Not finished: a chained `launch && predict` must not go on.
    sys.exit(128 + signal.Signals[result["interrupted"]].value)
  print(
    f"report: {workdir}/summary.json (per-step metrics: "
    f"{workdir}/metrics.jsonl, TensorBoard: {workdir}/tensorboard)"
  )
  print(f"final variables: {workdir}/params (rerunning reports this run)")
  print(
    f"predict: python -m flaxtl.predict --workdir {workdir} "
    "--data csv:TEST.csv --out submission.csv"
  )


def _check_config_file(argv) -> None:
  """config_flags reports a missing file as a traceback, at its first use."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    path = value.partition(":")[0]
    if not Path(path).is_file():
      raise FileNotFoundError(path)


def _unknown_key(argv) -> str:
  """Which --config.KEY override names no key, with the closest real one."""
  spec = next(
    (
      a.split("=", 1)[1] if a.startswith("--config=") else argv[i + 1]
      for i, a in enumerate(argv)
      if a.startswith("--config=") or (a == "--config" and i + 1 < len(argv))
    ),
    None,
  )
  overrides = [a for a in argv if a.startswith("--config.")]
  return config_files.unknown_key_message(spec, overrides)


def _parse_flags(argv):
  """absl's parser; a bad flag, config file or key is one line and exit 2."""
  try:
    _check_config_file(argv)
    return flags.FLAGS(argv)
  except SystemExit as e:
    if any(a in _HELP_FLAGS for a in argv):
      sys.exit(0)  # absl exits 1 after printing the help a user asked for.
    raise e from None
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # A config file that raised: its flag and the exception's own line.
    message = (
      f"{lines[0].split(':')[0]}: {lines[-1]}"
      if "Traceback" in str(e)
      else " ".join(lines)
    )
  except (AttributeError, KeyError):  # ml_collections' unknown-key errors.
    message = _unknown_key(argv)
  except FileNotFoundError as e:
    message = f"--config: {e}: no such config file"
  except SyntaxError as e:
    message = f"--config: {e.filename}:{e.lineno}: {e.msg}"
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def run() -> None:
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
