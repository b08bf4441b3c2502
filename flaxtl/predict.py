"""Predictions from a finished run.

    python -m flaxtl.predict --workdir WORKDIR --data csv:data/test.csv \
        --out submission.csv [--probs]

Writes `filename,label` (class names as in training; `--probs` adds one
probability column per class). Filenames are as the input had them (the CSV's
`filename` cell, or the path relative to a folder source), so a submission
lines up with the test CSV; `--full-paths` writes where each file was found.
On labelled data it also prints accuracy and log loss and writes a
confusion-matrix PNG next to --out. For `mnist_sample`
the predictions cover its fixed held-out 1,000 digits.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import csv
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np

from flaxtl import data, files, plots, weights
from flaxtl.data import sources
from flaxtl.errors import UserError, cli_logging, exit_on_user_error
from flaxtl.preprocess import prepare_images
from flaxtl.train import config as config_lib
from flaxtl.train import setup, steps
from flaxtl.train.metrics import log_loss_terms


def load_run(workdir: Path):
  """(config, class_names, model, variables) of a finished run."""
  for name in ("config.json", "class_names.json", "params"):
    if not (workdir / name).exists():
      raise UserError(
        f"{workdir}: no {name}; is this the workdir of a finished run?"
      )
  config = ml_collections.ConfigDict(
    json.loads((workdir / "config.json").read_text())
  )
  class_names = json.loads((workdir / "class_names.json").read_text())
  provenance_file = workdir / "weights_provenance.json"
  provenance = (
    json.loads(provenance_file.read_text())
    if provenance_file.is_file()
    else None
  )
  model = setup.build_model(config, len(class_names), provenance)
  variables = {
    c: weights.restore_to_host(workdir / c)
    for c in ("params", "batch_stats")
    if (workdir / c).is_dir()
  }
  return config, class_names, model, variables


def predict_probs(workdir: Path, data_spec: str, batch_size: int = 64):
  config, class_names, model, variables = load_run(workdir)
  opts = sources.Options(
    key="--data",
    class_names=class_names,
    labels_required=False,
    tfds_data_dir=config.data.get("tfds_data_dir"),
  )
  ds, held_out = sources.read(data_spec, opts)
  if data_spec == "mnist_sample":
    ds = held_out
  mode = config_lib.preprocess_mode(config)
  options = setup.compiler_options(config, dtype=config.model.dtype)
  fn = jax.jit(
    steps.make_predict_fn(
      model, prepare=lambda x: prepare_images(x, config.image_size, mode)
    ),
    compiler_options=options,
  )
  skipped: set[int] = set()  # Unreadable images (data.skip_corrupt).
  probs = np.concatenate(
    [
      np.asarray(fn(variables, b["image"]))[b["mask"]]
      for b in data.eval_batches(
        ds,
        batch_size,
        options=data.Options.from_config(config),
        skipped=skipped,
      )
    ]
  )
  if skipped:
    ds = ds.take([i for i in range(len(ds)) if i not in skipped])
  return ds, class_names, probs


def write_csv(
  path: Path,
  filenames: Sequence[str],
  class_names: Sequence[str],
  probs: np.ndarray,
  with_probs: bool,
) -> None:
  header = ["filename", "label"]
  if with_probs:
    header += [f"prob_{c}" for c in class_names]
  with files.atomic_open(path, newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    for name, p in zip(filenames, probs):
      row = [name, class_names[int(np.argmax(p))]]
      w.writerow(row + ([f"{x:.6f}" for x in p] if with_probs else []))


def confusion_matrix(
  labels: np.ndarray, preds: np.ndarray, n: int
) -> np.ndarray:
  m = np.zeros((n, n), np.int64)
  np.add.at(m, (labels, preds), 1)
  return m


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
  """sklearn.metrics.log_loss of predicted probabilities."""
  return float(np.mean(log_loss_terms(probs, labels)))


def _check_args(args: argparse.Namespace) -> None:
  """The flags' own problems, before any work."""
  if args.batch_size <= 0:
    raise UserError(f"--batch-size={args.batch_size}: must be positive")
  if args.out.is_dir():
    raise UserError(f"--out {args.out}: is a directory; give a CSV file path")
  parent = args.out.parent
  if parent.exists() and not parent.is_dir():
    raise UserError(f"--out {args.out}: {parent} is a file, not a directory")


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(
    prog="python -m flaxtl.predict", description=__doc__.split("\n\n")[0]
  )
  p.add_argument(
    "--workdir", required=True, type=Path, help="a finished run's workdir"
  )
  p.add_argument(
    "--data",
    required=True,
    help="csv:PATH | folder:PATH | npz:PATH | tfds:NAME[:SPLIT] | mnist_sample",
  )
  p.add_argument(
    "--out", required=True, type=Path, help="CSV to write (filename,label)"
  )
  p.add_argument(
    "--probs", action="store_true", help="add a probability column per class"
  )
  p.add_argument(
    "--full-paths",
    action="store_true",
    help="write each file's full path instead of its name as written",
  )
  p.add_argument(
    "--batch-size",
    type=int,
    default=64,
    help="images per forward pass (default 64; lower it to save memory)",
  )
  args = p.parse_args(argv)
  _check_args(args)
  cli_logging()
  ds, class_names, probs = predict_probs(
    args.workdir, args.data, args.batch_size
  )
  names = ds.paths if args.full_paths else ds.filenames
  filenames = names or ds.filenames or [f"{i}" for i in range(len(probs))]
  write_csv(args.out, filenames, class_names, probs, args.probs)
  result = {"count": len(probs), "out": str(args.out)}
  print(f"wrote {len(probs)} predictions to {args.out}")
  if ds.labels is not None:
    preds = probs.argmax(1)
    result.update(
      accuracy=float((preds == ds.labels).mean()),
      log_loss=log_loss(ds.labels, probs),
    )
    png = args.out.with_suffix(".confusion.png")
    plots.confusion_matrix(
      confusion_matrix(ds.labels, preds, len(class_names)), class_names, png
    )
    result["confusion_png"] = str(png)
    print(
      f"accuracy {result['accuracy']:.4f}, log loss {result['log_loss']:.4f}; "
      f"confusion matrix: {png}"
    )
  return result


if __name__ == "__main__":
  main()
