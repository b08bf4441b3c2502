"""data.augment='flip_crop': random shift and flip inside the jitted step.

Applied per batch on the device (on the batch's size, before the resize),
each image with its own offsets and flip. Off for digits: a mirrored 2 or 5 is
not a digit any more. The host-side alternative, 'inception', crops from the
full-resolution image (`flaxtl.data.transforms`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flaxtl.data.transforms import augment_mode


def augment(
  rng: jax.Array,
  images: jax.Array,
  pad: int | None = None,
  flip: bool = True,
) -> jax.Array:
  """(N, H, W, C) -> same shape: shifted by up to `pad` pixels (reflect
  padding, then a random H x W crop; default H // 8) and mirrored left-right
  with p=0.5."""
  n, h, w, c = images.shape
  pad = max(1, min(h, w) // 8) if pad is None else pad
  k_crop, k_flip = jax.random.split(rng)
  if pad > 0:
    padded = jnp.pad(
      images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect"
    )
    offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)

    def crop(img, o):
      return jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))

    images = jax.vmap(crop)(padded, offsets)
  if flip:
    mirrored = jax.random.bernoulli(k_flip, 0.5, (n,))
    images = jnp.where(
      mirrored[:, None, None, None], images[:, :, ::-1, :], images
    )
  return images


def device_augment(config: Any) -> Callable | None:
  """What the train step applies on the device: `augment` for
  data.augment='flip_crop', else None."""
  mode = augment_mode(config.data.augment)
  return augment if mode == "flip_crop" else None
