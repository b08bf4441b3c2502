"""The PNGs flaxtl writes: confusion matrices (predict) and study charts."""

from __future__ import annotations

from collections.abc import Sequence
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Files only, never a window.

import matplotlib.pyplot as plt
import numpy as np


def confusion_matrix(
  matrix: np.ndarray, class_names: Sequence[str], path: Path
) -> None:
  fig, ax = plt.subplots(
    figsize=(1 + 0.5 * len(class_names), 1 + 0.45 * len(class_names))
  )
  ax.imshow(matrix, cmap="Blues")
  ticks = range(len(class_names))
  ax.set(
    xticks=ticks,
    yticks=ticks,
    xticklabels=class_names,
    yticklabels=class_names,
    xlabel="predicted",
    ylabel="true",
    title="Confusion matrix",
  )
  for (i, j), v in np.ndenumerate(matrix):
    if v:
      ax.text(
        j,
        i,
        str(v),
        ha="center",
        va="center",
        fontsize=7,
        color="white" if v > matrix.max() / 2 else "black",
      )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def study(results: list[dict], workdir: Path) -> list[Path]:
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for r in results:
    lines = [
      json.loads(line)
      for line in (workdir / r["name"] / "metrics.jsonl")
      .read_text()
      .splitlines()
    ]
    train = [
      (line["step"], line["loss"]) for line in lines if line["split"] == "train"
    ]
    val = [
      (line["step"], line["accuracy"])
      for line in lines
      if line["split"] == "val"
    ]
    if train:
      ax_loss.plot(*zip(*train), label=r["name"])
    if val:
      ax_acc.plot(*zip(*val), marker="o", label=r["name"])
  ax_loss.set(
    xlabel="step", ylabel="train loss", title="Learning curves", yscale="log"
  )
  ax_acc.set(
    xlabel="step", ylabel="validation accuracy", title="Validation accuracy"
  )
  for ax in (ax_loss, ax_acc):
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  curves = workdir / "learning_curves.png"
  fig.savefig(curves, dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 3.5))
  names = [r["name"] for r in results]
  acc = [
    100 * (r.get("test_accuracy") or r.get("val_accuracy") or 0)
    for r in results
  ]
  ax.barh(names, acc, color="tab:blue")
  for i, a in enumerate(acc):
    ax.text(a + 0.5, i, f"{a:.1f}%", va="center", fontsize=8)
  ax.set(
    xlim=(0, 105),
    xlabel="test accuracy (%)",
    title="Strategies on the same split",
  )
  fig.tight_layout()
  bars = workdir / "accuracy.png"
  fig.savefig(bars, dpi=110)
  plt.close(fig)
  return [curves, bars]
