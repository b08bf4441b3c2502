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


# torchvision's initialisers, so a model trained from scratch starts where
# torchvision's does: convs kaiming normal (fan_out, tv_common.conv_init), BN
# ones/zeros, linear uniform(+-1/sqrt(out)).
conv_init = tv_common.conv_init


def _linear_init(key, shape, dtype=jnp.float32):
  bound = 1.0 / math.sqrt(shape[-1])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class SqueezeExcitation(nn.Module):
  """torchvision.ops.SqueezeExcitation with SiLU: 1x1 convs fc1, fc2."""

  squeeze: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def conv(features, name):
      return nn.Conv(
        features,
        (1, 1),
        kernel_init=conv_init,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
      )

    def tap(name, y):
      return tv_common.tap(self, name, y)

    s = tap("avgpool", jnp.mean(x, axis=(1, 2), keepdims=True))
    s = tap("fc1", conv(self.squeeze, "fc1")(s))
    s = tap("activation", nn.silu(s))
    s = tap("fc2", conv(x.shape[-1], "fc2")(s))
    s = tap("scale_activation", nn.sigmoid(s))
    return x * s


class MBConvBlock(nn.Module):
  """MBConv's `block` Sequential: [expand], depthwise, SE, project."""

  cfg: Block
  variant: Variant
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    b, i = self.cfg, 0
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}

    def cna(y, name, features, kernel=1, stride=1, groups=1, act="silu"):
      y = tv_common.ConvNormActivation(
        features,
        kernel,
        stride,
        groups,
        act,
        self.variant.bn_eps,
        self.variant.bn_momentum,
        name=name,
        **kw,
      )(y, train)
      return tv_common.tap(self, name, y)

    if b.expanded != b.cin:
      x = cna(x, "0", b.expanded)
      i = 1
    x = cna(x, str(i), b.expanded, b.kernel, b.stride, groups=b.expanded)
    se = str(i + 1)
    x = tv_common.tap(self, se, SqueezeExcitation(b.squeeze, name=se, **kw)(x))
    return cna(x, str(i + 2), b.cout, act=None)


class MBConv(nn.Module):
  """torchvision's MBConv: block, then stochastic depth + residual."""

  cfg: Block
  variant: Variant
  stochastic_depth_prob: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    y = MBConvBlock(
      self.cfg, self.variant, self.dtype, self.param_dtype, name="block"
    )(x, train)
    y = tv_common.tap(self, "block", y)
    if self.cfg.residual:
      p = self.stochastic_depth_prob * self.cfg.sd_prob
      y = common.stochastic_depth(self, y, p, train)
      y = tv_common.tap(self, "stochastic_depth", y) + x
    return y


class Stage(nn.Module):
  """`features/1` ... `features/7`: a Sequential of MBConv blocks."""

  cfgs: tuple[Block, ...]
  variant: Variant
  stochastic_depth_prob: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    for b in self.cfgs:
      name = str(b.index)
      x = MBConv(
        b,
        self.variant,
        self.stochastic_depth_prob,
        self.dtype,
        self.param_dtype,
        name=name,
      )(x, train)
      x = tv_common.tap(self, name, x)
    return x


class Features(nn.Module):
  """`features`: stem '0', stages '1'..'7', head conv '8'."""

  arch: str
  stochastic_depth_prob: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    v = VARIANTS[self.arch]
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}

    def cna(y, name, features, kernel=1, stride=1):
      y = tv_common.ConvNormActivation(
        features,
        kernel,
        stride,
        activation="silu",
        eps=v.bn_eps,
        momentum=v.bn_momentum,
        name=name,
        **kw,
      )(y, train)
      return tv_common.tap(self, name, y)

    x = cna(x, "0", stem_width(self.arch), 3, 2)
    for stage in blocks(self.arch):
      n = str(stage[0].stage)
      x = Stage(stage, v, self.stochastic_depth_prob, name=n, **kw)(x, train)
      x = tv_common.tap(self, n, x)
    return cna(x, str(len(STAGES) + 1), head_width(self.arch))


class Classifier(nn.Module):
  """`classifier`: Dropout '0', Linear '1'."""

  num_classes: int
  rate: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    x = nn.Dropout(self.rate, deterministic=not train, name="0")(x)
    x = tv_common.tap(self, "0", x)
    x = nn.Dense(
      self.num_classes,
      kernel_init=_linear_init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="1",
    )(x)
    return tv_common.tap(self, "1", x)


class TVEfficientNet(nn.Module):
  """torchvision's EfficientNet B0..B7; returns logits by default.

  Attributes:
    arch: 'tv_efficientnet_b0' ... 'tv_efficientnet_b7'.
    include_top: keep avgpool + classifier (Dropout, Linear).
    num_classes: outputs of `classifier/1`.
    pooling: without the top: None (4D features), 'avg' or 'max'.
    output_layer: stop at this module (any of `module_paths`), return it.
    return_layers: return {path: output} of these modules instead.
    dropout: before the classifier; None is torchvision's rate for the arch.
    stochastic_depth_prob: torchvision's; scaled by depth per block.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
  """

  arch: str = "tv_efficientnet_b0"
  include_top: bool = True
  num_classes: int = 1000
  pooling: str | None = None
  output_layer: str | None = None
  return_layers: tuple[str, ...] | None = None
  dropout: float | None = None
  stochastic_depth_prob: float = STOCHASTIC_DEPTH_PROB
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    tv_common.check_arch(self.arch, VARIANTS, self.pooling)
    common.check_input(self.arch, x.shape, MIN_SIZE)
    variant = VARIANTS[self.arch]
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}

    def forward():
      y = Features(
        self.arch, self.stochastic_depth_prob, name="features", **kw
      )(x.astype(self.dtype), train)
      y = tv_common.tap(self, "features", y)
      if not self.include_top:
        return tv_common.pool(self, y, self.pooling)
      y = tv_common.tap(self, "avgpool", jnp.mean(y, axis=(1, 2)))
      rate = variant.dropout if self.dropout is None else self.dropout
      y = Classifier(self.num_classes, rate, name="classifier", **kw)(y, train)
      return tv_common.tap(self, "classifier", y)

    out = tv_common.run(self, self.arch, forward)
    return tv_common.output(out, self.include_top, self.dtype)


# Module order, recorded from the taps of one pass.
module_paths, layer_names = tv_common.recorded_order(TVEfficientNet, MIN_SIZE)

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
