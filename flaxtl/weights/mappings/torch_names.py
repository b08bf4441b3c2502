"""What the mappings of PyTorch-named families share: state_dict -> variables.

Such a family (naming='torch') names its variables by the torch module path
with '/' for '.', so a state_dict key maps onto the model by name alone:

    features.1.0.block.0.0.weight (O, I, kh, kw)  -> params .../kernel HWIO
    classifier.1.weight (out, in)                 -> params .../kernel (in, out)
    *.weight (C,) of a BatchNorm / LayerNorm       -> params .../scale
    *.bias                                         -> params .../bias
    *.running_mean / running_var                   -> batch_stats .../mean, var
    *.num_batches_tracked                          -> dropped (Flax keeps none)

Anything else (ConvNeXt's `layer_scale`) keeps its name, squeezed of
trailing size-1 axes. Every variable the model has must come from the file,
with the right shape; file keys the model has no place for are skipped and
listed.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from pathlib import Path

import numpy as np

from flaxtl import tree
from flaxtl.errors import UserError
from flaxtl.weights.converted import Converted
from flaxtl.weights.mappings import keras_names
from flaxtl.weights.torch_file import TorchWeights

_STATS = {"running_mean": "mean", "running_var": "var"}
_DROPPED = ("num_batches_tracked",)


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one torch tensor goes, and how its layout changes."""

  collection: str  # 'params' or 'batch_stats'.
  path: str  # 'features/0/0/kernel'.
  perm: tuple[int, ...] | None  # np.transpose axes, or None.
  squeeze: bool = False  # Drop trailing size-1 axes (layer_scale).

  def shape(self, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(torch_shape)
    if self.perm is not None and len(self.perm) == len(shape):
      shape = tuple(shape[i] for i in self.perm)
    while self.squeeze and len(shape) > 1 and shape[-1] == 1:
      shape = shape[:-1]
    return shape

  def array(self, a: np.ndarray) -> np.ndarray:
    shape = self.shape(a.shape)
    if self.perm is not None:  # Shapes were checked: perm fits.
      a = np.transpose(a, self.perm)
    return np.ascontiguousarray(a.reshape(shape))


def slot(key: str, ndim: int) -> Slot | None:
  """Where the tensor `key` of `ndim` dimensions goes (None: dropped)."""
  *module, name = key.split(".")
  layer = "/".join(module)
  if name in _DROPPED:
    return None
  if name in _STATS:
    return Slot("batch_stats", f"{layer}/{_STATS[name]}", None)
  if name == "weight":
    if ndim == 4:  # Conv2d (O, I/groups, kh, kw) -> HWIO.
      return Slot("params", f"{layer}/kernel", (2, 3, 1, 0))
    if ndim == 2:  # Linear (out, in) -> (in, out).
      return Slot("params", f"{layer}/kernel", (1, 0))
    return Slot("params", f"{layer}/scale", None)
  if name == "bias":
    return Slot("params", f"{layer}/bias", None)
  return Slot("params", f"{layer}/{name}", None, squeeze=True)


def torch_key(collection: str, path: str) -> str:
  """The state_dict key a model variable comes from (for messages)."""
  layer, var = path.rsplit("/", 1)
  name = {
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
  }.get((collection, var), var)
  return f"{layer.replace('/', '.')}.{name}"


def stage_depths(tensors: Mapping[str, np.ndarray], pattern) -> dict:
  """{stage: number of blocks} for keys matching `pattern` (stage, block)."""
  seen: dict[int, set[int]] = {}
  for key in tensors:
    m = pattern.match(key)
    if m:
      seen.setdefault(int(m[1]), set()).add(int(m[2]))
  return {s: len(b) for s, b in seen.items()}


def shape_of(tensors: Mapping[str, np.ndarray], key: str) -> tuple | None:
  a = tensors.get(key)
  return None if a is None else tuple(np.shape(a))


def resolve_arch(
  src: Path, found: str | None, arch: str | None, family: str
) -> str:
  """The arch to convert to: the one asked for, checked against the file's."""
  if arch is None:
    if found is None:
      raise UserError(
        f"{src}: its tensors match no {family} architecture; pass --arch"
      )
    return found
  if found is not None and found != arch:
    raise UserError(f"{src}: holds a {found} model, not {arch}; use --arch")
  return arch


def from_torch(
  weights: TorchWeights,
  arch: str,
  include_top: bool | None,
  top_key: str,
  options: dict | None = None,
) -> Converted:
  """Maps a state_dict onto `arch`, checking every variable and shape.

  top_key: the classifier's weight ('classifier.1.weight'); include_top None
  takes the top when the file has it, and its rows are the classes.
  """
  src, tensors = weights.path, weights.tensors
  top = shape_of(tensors, top_key)
  if include_top is None:
    include_top = top is not None
  num_classes = None
  if include_top:
    if top is None or len(top) != 2:
      raise UserError(
        f"{src}: no {top_key} (the top of {arch}); convert without the top "
        "(--notop)"
      )
    num_classes = int(top[0])
  top_layer = top_key.rsplit(".", 2)[0] + "."
  options = dict(options or {})
  expected = keras_names.model_shapes(arch, include_top, num_classes, options)
  flat: dict[str, dict[str, np.ndarray]] = {}
  skipped = []
  for key, array in tensors.items():
    s = _expected_slot(key, np.ndim(array), expected)
    if s is None:
      continue
    want = expected.get(s.collection, {}).get(s.path)
    if want is None:
      top_part = not include_top and key.startswith(top_layer)
      skipped.append(f"{key} (top)" if top_part else key)
      continue
    got = s.shape(np.shape(array))
    if got != want:
      raise UserError(
        f"{src}: tensor {key} has shape {tuple(np.shape(array))}, "
        f"expected {_torch_shape(s, want)} for {arch}"
      )
    flat.setdefault(s.collection, {})[s.path] = _floats(
      src, key, s.array(array)
    )
  missing = [
    torch_key(c, p)
    for c, paths in expected.items()
    for p in paths
    if p not in flat.get(c, {})
  ]
  if missing:
    more = f" ... ({len(missing)} in all)" if len(missing) > 5 else ""
    raise UserError(
      f"{src}: missing tensor(s) {', '.join(missing[:5])}{more} for {arch}"
    )
  variables = {c: tree.nested(v) for c, v in flat.items()}
  return Converted(
    variables, arch, include_top, num_classes, "by_name", skipped, options
  )


def _expected_slot(key: str, ndim: int, expected: dict) -> Slot | None:
  """`slot`, but a `weight` goes where the model has a kernel or scale for it.

  So a conv weight of the wrong rank is reported as mis-shaped, not missing.
  """
  s = slot(key, ndim)
  if s is None or s.path in expected.get(s.collection, {}):
    return s
  if key.endswith(".weight"):
    layer = s.path.rsplit("/", 1)[0]
    for var in ("kernel", "scale"):
      shape = expected.get("params", {}).get(f"{layer}/{var}")
      if shape is not None:
        return slot(key, len(shape))
  return s


def _torch_shape(s: Slot, shape: tuple[int, ...]) -> tuple[int, ...]:
  """A model variable's shape as torch would hold it (for messages)."""
  if s.perm is None:
    return shape
  return tuple(shape[s.perm.index(i)] for i in range(len(shape)))


def _floats(src: Path, key: str, a: np.ndarray) -> np.ndarray:
  """float32 copies of float tensors (float16 / bfloat16 included)."""
  if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
    raise UserError(f"{src}: tensor {key} holds {a.dtype}, expected floats")
  return np.asarray(a, np.float32)
