"""torchvision's ResNet-18/34/50/101/152, with torchvision's module paths.

Parameters sit at the state dict's keys: `conv1`, `bn1`, `layer{1-4}/{i}/
conv{1,2,3}`, `layer{1-4}/{i}/bn{1,2,3}`, `layer{1-4}/0/downsample/{0,1}`
and `fc`. ResNet v1.5 as torchvision has it: a bottleneck strides in its 3x3
conv. timm's `resnet50` (and resnet18/34/101/152) use the same names and
the same computation, so their checkpoints load too.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.models import common
from flaxtl.models import tv_common as tv

# arch -> (block kind, blocks per stage).
ARCHS: dict[str, tuple[str, tuple[int, ...]]] = {
  "tv_resnet18": ("basic", (2, 2, 2, 2)),
  "tv_resnet34": ("basic", (3, 4, 6, 3)),
  "tv_resnet50": ("bottleneck", (3, 4, 6, 3)),
  "tv_resnet101": ("bottleneck", (3, 4, 23, 3)),
  "tv_resnet152": ("bottleneck", (3, 8, 36, 3)),
}
WIDTHS = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}
MIN_SIZE = 32


def _stages(arch: str):
  """(stage name, [(block index, stride, has downsample)]) in order."""
  kind, counts = ARCHS[arch]
  inplanes = 64
  for s, (n, width) in enumerate(zip(counts, WIDTHS)):
    stride = 1 if s == 0 else 2
    out = width * EXPANSION[kind]
    blocks = [(0, stride, stride != 1 or inplanes != out)]
    blocks += [(i, 1, False) for i in range(1, n)]
    inplanes = out
    yield f"layer{s + 1}", blocks


class Downsample(nn.Module):
  """`downsample`: '0' a strided 1x1 conv, '1' its BatchNorm."""

  features: int
  stride: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    layers = tv.Layers.of(self)
    x = tv.tap(self, "0", layers.conv(x, self.features, 1, "0", self.stride))
    return tv.tap(self, "1", layers.bn(x, train, "1"))


class Block(nn.Module):
  """torchvision's BasicBlock / Bottleneck."""

  kind: str
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    layers = tv.Layers.of(self)
    out = self.planes * EXPANSION[self.kind]
    if self.kind == "basic":
      plan = [(self.planes, 3, self.stride), (self.planes, 3, 1)]
    else:
      plan = [(self.planes, 1, 1), (self.planes, 3, self.stride), (out, 1, 1)]
    y = x
    for i, (features, k, stride) in enumerate(plan, start=1):
      y = layers.conv(y, features, k, f"conv{i}", stride, k // 2)
      y = tv.tap(self, f"conv{i}", y)
      y = tv.tap(self, f"bn{i}", layers.bn(y, train, f"bn{i}"))
      if i < len(plan):
        y = nn.relu(y)
    identity = x
    if self.downsample:
      identity = Downsample(
        out, self.stride, self.dtype, self.param_dtype, name="downsample"
      )(x, train)
      identity = tv.tap(self, "downsample", identity)
    return nn.relu(y + identity)


class Stage(nn.Module):
  """`layer1` ... `layer4`: blocks '0', '1', ..."""

  kind: str
  planes: int
  blocks: tuple[tuple[int, int, bool], ...]  # (index, stride, downsample).
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    for i, stride, down in self.blocks:
      block = Block(
        self.kind,
        self.planes,
        stride,
        down,
        self.dtype,
        self.param_dtype,
        name=str(i),
      )
      x = tv.tap(self, str(i), block(x, train))
    return x


class ResNet(nn.Module):
  """torchvision.models.resnetXX, returning logits by default.

  Attributes:
    arch: one of ARCHS.
    include_top: keep avgpool + fc.
    num_classes: outputs of fc.
    pooling: without the top, None (4D features), 'avg' or 'max'.
    output_layer: stop after this module ('layer3', 'layer2/1/bn2').
    return_layers: return {path: output} of these modules instead.
    dtype, param_dtype: compute and storage dtypes.
  """

  arch: str = "tv_resnet50"
  include_top: bool = True
  num_classes: int = 1000
  pooling: str | None = None
  output_layer: str | None = None
  return_layers: tuple[str, ...] | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    tv.check_arch(self.arch, ARCHS, self.pooling)
    common.check_input(self.arch, x.shape, MIN_SIZE)
    layers = tv.Layers.of(self)
    kind = ARCHS[self.arch][0]

    def forward() -> jax.Array:
      y = x.astype(self.dtype)
      y = tv.tap(self, "conv1", layers.conv(y, 64, 7, "conv1", 2, 3))
      y = tv.tap(self, "bn1", layers.bn(y, train, "bn1"))
      y = tv.tap(self, "relu", nn.relu(y))
      y = tv.tap(self, "maxpool", tv.max_pool(y, 3, 2, 1))
      for (stage, blocks), planes in zip(_stages(self.arch), WIDTHS):
        y = Stage(
          kind,
          planes,
          tuple(blocks),
          self.dtype,
          self.param_dtype,
          name=stage,
        )(y, train)
        y = tv.tap(self, stage, y)
      if not self.include_top:
        return common.global_pool(y, self.pooling)  # No module: no tap.
      y = tv.tap(self, "avgpool", jnp.mean(y, axis=(1, 2)))
      y = tv.logits(layers.linear(y, self.num_classes, "fc"))
      return tv.tap(self, "fc", y)

    return tv.run(self, self.arch, forward)


# Module order, recorded from the taps of one pass.
module_paths, layer_names = tv.recorded_order(ResNet, MIN_SIZE)


tv.register_family(
  "tv_resnet",
  ResNet,
  ARCHS,
  layer_names,
  module_paths,
  min_size=MIN_SIZE,
  feature_layer="layer4",
  classifier="fc",
  batch_stats=True,
  stem_layers=("conv1",),
)
