"""The tutorial's comparison, reproducible in one command.

    python -m flaxtl.study --workdir workdirs/study \\
        --configs configs/mnist_mlp.py configs/mnist_cnn.py configs/mnist_features.py:hed \\
                  configs/mnist_freeze8.py:hed_quick configs/mnist_scratch.py:quick configs/mnist_finetune.py:hed \\
        --set data.val_fraction=0.2 [...]

Runs every strategy on the same data split (the configs share data.source,
split_seed and val_fraction; --set applies to all of them) and writes
report.md, results.json, learning_curves.png and accuracy.png into --workdir.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

from flaxtl import config_files
from flaxtl.errors import UserError, cli_logging, exit_on_user_error

log = logging.getLogger(__name__)


def run_name(spec: str) -> str:
  path, _, variant = spec.partition(":")
  return Path(path).stem + (f"-{variant}" if variant else "")


def run_study(specs: Sequence[str], workdir: Path, overrides: Sequence[str] = ()) -> list[dict]:
  from flaxtl.train import train_and_evaluate

  configs = []
  for spec in specs:  # Load everything first: a bad config stops the study before any training.
    config = config_files.load(spec)
    for o in overrides:
      config_files.override(config, o)
    configs.append((spec, config))
  _check_same_split(configs)
  results = []
  for spec, config in configs:
    name = run_name(spec)
    log.info("study: %s", name)
    r = train_and_evaluate(config, workdir / name)
    results.append({"name": name, "config": spec, **r})
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
  write_report(results, workdir)
  return results


SPLIT_KEYS = ("source", "test_source", "val_fraction", "split_seed", "stratify", "max_examples")


def _check_same_split(configs) -> None:
  """A comparison is only fair on one split: the configs must agree on how data is split."""
  first_spec, first = configs[0]
  for spec, config in configs[1:]:
    for key in SPLIT_KEYS:
      a, b = first.data.get(key), config.data.get(key)
      if a != b:
        raise UserError(f"{spec} has data.{key}={b!r} but {first_spec} has {a!r}: strategies must share "
                        f"one split; pass --set data.{key}={a!r}")


def _fmt(v, pct=False):
  if v is None:
    return "-"
  return f"{100 * v:.1f}%" if pct else (f"{v:.3f}" if isinstance(v, float) else str(v))


def write_report(results: list[dict], workdir: Path) -> Path:
  lines = [
      "| strategy | weights | trainable params | val acc | val log loss | test acc | test log loss | wall time |",
      "|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results:
    lines.append(
        f"| {r['name']} | {r.get('weights', '-')} | {r.get('trainable_params', 0):,} | "
        f"{_fmt(r.get('val_accuracy'), True)} | {_fmt(r.get('val_log_loss'))} | "
        f"{_fmt(r.get('test_accuracy'), True)} | {_fmt(r.get('test_log_loss'))} | {r['wall_time_s']:.0f} s |"
    )
  plots = _plots(results, workdir)
  text = "# Study\n\n" + "\n".join(lines) + "\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
  path = workdir / "report.md"
  path.write_text(text)
  return path


def _plots(results: list[dict], workdir: Path) -> list[Path]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for r in results:
    lines = [json.loads(l) for l in (workdir / r["name"] / "metrics.jsonl").read_text().splitlines()]
    train = [(l["step"], l["loss"]) for l in lines if l["split"] == "train"]
    val = [(l["step"], l["accuracy"]) for l in lines if l["split"] == "val"]
    if train:
      ax_loss.plot(*zip(*train), label=r["name"])
    if val:
      ax_acc.plot(*zip(*val), marker="o", label=r["name"])
  ax_loss.set(xlabel="step", ylabel="train loss", title="Learning curves", yscale="log")
  ax_acc.set(xlabel="step", ylabel="validation accuracy", title="Validation accuracy")
  for ax in (ax_loss, ax_acc):
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  curves = workdir / "learning_curves.png"
  fig.savefig(curves, dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 3.5))
  names = [r["name"] for r in results]
  acc = [100 * (r.get("test_accuracy") or r.get("val_accuracy") or 0) for r in results]
  ax.barh(names, acc, color="tab:blue")
  for i, a in enumerate(acc):
    ax.text(a + 0.5, i, f"{a:.1f}%", va="center", fontsize=8)
  ax.set(xlim=(0, 105), xlabel="test accuracy (%)", title="Strategies on the same split")
  fig.tight_layout()
  bars = workdir / "accuracy.png"
  fig.savefig(bars, dpi=110)
  plt.close(fig)
  return [curves, bars]


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
  p = argparse.ArgumentParser(prog="python -m flaxtl.study", description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", nargs="+", required=True, help="config files, each with an optional :variant")
  p.add_argument("--workdir", required=True, type=Path)
  p.add_argument("--set", nargs="*", default=[], dest="overrides", help="KEY=VALUE applied to every config")
  args = p.parse_args(argv)
  cli_logging()
  results = run_study(args.configs, args.workdir, args.overrides)
  print(f"report: {args.workdir / 'report.md'}")
  return results


if __name__ == "__main__":
  main()
