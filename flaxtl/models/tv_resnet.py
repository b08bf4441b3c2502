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


def _block_leaves(kind: str, downsample: bool) -> list[str]:
  convs = 2 if kind == "basic" else 3
  leaves = [n for i in range(1, convs + 1) for n in (f"conv{i}", f"bn{i}")]
  return leaves + (["downsample/0", "downsample/1"] if downsample else [])


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


def module_paths(
  arch: str, include_top: bool = True, pooling: str | None = None
) -> list[str]:
  """Every module whose output `output_layer` can name, in forward order."""
  del pooling  # The pool without the top is no module here.
  kind = ARCHS[arch][0]
  leaves = ["conv1", "bn1", "relu", "maxpool"]
  for stage, blocks in _stages(arch):
    for i, _, down in blocks:
      leaves += [f"{stage}/{i}/{n}" for n in _block_leaves(kind, down)]
  if include_top:
    leaves += ["avgpool", "fc"]
  return tv.post_order(leaves)


def layer_names(
  arch: str, include_top: bool = True, pooling: str | None = None
) -> list[str]:
  """The modules with parameters, in forward order ('layer1/0/conv1')."""
  del pooling  # Parameter-free.
  kind = ARCHS[arch][0]
  names = ["conv1", "bn1"]
  for stage, blocks in _stages(arch):
    for i, _, down in blocks:
      names += [f"{stage}/{i}/{n}" for n in _block_leaves(kind, down)]
  return names + (["fc"] if include_top else [])


class Downsample(nn.Module):
  """`downsample`: '0' a strided 1x1 conv, '1' its BatchNorm."""

  features: int
  stride: int
  stop: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    layers, taps = tv.tools(self)
    x = taps("0", layers.conv(x, self.features, 1, "0", self.stride))
    return taps("1", layers.bn(x, train, "1"))


class Block(nn.Module):
  """torchvision's BasicBlock / Bottleneck."""

  kind: str
  planes: int
  stride: int = 1
  downsample: bool = False
  stop: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    layers, taps = tv.tools(self)
    out = self.planes * EXPANSION[self.kind]
    if self.kind == "basic":
      plan = [(self.planes, 3, self.stride), (self.planes, 3, 1)]
    else:
      plan = [(self.planes, 1, 1), (self.planes, 3, self.stride), (out, 1, 1)]
    y = x
    for i, (features, k, stride) in enumerate(plan, start=1):
      y = taps(
        f"conv{i}", layers.conv(y, features, k, f"conv{i}", stride, k // 2)
      )
      y = taps(f"bn{i}", layers.bn(y, train, f"bn{i}"))
      if i < len(plan):
        y = nn.relu(y)
    identity = x
    if self.downsample:
      identity = Downsample(
        out,
        self.stride,
        tv.sub_stop(self.stop, "downsample"),
        self.dtype,
        self.param_dtype,
        name="downsample",
      )(x, train)
      identity = taps("downsample", identity)
    return nn.relu(y + identity)


class Stage(nn.Module):
  """`layer1` ... `layer4`: blocks '0', '1', ..."""

  kind: str
  planes: int
  blocks: tuple[tuple[int, int, bool], ...]  # (index, stride, downsample).
  stop: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    taps = common.Taps(self.stop)
    for i, stride, down in self.blocks:
      block = Block(
        self.kind,
        self.planes,
        stride,
        down,
        tv.sub_stop(self.stop, str(i)),
        self.dtype,
        self.param_dtype,
        name=str(i),
      )
      x = taps(str(i), block(x, train))
    return x


class ResNet(nn.Module):
  """torchvision.models.resnetXX, returning logits by default.

  Attributes:
    arch: one of ARCHS.
    include_top: keep avgpool + fc.
    num_classes: outputs of fc.
    pooling: without the top, None (4D features), 'avg' or 'max'.
    output_layer: stop after this module ('layer3', 'layer2/1/bn2').
    dtype, param_dtype: compute and storage dtypes.
  """

  arch: str = "tv_resnet50"
  include_top: bool = True
  num_classes: int = 1000
  pooling: str | None = None
  output_layer: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    names = module_paths(self.arch, self.include_top)
    tv.check(self.arch, self.output_layer, names, x.shape, MIN_SIZE)
    layers = tv.Layers(self.dtype, self.param_dtype)
    taps = common.Taps(self.output_layer)
    kind = ARCHS[self.arch][0]

    def forward() -> jax.Array:
      y = x.astype(self.dtype)
      y = taps("conv1", layers.conv(y, 64, 7, "conv1", 2, 3))
      y = taps("bn1", layers.bn(y, train, "bn1"))
      y = taps("relu", nn.relu(y))
      y = taps("maxpool", tv.max_pool(y, 3, 2, 1))
      for (stage, blocks), planes in zip(_stages(self.arch), WIDTHS):
        y = Stage(
          kind,
          planes,
          tuple(blocks),
          tv.sub_stop(self.output_layer, stage),
          self.dtype,
          self.param_dtype,
          name=stage,
        )(y, train)
        y = taps(stage, y)
      if not self.include_top:
        return common.global_pool(y, self.pooling)
      y = taps("avgpool", jnp.mean(y, axis=(1, 2)))
      return taps("fc", tv.logits(layers.linear(y, self.num_classes, "fc")))

    return taps.run(forward)


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
