"""Image preprocessing, written in jnp so it runs inside the jitted step.

Images travel from the host as uint8 at their native size; resizing,
grayscale tiling and the family's `preprocess_input` happen on the device.
Modes are Keras' (`keras.applications.imagenet_utils.preprocess_input`):

    caffe  RGB -> BGR, minus the ImageNet channel means (VGG, ResNet v1)
    tf     scaled to [-1, 1] (MobileNet, Xception, Inception, ResNet v2)
    torch  [0, 1], minus mean, over std per channel (DenseNet, torchvision)
    clip   the same with OpenAI CLIP's mean and std (CLIP image towers)
    unit   scaled to [0, 1] (models trained from pixels)
    none   0..255 as is (EfficientNet and ConvNeXt normalise inside the model)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = ("caffe", "tf", "torch", "clip", "unit", "none")


def preprocess_input(x, mode: str = "caffe"):
  """Keras' `preprocess_input` of channels-last RGB 0..255 (numpy or jax)."""
  xp = jnp if isinstance(x, jax.Array) else np
  x = xp.asarray(x, dtype=xp.float32)
  if mode == "caffe":
    return x[..., ::-1] - xp.asarray(CAFFE_MEAN_BGR, dtype=xp.float32)
  if mode == "tf":
    return x / 127.5 - 1.0
  if mode in ("torch", "clip"):
    mean, std = (
      (TORCH_MEAN, TORCH_STD) if mode == "torch" else (CLIP_MEAN, CLIP_STD)
    )
    mean = xp.asarray(mean, dtype=xp.float32)
    std = xp.asarray(std, dtype=xp.float32)
    return (x / 255.0 - mean) / std
  if mode == "unit":
    return x / 255.0
  if mode == "none":
    return x
  raise ValueError(
    f"unknown preprocessing mode {mode!r}; expected one of {MODES}"
  )


def to_rgb(x: jax.Array) -> jax.Array:
  """Tiles 1-channel (or channel-less) images to 3 channels; RGB passes."""
  if x.ndim == 3:  # (N, H, W) grayscale without a channel axis.
    x = x[..., None]
  channels = x.shape[-1]
  if channels == 3:
    return x
  if channels == 1:
    return jnp.repeat(x, 3, axis=-1)
  if channels == 4:
    raise ValueError("RGBA images must be converted to RGB on load")
  raise ValueError(f"expected 1 or 3 channels, got {channels}")


def resize(
  x: jax.Array, size: int | tuple[int, int], method: str = "bilinear"
) -> jax.Array:
  """Resizes a (N, H, W, C) batch to `size`; a no-op when it already fits."""
  h, w = (size, size) if isinstance(size, int) else size
  if x.shape[1:3] == (h, w):
    return x
  return jax.image.resize(
    x.astype(jnp.float32),
    (x.shape[0], h, w, x.shape[3]),
    method=method,
    antialias=False,
  )


def prepare_images(
  images: jax.Array, size: int | tuple[int, int], mode: str = "caffe"
) -> jax.Array:
  """uint8 (N, H, W[, C]) -> float32 (N, size, size, 3) ready for the model."""
  x = to_rgb(jnp.asarray(images))
  x = resize(x.astype(jnp.float32), size)
  return preprocess_input(x, mode)
