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


# torchvision's trunc_normal_(std=0.02) truncates at +-2 absolute, i.e. never:
# a plain normal is the same distribution.
weight_init = nn.initializers.normal(0.02)


def _conv(
  m: nn.Module, features, kernel, stride=1, padding=0, groups=1, name=None
):
  return nn.Conv(
    features,
    (kernel, kernel),
    (stride, stride),
    padding=((padding, padding), (padding, padding)),
    feature_group_count=groups,
    conv_general_dilated=conv_ops.conv_general_dilated,
    kernel_init=weight_init,
    dtype=m.dtype,
    param_dtype=m.param_dtype,
    name=name,
  )


def _dense(m: nn.Module, features: int, name: str) -> nn.Dense:
  return nn.Dense(
    features,
    kernel_init=weight_init,
    dtype=m.dtype,
    param_dtype=m.param_dtype,
    name=name,
  )


def _norm(m: nn.Module, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
    EPS,
    dtype=m.dtype,
    param_dtype=m.param_dtype,
    use_fast_variance=False,
    name=name,
  )


class CNBlock(nn.Module):
  """torchvision's CNBlock: dwconv 7x7, LN, Linear 4x, GELU, Linear, scale."""

  stochastic_depth_prob: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    dim = x.shape[-1]
    y = Block(self.dtype, self.param_dtype, name="block")(x)
    y = tv_common.tap(self, "block", y)
    scale = self.param(
      "layer_scale",
      nn.initializers.constant(LAYER_SCALE),
      (dim,),
      self.param_dtype,
    )
    y = scale.astype(self.dtype) * y
    y = common.stochastic_depth(self, y, self.stochastic_depth_prob, train)
    y = tv_common.tap(self, "stochastic_depth", y)
    return y + x


class Block(nn.Module):
  """CNBlock's `block` Sequential (its Permutes are no-ops in NHWC)."""

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]

    def tap(name, y):
      return tv_common.tap(self, name, y)

    x = tap("0", _conv(self, dim, 7, padding=3, groups=dim, name="0")(x))
    x = tap("1", x)
    x = tap("2", _norm(self, "2")(x))
    x = tap("3", _dense(self, 4 * dim, "3")(x))
    x = tap("4", nn.gelu(x, approximate=False))
    x = tap("5", _dense(self, dim, "5")(x))
    return tap("6", x)


class Stage(nn.Module):
  """A Sequential of CNBlocks (features/1, 3, 5, 7)."""

  depth: int
  sd_probs: tuple[float, ...]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    for j in range(self.depth):
      block = CNBlock(
        self.sd_probs[j], self.dtype, self.param_dtype, name=str(j)
      )
      x = tv_common.tap(self, str(j), block(x, train))
    return x


class Downsample(nn.Module):
  """LayerNorm2d '0', then a 2x2 stride-2 conv '1' (features/2, 4, 6)."""

  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = tv_common.tap(self, "0", _norm(self, "0")(x))
    x = _conv(self, self.features, 2, 2, name="1")(x)
    return tv_common.tap(self, "1", x)


class Stem(nn.Module):
  """features/0: Conv2dNormActivation(4x4 stride 4, bias, LayerNorm2d)."""

  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _conv(self, self.features, 4, 4, name="0")(x)
    x = tv_common.tap(self, "0", x)
    return tv_common.tap(self, "1", _norm(self, "1")(x))


class Features(nn.Module):
  """`features`: stem '0' (4x4 stride-4 conv, LayerNorm2d), then stages."""

  arch: str
  stochastic_depth_prob: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    v = VARIANTS[self.arch]
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    x = tv_common.tap(self, "0", Stem(v.widths[0], name="0", **kw)(x))
    total, done = sum(v.depths), 0
    for s, depth in enumerate(v.depths):
      # torchvision: rate * block_id / (total_blocks - 1).
      sd = tuple(
        self.stochastic_depth_prob * (done + j) / (total - 1.0)
        for j in range(depth)
      )
      done += depth
      i = stage_index(s)
      x = Stage(depth, sd, name=str(i), **kw)(x, train)
      x = tv_common.tap(self, str(i), x)
      if s < len(v.widths) - 1:
        x = Downsample(v.widths[s + 1], name=str(i + 1), **kw)(x)
        x = tv_common.tap(self, str(i + 1), x)
    return x


class Classifier(nn.Module):
  """`classifier`: LayerNorm2d '0', Flatten '1', Linear '2'."""

  num_classes: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = tv_common.tap(self, "0", _norm(self, "0")(x))
    x = tv_common.tap(self, "1", x)  # Flatten of a (N, C, 1, 1) map in torch.
    x = _dense(self, self.num_classes, "2")(x)
    return tv_common.tap(self, "2", x)


class TVConvNeXt(nn.Module):
  """torchvision's ConvNeXt; returns logits by default.

  Attributes:
    arch: 'tv_convnext_tiny', '_small', '_base' or '_large'.
    include_top: keep avgpool + classifier (LayerNorm, Flatten, Linear).
    num_classes: outputs of `classifier/2`.
    pooling: without the top: None (4D features), 'avg' or 'max'.
    output_layer: stop at this module (any of `module_paths`), return it.
    return_layers: return {path: output} of these modules instead.
    stochastic_depth_prob: None is torchvision's rate for the arch; scaled
      linearly from 0 at the first block to it at the last.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
  """

  arch: str = "tv_convnext_tiny"
  include_top: bool = True
  num_classes: int = 1000
  pooling: str | None = None
  output_layer: str | None = None
  return_layers: tuple[str, ...] | None = None
  stochastic_depth_prob: float | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    tv_common.check_arch(self.arch, VARIANTS, self.pooling)
    common.check_input(self.arch, x.shape, MIN_SIZE)
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    sd = self.stochastic_depth_prob
    if sd is None:
      sd = VARIANTS[self.arch].stochastic_depth_prob

    def forward():
      y = Features(self.arch, sd, name="features", **kw)(
        x.astype(self.dtype), train
      )
      y = tv_common.tap(self, "features", y)
      if not self.include_top:
        return tv_common.pool(self, y, self.pooling)
      y = tv_common.tap(self, "avgpool", jnp.mean(y, axis=(1, 2)))
      y = Classifier(self.num_classes, name="classifier", **kw)(y)
      return tv_common.tap(self, "classifier", y)

    out = tv_common.run(self, self.arch, forward)
    return tv_common.output(out, self.include_top, self.dtype)


# Module order, recorded from the taps of one pass.
module_paths, layer_names = tv_common.recorded_order(TVConvNeXt, MIN_SIZE)

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
