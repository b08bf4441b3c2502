"""Classifier heads and the backbone + head model used for transfer learning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.models import common, registry

HEADS = ("keras_top", "mlp", "linear")
ACTIVATIONS = {
  "relu": nn.relu,
  "sigmoid": nn.sigmoid,
  "tanh": nn.tanh,
  "gelu": nn.gelu,
  "linear": lambda x: x,
}


def _keras_uniform(key, shape, dtype=jnp.float32):
  """Keras' 'uniform' initialiser: U(-0.05, 0.05) (the tutorial's head)."""
  return jax.random.uniform(key, shape, dtype, -0.05, 0.05)


INITS = {
  "glorot_uniform": nn.initializers.glorot_uniform(),
  "uniform": _keras_uniform,
}


class MLPHead(nn.Module):
  """Dense layers `dense1..N` with activations and dropout, then `logits`."""

  hidden: Sequence[int]
  activations: Sequence[str]
  dropout: Sequence[float]
  num_classes: int
  kernel_init: str = "glorot_uniform"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    for i, width in enumerate(self.hidden):
      x = nn.Dense(
        width,
        dtype=self.dtype,
        kernel_init=INITS[self.kernel_init],
        name=f"dense{i + 1}",
      )(x)
      x = ACTIVATIONS[self.activations[i]](x)
      rate = self.dropout[i] if i < len(self.dropout) else 0.0
      if rate:
        x = nn.Dropout(rate, deterministic=not train, name=f"dropout{i + 1}")(x)
    logits = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      kernel_init=INITS["glorot_uniform"],
      name="logits",
    )(x)
    return logits.astype(jnp.float32)


def pool_features(feats: jax.Array, pooling: str | None) -> jax.Array:
  """Backbone features -> a vector per image: NHWC maps pooled over space (or
  flattened), (B, T, D) tokens over tokens (`common.pool_tokens`)."""
  if feats.ndim == 2:
    return feats
  if pooling in common.FEATURE_POOLINGS:
    return common.global_pool(feats, pooling)
  return feats.reshape(feats.shape[0], -1)


class TransferModel(nn.Module):
  """A registered backbone (variables under `backbone/`) and a head.

  head:
    "keras_top": the backbone's own top, its final `classifier` layer resized
      to the task (VGG: fc1, fc2 pretrained, a new `predictions`).
    "mlp": features of `feature_layer` (flattened, or globally pooled when
      `pooling` is set) into an `MLPHead` under `head/`.
    "linear": the same with no hidden layers.
  """

  arch: str
  head: str
  num_classes: int
  feature_layer: str | None = None  # None: the backbone's default.
  pooling: str | None = None
  hidden: Sequence[int] = ()
  activations: Sequence[str] = ()
  dropout: Sequence[float] = ()
  head_init: str = "glorot_uniform"
  dtype: Any = jnp.float32
  backbone_options: Any = ()  # ((key, value), ...) family options, hashable.

  def backbone(self) -> nn.Module:
    spec = registry.get(self.arch)
    options = dict(self.backbone_options)
    if self.head == "keras_top":
      return spec.build(
        include_top=True,
        num_classes=self.num_classes,
        dtype=self.dtype,
        name="backbone",
        **options,
      )
    return spec.build(
      include_top=False,
      output_layer=self.feature_layer or spec.feature_layer,
      dtype=self.dtype,
      name="backbone",
      **options,
    )

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    out = self.backbone()(x, train=train)
    if self.head == "keras_top":
      return out.astype(jnp.float32)
    return self.apply_head(out, train)

  def apply_head(self, feats: jax.Array, train: Any = False) -> jax.Array:
    """The head alone: what a cached-features run trains."""
    head = MLPHead(**self.head_kwargs(), name="head")
    return head(pool_features(feats, self.pooling), train)

  def head_kwargs(self) -> dict:
    """The head's fields; `MLPHead(**kwargs, parent=None)` builds it alone."""
    return {
      "hidden": tuple(self.hidden) if self.head == "mlp" else (),
      "activations": tuple(self.activations),
      "dropout": tuple(self.dropout),
      "num_classes": self.num_classes,
      "kernel_init": self.head_init,
      "dtype": self.dtype,
    }


class HeadOnly(nn.Module):
  """A TransferModel's head on precomputed features (params under `head/`)."""

  head: MLPHead
  pooling: str | None = None

  def __call__(self, feats: jax.Array, train: Any = False) -> jax.Array:
    return self.head(pool_features(feats, self.pooling), train)
