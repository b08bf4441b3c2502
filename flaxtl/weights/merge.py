"""Strict merge of pretrained variables into a fresh init."""

from __future__ import annotations

from collections.abc import Iterable
import logging

import jax
import numpy as np

from flaxtl import tree
from flaxtl.errors import UserError

log = logging.getLogger(__name__)


def merge_pretrained(
  fresh: dict,
  pretrained: dict,
  *,
  into: str = "backbone",
  reinit: Iterable[str] = (),
) -> tuple[dict, dict]:
  """Copies `pretrained` variables into `fresh` under `into`, strictly.

  Both are variable dicts ({'params': ..., 'batch_stats': ...}). Every fresh
  variable under `into` must come from `pretrained` with the same shape,
  except layers listed in `reinit` (e.g. a new `predictions`, or a module
  path like 'classifier/6'), which keep their
  fresh init. Variables outside `into` (the head) stay fresh. Pretrained ones
  the model has no use for are skipped and logged. Returns (merged, report).
  """
  reinit = set(reinit)
  flat_pre = {
    f"{c}:{p}": v
    for c, coll in pretrained.items()
    for p, v in tree.flatten(coll).items()
  }
  missing, mismatched, loaded, fresh_kept = [], [], [], []
  prefix = into + "/"

  def pick(collection: str, path, value):
    key = tree.path_str(path)
    inner = key[len(prefix) :]
    if not key.startswith(prefix) or _under(inner, reinit):
      fresh_kept.append(key)
      return value
    src = flat_pre.get(f"{collection}:{inner}")
    if src is None:
      missing.append(key)
      return value
    if tuple(src.shape) != tuple(value.shape):
      mismatched.append(
        f"{key} {tuple(src.shape)} vs model {tuple(value.shape)}"
      )
      return value
    loaded.append(f"{collection}:{inner}")
    return np.asarray(src, dtype=value.dtype)

  merged = {
    c: jax.tree_util.tree_map_with_path(lambda p, v, c=c: pick(c, p, v), coll)
    for c, coll in fresh.items()
  }
  if missing or mismatched:
    parts = []
    if missing:
      names = ", ".join(tree.layers(missing))
      parts.append(f"missing from the pretrained weights: {names}")
    if mismatched:
      parts.append(f"shape mismatch: {'; '.join(mismatched)}")
    raise UserError(
      "pretrained weights do not fit the model: " + " | ".join(parts)
    )
  used = set(loaded)
  skipped = [p.split(":", 1)[1] for p in flat_pre if p not in used]
  for p in skipped:
    log.info("pretrained variable %s skipped (not used by this model)", p)
  log.info(
    "loaded %d pretrained arrays; fresh init for %s",
    len(loaded),
    ", ".join(tree.layers(fresh_kept)) or "nothing",
  )
  return merged, {"loaded": loaded, "fresh": fresh_kept, "skipped": skipped}


def _under(path: str, layers: set[str]) -> bool:
  """Whether `path` is in one of `layers` ('fc', or 'classifier/6')."""
  return any(path == n or path.startswith(n + "/") for n in layers)
