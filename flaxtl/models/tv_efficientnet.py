"""torchvision's EfficientNet-B0..B7 in Flax, named like its PyTorch modules.

Parameter paths are torchvision's module paths with '/' for '.', so a
PyTorch user's freeze rules read like their own code:
`features/1/0/block/0/0/kernel` is `features[1][0].block[0][0].weight`.
Kernels are HWIO (depthwise: (kh, kw, 1, C)), dense kernels (in, out);
BatchNorm has `scale`, `bias` and batch_stats `mean`, `var` with torchvision's
eps (1e-5 for B0-B4, 1e-3 for B5-B7) and momentum (torch 0.1 / 0.01 is
Flax's 0.9 / 0.99; while training, torch moves running_var towards the
unbiased batch variance, Flax towards the biased one, n/(n-1) apart). Inputs
are NHWC, normalised with ImageNet mean/std (`preprocess_input(x, 'torch')`).

`output_layer` takes every module path (`module_paths`), in the order its
output is ready, as a torch forward hook sees it: a leaf (`features/0/0`,
`features/0/2` the SiLU) right after it runs, a container (`features/1/0`,
`features/3`, `features`) after its last child, so "up to and including
`features/3`" covers the whole stage. `layer_names` are the modules with
parameters, in the same order. Outputs are NHWC where torch's are NCHW.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.models import common, tv_common
from flaxtl.ops import conv as conv_ops

# torchvision's EfficientNet-B0 stages: (expand_ratio, kernel, stride,
# input_channels, out_channels, num_layers), before width/depth scaling.
STAGES = (
  (1, 3, 1, 32, 16, 1),
  (6, 3, 2, 16, 24, 2),
  (6, 5, 2, 24, 40, 2),
  (6, 3, 2, 40, 80, 3),
  (6, 5, 1, 80, 112, 3),
  (6, 5, 2, 112, 192, 4),
  (6, 3, 1, 192, 320, 1),
)
MIN_SIZE = 32
STOCHASTIC_DEPTH_PROB = 0.2  # torchvision's default for every variant.


@dataclasses.dataclass(frozen=True)
class Variant:
  width: float
  depth: float
  dropout: float  # Before the classifier.
  bn_eps: float
  bn_momentum: float  # Flax's meaning: 1 - torch's momentum.


# torchvision.models.efficientnet_b0 ... b7.
VARIANTS = {
  "tv_efficientnet_b0": Variant(1.0, 1.0, 0.2, 1e-5, 0.9),
  "tv_efficientnet_b1": Variant(1.0, 1.1, 0.2, 1e-5, 0.9),
  "tv_efficientnet_b2": Variant(1.1, 1.2, 0.3, 1e-5, 0.9),
  "tv_efficientnet_b3": Variant(1.2, 1.4, 0.3, 1e-5, 0.9),
  "tv_efficientnet_b4": Variant(1.4, 1.8, 0.4, 1e-5, 0.9),
  "tv_efficientnet_b5": Variant(1.6, 2.2, 0.4, 1e-3, 0.99),
  "tv_efficientnet_b6": Variant(1.8, 2.6, 0.5, 1e-3, 0.99),
  "tv_efficientnet_b7": Variant(2.0, 3.1, 0.5, 1e-3, 0.99),
}


def make_divisible(v: float, divisor: int = 8) -> int:
  """torchvision's `_make_divisible`: nearest multiple, never 10% below."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


@dataclasses.dataclass(frozen=True)
class Block:
  """One MBConv block, `features/{stage}/{index}`."""

  stage: int
  index: int
  expand: int
  kernel: int
  stride: int
  cin: int
  cout: int
  sd_prob: float = 0.0  # Stochastic depth, as a fraction of the model's.

  @property
  def expanded(self) -> int:
    return make_divisible(self.cin * self.expand)

  @property
  def squeeze(self) -> int:
    return max(1, self.cin // 4)

  @property
  def residual(self) -> bool:
    return self.stride == 1 and self.cin == self.cout


@functools.cache
def blocks(arch: str) -> tuple[tuple[Block, ...], ...]:
  """The MBConv blocks of each stage (features/1 ... features/7)."""
  v = VARIANTS[arch]
  depths = [math.ceil(n * v.depth) for *_, n in STAGES]
  total, done, stages = sum(depths), 0, []
  for stage, ((e, k, s, cin, cout, _), n) in enumerate(
    zip(STAGES, depths), start=1
  ):
    cin, cout = make_divisible(cin * v.width), make_divisible(cout * v.width)
    stage_blocks = []
    for j in range(n):
      # Only a stage's first block strides and changes the width.
      first = j == 0
      b = Block(stage, j, e, k, s if first else 1, cin if first else cout, cout)
      stage_blocks.append(dataclasses.replace(b, sd_prob=done / total))
      done += 1
    stages.append(tuple(stage_blocks))
  return tuple(stages)


def stem_width(arch: str) -> int:
  return blocks(arch)[0][0].cin


def head_width(arch: str) -> int:
  return 4 * blocks(arch)[-1][-1].cout


def _conv_norm_act(prefix: str, act: bool = True) -> tv_common.Modules:
  mods = [(f"{prefix}/0", True), (f"{prefix}/1", True)]
  return [*mods, *([(f"{prefix}/2", False)] if act else []), (prefix, False)]


def _mbconv(b: Block) -> tv_common.Modules:
  p = f"features/{b.stage}/{b.index}"
  mods, i = [], 0
  if b.expanded != b.cin:
    mods += _conv_norm_act(f"{p}/block/0")
    i = 1
  mods += _conv_norm_act(f"{p}/block/{i}")
  se = f"{p}/block/{i + 1}"
  mods += [
    (f"{se}/avgpool", False),
    (f"{se}/fc1", True),
    (f"{se}/activation", False),
    (f"{se}/fc2", True),
    (f"{se}/scale_activation", False),
    (se, False),
  ]
  mods += _conv_norm_act(f"{p}/block/{i + 2}", act=False)
  mods.append((f"{p}/block", False))
  if b.residual:
    mods.append((f"{p}/stochastic_depth", False))
  return [*mods, (p, False)]


@functools.cache
def _features(arch: str) -> tuple[tuple[str, bool], ...]:
  mods = _conv_norm_act("features/0")
  for stage in blocks(arch):
    for b in stage:
      mods += _mbconv(b)
    mods.append((f"features/{stage[0].stage}", False))
  mods += _conv_norm_act(f"features/{len(STAGES) + 1}")
  return (*mods, ("features", False))


def _modules(
  arch: str, include_top: bool, pooling: str | None
) -> tv_common.Modules:
  # classifier: Dropout '0', Linear '1'.
  return tv_common.with_top(
    _features(arch), (False, True), include_top, pooling
  )


def module_paths(
  arch: str, include_top: bool = True, pooling: str | None = None
) -> list[str]:
  """Every module path in the order its output is ready: `output_layer`s."""
  return tv_common.paths(_modules(arch, include_top, pooling))


def layer_names(
  arch: str, include_top: bool = True, pooling: str | None = None
) -> list[str]:
  """The modules with parameters ('features/0/0'), in forward order."""
  return tv_common.param_paths(_modules(arch, include_top, pooling))


# torchvision's initialisers, so a model trained from scratch starts where
# torchvision's does: convs kaiming normal (fan_out, tv_common.conv_init), BN
# ones/zeros, linear uniform(+-1/sqrt(out)).
conv_init = tv_common.conv_init


def _linear_init(key, shape, dtype=jnp.float32):
  bound = 1.0 / math.sqrt(shape[-1])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


@dataclasses.dataclass(frozen=True)
class _Ctx:
  """What every submodule needs: the taps, train flag and dtypes."""

  taps: common.Taps
  train: Any
  variant: Variant
  dtype: Any
  param_dtype: Any


class ConvNormActivation(nn.Module):
  """torchvision.ops.Conv2dNormActivation: conv '0', BN '1', SiLU '2'."""

  features: int
  kernel: int = 1
  stride: int = 1
  depthwise: bool = False
  act: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, ctx: _Ctx, prefix: str) -> jax.Array:
    p = (self.kernel - 1) // 2  # torchvision's symmetric padding.
    conv = nn.Conv(
      self.features,
      (self.kernel, self.kernel),
      (self.stride, self.stride),
      padding=((p, p), (p, p)),
      feature_group_count=x.shape[-1] if self.depthwise else 1,
      conv_general_dilated=conv_ops.conv_general_dilated,
      use_bias=False,
      kernel_init=conv_init,
      dtype=ctx.dtype,
      param_dtype=ctx.param_dtype,
      name="0",
    )
    x = ctx.taps(f"{prefix}/0", conv(x))
    bn = common.BatchNorm(
      momentum=ctx.variant.bn_momentum,
      epsilon=ctx.variant.bn_eps,
      dtype=ctx.dtype,
      param_dtype=ctx.param_dtype,
      use_fast_variance=False,
      name="1",
    )
    x = ctx.taps(f"{prefix}/1", bn(x, ctx.train))
    if self.act:
      x = ctx.taps(f"{prefix}/2", nn.silu(x))
    return ctx.taps(prefix, x)


class SqueezeExcitation(nn.Module):
  """torchvision.ops.SqueezeExcitation with SiLU: 1x1 convs fc1, fc2."""

  squeeze: int

  @nn.compact
  def __call__(self, x: jax.Array, ctx: _Ctx, prefix: str) -> jax.Array:
    def conv(features, name):
      return nn.Conv(
        features,
        (1, 1),
        kernel_init=conv_init,
        dtype=ctx.dtype,
        param_dtype=ctx.param_dtype,
        name=name,
      )

    taps = ctx.taps
    s = taps(f"{prefix}/avgpool", jnp.mean(x, axis=(1, 2), keepdims=True))
    s = taps(f"{prefix}/fc1", conv(self.squeeze, "fc1")(s))
    s = taps(f"{prefix}/activation", nn.silu(s))
    s = taps(f"{prefix}/fc2", conv(x.shape[-1], "fc2")(s))
    s = taps(f"{prefix}/scale_activation", nn.sigmoid(s))
    return taps(prefix, x * s)


class MBConvBlock(nn.Module):
  """MBConv's `block` Sequential: [expand], depthwise, SE, project."""

  cfg: Block

  @nn.compact
  def __call__(self, x: jax.Array, ctx: _Ctx, prefix: str) -> jax.Array:
    b, i = self.cfg, 0
    if b.expanded != b.cin:
      x = ConvNormActivation(b.expanded, name="0")(x, ctx, f"{prefix}/0")
      i = 1
    x = ConvNormActivation(
      b.expanded, b.kernel, b.stride, depthwise=True, name=str(i)
    )(x, ctx, f"{prefix}/{i}")
    x = SqueezeExcitation(b.squeeze, name=str(i + 1))(
      x, ctx, f"{prefix}/{i + 1}"
    )
    x = ConvNormActivation(b.cout, act=False, name=str(i + 2))(
      x, ctx, f"{prefix}/{i + 2}"
    )
    return ctx.taps(prefix, x)


class MBConv(nn.Module):
  """torchvision's MBConv: block, then stochastic depth + residual."""

  cfg: Block
  stochastic_depth_prob: float

  @nn.compact
  def __call__(self, x: jax.Array, ctx: _Ctx, prefix: str) -> jax.Array:
    y = MBConvBlock(self.cfg, name="block")(x, ctx, f"{prefix}/block")
    if self.cfg.residual:
      p = self.stochastic_depth_prob * self.cfg.sd_prob
      y = ctx.taps(
        f"{prefix}/stochastic_depth",
        common.stochastic_depth(self, y, p, ctx.train),
      )
      y = y + x
    return ctx.taps(prefix, y)


class Stage(nn.Module):
  """`features/1` ... `features/7`: a Sequential of MBConv blocks."""

  cfgs: tuple[Block, ...]
  stochastic_depth_prob: float

  @nn.compact
  def __call__(self, x: jax.Array, ctx: _Ctx, prefix: str) -> jax.Array:
    for b in self.cfgs:
      x = MBConv(b, self.stochastic_depth_prob, name=str(b.index))(
        x, ctx, f"{prefix}/{b.index}"
      )
    return ctx.taps(prefix, x)


class Features(nn.Module):
  """`features`: stem '0', stages '1'..'7', head conv '8'."""

  arch: str
  stochastic_depth_prob: float

  @nn.compact
  def __call__(self, x: jax.Array, ctx: _Ctx) -> jax.Array:
    x = ConvNormActivation(stem_width(self.arch), 3, 2, name="0")(
      x, ctx, "features/0"
    )
    for stage in blocks(self.arch):
      n = stage[0].stage
      x = Stage(stage, self.stochastic_depth_prob, name=str(n))(
        x, ctx, f"features/{n}"
      )
    last = str(len(STAGES) + 1)
    x = ConvNormActivation(head_width(self.arch), name=last)(
      x, ctx, f"features/{last}"
    )
    return ctx.taps("features", x)


class Classifier(nn.Module):
  """`classifier`: Dropout '0', Linear '1'."""

  num_classes: int
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, ctx: _Ctx) -> jax.Array:
    x = nn.Dropout(self.rate, deterministic=not ctx.train, name="0")(x)
    x = ctx.taps("classifier/0", x)
    x = nn.Dense(
      self.num_classes,
      kernel_init=_linear_init,
      dtype=ctx.dtype,
      param_dtype=ctx.param_dtype,
      name="1",
    )(x)
    return ctx.taps("classifier", ctx.taps("classifier/1", x))


class TVEfficientNet(nn.Module):
  """torchvision's EfficientNet B0..B7; returns logits by default.

  Attributes:
    arch: 'tv_efficientnet_b0' ... 'tv_efficientnet_b7'.
    include_top: keep avgpool + classifier (Dropout, Linear).
    num_classes: outputs of `classifier/1`.
    pooling: without the top: None (4D features), 'avg' or 'max'.
    output_layer: stop at this module (any of `module_paths`), return it.
    dropout: before the classifier; None is torchvision's rate for the arch.
    stochastic_depth_prob: torchvision's; scaled by depth per block.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
  """

  arch: str = "tv_efficientnet_b0"
  include_top: bool = True
  num_classes: int = 1000
  pooling: str | None = None
  output_layer: str | None = None
  dropout: float | None = None
  stochastic_depth_prob: float = STOCHASTIC_DEPTH_PROB
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    tv_common.check_arch(self.arch, VARIANTS, self.pooling)
    names = module_paths(self.arch, self.include_top, self.pooling)
    tv_common.check(self.arch, self.output_layer, names, x.shape, MIN_SIZE)
    variant = VARIANTS[self.arch]
    taps = common.Taps(self.output_layer)
    ctx = _Ctx(taps, train, variant, self.dtype, self.param_dtype)

    def forward():
      y = Features(self.arch, self.stochastic_depth_prob, name="features")(
        x.astype(self.dtype), ctx
      )
      if not self.include_top:
        return tv_common.pool(taps, y, self.pooling)
      y = taps("avgpool", jnp.mean(y, axis=(1, 2)))
      rate = variant.dropout if self.dropout is None else self.dropout
      return Classifier(self.num_classes, rate, name="classifier")(y, ctx)

    return tv_common.output(taps.run(forward), self.include_top, self.dtype)


tv_common.register_family(
  "tv_efficientnet",
  TVEfficientNet,
  VARIANTS,
  layer_names,
  module_paths,
  min_size=MIN_SIZE,
  feature_layer="features",
  classifier="classifier/1",
  batch_stats=True,
  stem_layers=("features/0/0",),
  options={"dropout": None, "stochastic_depth_prob": STOCHASTIC_DEPTH_PROB},
)
