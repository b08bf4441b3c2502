"""The tutorial's from-pixels baselines, so its comparison can be rerun.

MLP: flattened image -> 3 x Dense(500, relu) -> classes (the tutorial's
6.9%-train-accuracy model). CNN: 3 blocks of Conv(32, 5x5, relu) + 4x4
max-pool... The tutorial pools 4x4 after each block on 224x224 input; on small
inputs the pool shrinks to what still fits, so the model runs at any size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class PixelMLP(nn.Module):
  num_classes: int
  hidden: Sequence[int] = (500, 500, 500)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"dense{i + 1}")(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(
      x
    ).astype(jnp.float32)


class SmallCNN(nn.Module):
  num_classes: int
  filters: int = 32
  blocks: int = 3
  pool: int = 4
  dense: int = 64
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.astype(self.dtype)
    for b in range(1, self.blocks + 1):
      x = nn.relu(
        nn.Conv(
          self.filters,
          (5, 5),
          padding="SAME",
          dtype=self.dtype,
          name=f"conv{b}",
        )(x)
      )
      p = min(self.pool, x.shape[1], x.shape[2])
      x = nn.max_pool(x, (p, p), strides=(p, p))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.dense, dtype=self.dtype, name="dense")(x))
    x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(
      x
    ).astype(jnp.float32)
