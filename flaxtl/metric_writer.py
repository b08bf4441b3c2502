"""Metrics to JSON lines, TensorBoard event files and a progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from tqdm import tqdm


def _plain(v: Any):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


class MetricWriter:
  """Writes only on process 0; every process may call it."""

  def __init__(self, workdir: Path, total_steps: int, start_step: int, batch_size: int, progress: bool):
    self.active = jax.process_index() == 0
    self.batch_size = batch_size
    self._jsonl = open(workdir / "metrics.jsonl", "a") if self.active else None
    self._tb = None
    if self.active:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(workdir / "tensorboard"))
    self._bar = tqdm(total=total_steps, initial=start_step, disable=not (progress and self.active),
                     unit="step", dynamic_ncols=True)
    self._last = (time.perf_counter(), start_step)

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.active:
      return
    record = {"step": step, "split": split, **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in record.items():
      if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(f"{split}/{k}", v, step)
    self._tb.flush()

  def progress(self, step: int, metrics: dict[str, float]) -> Optional[float]:
    """Advances the bar to `step`; returns images/s since the last call."""
    now = time.perf_counter()
    t0, s0 = self._last
    self._last = (now, step)
    rate = (step - s0) * self.batch_size / max(now - t0, 1e-9) if step > s0 else None
    if self.active:
      post = {k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "accuracy")}
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
