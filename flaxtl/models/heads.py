"""Classifier heads and the backbone + head model used for transfer learning."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.errors import UserError
from flaxtl.models.vgg import VGG

ACTIVATIONS = {"relu": nn.relu, "sigmoid": nn.sigmoid, "tanh": nn.tanh, "gelu": nn.gelu, "linear": lambda x: x}
# The tutorial's head: Dense(1000, relu, kernel_initializer='uniform') ...; Keras'
# 'uniform' initialiser is U(-0.05, 0.05).
def _keras_uniform(key, shape, dtype=jnp.float32):
  return jax.random.uniform(key, shape, dtype, -0.05, 0.05)


INITS = {"glorot_uniform": nn.initializers.glorot_uniform(), "uniform": _keras_uniform}


class MLPHead(nn.Module):
  """Dense layers `dense1..N` with activations and (really applied) dropout, then `logits`."""

  hidden: Sequence[int]
  activations: Sequence[str]
  dropout: Sequence[float]
  num_classes: int
  kernel_init: str = "glorot_uniform"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, width in enumerate(self.hidden):
      x = nn.Dense(width, dtype=self.dtype, kernel_init=INITS[self.kernel_init], name=f"dense{i + 1}")(x)
      x = ACTIVATIONS[self.activations[i]](x)
      rate = self.dropout[i] if i < len(self.dropout) else 0.0
      if rate:
        x = nn.Dropout(rate, deterministic=not train, name=f"dropout{i + 1}")(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=INITS["glorot_uniform"], name="logits")(
        x
    ).astype(jnp.float32)


class TransferModel(nn.Module):
  """A VGG backbone (params under `backbone/`, Keras names) and a head.

  head:
    "keras_top": the Keras top itself: fc1, fc2 (pretrained) and a new
      `predictions` sized to the task, all under `backbone/`.
    "mlp": features from `feature_layer` (flattened, or globally pooled when
      `pooling` is set) into an `MLPHead` under `head/`.
    "linear": the same with no hidden layers.
  """

  arch: str
  head: str
  num_classes: int
  feature_layer: str = "block5_pool"
  pooling: Optional[str] = None
  hidden: Sequence[int] = ()
  activations: Sequence[str] = ()
  dropout: Sequence[float] = ()
  head_init: str = "glorot_uniform"
  dtype: Any = jnp.float32
  conv_impl: str = "auto"  # VGG's conv_impl.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.head == "keras_top":
      return VGG(arch=self.arch, include_top=True, num_classes=self.num_classes, dtype=self.dtype,
                 conv_impl=self.conv_impl, name="backbone")(x)
    if self.head not in ("mlp", "linear"):
      raise UserError(f"model.head must be 'keras_top', 'mlp' or 'linear', got {self.head!r}")
    feats = VGG(arch=self.arch, include_top=False, output_layer=self.feature_layer, dtype=self.dtype,
                conv_impl=self.conv_impl, name="backbone")(x)
    return self.apply_head(feats, train)

  def apply_head(self, feats: jax.Array, train: bool = False) -> jax.Array:
    """The head alone: what a cached-features run trains."""
    return self.make_head(name="head")(pool_features(feats, self.pooling), train)

  def make_head(self, name: Optional[str] = None) -> MLPHead:
    return MLPHead(**self.head_kwargs(), name=name)

  def head_kwargs(self) -> dict:
    """The head's fields; `MLPHead(**kwargs, parent=None)` builds it outside this model."""
    return dict(hidden=tuple(self.hidden) if self.head == "mlp" else (), activations=tuple(self.activations),
                dropout=tuple(self.dropout), num_classes=self.num_classes, kernel_init=self.head_init,
                dtype=self.dtype)


def pool_features(feats: jax.Array, pooling: Optional[str]) -> jax.Array:
  if feats.ndim == 2:
    return feats
  if pooling == "avg":
    return feats.mean(axis=(1, 2))
  if pooling == "max":
    return feats.max(axis=(1, 2))
  return feats.reshape(feats.shape[0], -1)


class HeadOnly(nn.Module):
  """The head of a TransferModel on precomputed features; params under `head/` as in the full model."""

  head: MLPHead
  pooling: Optional[str] = None

  def __call__(self, feats: jax.Array, train: bool = False) -> jax.Array:
    return self.head(pool_features(feats, self.pooling), train)
