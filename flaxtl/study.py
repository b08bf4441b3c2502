"""The tutorial's comparison, reproducible in one command.

    python -m flaxtl.study --workdir workdirs/study --configs \\
        configs/mnist_mlp.py configs/mnist_cnn.py \\
        configs/mnist_features.py:hed \\
        configs/mnist_freeze8.py:hed_quick configs/mnist_scratch.py:quick \\
        configs/mnist_finetune.py:hed --set data.val_fraction=0.2 [...]

Runs every strategy on the same data split (the configs share data.source,
split_seed and val_fraction; --set applies to all of them) and writes
report.md, results.json, learning_curves.png and accuracy.png into --workdir.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import logging
from pathlib import Path

from flaxtl import config_files, files, plots
from flaxtl.errors import UserError, cli_logging, exit_on_user_error
from flaxtl.train import train_and_evaluate

log = logging.getLogger(__name__)


def run_study(
  specs: Sequence[str], workdir: Path, overrides: Sequence[str] = ()
) -> list[dict]:
  configs = []
  for spec in (
    specs
  ):  # Load everything first: a bad config stops the study before any training.
    config = config_files.load(spec)
    for o in overrides:
      config_files.override(config, o)
    configs.append((spec, config))
  _check_same_split(configs)
  results = []
  for spec, config in configs:
    name = config_files.run_name(spec)
    log.info("study: %s", name)
    r = train_and_evaluate(config, workdir / name)
    results.append({"name": name, "config": spec, **r})
  workdir.mkdir(parents=True, exist_ok=True)
  files.write_json(workdir / "results.json", results)
  write_report(results, workdir)
  return results


SPLIT_KEYS = (
  "source",
  "test_source",
  "val_fraction",
  "split_seed",
  "stratify",
  "max_examples",
)


def _check_same_split(configs) -> None:
  """A fair comparison needs one split: the configs must agree on it."""
  first_spec, first = configs[0]
  for spec, config in configs[1:]:
    for key in SPLIT_KEYS:
      a, b = first.data.get(key), config.data.get(key)
      if a != b:
        raise UserError(
          f"{spec} has data.{key}={b!r} but {first_spec} has {a!r}: "
          "strategies must share "
          f"one split; pass --set data.{key}={a!r}"
        )


def _fmt(v, pct=False):
  if v is None:
    return "-"
  return (
    f"{100 * v:.1f}%"
    if pct
    else (f"{v:.3f}" if isinstance(v, float) else str(v))
  )


def _row(cells) -> str:
  return "| " + " | ".join(str(c) for c in cells) + " |"


def write_report(results: list[dict], workdir: Path) -> Path:
  header = (
    "strategy",
    "weights",
    "trainable params",
    "val acc",
    "val log loss",
    "test acc",
    "test log loss",
    "wall time",
  )
  lines = [_row(header), "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    lines.append(
      _row(
        (
          r["name"],
          r.get("weights", "-"),
          f"{r.get('trainable_params', 0):,}",
          _fmt(r.get("val_accuracy"), True),
          _fmt(r.get("val_log_loss")),
          _fmt(r.get("test_accuracy"), True),
          _fmt(r.get("test_log_loss")),
          f"{r['wall_time_s']:.0f} s",
        )
      )
    )
  written = plots.study(results, workdir)
  text = (
    "# Study\n\n"
    + "\n".join(lines)
    + "\n\n"
    + "".join(f"![{p.stem}]({p.name})\n" for p in written)
  )
  path = workdir / "report.md"
  files.write_text(path, text)
  return path


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(
    prog="python -m flaxtl.study", description=__doc__.split("\n\n")[0]
  )
  p.add_argument(
    "--configs",
    nargs="+",
    required=True,
    help="config files, each with an optional :variant",
  )
  p.add_argument(
    "--workdir",
    required=True,
    type=Path,
    help="the study's folder: one run workdir per config, and the table",
  )
  p.add_argument(
    "--set",
    nargs="*",
    default=[],
    dest="overrides",
    help="KEY=VALUE applied to every config",
  )
  args = p.parse_args(argv)
  cli_logging()
  results = run_study(args.configs, args.workdir, args.overrides)
  print(f"report: {args.workdir / 'report.md'}")
  return results


if __name__ == "__main__":
  main()
