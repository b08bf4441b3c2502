"""Host transforms: an image of any size -> a square uint8 RGB image.

    evaluation, and training without host augmentation:
        the largest centred square, resized to `size` (= shorter side resized
        to `size`, then centre crop)
    training with data.augment='inception':
        a random-resized crop (area 8-100% of the image, aspect 3/4-4/3, as
        torchvision's RandomResizedCrop and Inception's training) resized to
        `size`, mirrored left-right with p=0.5

The crop box is computed on the full-resolution image; the crop and the resize
are one Pillow call (`resize(box=...)`, antialiased). Large JPEGs are decoded
at a reduced DCT scale that still leaves at least `size` pixels across the
box (`Image.draft`), which is most of the decode time saved.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from flaxtl.data import images

# 'flip_crop' is the on-device random shift + flip (`flaxtl.data.augment`).
AUGMENTS = ("none", "flip_crop", "inception")
HOST_AUGMENTS = ("inception",)

Box = tuple[float, float, float, float]  # (left, top, right, bottom)


def augment_mode(value: Any) -> str:
  """data.augment: a mode name; True/False (older configs) mean
  'flip_crop'/'none'."""
  if value is True:
    return "flip_crop"
  if value is False or value is None:
    return "none"
  return str(value)


def centre_box(width: int, height: int) -> Box:
  """The largest centred square."""
  side = min(width, height)
  left, top = (width - side) / 2, (height - side) / 2
  return (left, top, left + side, top + side)


def inception_box(
  width: int,
  height: int,
  rng: np.random.Generator,
  scale: tuple[float, float] = (0.08, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
  """A random crop of `scale` of the area and `ratio` aspect (10 tries, then
  the centred crop with the aspect clamped), like RandomResizedCrop."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target * aspect))
    h = round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return (left, top, left + w, top + h)
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, round(width / ratio[0])
  elif aspect > ratio[1]:
    w, h = round(height * ratio[1]), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return (left, top, left + w, top + h)


def fit(
  img: Image.Image,
  size: int,
  rng: np.random.Generator | None = None,
  augment: str = "none",
) -> np.ndarray:
  """Pillow image -> uint8 (size, size, 3); random for 'inception'."""
  width, height = img.size
  if augment == "inception":
    box = inception_box(width, height, rng)
    mirror = bool(rng.integers(2))
  else:
    box, mirror = centre_box(width, height), False
  img, box = _draft(img, box, size)
  img = images.normalise_mode(img)
  out = img.resize((size, size), Image.BILINEAR, box=box)
  if mirror:
    out = out.transpose(Image.FLIP_LEFT_RIGHT)
  arr = np.asarray(out, dtype=np.uint8)
  arr = arr[..., None] if arr.ndim == 2 else arr
  if arr.shape[-1] == 1:
    arr = np.repeat(arr, 3, axis=-1)  # Grayscale tiled to RGB.
  return arr


def _draft(img: Image.Image, box: Box, size: int) -> tuple[Image.Image, Box]:
  """JPEG only: decode at 1/2, 1/4 or 1/8 scale when the box stays >= size."""
  if img.format != "JPEG":
    return img, box
  width, height = img.size
  shrink = min(box[2] - box[0], box[3] - box[1]) / size
  if shrink < 2:
    return img, box
  img.draft(img.mode, (math.ceil(width / shrink), math.ceil(height / shrink)))
  sx, sy = img.size[0] / width, img.size[1] / height
  return img, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
