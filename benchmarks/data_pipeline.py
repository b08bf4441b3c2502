"""The grain data pipeline on class folders of mixed-size JPEGs at 224x224.

    python benchmarks/data_pipeline.py make --images 4000 24000 100000
    python benchmarks/data_pipeline.py memory --images 4000 24000 100000
    python benchmarks/data_pipeline.py throughput --images 24000
    python benchmarks/data_pipeline.py first-step --images 24000 \\
        [--old-checkout /work/main --old-python /work/main/.venv/bin/python]
    python benchmarks/data_pipeline.py in-memory [--old-checkout ...]

make        4 class folders of N JPEGs, 240-400 x 200-300 px, smooth random
            content, under --root (default /tmp/flaxtl-bench-data; never
            committed). The smaller sets are hard links into the largest.
memory      peak PSS summed over the process tree (the run and its grain
            workers), sampled every 0.2 s, of `launch.py` training the small
            CNN baseline at 224x224 for --steps steps, batch 16, 2 workers.
throughput  host images/s of `TrainIterator` (decode + resize + batch, batch
            16, 224x224) with 0, 1, 2 workers, against the VGG16 freeze-8
            train step at 224x224 (batch 16, random weights, as launch.py
            compiles it) in a separate process on the same machine.
first-step  seconds from process start to the first train step (its metrics
            line) on the same run, new pipeline vs an older checkout that
            decodes the whole set first (data.load_size=224).
in-memory   host batches/s of TrainIterator on the embedded 28x28 sample
            (batch 16), this checkout vs --old-checkout, same machine.

Every measurement records the CPU other processes used meanwhile (the machine
is shared); results go to benchmarks/results/data_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
from multiprocessing import Pool
import os
from pathlib import Path
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# Run as `python benchmarks/data_pipeline.py`: flaxtl and configs from here.
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import mnist_freeze8  # noqa: E402
from flaxtl import data  # noqa: E402
from flaxtl.data import sources  # noqa: E402
from flaxtl.ops import cpu  # noqa: E402
from flaxtl.preprocess import prepare_images  # noqa: E402
from flaxtl.train import setup  # noqa: E402
from flaxtl.train import steps as steps_lib  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "data_pipeline.json"
COMMANDS = (
  "make",
  "memory",
  "throughput",
  "first-step",
  "in-memory",
  "vgg-step",
)
CLASSES = 4
SIZE, BATCH = 224, 16


# --- data -----------------------------------------------------------------


def _jpeg(args: tuple[int, Path]) -> None:
  """One smooth random picture (sums of sines + noise), JPEG quality 85."""
  seed, path = args
  rng = np.random.default_rng(seed)
  w, h = int(rng.integers(240, 401)), int(rng.integers(200, 301))
  x, y = np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)
  f, ph = rng.uniform(0.01, 0.08, (3, 2)), rng.uniform(0, 6.3, (3, 2))
  img = np.stack(
    [
      127
      + 60 * np.sin(f[c, 0] * x + ph[c, 0])[None, :]
      + 60 * np.sin(f[c, 1] * y + ph[c, 1])[:, None]
      for c in range(3)
    ],
    -1,
  ).astype(np.int16)
  img += rng.integers(-12, 13, img.shape, dtype=np.int16)
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=85)


def folder(root: Path, n: int) -> Path:
  return root / f"mixed-{n}"


def make(root: Path, sizes: list[int]) -> None:
  largest = folder(root, max(sizes))
  todo = []
  for i in range(max(sizes)):
    path = largest / f"c{i % CLASSES}" / f"{i:06d}.jpg"
    if not path.exists():
      todo.append((i, path))
  for c in range(CLASSES):
    (largest / f"c{c}").mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  with Pool(os.cpu_count()) as pool:
    pool.map(_jpeg, todo, chunksize=256)
  print(f"wrote {len(todo)} JPEGs in {time.perf_counter() - t0:.0f} s")
  for n in sizes:
    if n == max(sizes):
      continue
    dst = folder(root, n)
    for i in range(n):
      src = largest / f"c{i % CLASSES}" / f"{i:06d}.jpg"
      link = dst / src.relative_to(largest)
      if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, link)
  for n in sizes:
    files = list(folder(root, n).rglob("*.jpg"))
    mb = sum(f.stat().st_size for f in files) / 2**20
    print(f"{folder(root, n)}: {len(files)} files, {mb:.0f} MiB")


# --- process-tree measurement --------------------------------------------


def _children(pid: int) -> list[int]:
  out = []
  try:
    for tid in os.listdir(f"/proc/{pid}/task"):
      with open(f"/proc/{pid}/task/{tid}/children") as f:
        out += [int(c) for c in f.read().split()]
  except OSError:
    pass
  return out


def _tree(pid: int) -> list[int]:
  todo, seen = [pid], []
  while todo:
    p = todo.pop()
    seen.append(p)
    todo += _children(p)
  return seen


def _pss_mb(pid: int) -> float:
  try:
    with open(f"/proc/{pid}/smaps_rollup") as f:
      for line in f:
        if line.startswith("Pss:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return 0.0


def _busy_s() -> float:
  with open("/proc/stat") as f:
    v = [int(x) for x in f.readline().split()[1:9]]
  return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
  t = os.times()
  return t.children_user + t.children_system


def _has_line(path: Path | None) -> bool:
  return path is not None and path.exists() and bool(path.read_text().strip())


def run_tree(
  cmd: list[str], cwd: Path, first_line: Path | None = None, poll=None
) -> dict:
  """Runs `cmd`; peak PSS over its process tree, wall time, the CPU other
  processes used (cores), and when `first_line` (a file) got its first line.
  `poll()`, if given, is called at every sample."""
  busy0, own0, t0 = _busy_s(), _children_cpu_s(), time.perf_counter()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(cwd)}
  proc = subprocess.Popen(
    cmd,
    cwd=cwd,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  peak = peak_main = 0.0
  processes = 1
  first = None
  while proc.poll() is None:
    tree = _tree(proc.pid)
    processes = max(processes, len(tree))
    total = sum(_pss_mb(p) for p in tree)
    peak, peak_main = max(peak, total), max(peak_main, _pss_mb(proc.pid))
    if first is None and _has_line(first_line):
      first = time.perf_counter() - t0
    if poll is not None:
      poll()
    time.sleep(0.2)
  out = proc.stdout.read()
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
  own = _children_cpu_s() - own0
  other = max(0.0, _busy_s() - busy0 - own) / wall
  return {
    "peak_pss_mb": round(peak),
    "peak_pss_main_mb": round(peak_main),
    "processes": processes,
    "wall_s": round(wall, 1),
    "first_step_s": None if first is None else round(first, 1),
    "own_cpu_cores": round(own / wall, 2),
    "other_cpu_cores": round(other, 2),
  }


def _launch_args(
  source: str, steps: int, workers: int, workdir: Path, extra=()
) -> list[str]:
  return [
    "launch.py",
    "--config",
    "configs/mnist_cnn.py",
    "--workdir",
    str(workdir),
    f"--config.data.source={source}",
    f"--config.image_size={SIZE}",
    f"--config.batch_size={BATCH}",
    f"--config.total_steps={steps}",
    "--config.data.val_fraction=0.0",
    "--config.checkpoint_every_steps=100000",
    "--config.log_every_steps=1",
    "--config.progress=False",
    f"--config.data.workers={workers}",
    *(f"--config.{kv}" for kv in extra),
  ]


def memory(
  root: Path, sizes: list[int], steps: int, workers: int, extra: list[str]
) -> list:
  rows = []
  for n in sizes:
    workdir = Path(f"/tmp/flaxtl-bench-run-{n}-{os.getpid()}")
    source = f"folder:{folder(root, n)}"
    cmd = [
      sys.executable,
      *_launch_args(source, steps, workers, workdir, extra),
    ]
    r = run_tree(cmd, ROOT, workdir / "metrics.jsonl")
    r.update(images=n, steps=steps, workers=workers, set=extra)
    print(json.dumps(r))
    rows.append(r)
  return rows


def first_step(
  root: Path,
  n: int,
  workers: int,
  old_checkout: Path | None,
  old_python: str,
  extra: list[str],
) -> list:
  rows = []
  workdir = Path(f"/tmp/flaxtl-bench-first-{os.getpid()}")
  new = _launch_args(f"folder:{folder(root, n)}", 2, workers, workdir, extra)
  r = run_tree([sys.executable, *new], ROOT, workdir / "metrics.jsonl")
  r.update(loader="grain (this checkout)", images=n, workers=workers, set=extra)
  print(json.dumps(r))
  rows.append(r)
  if old_checkout is not None:
    workdir = Path(f"/tmp/flaxtl-bench-first-old-{os.getpid()}")
    old = _launch_args(f"folder:{folder(root, n)}", 2, 0, workdir, extra)
    old = [a for a in old if not a.startswith("--config.data.workers")]
    old.append(f"--config.data.load_size={SIZE}")
    r = run_tree([old_python, *old], old_checkout, workdir / "metrics.jsonl")
    r.update(
      loader=f"in-memory ({old_checkout})", images=n, workers=0, set=extra
    )
    print(json.dumps(r))
    rows.append(r)
  return rows


# --- throughput -----------------------------------------------------------


def loader_rate(root: Path, n: int, workers: int, batches: int) -> dict:
  ds, _ = sources.read(f"folder:{folder(root, n)}")
  opts = data.Options(model_size=SIZE, workers=workers, prefetch=2)
  busy0, t0 = _busy_s(), time.perf_counter()
  own0 = sum(os.times()[:2])
  it = data.TrainIterator(ds, BATCH, seed=0, options=opts)
  next(it)  # Starts the workers.
  t1 = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  t2 = time.perf_counter()
  it.close()
  assert batch["image"].shape == (BATCH, SIZE, SIZE, 3)
  wall = t2 - t0
  own = sum(os.times()[:2]) - own0  # The workers' CPU is not in here.
  return {
    "workers": workers,
    "images_per_s": round(batches * BATCH / (t2 - t1), 1),
    "first_batch_s": round(t1 - t0, 2),
    "machine_busy_cores": round((_busy_s() - busy0) / wall, 2),
    "main_process_cores": round(own / wall, 2),
  }


def vgg_step_rate(steps: int) -> dict:
  """The VGG16 freeze-8 train step at 224 as launch.py compiles it."""
  config = mnist_freeze8.get_config()
  config.model.weights = "none"
  config.image_size = SIZE
  config.batch_size = BATCH
  cpu.tune_malloc()
  model = setup.build_model(config, CLASSES)
  variables = jax.jit(setup.init_fn(model, SIZE))(jax.random.PRNGKey(0))
  plan = setup.freeze_plan(config, variables["params"], 8, log_matches=False)

  def prepare(images):
    return prepare_images(images, SIZE, "caffe")

  tx, fn, options = setup.train_step(config, model, plan, 1000, prepare, {})
  step = jax.jit(fn, donate_argnums=0, compiler_options=options)
  state = steps_lib.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=variables["params"],
    batch_stats={},
    opt_state=tx.init(variables["params"]),
    rng=jax.random.PRNGKey(1),
  )
  rng = np.random.default_rng(0)
  batch = {
    "image": jnp.asarray(
      rng.integers(0, 255, (BATCH, SIZE, SIZE, 3), np.uint8)
    ),
    "label": jnp.asarray(rng.integers(0, CLASSES, BATCH).astype(np.int32)),
  }
  state, m = step(state, batch)  # Compile.
  jax.block_until_ready(m)
  busy0, own0, t0 = _busy_s(), sum(os.times()[:2]), time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  wall = time.perf_counter() - t0
  return {
    "images_per_s": round(steps * BATCH / wall, 2),
    "steps": steps,
    "other_cpu_cores": round(
      max(0.0, _busy_s() - busy0 - (sum(os.times()[:2]) - own0)) / wall, 2
    ),
  }


def throughput(root: Path, n: int, batches: int, vgg_steps: int) -> dict:
  rows = [loader_rate(root, n, w, batches) for w in (0, 1, 2)]
  for r in rows:
    print(json.dumps(r))
  out = subprocess.run(
    [sys.executable, __file__, "vgg-step", "--steps", str(vgg_steps)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  if out.returncode != 0:
    raise RuntimeError(out.stderr[-3000:])
  vgg = json.loads(out.stdout.strip().splitlines()[-1])
  print(json.dumps(vgg))
  return {"images": n, "loader": rows, "vgg16_freeze8_224": vgg}


_IN_MEMORY = """
import json, time
from flaxtl import data
train = data.load({"source": "mnist_sample", "val_fraction": 0.0}).train
it = data.TrainIterator(train, 16, seed=0)
next(it)
t0 = time.perf_counter()
for _ in range(%d):
  next(it)
print(json.dumps({"images_per_s": round(%d * 16 / (time.perf_counter() - t0))}))
"""


def in_memory(
  batches: int, old_checkout: Path | None, old_python: str
) -> list[dict]:
  rows = []
  runs = [("grain (this checkout)", sys.executable, ROOT)]
  if old_checkout is not None:
    runs.append((f"in-memory ({old_checkout})", old_python, old_checkout))
  for name, python, cwd in runs:
    busy0, t0 = _busy_s(), time.perf_counter()
    own0 = _children_cpu_s()
    out = subprocess.run(
      [python, "-c", _IN_MEMORY % (batches, batches)],
      cwd=cwd,
      capture_output=True,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(cwd)},
    )
    if out.returncode != 0:
      raise RuntimeError(out.stderr[-3000:])
    wall = time.perf_counter() - t0
    own = _children_cpu_s() - own0
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r.update(
      loader=name,
      other_cpu_cores=round(max(0.0, _busy_s() - busy0 - own) / wall, 2),
    )
    print(json.dumps(r))
    rows.append(r)
  return rows


def save(section: str, value) -> None:
  results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
  results[section] = {
    "value": value,
    "when": time.strftime("%Y-%m-%d %H:%M"),
    "cores": os.cpu_count(),
  }
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("what", choices=COMMANDS)
  p.add_argument("--root", type=Path, default=Path("/tmp/flaxtl-bench-data"))
  p.add_argument("--images", type=int, nargs="+", default=[24000])
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--batches", type=int, default=30)
  p.add_argument("--old-checkout", type=Path, default=None)
  p.add_argument("--old-python", default=sys.executable)
  p.add_argument(
    "--set", nargs="*", default=[], help="KEY=VALUE config overrides"
  )
  p.add_argument("--tag", default="", help="suffix of the results key")
  args = p.parse_args()
  if args.what == "make":
    make(args.root, args.images)
  elif args.what == "memory":
    rows = memory(args.root, args.images, args.steps, args.workers, args.set)
    save("memory" + args.tag, rows)
  elif args.what == "throughput":
    save(
      "throughput",
      throughput(args.root, args.images[0], args.batches, args.steps),
    )
  elif args.what == "first-step":
    rows = first_step(
      args.root,
      args.images[0],
      args.workers,
      args.old_checkout,
      args.old_python,
      args.set,
    )
    save("first_step" + args.tag, rows)
  elif args.what == "in-memory":
    save(
      "in_memory",
      in_memory(args.batches, args.old_checkout, args.old_python),
    )
  else:
    print(json.dumps(vgg_step_rate(args.steps)))


if __name__ == "__main__":
  main()
