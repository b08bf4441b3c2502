"""The parameter table printed at the start of a run."""

from __future__ import annotations

import numpy as np

from flaxtl import tree
from flaxtl.train.freeze import Plan


def param_table(
  params, freeze_plan: Plan, roles: dict[str, str] | None = None
) -> str:
  """One row per parameter; `roles` (PEFT: adapter/head/base) adds a column."""
  shapes = {p: np.shape(v) for p, v in tree.flatten(params).items()}
  rows, totals = [], counts(params, freeze_plan)
  for path, state, mult in freeze_plan.rows:
    n = int(np.prod(shapes[path]))
    rows.append(
      (
        path,
        "x".join(map(str, shapes[path])) or "scalar",
        f"{n:,}",
        state,
        "-" if state == "frozen" else f"{mult:g}",
        *((roles.get(path, "-"),) if roles else ()),
      )
    )
  header = ("parameter", "shape", "params", "state", "lr mult")
  header += ("role",) if roles else ()
  widths = [max(len(r[i]) for r in [*rows, header]) for i in range(len(header))]

  def fmt(row) -> str:
    return "  ".join(
      c.ljust(w) if i in (0, 1, 3, 5) else c.rjust(w)
      for i, (c, w) in enumerate(zip(row, widths))
    )

  total = totals["trainable"] + totals["frozen"]
  lines = [
    fmt(header),
    fmt(tuple("-" * w for w in widths)),
    *map(fmt, rows),
    "",
    f"total {total:,} params: {totals['trainable']:,} trainable, "
    f"{totals['frozen']:,} frozen",
  ]
  return "\n".join(lines)


def counts(params, freeze_plan: Plan) -> dict[str, int]:
  sizes = {p: int(np.size(v)) for p, v in tree.flatten(params).items()}
  out = {"trainable": 0, "frozen": 0}
  for path, state, _ in freeze_plan.rows:
    out[state] += sizes[path]
  return out
