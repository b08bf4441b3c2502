"""results.json, report.md and plots of a probe run; the suite's leaderboard.

Every file is written whole (to a temporary name, then renamed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flaxtl import files


def _fmt(r: dict) -> str:
  return f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_ci95']:.1f}"


def _shots(k) -> str:
  return "all" if k is None else str(k)


def write_results(out: Path, records: list[dict], meta: dict) -> None:
  files.write_json(out / "results.json", {"meta": meta, "results": records})


def write_report(out: Path, records: list[dict], meta: dict) -> None:
  lines = [
    f"# Probe: {meta['arch']} ({meta['weights']})",
    "",
    f"- data: {meta['data']}; test: {meta['test_data']}",
    f"- n_train {meta['n_train']}, n_test {meta['n_test']}, "
    f"{meta['num_classes']} classes; image size {meta['image_size']}",
    f"- pooling: {meta['pooling']}",
    f"- split: {meta['split']}",
    "- accuracy in %, ± the 95% interval (t over seeds, or binomial over "
    "the test set for deterministic runs)",
    "",
    "| layer | method | shots | seeds | accuracy | n_train |",
    "|---|---|---|---|---|---|",
  ]
  for r in records:
    lines.append(
      f"| {r['layer']} | {r['method']} | {_shots(r['shots'])} | "
      f"{r['seeds']} | {_fmt(r)} | {r['n_train']} |"
    )
  lines += ["", "![accuracy vs shots](shots.png)"]
  if len({r["layer"] for r in records}) > 1:
    lines.append("![accuracy by layer](layers.png)")
  with files.atomic_open(out / "report.md") as f:
    f.write("\n".join(lines) + "\n")
  plot_shots(out / "shots.png", records, meta)
  if len({r["layer"] for r in records}) > 1:
    plot_layers(out / "layers.png", records, meta)


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _save(fig, path: Path) -> None:
  with files.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=110, bbox_inches="tight")


def plot_shots(path: Path, records: list[dict], meta: dict) -> None:
  """Accuracy against shots per method (the last layer; 'all' at the end)."""
  plt = _pyplot()
  layer = records[-1]["layer"]
  rows = [r for r in records if r["layer"] == layer]
  ticks = sorted({r["shots"] for r in rows if r["shots"] is not None})
  pos = {k: i for i, k in enumerate(ticks)}
  pos[None] = len(ticks)
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for method in dict.fromkeys(r["method"] for r in rows):
    rs = sorted(
      (r for r in rows if r["method"] == method),
      key=lambda r: pos[r["shots"]],
    )
    ax.errorbar(
      [pos[r["shots"]] for r in rs],
      [100 * r["accuracy_mean"] for r in rs],
      yerr=[100 * r["accuracy_ci95"] for r in rs],
      marker="o",
      capsize=3,
      label=method,
    )
  ax.set_xticks(range(len(ticks) + 1), [*map(str, ticks), "all"])
  ax.set_xlabel("training examples per class")
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 105)
  ax.set_title(f"{meta['arch']} ({meta['weights']}) {layer}", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  _save(fig, path)
  plt.close(fig)


def plot_layers(path: Path, records: list[dict], meta: dict) -> None:
  """Accuracy by layer for each (method, shots)."""
  plt = _pyplot()
  layers = list(dict.fromkeys(r["layer"] for r in records))
  fig, ax = plt.subplots(figsize=(max(5.5, 0.6 * len(layers)), 3.8))
  keys = dict.fromkeys((r["method"], r["shots"]) for r in records)
  for method, k in keys:
    rs = {
      r["layer"]: r
      for r in records
      if r["method"] == method and r["shots"] == k
    }
    xs = [i for i, layer in enumerate(layers) if layer in rs]
    ax.errorbar(
      xs,
      [100 * rs[layers[i]]["accuracy_mean"] for i in xs],
      yerr=[100 * rs[layers[i]]["accuracy_ci95"] for i in xs],
      marker="o",
      capsize=3,
      label=f"{method} {_shots(k)}",
    )
  ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right")
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 105)
  ax.set_title(f"{meta['arch']} ({meta['weights']}) by layer", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  _save(fig, path)
  plt.close(fig)


def leaderboard_rows(runs: list[dict], columns: Sequence[tuple]) -> list[dict]:
  """One row per (data set, backbone) with the chosen (method, shots)."""
  rows = []
  for run in runs:
    entry = {
      "dataset": run["dataset"],
      "backbone": run["backbone"],
      "layer": run["layer"],
      "seconds": run["seconds"],
    }
    for method, k in columns:
      for r in run["records"]:
        if r["method"] == method and r["shots"] == k:
          entry[f"{method}:{_shots(k)}"] = {
            "accuracy_mean": r["accuracy_mean"],
            "accuracy_ci95": r["accuracy_ci95"],
            "seeds": r["seeds"],
          }
    rows.append(entry)
  return rows


def write_leaderboard(
  out: Path,
  rows: list[dict],
  columns: Sequence[tuple],
  descriptions: dict[str, str],
  meta: dict,
) -> None:
  files.write_json(
    out / "leaderboard.json",
    {"meta": meta, "datasets": descriptions, "rows": rows},
  )
  datasets = list(dict.fromkeys(r["dataset"] for r in rows))
  backbones = list(dict.fromkeys(r["backbone"] for r in rows))
  cell = {(r["dataset"], r["backbone"]): r for r in rows}
  lines = ["# Offline transfer suite", ""]
  lines += [f"- command: `{meta['command']}`"]
  lines += [
    f"- wall time: {meta['wall_seconds']:.0f} s ({meta['resumed_runs']} "
    f"runs kept from earlier invocations; all runs' own time "
    f"{meta['run_seconds']:.0f} s); {meta['machine']}"
  ]
  lines += [
    f"- image size {meta['image_size']}, seeds {meta['seeds']}; pooling: "
    f"{meta['pooling']}; accuracy in %, ± the 95% interval",
    "",
    "Data sets:",
    "",
  ]
  lines += [f"- **{d}**: {descriptions[d]}" for d in datasets]
  for method, k in columns:
    col = f"{method}:{_shots(k)}"
    lines += ["", f"## {method}, {_shots(k)} per class", ""]
    lines.append("| data set | " + " | ".join(backbones) + " |")
    lines.append("|---|" + "---|" * len(backbones))
    for d in datasets:
      cells = []
      for b in backbones:
        r = cell.get((d, b), {}).get(col)
        cells.append(_fmt(r) if r else "–")
      lines.append(f"| {d} | " + " | ".join(cells) + " |")
    means = []
    for b in backbones:
      accs = [cell[(d, b)][col]["accuracy_mean"] for d in datasets
              if col in cell.get((d, b), {})]  # fmt: skip
      means.append(f"{100 * np.mean(accs):.1f}" if accs else "–")
    lines.append("| **mean** | " + " | ".join(means) + " |")
  lines += ["", "![leaderboard](leaderboard.png)", ""]
  with files.atomic_open(out / "leaderboard.md") as f:
    f.write("\n".join(lines))
  plot_heatmap(out / "leaderboard.png", rows, columns, datasets, backbones)


def plot_heatmap(path, rows, columns, datasets, backbones) -> None:
  plt = _pyplot()
  cell = {(r["dataset"], r["backbone"]): r for r in rows}
  fig, axes = plt.subplots(
    1,
    len(columns),
    figsize=(1.0 + 1.3 * len(backbones) * len(columns), 0.5 * len(datasets)
             + 1.8),
    squeeze=False,
  )  # fmt: skip
  for ax, (method, k) in zip(axes[0], columns):
    col = f"{method}:{_shots(k)}"
    grid = np.full((len(datasets), len(backbones)), np.nan)
    for i, d in enumerate(datasets):
      for j, b in enumerate(backbones):
        r = cell.get((d, b), {}).get(col)
        if r:
          grid[i, j] = 100 * r["accuracy_mean"]
    ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i in range(len(datasets)):
      for j in range(len(backbones)):
        if not np.isnan(grid[i, j]):
          r = cell[(datasets[i], backbones[j])][col]
          ax.text(
            j, i, f"{grid[i, j]:.0f}\n±{100 * r['accuracy_ci95']:.0f}",
            ha="center", va="center", fontsize=7,
            color="white" if grid[i, j] < 60 else "black",
          )  # fmt: skip
    ax.set_xticks(range(len(backbones)), backbones, rotation=40, ha="right",
                  fontsize=7)  # fmt: skip
    ax.set_yticks(range(len(datasets)), datasets, fontsize=8)
    ax.set_title(f"{method}, {_shots(k)} per class", fontsize=9)
  _save(fig, path)
  plt.close(fig)
