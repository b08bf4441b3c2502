"""Strict merge of pretrained params into a fresh init."""

from __future__ import annotations

import logging
from typing import Iterable

import jax
import numpy as np

from flaxtl.errors import UserError
from flaxtl.freeze import param_paths, path_str

log = logging.getLogger(__name__)


def merge_pretrained(fresh: dict, pretrained: dict, *, into: str = "backbone",
                     reinit: Iterable[str] = ()) -> tuple[dict, dict]:
  """Copies `pretrained` into `fresh[into]`, strictly.

  Every fresh parameter under `into` must come from `pretrained` with the same
  shape, except layers listed in `reinit` (e.g. a new `predictions`), which
  keep their fresh init. Parameters outside `into` (the head) stay fresh.
  Pretrained parameters the model has no use for are skipped and logged.
  Returns (merged params, report) where the report lists what happened.
  """
  reinit = set(reinit)
  flat_pre = {p: v for p, v in _flat(pretrained)}
  missing, mismatched, loaded, fresh_kept = [], [], [], []

  def pick(path, value):
    key = path_str(path)
    if not key.startswith(into + "/"):
      fresh_kept.append(key)
      return value
    inner = key[len(into) + 1 :]
    if inner.split("/")[0] in reinit:
      fresh_kept.append(key)
      return value
    if inner not in flat_pre:
      missing.append(key)
      return value
    src = flat_pre[inner]
    if tuple(src.shape) != tuple(value.shape):
      mismatched.append(f"{key} {tuple(src.shape)} vs model {tuple(value.shape)}")
      return value
    loaded.append(key)
    return np.asarray(src, dtype=value.dtype)

  merged = jax.tree_util.tree_map_with_path(pick, fresh)
  if missing or mismatched:
    parts = []
    if missing:
      parts.append(f"missing from the pretrained weights: {', '.join(_layers(missing))}")
    if mismatched:
      parts.append(f"shape mismatch: {'; '.join(mismatched)}")
    raise UserError("pretrained weights do not fit the model: " + " | ".join(parts))
  used = {k[len(into) + 1 :] for k in loaded}
  skipped = [p for p in flat_pre if p not in used]
  for p in skipped:
    log.info("pretrained param %s skipped (not used by this model)", p)
  log.info("loaded %d pretrained arrays; fresh init for %s", len(loaded), ", ".join(_layers(fresh_kept)) or "nothing")
  return merged, {"loaded": loaded, "fresh": fresh_kept, "skipped": skipped}


def _flat(tree):
  paths = param_paths(tree)
  return zip(paths, jax.tree.leaves(tree))


def _layers(paths: list[str]) -> list[str]:
  out: list[str] = []
  for p in paths:
    layer = p.rsplit("/", 1)[0]
    if layer not in out:
      out.append(layer)
  return out
