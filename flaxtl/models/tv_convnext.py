"""torchvision's ConvNeXt Tiny/Small/Base/Large in Flax, named like its modules.

Parameter paths are torchvision's module paths with '/' for '.':
`features/1/0/block/0/kernel` is `features[1][0].block[0].weight` (the 7x7
depthwise conv), `features/1/0/block/2/{scale,bias}` its LayerNorm,
`features/1/0/layer_scale` the block's LayerScale, stored as (C,) where torch
keeps (C, 1, 1). Kernels are HWIO (depthwise: (7, 7, 1, C)), dense kernels
(in, out); every LayerNorm has eps 1e-6 and GELU is the exact (erf) one, as
in torchvision. No BatchNorm, so no batch_stats. Inputs are NHWC, normalised
with ImageNet mean/std (`preprocess_input(x, 'torch')`).

`output_layer` and `layer_names` follow `tv_efficientnet`: every module path
(`module_paths`) in the order its output is ready, a container after its
last child; `layer_names` those with parameters. Outputs are NHWC where
torch's are NCHW, so a block's two Permutes (`block/1`, `block/6`) change
nothing here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.models import common, tv_common
from flaxtl.ops import conv as conv_ops


@dataclasses.dataclass(frozen=True)
class Variant:
  widths: tuple[int, int, int, int]
  depths: tuple[int, int, int, int]
  stochastic_depth_prob: float  # torchvision's default for the variant.


# torchvision.models.convnext_tiny ... convnext_large.
VARIANTS = {
  "tv_convnext_tiny": Variant((96, 192, 384, 768), (3, 3, 9, 3), 0.1),
  "tv_convnext_small": Variant((96, 192, 384, 768), (3, 3, 27, 3), 0.4),
  "tv_convnext_base": Variant((128, 256, 512, 1024), (3, 3, 27, 3), 0.5),
  "tv_convnext_large": Variant((192, 384, 768, 1536), (3, 3, 27, 3), 0.5),
}
EPS = 1e-6
LAYER_SCALE = 1e-6  # Initial LayerScale.
MIN_SIZE = 32  # Total stride 32: a 1x1 map at the end.


def stage_index(stage: int) -> int:
  """features/1, 3, 5, 7 hold the stages; 2, 4, 6 the downsamplings."""
  return 2 * stage + 1


# CNBlock's `block`: dwconv, Permute, LayerNorm, Linear, GELU, Linear, Permute.
_BLOCK_PARAMS = (True, False, True, True, False, True, False)


def _cnblock(prefix: str) -> tv_common.Modules:
  mods = [(f"{prefix}/block/{i}", p) for i, p in enumerate(_BLOCK_PARAMS)]
  # The block itself holds layer_scale, applied after `block`.
  return [
    *mods,
    (f"{prefix}/block", False),
    (f"{prefix}/stochastic_depth", False),
    (prefix, True),
  ]


@functools.cache
def _features(arch: str) -> tuple[tuple[str, bool], ...]:
  mods = [("features/0/0", True), ("features/0/1", True), ("features/0", False)]
  depths = VARIANTS[arch].depths
  for s, depth in enumerate(depths):
    stage = f"features/{stage_index(s)}"
    for j in range(depth):
      mods += _cnblock(f"{stage}/{j}")
    mods.append((stage, False))
    if s < len(depths) - 1:
      down = f"features/{stage_index(s) + 1}"
      mods += [(f"{down}/0", True), (f"{down}/1", True), (down, False)]
  return (*mods, ("features", False))


def _modules(
  arch: str, include_top: bool, pooling: str | None
) -> tv_common.Modules:
  # classifier: LayerNorm2d '0', Flatten '1', Linear '2'.
  top = (True, False, True)
  return tv_common.with_top(_features(arch), top, include_top, pooling)


def module_paths(
  arch: str, include_top: bool = True, pooling: str | None = None
) -> list[str]:
  """Every module path in the order its output is ready: `output_layer`s."""
  return tv_common.paths(_modules(arch, include_top, pooling))


def layer_names(
  arch: str, include_top: bool = True, pooling: str | None = None
) -> list[str]:
  """The modules with parameters, in forward order.

  A CNBlock ('features/1/0') is one: it holds its layer_scale.
  """
  return tv_common.param_paths(_modules(arch, include_top, pooling))


# torchvision's trunc_normal_(std=0.02) truncates at +-2 absolute, i.e. never:
# a plain normal is the same distribution.
weight_init = nn.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class _Ctx:
  taps: common.Taps
  train: Any
  dtype: Any
  param_dtype: Any

  def conv(self, features, kernel, stride=1, padding=0, groups=1, name=None):
    return nn.Conv(
      features,
      (kernel, kernel),
      (stride, stride),
      padding=((padding, padding), (padding, padding)),
      feature_group_count=groups,
      conv_general_dilated=conv_ops.conv_general_dilated,
      kernel_init=weight_init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )

  def dense(self, features, name):
    return nn.Dense(
      features,
      kernel_init=weight_init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )

  def norm(self, name):
    return nn.LayerNorm(
      EPS,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      use_fast_variance=False,
      name=name,
    )


class CNBlock(nn.Module):
  """torchvision's CNBlock: dwconv 7x7, LN, Linear 4x, GELU, Linear, scale."""

  stochastic_depth_prob: float

  @nn.compact
  def __call__(self, x: jax.Array, ctx: _Ctx, prefix: str) -> jax.Array:
    dim, taps = x.shape[-1], ctx.taps
    y = Block(name="block")(x, ctx, f"{prefix}/block")
    scale = self.param(
      "layer_scale",
      nn.initializers.constant(LAYER_SCALE),
      (dim,),
      ctx.param_dtype,
    )
    y = scale.astype(ctx.dtype) * y
    y = common.stochastic_depth(self, y, self.stochastic_depth_prob, ctx.train)
    y = taps(f"{prefix}/stochastic_depth", y)
    return taps(prefix, y + x)


class Block(nn.Module):
  """CNBlock's `block` Sequential (its Permutes are no-ops in NHWC)."""

  @nn.compact
  def __call__(self, x: jax.Array, ctx: _Ctx, prefix: str) -> jax.Array:
    dim, taps = x.shape[-1], ctx.taps
    x = taps(
      f"{prefix}/0", ctx.conv(dim, 7, padding=3, groups=dim, name="0")(x)
    )
    x = taps(f"{prefix}/1", x)
    x = taps(f"{prefix}/2", ctx.norm("2")(x))
    x = taps(f"{prefix}/3", ctx.dense(4 * dim, "3")(x))
    x = taps(f"{prefix}/4", nn.gelu(x, approximate=False))
    x = taps(f"{prefix}/5", ctx.dense(dim, "5")(x))
    x = taps(f"{prefix}/6", x)
    return taps(prefix, x)


class Stage(nn.Module):
  """A Sequential of CNBlocks (features/1, 3, 5, 7)."""

  depth: int
  sd_probs: tuple[float, ...]

  @nn.compact
  def __call__(self, x: jax.Array, ctx: _Ctx, prefix: str) -> jax.Array:
    for j in range(self.depth):
      x = CNBlock(self.sd_probs[j], name=str(j))(x, ctx, f"{prefix}/{j}")
    return ctx.taps(prefix, x)


class Downsample(nn.Module):
  """LayerNorm2d '0', then a 2x2 stride-2 conv '1' (features/2, 4, 6)."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array, ctx: _Ctx, prefix: str) -> jax.Array:
    x = ctx.taps(f"{prefix}/0", ctx.norm("0")(x))
    x = ctx.taps(f"{prefix}/1", ctx.conv(self.features, 2, 2, name="1")(x))
    return ctx.taps(prefix, x)


class Features(nn.Module):
  """`features`: stem '0' (4x4 stride-4 conv, LayerNorm2d), then stages."""

  arch: str
  stochastic_depth_prob: float

  @nn.compact
  def __call__(self, x: jax.Array, ctx: _Ctx) -> jax.Array:
    v, taps = VARIANTS[self.arch], ctx.taps
    x = Stem(v.widths[0], name="0")(x, ctx, "features/0")
    total, done = sum(v.depths), 0
    for s, depth in enumerate(v.depths):
      # torchvision: rate * block_id / (total_blocks - 1).
      sd = tuple(
        self.stochastic_depth_prob * (done + j) / (total - 1.0)
        for j in range(depth)
      )
      done += depth
      i = stage_index(s)
      x = Stage(depth, sd, name=str(i))(x, ctx, f"features/{i}")
      if s < len(v.widths) - 1:
        x = Downsample(v.widths[s + 1], name=str(i + 1))(
          x, ctx, f"features/{i + 1}"
        )
    return taps("features", x)


class Stem(nn.Module):
  """features/0: Conv2dNormActivation(4x4 stride 4, bias, LayerNorm2d)."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array, ctx: _Ctx, prefix: str) -> jax.Array:
    x = ctx.taps(f"{prefix}/0", ctx.conv(self.features, 4, 4, name="0")(x))
    x = ctx.taps(f"{prefix}/1", ctx.norm("1")(x))
    return ctx.taps(prefix, x)


class Classifier(nn.Module):
  """`classifier`: LayerNorm2d '0', Flatten '1', Linear '2'."""

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, ctx: _Ctx) -> jax.Array:
    x = ctx.taps("classifier/0", ctx.norm("0")(x))
    x = ctx.taps("classifier/1", x)  # Flatten of a (N, C, 1, 1) map in torch.
    x = ctx.taps("classifier/2", ctx.dense(self.num_classes, "2")(x))
    return ctx.taps("classifier", x)


class TVConvNeXt(nn.Module):
  """torchvision's ConvNeXt; returns logits by default.

  Attributes:
    arch: 'tv_convnext_tiny', '_small', '_base' or '_large'.
    include_top: keep avgpool + classifier (LayerNorm, Flatten, Linear).
    num_classes: outputs of `classifier/2`.
    pooling: without the top: None (4D features), 'avg' or 'max'.
    output_layer: stop at this module (any of `module_paths`), return it.
    stochastic_depth_prob: None is torchvision's rate for the arch; scaled
      linearly from 0 at the first block to it at the last.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
  """

  arch: str = "tv_convnext_tiny"
  include_top: bool = True
  num_classes: int = 1000
  pooling: str | None = None
  output_layer: str | None = None
  stochastic_depth_prob: float | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    tv_common.check_arch(self.arch, VARIANTS, self.pooling)
    names = module_paths(self.arch, self.include_top, self.pooling)
    tv_common.check(self.arch, self.output_layer, names, x.shape, MIN_SIZE)
    taps = common.Taps(self.output_layer)
    ctx = _Ctx(taps, train, self.dtype, self.param_dtype)
    sd = self.stochastic_depth_prob
    if sd is None:
      sd = VARIANTS[self.arch].stochastic_depth_prob

    def forward():
      y = Features(self.arch, sd, name="features")(x.astype(self.dtype), ctx)
      if not self.include_top:
        return tv_common.pool(taps, y, self.pooling)
      y = taps("avgpool", jnp.mean(y, axis=(1, 2)))
      return Classifier(self.num_classes, name="classifier")(y, ctx)

    return tv_common.output(taps.run(forward), self.include_top, self.dtype)


tv_common.register_family(
  "tv_convnext",
  TVConvNeXt,
  VARIANTS,
  layer_names,
  module_paths,
  min_size=MIN_SIZE,
  feature_layer="features",
  classifier="classifier/2",
  batch_stats=False,
  stem_layers=("features/0/0",),
  options={"stochastic_depth_prob": None},
)
