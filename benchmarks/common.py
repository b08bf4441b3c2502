"""Helpers shared by the benchmarks: warm-up, median of N, peak RSS, isolation.

The machine these run on is shared with other work (tests, training runs), so
every measurement also records how much CPU *other* processes used while it ran
(/proc/stat minus our own CPU time). A measurement taken while others used more
than `MAX_OTHER` of the machine is retried after a pause and the least
contended attempt is kept; the JSON says how contended it was.

Each framework runs in its own subprocess (`run_worker`): PyTorch's OpenMP
threads spin for a while after each op and would steal cycles from a JAX
measurement in the same process, and peak RSS is a per-process high-water mark.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import contextlib
from importlib import metadata
import json
import os
from pathlib import Path
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
# Fraction of all cores used by other processes above which we retry.
MAX_OTHER = 0.15

# The scripts run as `python benchmarks/x.py` (sys.path[0] is benchmarks/):
# make flaxtl and configs importable from the checkout without an install.
if str(ROOT) not in sys.path:
  sys.path.insert(1, str(ROOT))


# --- CPU accounting -----------------------------------------------------------


def _machine_busy_s() -> float:
  """CPU-seconds all processes spent busy since boot (not idle or iowait)."""
  try:
    with open("/proc/stat") as f:
      v = [int(x) for x in f.readline().split()[1:9]]
  except OSError:  # Not Linux: contention is simply not measured.
    return 0.0
  # user, nice, system, irq, softirq, steal.
  return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
  """This process's CPU time and its finished children's (a timed CLI run)."""
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


class CpuProbe:
  """`with CpuProbe() as p: ...`; p.own / p.other: fractions of all cores."""

  def __enter__(self) -> CpuProbe:
    self._busy = _machine_busy_s()
    self._own = _own_cpu_s()
    self._wall = time.perf_counter()
    return self

  def __exit__(self, *exc) -> None:
    wall = max(time.perf_counter() - self._wall, 1e-9)
    own = _own_cpu_s() - self._own
    busy = _machine_busy_s() - self._busy
    cores = os.cpu_count() or 1
    self.wall = wall
    self.own = own / (wall * cores)
    self.other = max(0.0, busy - own) / (wall * cores) if busy else 0.0


def tune_malloc() -> bool:
  """What the trainer does first (config.tune_malloc): reuse freed memory."""
  # Imported here: flaxtl.ops.cpu imports jax, and the torch workers call this
  # without loading a second framework into their process.
  from flaxtl.ops import cpu

  return cpu.tune_malloc()


def peak_rss_mb() -> float:
  """Max RSS of this process so far (a high-water mark; Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- timing -------------------------------------------------------------------


def time_fn(
  fn: Callable[[], Any],
  *,
  warmup: int = 1,
  reps: int = 5,
  min_reps: int = 3,
  budget_s: float = 4.0,
  retries: int | None = None,
  pause_s: float = 3.0,
) -> dict:
  """Median wall time of `fn()` (which must block until its result is ready).

  `warmup` untimed calls first (compilation, caches, allocator), then up to
  `reps` timed calls, stopping once `budget_s` is spent but never below
  `min_reps`, so a slow case (VGG16 at 224x224 is ~1 s a call) stays a few
  seconds. Retried up to `retries` times (env BENCH_RETRIES, default 2) if
  other processes were busy; a smoke run on a busy machine sets 0.
  """
  if retries is None:
    retries = int(os.environ.get("BENCH_RETRIES", 2))
  for _ in range(warmup):
    fn()
  best: dict | None = None
  for attempt in range(retries + 1):
    times: list[float] = []
    with CpuProbe() as probe:
      start = time.perf_counter()
      while len(times) < reps and (
        len(times) < min_reps or time.perf_counter() - start < budget_s
      ):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    res = {
      "median_s": statistics.median(times),
      "min_s": min(times),
      "times_s": times,
      "own_cpu": round(probe.own, 3),
      "other_cpu": round(probe.other, 3),
      "attempts": attempt + 1,
    }
    if best is None or res["other_cpu"] < best["other_cpu"]:
      best = res
    if res["other_cpu"] <= MAX_OTHER:
      break
    if attempt < retries:
      time.sleep(pause_s)
      wait_for_quiet()  # Give the others up to BENCH_QUIET_WAIT s to finish.
      fn()  # Caches and threads may have gone cold meanwhile.
  best["attempts"] = attempt + 1
  best["contended"] = best["other_cpu"] > MAX_OTHER
  return best


def wait_for_quiet(
  max_wait_s: float | None = None, window_s: float = 2.0
) -> float:
  """Waits until other processes use under MAX_OTHER of the machine.

  At most `max_wait_s` (env BENCH_QUIET_WAIT, default 20 s), so run_all.sh
  keeps its time budget; returns the last reading.
  """
  if max_wait_s is None:
    max_wait_s = float(os.environ.get("BENCH_QUIET_WAIT", 20))
  deadline = time.monotonic() + max_wait_s
  while True:
    with CpuProbe() as p:
      time.sleep(window_s)
    if p.other <= MAX_OTHER or time.monotonic() > deadline:
      return p.other


# --- processes and results ----------------------------------------------------


def _cpuinfo_field(lines: Sequence[str], key: str) -> str | None:
  for line in lines:
    if line.startswith(key):
      return line.split(":", 1)[1].strip()
  return None


def env_info() -> dict:
  """What the numbers depend on: versions, CPU, thread settings, XLA flags."""
  info: dict[str, Any] = {
    "python": platform.python_version(),
    "machine": platform.machine(),
    "cores": os.cpu_count(),
    "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
  }
  for dist in ("jax", "jaxlib", "flax", "optax", "torch", "keras"):
    with contextlib.suppress(metadata.PackageNotFoundError):
      info[dist] = metadata.version(dist)
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.read().splitlines()
  except OSError:
    return info
  info["cpu"] = _cpuinfo_field(lines, "model name") or "?"
  flags = (_cpuinfo_field(lines, "flags") or "").split()
  info["cpu_flags"] = sorted(
    f for f in flags if f.startswith(("avx512", "amx"))
  )
  return info


def run_worker(
  script: Path,
  args: list[str],
  *,
  env: dict | None = None,
  timeout_s: float = 900,
) -> list[dict]:
  """Runs `python script *args` in a fresh process; returns its JSON records.

  Workers print one `@@{json}` line per result; everything else (warnings,
  logs) goes to stderr, whose tail is shown if the worker fails.
  """
  full_env = {**os.environ, **(env or {})}
  full_env["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p
  )
  proc = subprocess.run(
    [sys.executable, str(script), *args],
    env=full_env,
    text=True,
    capture_output=True,
    timeout=timeout_s,
  )
  records = [
    json.loads(line[2:])
    for line in proc.stdout.splitlines()
    if line.startswith("@@")
  ]
  if proc.returncode != 0:
    sys.stderr.write(proc.stderr[-4000:])
    command = " ".join(args)
    records.append(
      {
        "error": f"worker {script.name} {command} exited {proc.returncode}",
        "stderr_tail": proc.stderr[-1500:],
      }
    )
  return records


def emit(record: dict) -> None:
  """A worker's result line (see `run_worker`)."""
  print("@@" + json.dumps(record), flush=True)


def write_json(name: str, payload: dict) -> Path:
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / name
  path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
  return path


# (numerator, denominator) framework pairs shown as ratio columns: stock
# against stock, and malloc-tuned against malloc-tuned. "_tuned" is
# tune_malloc() in that process; flaxtl_tuned also compiles with flaxtl's own
# XLA options (flaxtl as launch.py runs it).
PAIRS = (
  ("flaxtl", "torch"),
  ("flaxtl", "keras"),
  ("flaxtl_tuned", "torch_tuned"),
  ("flaxtl_tuned", "keras_tuned"),
  ("flaxtl_tuned", "torch"),
  ("flaxtl_tuned", "flaxtl"),
  ("flaxtl_xla", "flaxtl"),
)


def present_pairs(fws: list[str]) -> list[tuple[str, str]]:
  return [(a, b) for a, b in PAIRS if a in fws and b in fws]


def ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a and b else None


def ratio_cells(
  pairs: Sequence[tuple[str, str]],
  value: Callable[[str], float | None],
  tag: str,
  derived: dict,
) -> list[str]:
  """One cell per (a, b) pair: value(a) / value(b), also derived['a/b@tag']."""
  cells = []
  for a, b in pairs:
    r = derived[f"{a}/{b}@{tag}"] = ratio(value(a), value(b))
    cells.append(fmt_ratio(r))
  return cells


def fmt(x: float | None, digits: int = 1) -> str:
  if x is None:
    return "-"
  if x >= 1000:
    return f"{x:,.0f}"
  return f"{x:.{digits}f}"


def fmt_ratio(x: float | None) -> str:
  return "-" if x is None else f"{x:.2f}x"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


STAR_NOTE = (
  "`*`: other processes used > 15% of the machine during that measurement "
  "(retried, least contended kept)."
)
