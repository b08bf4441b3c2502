"""Image preprocessing, written in jnp so it runs inside the jitted step.

Images travel from the host as uint8 at their native size; resizing, grayscale
tiling and Keras' VGG `preprocess_input` happen on the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Keras 'caffe' mode: BGR channel means of the ImageNet training set.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocess_input(x: jax.Array) -> jax.Array:
  """Keras `vgg16.preprocess_input` (caffe mode), channels-last.

  Takes RGB in 0..255 (any float or int dtype), flips to BGR and subtracts the
  ImageNet means. No scaling, exactly like Keras.
  """
  xp = jnp if isinstance(x, jax.Array) else np
  x = xp.asarray(x, dtype=xp.float32)
  return x[..., ::-1] - xp.asarray(CAFFE_MEAN_BGR, dtype=xp.float32)


def to_rgb(x: jax.Array) -> jax.Array:
  """Tiles 1-channel (or channel-less) images to 3 channels; RGB passes through."""
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


def resize(x: jax.Array, size: int | tuple[int, int], method: str = "bilinear") -> jax.Array:
  """Resizes a (N, H, W, C) batch to `size`; a no-op when it already fits."""
  h, w = (size, size) if isinstance(size, int) else size
  if x.shape[1:3] == (h, w):
    return x
  return jax.image.resize(
      x.astype(jnp.float32), (x.shape[0], h, w, x.shape[3]), method=method, antialias=False
  )


def prepare_images(
    images: jax.Array, size: int | tuple[int, int], mode: str = "caffe"
) -> jax.Array:
  """uint8 (N, H, W[, C]) -> float32 (N, size, size, 3) ready for the model.

  mode: "caffe" (VGG's preprocess_input), "unit" (scale to [0, 1], for models
  trained from pixels like the tutorial's MLP/CNN baselines) or "none".
  """
  x = to_rgb(jnp.asarray(images))
  x = resize(x.astype(jnp.float32), size)
  if mode == "caffe":
    return preprocess_input(x)
  if mode == "unit":
    return x / 255.0
  if mode == "none":
    return x
  raise ValueError(f"unknown preprocessing mode {mode!r}")
