"""A PyTorch state dict -> the variables of a PyTorch-named flaxtl model.

The models' parameter paths are the state dict's keys ('layer1/0/conv1' is
`layer1.0.conv1`), so the mapping is by name, driven by the model: every
variable the model has is taken from its tensor, converted, and its shape
checked; a missing or mis-shaped tensor is named. Conversions:

    conv   weight (out, in/groups, kh, kw) -> kernel (kh, kw, in/groups, out)
    linear weight (out, in)                -> kernel (in, out)
    bias                                   -> bias
    BN     weight, bias                    -> params scale, bias
           running_mean, running_var       -> batch_stats mean, var

Tensors the model does not use (`num_batches_tracked`, the classifier of a
model converted without its top) are reported as skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from flaxtl import tree
from flaxtl.errors import UserError
from flaxtl.models import common, registry
from flaxtl.weights.converted import Converted
from flaxtl.weights.torch_file import TorchWeights

# (collection, flax leaf name) -> torch tensor suffix.
SUFFIX = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("params", "bias"): "bias",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
  # ConvNeXt's LayerScale, (C, 1, 1) in torch: its mapping reshapes it.
  ("params", "layer_scale"): "layer_scale",
}
# A family's special case for one variable: (torch array, flax shape) -> array.
Fixup = Callable[[np.ndarray, tuple[int, ...]], np.ndarray]


def torch_key(path: str, collection: str = "params") -> str:
  """'layer1/0/conv1/kernel' in params -> 'layer1.0.conv1.weight'."""
  layer, leaf = path.rsplit("/", 1)
  suffix = SUFFIX.get((collection, leaf))
  if suffix is None:
    raise ValueError(f"no torch name for {collection}/{path}")
  return layer.replace("/", ".") + "." + suffix


def expected_shapes(
  arch: str, include_top: bool, num_classes: int | None, options: dict
) -> dict:
  """{collection: {path: ShapeDtypeStruct}} of the model, without FLOPs."""
  spec = registry.get(arch)
  model = spec.create(
    include_top=include_top, num_classes=num_classes or 1000, **options
  )
  shapes = common.variable_shapes(model, spec.input_size(include_top))
  return {c: tree.flatten(v) for c, v in shapes.items()}


def to_flax(array: np.ndarray, leaf: str, ndim: int) -> np.ndarray:
  """A torch tensor in the layout of the flax variable `leaf` (ndim dims)."""
  if leaf == "kernel" and array.ndim == 4 and ndim == 4:
    return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
  if leaf == "kernel" and array.ndim == 2 and ndim == 2:
    return array.T  # (out, in) -> (in, out).
  return array


def to_torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  """The torch shape a flax variable of `shape` comes from (for messages)."""
  if leaf == "kernel" and len(shape) == 4:
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  if leaf == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def convert(
  weights: TorchWeights,
  arch: str,
  include_top: bool,
  num_classes: int | None,
  options: dict | None = None,
  fixups: Mapping[str, Fixup] | None = None,
) -> Converted:
  """The model's variables from `weights`, every tensor checked.

  fixups: {'classifier/0/kernel': fn} for variables whose layout differs
  beyond the conversions above (VGG's (C, H, W) flatten).
  """
  options, fixups = dict(options or {}), dict(fixups or {})
  want = expected_shapes(arch, include_top, num_classes, options)
  src, tensors = weights.path, weights.tensors
  variables: dict = {}
  used: set[str] = set()
  missing, problems = [], []
  for collection, shapes in want.items():
    flat = {}
    for path, spec in shapes.items():
      leaf = path.rsplit("/", 1)[1]
      key = torch_key(path, collection)
      if key not in tensors:
        missing.append(key)
        continue
      used.add(key)
      array = tensors[key]
      if (
        not np.issubdtype(array.dtype, np.floating) and array.dtype.kind != "V"
      ):
        problems.append(f"{key} holds {array.dtype}, expected floats")
        continue
      want_shape = tuple(spec.shape)
      if path in fixups:
        converted = fixups[path](array, want_shape)
      else:
        converted = to_flax(array, leaf, len(want_shape))
      if converted is None or tuple(converted.shape) != want_shape:
        problems.append(
          f"{key} has shape {tuple(array.shape)}, expected "
          f"{to_torch_shape(want_shape, leaf)}"
        )
        continue
      flat[path] = np.ascontiguousarray(converted, dtype=spec.dtype)
    variables[collection] = tree.nested(flat)
  if missing:
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise UserError(
      f"{src}: missing tensor(s) {', '.join(missing[:5])}{more} for {arch}"
      + ("" if include_top else " without its top")
    )
  if problems:
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    raise UserError(
      f"{src}: tensors do not fit {arch}: {'; '.join(problems[:3])}{more}"
    )
  skipped = [k for k in tensors if k not in used]
  return Converted(
    variables,
    arch,
    include_top,
    num_classes if include_top else None,
    "by_name",
    skipped,
    options,
  )


def num_classes_of(weights: TorchWeights, key: str) -> int | None:
  """Rows of the classifier's weight `key`, if the file has it."""
  w = weights.tensors.get(key)
  return int(w.shape[0]) if w is not None and w.ndim == 2 else None


def has(weights: TorchWeights, *keys: str) -> bool:
  return all(k in weights.tensors for k in keys)


def count(weights: TorchWeights, prefix: str) -> int:
  """How many numbered children `prefix.N.` the state dict has."""
  found = set()
  for k in weights.tensors:
    if k.startswith(prefix + "."):
      head = k[len(prefix) + 1 :].split(".", 1)[0]
      if head.isdigit():
        found.add(int(head))
  return max(found) + 1 if found else 0


def from_torch(
  weights: TorchWeights,
  arch: str,
  include_top: bool | None,
  classifier: str,
  fixups: Mapping[str, Fixup] | None = None,
) -> Converted:
  """`convert` with include_top and num_classes read from the classifier.

  classifier: the torch key of the classifier's weight ('fc.weight').
  """
  n = num_classes_of(weights, classifier)
  if include_top is None:
    include_top = n is not None
  if include_top and n is None:
    raise UserError(
      f"{weights.path}: has no classifier ({classifier}); convert it "
      "without the top (--notop)"
    )
  return convert(weights, arch, include_top, n, fixups=fixups)


FromTorch = Callable[..., Converted]


def from_torch_for(
  classifier: str, fixups: Mapping[str, Fixup] | None = None
) -> FromTorch:
  """A family's `from_torch(weights, arch, include_top=None)`.

  classifier: the torch key of its classifier's weight ('fc.weight');
  fixups: as in `convert`, the same for every arch of the family.
  """

  def family_from_torch(
    weights: TorchWeights, arch: str, include_top: bool | None = None
  ) -> Converted:
    return from_torch(weights, arch, include_top, classifier, fixups)

  return family_from_torch
