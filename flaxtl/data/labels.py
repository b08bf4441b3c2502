"""Raw labels -> int32 class indices, against a class list derived or given.

The training source defines the class list; a test source is mapped onto it,
so index k means the same class in both, and a label the model was never
trained on is a user error rather than a silent wrong index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from flaxtl.errors import UserError


def _key(label: str):
  """'3', '3.0' and ' 3' are one class; non-numeric labels compare as text."""
  text = label.strip()
  try:
    return (0, float(text))
  except ValueError:
    return (1, text)


def class_names_of(raw: Sequence[str]) -> list[str]:
  """Sorted unique labels: numerically when all are numbers ('2' < '10'),
  else as text."""
  first: dict = {}
  for label in raw:
    first.setdefault(_key(label), label.strip())
  return [first[k] for k in sorted(first)]


def index(
  raw: Sequence[str], class_names: Sequence[str], where: Callable[[int], str]
) -> np.ndarray:
  """Maps each raw label to its position in `class_names`; `where(i)` names
  example i in errors."""
  lookup = {_key(name): i for i, name in enumerate(class_names)}
  out = np.empty(len(raw), np.int32)
  for i, label in enumerate(raw):
    k = lookup.get(_key(label))
    if k is None:
      raise UserError(
        f"{where(i)}: label {label.strip()!r} is not one of the classes "
        f"{_preview(class_names)}"
      )
    out[i] = k
  return out


def remap(
  labels: np.ndarray,
  own_names: Sequence[str] | None,
  class_names: Sequence[str] | None,
  where: Callable[[int], str],
) -> tuple[np.ndarray, list[str]]:
  """A source's integer labels (own class list) -> indices into `class_names`.

  With no reference list, the source's own list stands. Without own names the
  labels are taken to be indices already and only range-checked.
  """
  labels = np.asarray(labels)
  if labels.size and labels.min() < 0:
    i = int(np.argmin(labels))
    raise UserError(f"{where(i)}: negative label {int(labels[i])}")
  if own_names is None:
    names = (
      list(class_names)
      if class_names is not None
      else [str(k) for k in range(int(labels.max(initial=-1)) + 1)]
    )
    _check_range(labels, names, where)
    return labels.astype(np.int32), names
  _check_range(labels, own_names, where)
  if class_names is None or list(own_names) == list(class_names):
    return labels.astype(np.int32), list(own_names)
  lookup = {_key(name): i for i, name in enumerate(class_names)}
  table = np.array([lookup.get(_key(name), -1) for name in own_names], np.int64)
  mapped = table[labels]
  if mapped.size and mapped.min() < 0:
    i = int(np.argmin(mapped))
    raise UserError(
      f"{where(i)}: label {own_names[labels[i]]!r} is not one of the classes "
      f"{_preview(class_names)}"
    )
  return mapped.astype(np.int32), list(class_names)


def _check_range(
  labels: np.ndarray, names: Sequence[str], where: Callable[[int], str]
) -> None:
  if labels.size and labels.max() >= len(names):
    i = int(np.argmax(labels))
    raise UserError(
      f"{where(i)}: label {int(labels[i])} is outside the {len(names)} "
      f"classes {_preview(names)}"
    )


def _preview(names: Sequence[str], limit: int = 12) -> str:
  shown = ", ".join(names[:limit])
  return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"
