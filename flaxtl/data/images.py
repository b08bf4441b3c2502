"""One image -> uint8 (H, W, C), with user errors naming the file.

Anything Pillow opens is accepted. Grayscale ('L', '1', 16-bit) stays one
channel; palette, RGBA, LA, CMYK and the other colour modes become RGB (alpha
is dropped, as Keras' `load_img(color_mode='rgb')` does). Runs in grain's
worker processes, once per example.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
import warnings

import numpy as np
from PIL import Image

from flaxtl.errors import UserError

log = logging.getLogger(__name__)

# Pillow's own large-image warning names no file: open_image says it instead.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

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

# What Pillow raises on truncated or corrupt data (OSError, SyntaxError),
# unknown formats (UnidentifiedImageError, an OSError) and bombs.
DECODE_ERRORS = (
  OSError,
  ValueError,
  SyntaxError,
  EOFError,
  Image.DecompressionBombError,
)


def is_image_file(path: Path) -> bool:
  return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(
    "."
  )


def read_bytes(path: str | Path, where: str = "") -> bytes:
  """A file's bytes; a missing or unreadable file is a UserError."""
  try:
    return Path(path).read_bytes()
  except FileNotFoundError:
    raise UserError(f"{where or path}: image file not found") from None
  except OSError as e:
    raise UserError(f"{where or path}: cannot read file: {e}") from None


def open_image(data: bytes, where: str) -> Image.Image:
  """Encoded bytes -> a Pillow image (header read; pixels decoded lazily)."""
  if not data:
    raise UserError(f"{where}: cannot read image: empty file (0 bytes)")
  try:
    img = Image.open(io.BytesIO(data))
  except Image.UnidentifiedImageError:
    raise UserError(
      f"{where}: cannot read image: not an image (no format Pillow knows "
      f"starts with {bytes(data[:8])!r})"
    ) from None
  except DECODE_ERRORS as e:
    raise UserError(
      f"{where}: cannot read image: {describe_error(e)}"
    ) from None
  pixels = img.size[0] * img.size[1]
  if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
    log.warning(
      "%s: a large image (%dx%d, %d pixels, over Pillow's %d): decoding it "
      "takes ~%d MB",
      where,
      *img.size,
      pixels,
      Image.MAX_IMAGE_PIXELS,
      pixels * 3 >> 20,
    )
  return img


def describe_error(e: Exception) -> str:
  """Pillow's message, without the `<_io.BytesIO object at 0x...>` it names."""
  text = str(e).strip() or type(e).__name__
  if "<_io.BytesIO" in text:
    return f"not a readable image ({type(e).__name__})"
  return text


def verify_image(data: bytes, where: str) -> None:
  """Decodes every pixel: truncated data fails here, not in training."""
  img = open_image(data, where)
  try:
    img.load()
  except DECODE_ERRORS as e:
    raise UserError(
      f"{where}: cannot read image: {describe_error(e)}"
    ) from None
  finally:
    img.close()


def read_image(path: str | Path, where: str = "") -> np.ndarray:
  """One file, decoded -> uint8 (H, W, 1|3); a bad file is a UserError."""
  where = where or str(path)
  img = open_image(read_bytes(path, where), where)
  try:
    return to_array(img)
  except DECODE_ERRORS as e:  # Truncated data shows up only when decoded.
    raise UserError(
      f"{where}: cannot read image: {describe_error(e)}"
    ) from None


def to_array(img: Image.Image) -> np.ndarray:
  """A Pillow image -> uint8 (H, W, 1|3)."""
  img = normalise_mode(img)
  arr = np.asarray(img, dtype=np.uint8)
  return arr[..., None] if arr.ndim == 2 else arr


def normalise_mode(img: Image.Image) -> Image.Image:
  """Any mode -> 'L' (grayscale, 16-bit scaled) or 'RGB' (alpha dropped)."""
  if img.mode in _GRAY_MODES:
    return _to_8bit_gray(img)
  if img.mode == "RGB":
    return img
  # Palette images with a transparency entry go through RGBA, which is what
  # Pillow asks for; the alpha is then dropped like any other.
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  return img.convert("RGB")


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


def from_array(arr: np.ndarray) -> Image.Image:
  """uint8 (H, W, 1|3) -> a Pillow image ('L' or 'RGB')."""
  return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def encode_png(arr: np.ndarray) -> bytes:
  """uint8 (H, W, 1|3) -> PNG bytes (lossless; for packing array sources)."""
  out = io.BytesIO()
  from_array(arr).save(out, format="PNG")
  return out.getvalue()
