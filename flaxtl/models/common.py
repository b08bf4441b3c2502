"""What every family shares: Keras' BatchNormalization rule, layer taps, init.

BatchNormalization as Keras defines it (TF 2 / Keras >= 2.1.3): a BN layer
whose weights are frozen runs in inference mode, normalising with its moving
statistics and never updating them. A training step says which BN layers those
are by passing `train=TrainMode(bn_inference=...)` instead of `train=True`;
every `BatchNorm` below asks `uses_batch_stats(train, its path)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.errors import UserError

# How a head may pool a feature layer: over space for NHWC maps; over tokens
# for (B, T, D) sequences, where 'token' takes the class token.
FEATURE_POOLINGS = ("avg", "max", "token")


@dataclasses.dataclass(frozen=True)
class TrainMode:
  """A truthy `train` flag that also names the BN layers kept in inference mode.

  bn_inference: '/'-joined module paths as they appear in the variables
  ('backbone/conv1_bn', 'backbone/layer1/0/bn1').
  """

  bn_inference: frozenset[str] = frozenset()

  def __bool__(self) -> bool:
    return True


def uses_batch_stats(train: bool | TrainMode, path: str) -> bool:
  """Whether the BN layer at `path` normalises with batch statistics now."""
  if not train:
    return False
  return not (isinstance(train, TrainMode) and path in train.bn_inference)


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` that takes `train` and follows Keras' frozen-layer rule.

  Flax's momentum has Keras' meaning (moving = m * moving + (1 - m) * batch);
  PyTorch's momentum 0.1 is Flax's 0.9. Batch variance in two passes, as
  Keras (jnp.var) and PyTorch compute it: Flax's default E[x²] - E[x]² loses
  the digits that matter when |mean| >> std (tests/train/test_bn_semantics).
  """

  use_fast_variance: bool = False

  def __call__(
    self, x: jax.Array, train: bool | TrainMode = False
  ) -> jax.Array:  # type: ignore[override]
    batch = uses_batch_stats(train, "/".join(self.path))
    return super().__call__(x, use_running_average=not batch)


class _Stop(Exception):
  def __init__(self, value: Any):
    super().__init__()
    self.value = value


class Taps:
  """Names layer outputs in a forward pass; stops it once it has what was asked.

      taps = Taps(self.output_layer, self.return_layers)
      def forward():
        x = taps("conv1_relu", nn.relu(x))
        ...
      return taps.run(forward)

  output_layer: stop there and return that output. return_layers: return
  `{name: output}` for these layers instead, stopping after the deepest one.
  A model built to stop early has no parameters after it, like a Keras
  `Model(inputs, base.get_layer(name).output)`.
  """

  def __init__(
    self, output_layer: str | None = None, return_layers: Sequence[str] = ()
  ):
    if output_layer is not None and return_layers:
      raise UserError(
        f"output_layer={output_layer!r} and return_layers="
        f"{tuple(return_layers)}: give one of them"
      )
    self.output_layer = output_layer
    self.wanted = tuple(dict.fromkeys(return_layers))
    self.found: dict[str, jax.Array] = {}
    self.seen: list[str] = []

  def __call__(self, name: str, x: jax.Array) -> jax.Array:
    self.seen.append(name)
    if name == self.output_layer:
      raise _Stop(x)
    if name in self.wanted:
      self.found[name] = x
      if len(self.found) == len(self.wanted):
        raise _Stop(self.collected())
    return x

  def collected(self) -> dict[str, jax.Array]:
    return {n: self.found[n] for n in self.wanted}

  def run(self, forward: Callable[[], Any]) -> Any:
    try:
      out = forward()
    except _Stop as stop:
      return stop.value
    if self.wanted:  # The forward ended before every asked layer was seen.
      missing = [n for n in self.wanted if n not in self.found]
      raise UserError(f"return_layers {missing} are not layers of this model")
    return out


def check_output_layer(
  arch: str, output_layer: str | None, names: list[str]
) -> None:
  if output_layer is not None and output_layer not in names:
    raise UserError(
      f"output_layer {output_layer!r} is not a layer of {arch} "
      f"(first layers: {names[1:6]} ...)"
    )


def check_input(arch: str, shape: tuple[int, ...], min_size: int) -> None:
  if len(shape) != 4 or shape[-1] != 3:
    raise UserError(
      f"{arch} needs (batch, height, width, 3) images, got shape {tuple(shape)}"
    )
  if min(shape[1], shape[2]) < min_size:
    raise UserError(
      f"{arch} needs images of at least {min_size}x{min_size}, "
      f"got {shape[1]}x{shape[2]}"
    )


def global_pool(x: jax.Array, pooling: str | None) -> jax.Array:
  """Keras' global pooling of (B, H, W, C) maps; (B, T, D) tokens pool over
  the tokens only ('token' takes the first, a class token)."""
  if x.ndim == 3:
    return pool_tokens(x, pooling)
  if pooling == "avg":
    return jnp.mean(x, axis=(1, 2))
  if pooling == "max":
    return jnp.max(x, axis=(1, 2))
  return x


def pool_tokens(x: jax.Array, pooling: str | None) -> jax.Array:
  """(B, T, D) token sequences -> (B, D): 'token' (the first token), 'avg'
  or 'max' over tokens; None keeps the sequence."""
  if pooling == "token":
    return x[:, 0]
  if pooling == "avg":
    return jnp.mean(x, axis=1)
  if pooling == "max":
    return jnp.max(x, axis=1)
  return x


def dummy_input(image_size: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)


def init_variables(
  model: nn.Module, image_size: int, rng: jax.Array | None = None
) -> dict:
  """All variable collections of `model` for square `image_size` inputs."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  x = jnp.zeros(dummy_input(image_size).shape, jnp.float32)
  return dict(model.init(rng, x))


def variable_shapes(model: nn.Module, image_size: int) -> dict:
  """The variables as `jax.ShapeDtypeStruct`s, computed without FLOPs."""
  return jax.eval_shape(
    lambda: init_variables(model, image_size, jax.random.PRNGKey(0))
  )


def stochastic_depth(
  module: nn.Module, x: jax.Array, rate: float, train: bool | TrainMode
) -> jax.Array:
  """torchvision's StochasticDepth(rate, 'row'): drops whole samples.

  While training, each sample's `x` is zeroed with probability `rate` and
  scaled by 1 / (1 - rate) otherwise (module's 'dropout' rng); identity in
  inference.
  """
  if not train or rate == 0.0:
    return x
  keep = jax.random.bernoulli(
    module.make_rng("dropout"), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1)
  )
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
