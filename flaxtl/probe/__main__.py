"""Transfer evaluation: few-shot, linear and kNN probes on frozen features.

    python -m flaxtl.probe --arch vgg16 --weights hed --data mnist_sample \
        [--test-data SOURCE] [--layers block4_pool,block5_pool] \
        [--methods fewshot,linear,knn] [--shots 1,5,10,25] [--seeds 5] \
        [--image-size 64] [--out DIR]
    python -m flaxtl.probe --suite offline \
        --backbones vgg16:hed,tv_mobilenet_v2:imagenet --out DIR

--weights: 'random' (a seeded random init), 'hed', 'imagenet', a converted
checkpoint directory or a weight file, resolved as training resolves
`model.weights`. --arch pixels is the raw-pixel baseline. Without
--test-data (and for sources without their own test split) the data is split
stratified with --split-seed. Writes DIR/results.json, DIR/report.md,
DIR/shots.png (and DIR/layers.png for several layers); the suite writes
DIR/leaderboard.{md,json,png} and one such folder per data set and backbone.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import json
import logging
from pathlib import Path
import platform
import shlex
import sys
import time

import numpy as np

from flaxtl import data
from flaxtl.data import sources
from flaxtl.errors import UserError, cli_logging, exit_on_user_error
from flaxtl.probe import evaluate, features, report, suite
from flaxtl.weights.sources import default_cache_dir

log = logging.getLogger("flaxtl.probe")

DEFAULT_SHOTS = (1, 5, 10, 25)
TEST_FRACTION = 0.25
SUITE_COLUMNS = (("fewshot", 10), ("linear", None), ("knn", None))


def _ints(text: str, key: str) -> list[int]:
  try:
    return [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise UserError(
      f"{key}: expected integers like 1,5,10, got {text!r}"
    ) from None


def _options(items: Sequence[str]) -> dict:
  out = {}
  for item in items or ():
    key, sep, value = item.partition("=")
    if not sep:
      raise UserError(f"--option {item!r}: expected KEY=VALUE")
    for cast in (int, float):
      try:
        out[key] = cast(value)
        break
      except ValueError:
        continue
    else:
      out[key] = value
  return out


def _parse_args(argv):
  p = argparse.ArgumentParser(
    prog="python -m flaxtl.probe", description=__doc__.split("\n\n")[0]
  )
  p.add_argument("--arch", help="architecture, or 'pixels'")
  p.add_argument("--weights", default="random", help="see above")
  p.add_argument("--data", help="a flaxtl data source (mnist_sample, npz:...)")
  p.add_argument("--test-data", help="a test source (default: a split)")
  p.add_argument("--layers", help="comma-separated (default: feature layer)")
  p.add_argument("--methods", default=",".join(evaluate.METHODS))
  p.add_argument("--shots", default=",".join(map(str, DEFAULT_SHOTS)))
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--image-size", type=int, default=64)
  p.add_argument("--out", default="probe_out")
  p.add_argument("--cache-dir", help="feature cache (default: OUT/features)")
  p.add_argument("--option", action="append", help="backbone KEY=VALUE")
  p.add_argument("--token-pool", choices=features.TOKEN_POOLS, default="cls")
  p.add_argument("--split-seed", type=int, default=0)
  p.add_argument("--weights-dir", help="where named weights are converted")
  p.add_argument("--download-cache", help="wheel cache (~/.cache/flaxtl)")
  p.add_argument("--suite", choices=("offline",))
  p.add_argument("--backbones", help="suite: ARCH:WEIGHTS,...")
  p.add_argument("--datasets", help="suite: a subset of the data sets")
  p.add_argument("--n-train", type=int, default=50, help="suite: per class")
  p.add_argument("--n-test", type=int, default=50, help="suite: per class")
  p.add_argument(
    "--resume",
    action="store_true",
    help="suite: keep (data set, backbone) runs whose results.json exists",
  )
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def _split_data(args, train_spec: str, test_spec: str | None):
  """(train, test, how the split was made)."""
  ds, own_test = sources.read(train_spec, sources.Options(key="--data"))
  if ds.labels is None or not ds.class_names:
    raise UserError(f"--data {train_spec}: a probe needs labelled data")
  if len(ds.class_names) < 2 or len(np.unique(ds.labels)) < 2:
    raise UserError(
      f"--data {train_spec}: one class only ({ds.class_names[0]!r}); a "
      "probe needs at least 2"
    )
  if test_spec:
    test, _ = sources.read(
      test_spec,
      sources.Options(key="--test-data", class_names=ds.class_names),
    )
    if test.labels is None:
      raise UserError(f"--test-data {test_spec}: needs labels to score")
    return ds, test, f"given test data {test_spec}"
  if own_test is not None:
    return ds, own_test, f"the source's own test split ({train_spec})"
  train, test = data.split(ds, TEST_FRACTION, args.split_seed)
  how = (
    f"stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%} split, seed "
    f"{args.split_seed}"
  )
  return train, test, how


def probe_one(
  args,
  backbone: features.Backbone,
  layers: list[str],
  train_spec: str,
  test_spec: str | None,
  out: Path,
  cache_dir: Path,
  methods: list[str],
  shots: list[int],
) -> tuple[list[dict], dict]:
  """Extract (cached), probe, write results.json/report.md/plots in `out`."""
  train, test, how = _split_data(args, train_spec, test_spec)
  num_classes = len(train.class_names)
  evaluate.check_shots(train.labels, num_classes, shots)
  kw = {
    "image_size": args.image_size,
    "cache_dir": cache_dir,
    "token_pool": args.token_pool,
    "progress": not args.no_progress,
  }
  t0 = time.perf_counter()
  f_train = features.extract(backbone, layers, train, split="train", **kw)
  f_test = features.extract(backbone, layers, test, split="test", **kw)
  t1 = time.perf_counter()
  records = []
  for layer in layers:
    for r in evaluate.run(
      f_train[layer],
      train.labels,
      f_test[layer],
      test.labels,
      num_classes,
      methods,
      shots,
      args.seeds,
    ):
      records.append(
        {
          "arch": backbone.arch,
          "weights": backbone.weights,
          "layer": layer,
          **r,
        }
      )
  meta = {
    "arch": backbone.arch,
    "weights": backbone.weights,
    "weights_fingerprint": backbone.fingerprint,
    "options": backbone.options,
    "data": train_spec,
    "test_data": test_spec or "(split)",
    "split": how,
    "n_train": len(train),
    "n_test": len(test),
    "num_classes": num_classes,
    "class_names": train.class_names,
    "image_size": args.image_size,
    "pooling": features.pooling_note(backbone.arch, args.token_pool),
    "feature_seconds": round(t1 - t0, 2),
    "probe_seconds": round(time.perf_counter() - t1, 2),
  }
  out.mkdir(parents=True, exist_ok=True)
  report.write_results(out, records, meta)
  report.write_report(out, records, meta)
  return records, meta


def _methods(text: str) -> list[str]:
  methods = [m.strip() for m in text.split(",") if m.strip()]
  bad = [m for m in methods if m not in evaluate.METHODS]
  if bad or not methods:
    raise UserError(
      f"--methods: unknown {bad}; expected some of {list(evaluate.METHODS)}"
    )
  return methods


def _resolve(args, arch: str, weights: str, options: dict):
  return features.resolve(
    arch,
    weights,
    options=options,
    weights_dir=args.weights_dir,
    cache_dir=args.download_cache,
  )


def run_single(args) -> list[dict]:
  if not args.arch or not args.data:
    raise UserError("--arch and --data are needed (or --suite offline)")
  methods, shots = _methods(args.methods), _ints(args.shots, "--shots")
  if args.seeds < 1:
    raise UserError(f"--seeds must be >= 1, got {args.seeds}")
  backbone = _resolve(args, args.arch, args.weights, _options(args.option))
  layers = (
    [v.strip() for v in args.layers.split(",") if v.strip()]
    if args.layers
    else [features.default_layer(backbone)]
  )
  layers = features.check_layers(backbone, layers)
  out = Path(args.out)
  cache = Path(args.cache_dir) if args.cache_dir else out / "features"
  records, _ = probe_one(
    args, backbone, layers, args.data, args.test_data, out, cache, methods,
    shots,
  )  # fmt: skip
  for r in records:
    print(
      f"{r['layer']:<20} {r['method']:<8} shots={r['shots']!s:<5} "
      f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_ci95']:.1f}"
    )
  print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
  return records


def _suite_backbones(text: str | None) -> list[tuple[str, str]]:
  pairs = []
  for item in (text or "").split(","):
    if not item.strip():
      continue
    arch, sep, w = item.strip().partition(":")
    pairs.append((arch, w if sep else "random"))
  pairs.insert(0, (features.PIXELS, "none"))  # Always: what pixels give.
  for arch in dict.fromkeys(a for a, _ in pairs if a != features.PIXELS):
    pairs.append((arch, features.RANDOM))  # Always: what weights give.
  return list(dict.fromkeys(pairs))


def run_suite(args, argv) -> list[dict]:
  methods, shots = _methods(args.methods), _ints(args.shots, "--shots")
  names = (
    [d.strip() for d in args.datasets.split(",")]
    if args.datasets
    else list(suite.TASKS)
  )
  unknown = [d for d in names if d not in suite.TASKS]
  if unknown:
    raise UserError(
      f"--datasets: unknown {unknown}; the suite has {list(suite.TASKS)}"
    )
  out = Path(args.out)
  cache = Path(args.cache_dir) if args.cache_dir else out / "features"
  data_cache = Path(args.download_cache or default_cache_dir())
  pairs = _suite_backbones(args.backbones)
  backbones = [_resolve(args, a, w, {}) for a, w in pairs]  # Fail fast.
  start = time.perf_counter()
  prepared = {
    d: suite.prepare(d, args.n_train, args.n_test, data_cache) for d in names
  }
  runs, resumed = [], 0
  for backbone in backbones:  # Backbone-major: one compile per input shape.
    for d, (train_spec, test_spec, _) in prepared.items():
      label = f"{backbone.arch}:{backbone.weights}"
      layer = features.default_layer(backbone)
      t0 = time.perf_counter()
      run_dir = out / d / label.replace(":", "_").replace("/", "_")
      done = run_dir / "results.json"
      if args.resume and done.exists():
        kept = json.loads(done.read_text())
        records = kept["results"]
        m = kept["meta"]
        seconds = m["feature_seconds"] + m["probe_seconds"]
        resumed += 1
      else:
        records, _ = probe_one(
          args, backbone, [layer], train_spec, test_spec, run_dir, cache,
          methods, shots,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
      log.info("%s %s: %.1f s", d, label, seconds)
      runs.append(
        {
          "dataset": d,
          "backbone": label,
          "layer": layer,
          "seconds": round(seconds, 2),
          "records": records,
        }
      )
  wall = time.perf_counter() - start
  columns = [
    c for c in SUITE_COLUMNS if c[0] in methods and c[1] in (*shots, None)
  ]
  rows = report.leaderboard_rows(runs, columns)
  meta = {
    "command": "python -m flaxtl.probe " + shlex.join(argv),
    "wall_seconds": wall,
    "resumed_runs": resumed,
    "run_seconds": sum(r["seconds"] for r in runs),
    "machine": f"{platform.machine()}, {_cpus()} CPUs",
    "image_size": args.image_size,
    "seeds": args.seeds,
    "n_train_per_class": args.n_train,
    "n_test_per_class": args.n_test,
    "pooling": features.pooling_note("", args.token_pool),
  }
  descriptions = {d: prepared[d][2]["description"] for d in names}
  report.write_leaderboard(out, rows, columns, descriptions, meta)
  print(f"wrote {out / 'leaderboard.md'} ({wall:.0f} s)")
  return rows


def _cpus() -> int:
  import os

  return len(os.sched_getaffinity(0))


@exit_on_user_error
def main(argv: Sequence[str] | None = None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parse_args(argv)
  cli_logging()
  if args.suite:
    return run_suite(args, argv)
  return run_single(args)


if __name__ == "__main__":
  main()
