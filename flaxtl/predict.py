"""Predictions from a finished run.

    python -m flaxtl.predict --workdir workdirs/mnist_freeze8 --data csv:data/test.csv --out submission.csv [--probs]

Writes `filename,label` (class names as in training; `--probs` adds one
probability column per class). On labelled data it also prints accuracy and
log loss and writes a confusion-matrix PNG next to --out. For `mnist_sample`
the predictions cover its fixed held-out 1,000 digits.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np

from flaxtl import runtime, steps, weights
from flaxtl.data import eval_batches, sources
from flaxtl.errors import UserError, cli_logging, exit_on_user_error


def load_run(workdir: Path):
  """(config, class_names, model, params) of a finished run."""
  from flaxtl.train import build_model

  for name in ("config.json", "class_names.json", "params"):
    if not (workdir / name).exists():
      raise UserError(f"{workdir}: no {name}; is this the workdir of a finished run?")
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  class_names = json.loads((workdir / "class_names.json").read_text())
  model = build_model(config, len(class_names))
  return config, class_names, model, weights.restore_to_host(workdir / "params")


def predict_probs(workdir: Path, data_spec: str, batch_size: int = 64):
  config, class_names, model, params = load_run(workdir)
  opts = sources.Options(key="--data", class_names=class_names, labels_required=False,
                         load_size=config.data.get("load_size"), tfds_data_dir=config.data.get("tfds_data_dir"))
  ds, held_out = sources.read(data_spec, opts)
  if data_spec == "mnist_sample":
    ds = held_out
  fn = jax.jit(steps.make_predict_fn(model, prepare=steps.image_prep(config.image_size, config.preprocess)),
               compiler_options=runtime.compiler_options(config.get("xla_cpu_ynn", "auto"), config.image_size,
                                                         dtype=config.model.dtype))
  probs = np.concatenate([np.asarray(fn(params, b["image"]))[b["mask"]] for b in eval_batches(ds, batch_size)])
  return ds, class_names, probs


def write_csv(path: Path, filenames: Sequence[str], class_names: Sequence[str], probs: np.ndarray,
              with_probs: bool) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["filename", "label"] + ([f"prob_{c}" for c in class_names] if with_probs else []))
      for name, p in zip(filenames, probs):
        w.writerow([name, class_names[int(np.argmax(p))]] + ([f"{x:.6f}" for x in p] if with_probs else []))
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, n: int) -> np.ndarray:
  m = np.zeros((n, n), np.int64)
  np.add.at(m, (labels, preds), 1)
  return m


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(1 + 0.5 * len(class_names), 1 + 0.45 * len(class_names)))
  ax.imshow(matrix, cmap="Blues")
  ticks = range(len(class_names))
  ax.set(xticks=ticks, yticks=ticks, xticklabels=class_names, yticklabels=class_names,
         xlabel="predicted", ylabel="true", title="Confusion matrix")
  for (i, j), v in np.ndenumerate(matrix):
    if v:
      ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
              color="white" if v > matrix.max() / 2 else "black")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
  """sklearn.metrics.log_loss: clip to [eps, 1 - eps], renormalise, mean -log p(true)."""
  eps = np.finfo(probs.dtype).eps
  p = np.clip(probs, eps, 1 - eps)
  p = p / p.sum(1, keepdims=True)
  return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = argparse.ArgumentParser(prog="python -m flaxtl.predict", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, type=Path, help="a finished run's workdir")
  p.add_argument("--data", required=True, help="csv:PATH | folder:PATH | npz:PATH | tfds:NAME[:SPLIT] | mnist_sample")
  p.add_argument("--out", required=True, type=Path, help="CSV to write (filename,label)")
  p.add_argument("--probs", action="store_true", help="add a probability column per class")
  p.add_argument("--batch-size", type=int, default=64)
  args = p.parse_args(argv)
  cli_logging()
  ds, class_names, probs = predict_probs(args.workdir, args.data, args.batch_size)
  filenames = ds.filenames or [f"{i}" for i in range(len(probs))]
  write_csv(args.out, filenames, class_names, probs, args.probs)
  result = {"count": len(probs), "out": str(args.out)}
  print(f"wrote {len(probs)} predictions to {args.out}")
  if ds.labels is not None:
    preds = probs.argmax(1)
    result.update(accuracy=float((preds == ds.labels).mean()), log_loss=log_loss(ds.labels, probs))
    png = args.out.with_suffix(".confusion.png")
    plot_confusion(confusion_matrix(ds.labels, preds, len(class_names)), class_names, png)
    result["confusion_png"] = str(png)
    print(f"accuracy {result['accuracy']:.4f}, log loss {result['log_loss']:.4f}; confusion matrix: {png}")
  return result


if __name__ == "__main__":
  main()
