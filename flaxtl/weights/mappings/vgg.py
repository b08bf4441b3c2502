"""A Keras file's layers -> VGG16/VGG19 params.

Mapping is by structure: the 3x3 convolutions in model order must form a VGG16
or VGG19 stack, shape by shape; `fc1`/`fc2`/`predictions` are the dense layers
that follow. When the file records the Keras layer names (every layout but the
oldest Keras 3 archives does), layers are matched by name instead and the
order is not relied upon. Either way every shape is checked.
"""

from __future__ import annotations

from pathlib import Path
import re

import numpy as np

from flaxtl.errors import UserError
from flaxtl.models import vgg
from flaxtl.weights import keras_file
from flaxtl.weights.converted import Converted

_VGG_CONV = re.compile(r"block[1-5]_conv[1-4]")
_TOP = ("fc1", "fc2", "predictions")


def expected_conv_shapes(arch: str) -> list[tuple[int, int, int, int]]:
  shapes, cin = [], 3
  for n, width in zip(vgg.BLOCKS[arch], vgg.WIDTHS):
    for _ in range(n):
      shapes.append((3, 3, cin, width))
      cin = width
  return shapes


def detect(weights: keras_file.KerasWeights) -> str | None:
  """'vgg16' or 'vgg19' when the file's 3x3 convs form that stack, else None."""
  convs = _convs(weights)
  return _detect_arch(convs, _by_name(convs)) if convs else None


def _convs(weights: keras_file.KerasWeights) -> list[keras_file.LayerWeights]:
  return [
    layer
    for layer in weights.layers
    if _kernel_bias(layer, ndim=4) and layer.arrays[0].shape[:2] == (3, 3)
  ]


def _by_name(convs: list[keras_file.LayerWeights]) -> bool:
  names = [layer.name for layer in convs]
  unique = len(set(names)) == len(names)
  return unique and all(n and _VGG_CONV.fullmatch(n) for n in names)


def _resolve_arch(src, convs, by_name: bool, arch: str | None) -> str:
  """`arch`, or the VGG the convs are; a file of the other VGG is refused."""
  found = _detect_arch(convs, by_name)
  if arch is None:
    if found is None:
      raise UserError(
        f"{src}: its {len(convs)} 3x3 convolutions match neither VGG16 "
        "nor VGG19"
      )
    return found
  if found is not None and found != arch:
    n = len(vgg.conv_layer_names(found))
    raise UserError(
      f"{src}: holds a {found.upper()} conv stack ({n} 3x3 convs), "
      f"not {arch.upper()}; "
      f"use --arch {found}"
    )
  return arch


def _chosen_convs(src, convs, by_name: bool, arch: str) -> list:
  """The file's layer for each of `arch`'s convs: by name, else by order."""
  names = vgg.conv_layer_names(arch)
  if by_name:
    lookup = {layer.name: layer for layer in convs}
    missing = [n for n in names if n not in lookup]
    if missing:
      raise UserError(
        f"{src}: missing layer(s) {', '.join(missing)} for {arch}"
      )
    return [lookup[n] for n in names]
  if len(convs) < len(names):
    raise UserError(
      f"{src}: missing layer {names[len(convs)]}: the file has only "
      f"{len(convs)} 3x3 conv layers, {arch} needs {len(names)}"
    )
  return convs[: len(names)]


def from_keras(
  weights: keras_file.KerasWeights,
  arch: str | None = None,
  include_top: bool | None = None,
) -> Converted:
  """Maps the layers of a Keras file onto VGG16/VGG19, checking shapes."""
  src = weights.path
  convs = _convs(weights)
  dense = [layer for layer in weights.layers if _kernel_bias(layer, ndim=2)]
  if not convs:
    raise UserError(f"{src}: no 3x3 convolution layers found; not a VGG file")

  by_name = _by_name(convs)
  arch = _resolve_arch(src, convs, by_name, arch)
  params: dict = {}
  used: set[int] = set()
  names = vgg.conv_layer_names(arch)
  chosen = _chosen_convs(src, convs, by_name, arch)
  for name, layer, shape in zip(names, chosen, expected_conv_shapes(arch)):
    params[name] = _checked(src, name, layer, shape)
    used.add(id(layer))

  top_found = _find_top(dense)
  if include_top is None:
    include_top = top_found is not None
  num_classes = None
  if include_top:
    if top_found is None:
      have = [
        f"{layer.name or layer.where} {layer.arrays[0].shape}"
        for layer in dense
      ] or ["none"]
      raise UserError(
        f"{src}: no VGG top (fc1 25088x4096, fc2, predictions) in this file "
        f"(dense layers: {', '.join(have)}); convert without the top (--notop)"
      )
    for name, layer in zip(_TOP, top_found):
      params[name] = _checked(src, name, layer, None)
      used.add(id(layer))
    num_classes = int(params["predictions"]["kernel"].shape[1])
    _check_top_shapes(src, params)

  skipped = [
    f"{layer.name or '?'} at {layer.where}"
    for layer in weights.layers
    if id(layer) not in used
  ]
  mapping = "by_name" if by_name else "by_order"
  return Converted(
    {"params": params}, arch, include_top, num_classes, mapping, skipped
  )


def _kernel_bias(layer: keras_file.LayerWeights, ndim: int) -> bool:
  arrays = layer.arrays
  if len(arrays) != 2:
    return False
  kernel, bias = sorted(arrays, key=lambda a: -a.ndim)
  return (
    kernel.ndim == ndim and bias.ndim == 1
  )  # Sizes are checked once mapped.


def _detect_arch(
  convs: list[keras_file.LayerWeights], by_name: bool
) -> str | None:
  if by_name:
    names = {layer.name for layer in convs}
    return (
      "vgg19"
      if names & {"block3_conv4", "block4_conv4", "block5_conv4"}
      else "vgg16"
    )
  shapes = [_kernel(layer).shape for layer in convs]
  # The longest VGG stack that the leading convs match exactly.
  for arch in ("vgg19", "vgg16"):
    want = expected_conv_shapes(arch)
    if [tuple(s) for s in shapes[: len(want)]] == want:
      return arch
  return None


def _find_top(
  dense: list[keras_file.LayerWeights],
) -> list[keras_file.LayerWeights] | None:
  by_name = {layer.name: layer for layer in dense if layer.name in _TOP}
  if len(by_name) == 3:
    return [by_name[n] for n in _TOP]
  fc1 = [
    i
    for i, layer in enumerate(dense)
    if _kernel(layer).shape == (7 * 7 * 512, vgg.TOP_UNITS)
  ]
  if fc1 and len(dense) >= fc1[0] + 3:
    return dense[fc1[0] : fc1[0] + 3]
  return None


def _kernel(layer: keras_file.LayerWeights) -> np.ndarray:
  return max(layer.arrays, key=lambda a: a.ndim)


def _checked(
  src: Path, name: str, layer: keras_file.LayerWeights, kernel_shape
) -> dict:
  kernel = _kernel(layer)
  bias = min(layer.arrays, key=lambda a: a.ndim)
  where = f"layer {name} ({layer.where})"
  for a in (kernel, bias):
    if not np.issubdtype(a.dtype, np.floating):
      raise UserError(
        f"{src}: {where} holds {a.dtype} weights, expected floats"
      )
  if kernel_shape is not None and tuple(kernel.shape) != tuple(kernel_shape):
    raise UserError(
      f"{src}: {where} kernel has shape {tuple(kernel.shape)}, "
      f"expected {tuple(kernel_shape)}"
    )
  if bias.shape != (kernel.shape[-1],):
    raise UserError(
      f"{src}: {where} bias has shape {bias.shape}, "
      f"expected ({kernel.shape[-1]},)"
    )
  return {"kernel": np.asarray(kernel), "bias": np.asarray(bias)}


def _check_top_shapes(src: Path, params: dict) -> None:
  want = {
    "fc1": (7 * 7 * 512, vgg.TOP_UNITS),
    "fc2": (vgg.TOP_UNITS, vgg.TOP_UNITS),
  }
  for name, shape in want.items():
    got = params[name]["kernel"].shape
    if got != shape:
      raise UserError(
        f"{src}: layer {name} kernel has shape {got}, expected {shape}"
      )
  if params["predictions"]["kernel"].shape[0] != vgg.TOP_UNITS:
    raise UserError(
      f"{src}: layer predictions kernel has shape "
      f"{params['predictions']['kernel'].shape}, "
      f"expected ({vgg.TOP_UNITS}, num_classes)"
    )
