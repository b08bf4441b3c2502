"""PNG chart of results/{forward,train_step}.json -> results/chart.png.

    python benchmarks/chart.py

Left: forward images/s per input size and dtype (log scale: 224x224 is ~10
img/s, 32x32 hundreds). Right: train-step images/s at 64x64, batch 16. Bars
are grouped by case, one colour per framework; the label over each flaxtl bar
is its ratio to PyTorch with the same process settings (flaxtl / torch,
flaxtl_tuned / torch_tuned).
"""

from __future__ import annotations

import json

import common
import matplotlib

matplotlib.use("Agg")  # Headless: no display on the benchmark machine.
import matplotlib.pyplot as plt

COLOURS = {
  "flaxtl": "#1f77b4",
  "flaxtl_tuned": "#17becf",
  "torch": "#d62728",
  "torch_tuned": "#ff9896",
  "keras": "#7f7f7f",
  "keras_tuned": "#c7c7c7",
}
LABELS = {
  "flaxtl": "flaxtl (XLA + glibc defaults)",
  "flaxtl_tuned": "flaxtl_tuned (as launch.py runs it)",
  "torch_tuned": "torch_tuned (glibc tuned)",
  "keras_tuned": "keras_tuned (glibc tuned)",
}


def _load(name: str) -> dict:
  path = common.RESULTS / name
  return json.loads(path.read_text()) if path.exists() else {}


def _bars(
  ax,
  groups: list[str],
  values: dict[str, list],
  log: bool,
  title: str,
  ylabel: str,
) -> None:
  fws = [f for f in COLOURS if f in values]
  width = 0.8 / max(1, len(fws))
  for i, fw in enumerate(fws):
    xs = [g + (i - (len(fws) - 1) / 2) * width for g in range(len(groups))]
    ys = [v or 0 for v in values[fw]]
    ax.bar(xs, ys, width, label=LABELS.get(fw, fw), color=COLOURS[fw])
    # Like for like: stock vs stock, tuned vs tuned.
    torch_fw = fw.replace("flaxtl", "torch")
    if fw.startswith("flaxtl") and torch_fw in values:
      for x, y, t in zip(xs, ys, values[torch_fw]):
        if y and t:
          ax.text(
            x,
            y * (1.05 if log else 1.01),
            f"{y / t:.2f}",
            ha="center",
            va="bottom",
            fontsize=6,
            rotation=90,
          )
  ax.set_xticks(range(len(groups)))
  ax.set_xticklabels(groups, fontsize=8)
  if log:
    ax.set_yscale("log")
  ax.set_title(title, fontsize=10)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=7)
  ax.grid(axis="y", alpha=0.3)


def main() -> None:
  fwd, train = _load("forward.json"), _load("train_step.json")
  if not fwd and not train:
    raise SystemExit(
      f"no results in {common.RESULTS}; run benchmarks/run_all.sh first"
    )
  fig, axes = plt.subplots(
    1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]}
  )
  if fwd:
    res = fwd["results"]
    keys = [
      f"{c}/{d}"
      for c in ("224x8", "64x32", "32x64")
      for d in ("fp32", "bf16")
      if any(f"{c}/{d}" in r for r in res.values())
    ]
    values = {
      fw: [r.get(k, {}).get("img_s") for k in keys] for fw, r in res.items()
    }
    labels = [k.replace("x", "px\nb", 1).replace("/", "\n") for k in keys]
    _bars(
      axes[0],
      labels,
      values,
      True,
      "VGG16 forward (no top), images/s (label: flaxtl / torch)",
      "images/s",
    )
  if train:
    res = train["results"]
    cases = [
      c
      for c in ("freeze8", "full", "frozen_backbone")
      if any(c in r for r in res.values())
    ]
    values = {
      fw: [r.get(c, {}).get("img_s") for c in cases] for fw, r in res.items()
    }
    _bars(
      axes[1],
      cases,
      values,
      False,
      "Train step 64x64, batch 16, fp32, SGD (label: flaxtl / torch)",
      "images/s",
    )
  env = (fwd or train).get("env", {})
  fig.suptitle(
    f"{env.get('cpu', '?')}, {env.get('cores', '?')} cores", fontsize=9
  )
  fig.tight_layout()
  path = common.RESULTS / "chart.png"
  fig.savefig(path, dpi=130)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
