"""Metrics: log loss as sklearn computes it, and where metrics go during a run.

MetricWriter: JSON lines, TensorBoard event files and a progress bar (process
0 only). PendingMetrics: train metrics fetched from the device in batches and
checked for NaN/Inf before anything is saved.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

from flaxtl.errors import UserError

log = logging.getLogger(__name__)


def log_loss_terms(probs, labels):
  """Per-example log loss exactly as sklearn's `log_loss` computes it.

  Probabilities are clipped to [eps, 1 - eps] (float32 eps) and renormalised
  before the log, so a confident mistake costs ~16, not infinity. Works on
  numpy and jax arrays alike.
  """
  xp = jnp if isinstance(probs, jax.Array) else np
  eps = np.finfo(np.float32).eps
  p = xp.clip(probs, eps, 1 - eps)
  p = p / p.sum(-1, keepdims=True)
  return -xp.log(xp.take_along_axis(p, labels[:, None], axis=-1)[:, 0])


def summarise_eval(sums: dict) -> dict:
  """Summed eval-step outputs -> count, means, and accuracy per class."""
  n = float(sums["count"])
  per_class = np.where(
    sums["class_count"] > 0,
    sums["class_correct"] / np.maximum(sums["class_count"], 1),
    np.nan,
  )
  return {
    "count": int(n),
    "loss": float(sums["loss"]) / n,
    "accuracy": float(sums["correct"]) / n,
    "log_loss": float(sums["log_loss"]) / n,
    "per_class_accuracy": [float(x) for x in per_class],
  }


def _plain(v: Any):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


def _is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


class MetricWriter:
  """Writes only on process 0; every process may call it."""

  def __init__(
    self,
    workdir: Path,
    total_steps: int,
    start_step: int,
    batch_size: int,
    progress: bool,
  ):
    self.active = jax.process_index() == 0
    self.batch_size = batch_size
    # Appended line by line for the whole run; closed by close().
    jsonl = workdir / "metrics.jsonl"
    self._jsonl = open(jsonl, "a") if self.active else None  # noqa: SIM115
    self._tb = None
    if self.active:
      self._tb = SummaryWriter(str(workdir / "tensorboard"))
    self._bar = tqdm(
      total=total_steps,
      initial=start_step,
      # A captured log (not a terminal) gets the step lines, not a bar's \r
      # redraws glued into the text printed around it.
      disable=not (progress and self.active and _is_terminal(sys.stderr)),
      unit="step",
      dynamic_ncols=True,
    )
    self._last = (time.perf_counter(), start_step)

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.active:
      return
    record = {
      "step": step,
      "split": split,
      **{k: _plain(v) for k, v in metrics.items()},
    }
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in record.items():
      if (
        k not in ("step", "split")
        and isinstance(v, (int, float))
        and math.isfinite(v)
      ):
        self._tb.add_scalar(f"{split}/{k}", v, step)
    self._tb.flush()

  def progress(self, step: int, metrics: dict[str, float]) -> float | None:
    """Advances the bar to `step`; returns images/s since the last call."""
    now = time.perf_counter()
    t0, s0 = self._last
    self._last = (now, step)
    rate = (
      (step - s0) * self.batch_size / max(now - t0, 1e-9) if step > s0 else None
    )
    if self.active:
      post = {
        k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "accuracy")
      }
      if rate:
        post["img/s"] = f"{rate:.1f}"
      self._bar.set_postfix(post, refresh=False)
      self._bar.update(step - self._bar.n)
    return rate

  def print(self, text: str) -> None:
    if self.active:
      self._bar.write(text)

  def close(self) -> None:
    self._bar.close()
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


class NonFiniteLoss(UserError):
  """The loss or gradient norm became NaN/Inf (the last checkpoint stays)."""


class PendingMetrics:
  """Train metrics fetched from the device in batches (no per-step sync).

  `flush()` checks them for NaN/Inf; the loop calls it before every
  checkpoint, so a non-finite step is never saved.
  """

  def __init__(
    self,
    writer: MetricWriter,
    nan_policy: str,
    workdir: Path,
    last_good_step: int | None,
  ):
    self.writer, self.nan_policy, self.workdir = writer, nan_policy, workdir
    self.last_good_step = last_good_step
    self.skipped_updates = 0
    self.last: dict = {}
    self.rates: list[float] = []
    self._pending: list[tuple[int, dict]] = []

  def add(self, step: int, metrics: dict) -> None:
    self._pending.append((step, metrics))

  def flush(self) -> None:
    if not self._pending:
      return
    fetched = jax.device_get([m for _, m in self._pending])
    for (s, _), m in zip(self._pending, fetched):
      if not bool(m["finite"]):
        if self.nan_policy == "stop":
          if self.last_good_step is None:
            kept = "no checkpoint had been saved yet"
          else:
            kept = (
              f"the last good checkpoint (step {self.last_good_step}) in "
              f"{self.workdir} is intact"
            )
          raise NonFiniteLoss(
            f"loss or gradient became NaN/Inf at step {s}; {kept}; lower "
            "optim.lr or set nan_policy='skip'"
          )
        self.skipped_updates += 1
        log.warning("step %d: non-finite loss, update skipped", s)
    s, m = self._pending[-1][0], fetched[-1]
    self.last = {k: float(v) for k, v in m.items() if k != "finite"}
    extra = {"skipped_updates": self.skipped_updates}
    self.writer.write(s, "train", {**self.last, **extra})
    rate = self.writer.progress(s, self.last)
    if rate:
      self.rates.append(rate)
    self._pending = []
