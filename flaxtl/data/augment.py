"""Random crop and flip, in jnp so they run inside the jitted train step.

Applied per batch on the device (on native-size images, before the resize),
each image with its own offsets and flip. Off for digits: a mirrored 2 or 5 is
not a digit any more.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def augment(
  rng: jax.Array,
  images: jax.Array,
  pad: int | None = None,
  flip: bool = True,
) -> jax.Array:
  """(N, H, W, C) -> same shape: shifted by up to `pad` pixels (reflect padding,
  then a random H x W crop; default H // 8) and mirrored left-right with p=0.5."""
  n, h, w, c = images.shape
  pad = max(1, min(h, w) // 8) if pad is None else pad
  k_crop, k_flip = jax.random.split(rng)
  if pad > 0:
    padded = jnp.pad(
      images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect"
    )
    offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))  # noqa: E731
    images = jax.vmap(crop)(padded, offsets)
  if flip:
    mirrored = jax.random.bernoulli(k_flip, 0.5, (n,))
    images = jnp.where(
      mirrored[:, None, None, None], images[:, :, ::-1, :], images
    )
  return images
