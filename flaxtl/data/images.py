"""Image files -> one uint8 (N, H, W, C) array, with user errors naming the file.

Anything Pillow opens is accepted. Grayscale ('L', '1', 16-bit) stays one
channel; palette, RGBA, LA, CMYK and the other colour modes become RGB (alpha
is dropped, as Keras' `load_img(color_mode='rgb')` does). When a set mixes
grayscale and colour images, the grayscale ones are tiled to RGB so they stack.
"""

from __future__ import annotations

from collections.abc import Sequence
import concurrent.futures
import os
from pathlib import Path

import numpy as np
from PIL import Image

from flaxtl.errors import UserError

# What a class folder may hold; other files (.txt, .DS_Store, ...) are skipped.
IMAGE_EXTENSIONS = frozenset(
  {
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
  }
)

_GRAY_MODES = frozenset({"L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def is_image_file(path: Path) -> bool:
  return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(
    "."
  )


def read_image(
  path: Path, load_size: int | None = None, where: str = ""
) -> np.ndarray:
  """One file -> uint8 (H, W, 1|3); `where` (e.g. 'train.csv row 3') prefixes errors."""
  prefix = f"{where}: " if where else ""
  try:
    with Image.open(path) as img:
      img.load()
      arr = to_array(img, load_size)
  except FileNotFoundError:
    raise UserError(f"{prefix}image file not found: {path}") from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    # Pillow reports truncated/corrupt data as OSError or SyntaxError, unknown
    # formats as UnidentifiedImageError (an OSError).
    raise UserError(f"{prefix}cannot read image {path}: {e}") from None
  return arr


def to_array(img: Image.Image, load_size: int | None = None) -> np.ndarray:
  if img.mode in _GRAY_MODES:
    img = _to_8bit_gray(img)
  elif img.mode != "RGB":
    # Palette images with a transparency entry go through RGBA, which is what
    # Pillow asks for; the alpha is then dropped like any other.
    if img.mode == "P" and "transparency" in img.info:
      img = img.convert("RGBA")
    img = img.convert("RGB")
  if load_size is not None and img.size != (load_size, load_size):
    img = img.resize((load_size, load_size), Image.BILINEAR)
  arr = np.asarray(img, dtype=np.uint8)
  return arr[..., None] if arr.ndim == 2 else arr


def _to_8bit_gray(img: Image.Image) -> Image.Image:
  if img.mode in ("L", "1"):
    return img.convert("L")
  # 16-bit grayscale: Pillow's convert('L') clips at 255, so scale. Pillow
  # opens some 16-bit files as 32-bit 'I'; 'I'/'F' data within 0..255 is kept.
  arr = np.asarray(img, dtype=np.float64)
  top = (
    65535.0
    if img.mode.startswith("I;16") or arr.max(initial=0) > 255
    else 255.0
  )
  return Image.fromarray(
    np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L"
  )


def resize_array(arr: np.ndarray, load_size: int) -> np.ndarray:
  """uint8 (H, W, C) -> (load_size, load_size, C), bilinear like `to_array`."""
  if arr.shape[:2] == (load_size, load_size):
    return arr
  img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
  return to_array(img.resize((load_size, load_size), Image.BILINEAR))


def stack(arrays: Sequence[np.ndarray], names: Sequence[str]) -> np.ndarray:
  """uint8 (H, W, C) images -> (N, H, W, C); all must share H and W (`names` go in the error)."""
  if not arrays:
    raise ValueError("nothing to stack")
  sizes = {a.shape[:2] for a in arrays}
  if len(sizes) > 1:
    first = arrays[0].shape[:2]
    i = next(i for i, a in enumerate(arrays) if a.shape[:2] != first)
    raise UserError(
      f"images have different sizes: {names[0]} is {_hw(first)}, {names[i]} is {_hw(arrays[i].shape[:2])}; "
      "set data.load_size to resize them on load"
    )
  channels = 3 if any(a.shape[-1] == 3 for a in arrays) else 1
  out = np.empty((len(arrays), *arrays[0].shape[:2], channels), np.uint8)
  for i, a in enumerate(arrays):
    out[i] = a  # Broadcasting tiles a 1-channel image into 3.
  return out


def read_images(
  paths: Sequence[Path],
  load_size: int | None = None,
  where: Sequence[str] | None = None,
) -> np.ndarray:
  """Reads files on a few threads (Pillow decodes without the GIL) and stacks them."""
  where = where or [""] * len(paths)
  workers = min(8, os.cpu_count() or 1, max(1, len(paths)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    arrays = list(
      pool.map(
        lambda pw: read_image(pw[0], load_size, pw[1]), zip(paths, where)
      )
    )
  return stack(arrays, [str(p) for p in paths])


def _hw(shape) -> str:
  return f"{shape[0]}x{shape[1]}"
