"""Peak PSS and speed of a streamed class-folder run, per malloc setting.

    python benchmarks/memory_stream.py --images 1000 4000 --steps 40

Builds class folders of JPEGs (240-400 x 200-300 px, quality 90, ~10%
grayscale) of each size in --images and two kinds of content ('noise':
uniform random pixels, large files; 'smooth': gradients and sines, photo-like
small files) under --root (never committed), then trains the small CNN
baseline (`configs/mnist_cnn.py`) at 224x224, batch 16, for --steps steps from
each folder with `launch.py` in a subprocess, once per malloc setting:

default  the default config (`tune_malloc=True`: flaxtl.ops.cpu).
reuse    the previous default: `tune_malloc=False` with glibc's environment
         variables MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
         MALLOC_TRIM_THRESHOLD_=2147483647 (no trim ever; the grain
         workers inherit them too).
glibc    `tune_malloc=False`: glibc's own defaults.

PSS is summed over the process tree (the run and its grain workers) from
/proc/<pid>/smaps_rollup every 0.2 s (benchmarks/data_pipeline.run_tree).
img/s is over the steps after the 5th, timed from the metrics.jsonl lines
(`log_every_steps=1`) as they appear. Results: results/memory_stream.json.
"""

from __future__ import annotations

import argparse
import json
from multiprocessing import Pool
import os
from pathlib import Path
import sys
import time

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import data_pipeline as dp  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "memory_stream.json"
CONTENTS = ("noise", "smooth")
REUSE_ENV = {
  "MALLOC_ARENA_MAX": "1",
  "MALLOC_MMAP_MAX_": "0",
  "MALLOC_TRIM_THRESHOLD_": "2147483647",
}
SETTINGS = {
  "default": ([], {}),
  "reuse": (["tune_malloc=False"], REUSE_ENV),
  "glibc": (["tune_malloc=False"], {}),
  # A candidate: one arena, blocks from 64 MB up mmapped (fixed threshold).
  "mmap64": (
    ["tune_malloc=False"],
    {
      "MALLOC_ARENA_MAX": "1",
      "MALLOC_MMAP_THRESHOLD_": str(64 << 20),
      "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
    },
  ),
}
WARM_STEPS = 5


def _jpeg(args: tuple[int, str, Path]) -> None:
  seed, content, path = args
  rng = np.random.default_rng(seed)
  w, h = int(rng.integers(240, 401)), int(rng.integers(200, 301))
  if content == "noise":
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  else:
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    a, b, f = rng.uniform(0, 255, (3, 3))
    img = a * x + b * (1 - y) + 40 * np.sin(f / 20 * (x * w + y * h))
    img = np.clip(img, 0, 255).astype(np.uint8)
  pic = Image.fromarray(img)
  if rng.random() < 0.1:
    pic = pic.convert("L")
  pic.save(path, quality=90)


def folder(root: Path, content: str, n: int) -> Path:
  return root / f"{content}-{n}"


def make(root: Path, sizes: list[int]) -> None:
  """Each size is its own folder: the smaller sets are not prefixes."""
  todo = []
  for content in CONTENTS:
    for n in sizes:
      d = folder(root, content, n)
      for i in range(n):
        path = d / f"c{i % dp.CLASSES}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
          todo.append((n * 1_000_003 + i, content, path))
  t0 = time.perf_counter()
  with Pool(os.cpu_count()) as pool:
    pool.map(_jpeg, todo, chunksize=64)
  print(f"wrote {len(todo)} JPEGs in {time.perf_counter() - t0:.0f} s")


class _Steps:
  """(time, step) of metrics.jsonl's train lines as they appear."""

  def __init__(self, path: Path):
    self.path, self.seen = path, []

  def __call__(self) -> None:
    try:
      lines = self.path.read_text().splitlines()
    except OSError:
      return
    steps = [json.loads(s)["step"] for s in lines if '"train"' in s]
    if steps and (not self.seen or steps[-1] > self.seen[-1][1]):
      self.seen.append((time.perf_counter(), steps[-1]))

  def rate(self, batch: int) -> float | None:
    warm = [(t, s) for t, s in self.seen if s >= WARM_STEPS]
    if len(warm) < 2:
      return None
    (t0, s0), (t1, s1) = warm[0], warm[-1]
    return (s1 - s0) * batch / (t1 - t0)


def run(root: Path, content: str, n: int, setting: str, steps: int) -> dict:
  extra, env = SETTINGS[setting]
  workdir = Path(f"/tmp/flaxtl-memstream-{content}-{n}-{setting}-{os.getpid()}")
  cmd = [
    sys.executable,
    *dp._launch_args(
      f"folder:{folder(root, content, n)}", steps, 2, workdir, extra
    ),
  ]
  watch = _Steps(workdir / "metrics.jsonl")
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    r = dp.run_tree(cmd, ROOT, poll=watch)
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  rate = watch.rate(dp.BATCH)
  r.update(
    images=n,
    content=content,
    setting=setting,
    steps=steps,
    img_per_s=None if rate is None else round(rate, 1),
  )
  print(json.dumps(r), flush=True)
  return r


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--root", type=Path, default=Path("/tmp/flaxtl-memstream"))
  p.add_argument("--images", type=int, nargs="+", default=[1000, 4000])
  p.add_argument("--contents", nargs="+", default=list(CONTENTS))
  p.add_argument("--settings", nargs="+", default=list(SETTINGS))
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--tag", default="", help="suffix of the results file")
  args = p.parse_args()
  results = RESULTS.with_name(f"memory_stream{args.tag}.json")
  make(args.root, args.images)
  rows, when = [], time.strftime("%Y-%m-%d %H:%M")
  results.parent.mkdir(parents=True, exist_ok=True)
  for setting in args.settings:  # The first settings get every folder first.
    for n in args.images:
      for content in args.contents:
        rows.append(run(args.root, content, n, setting, args.steps))
        results.write_text(
          json.dumps({"when": when, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
  main()
