"""torchvision's VGG16 / VGG19, with torchvision's module paths.

Parameters: `features/{i}` for each conv (i counts the convs, ReLUs and
pools of torchvision's `features` Sequential: 0, 2, 5, 7, 10, ...) and
`classifier/{0,3,6}` for the three linear layers. Before the classifier an
adaptive average pool makes the map 7x7 whatever the input size, as in
torchvision.

The flatten pitfall: torchvision flattens the (C, H, W) map, so fc1's 25088
inputs run channel-major; this model flattens NHWC (H, W, C). The weight
mapping permutes the rows of `classifier/0/kernel` once, at conversion
(flaxtl.weights.mappings.tv_vgg), so the forward pass needs no transpose.
Unlike `flaxtl.models.vgg` (Keras' VGG, 'caffe' input), these take
torchvision's normalised RGB ('torch').
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.models import common
from flaxtl.models import tv_common as tv

# torchvision's cfgs "D" and "E": conv widths, "M" a 2x2 max pool.
CFGS: dict[str, tuple[int | str, ...]] = {
  "tv_vgg16": (
    *(64, 64, "M", 128, 128, "M", 256, 256, 256, "M"),
    *(512, 512, 512, "M", 512, 512, 512, "M"),
  ),
  "tv_vgg19": (
    *(64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M"),
    *(512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
  ),
}
POOL_SIZE = (7, 7)
HIDDEN = 4096
MIN_SIZE = 32
# torchvision's VGG init: linear layers N(0, 0.01).
classifier_init = nn.initializers.normal(0.01)


def _features(arch: str) -> list[tuple[int, str, int]]:
  """(index, 'conv'|'relu'|'pool', width) of `features`, in order."""
  out, i = [], 0
  for v in CFGS[arch]:
    if v == "M":
      out.append((i, "pool", 0))
      i += 1
    else:
      out += [(i, "conv", int(v)), (i + 1, "relu", 0)]
      i += 2
  return out


class Features(nn.Module):
  """`features`: 3x3 convs (padding 1), ReLUs and 2x2 max pools."""

  arch: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    layers = tv.Layers.of(self)
    for i, kind, width in _features(self.arch):
      if kind == "conv":
        x = layers.conv(x, width, 3, str(i), padding=1, bias=True)
      elif kind == "relu":
        x = nn.relu(x)
      else:
        x = tv.max_pool(x, 2, 2)
      x = tv.tap(self, str(i), x)
    return x


class Classifier(nn.Module):
  """`classifier`: Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear."""

  num_classes: int
  dropout: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    layers = tv.Layers.of(self)
    for i, units in ((0, HIDDEN), (3, HIDDEN)):
      x = layers.linear(x, units, str(i), classifier_init)
      x = tv.tap(self, str(i), x)
      x = tv.tap(self, str(i + 1), nn.relu(x))
      x = tv.dropout(x, self.dropout, train, str(i + 2))
      x = tv.tap(self, str(i + 2), x)
    x = layers.linear(x, self.num_classes, "6", classifier_init)
    return tv.tap(self, "6", tv.logits(x))


class VGG(nn.Module):
  """torchvision.models.vgg16 / vgg19, returning logits by default.

  Attributes:
    arch: 'tv_vgg16' or 'tv_vgg19'.
    include_top: keep avgpool + classifier (any input size: the adaptive
      pool makes 7x7).
    num_classes: outputs of classifier/6.
    pooling: without the top, None (4D features), 'avg' or 'max'.
    output_layer: stop after this module ('features/16', 'classifier/3').
    return_layers: return {path: output} of these modules instead.
    dropout: the classifier's dropout rate while training (torchvision's 0.5).
  """

  arch: str = "tv_vgg16"
  include_top: bool = True
  num_classes: int = 1000
  pooling: str | None = None
  output_layer: str | None = None
  return_layers: tuple[str, ...] | None = None
  dropout: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    tv.check_arch(self.arch, CFGS, self.pooling)
    common.check_input(self.arch, x.shape, MIN_SIZE)

    def forward() -> jax.Array:
      y = Features(self.arch, self.dtype, self.param_dtype, name="features")(
        x.astype(self.dtype)
      )
      y = tv.tap(self, "features", y)
      if not self.include_top:
        return common.global_pool(y, self.pooling)  # No module: no tap.
      y = tv.tap(self, "avgpool", tv.adaptive_avg_pool(y, POOL_SIZE))
      y = y.reshape(y.shape[0], -1)  # (H, W, C) order: see the module doc.
      y = Classifier(
        self.num_classes,
        self.dropout,
        self.dtype,
        self.param_dtype,
        name="classifier",
      )(y, train)
      return tv.tap(self, "classifier", y)

    return tv.run(self, self.arch, forward)


# Module order, recorded from the taps of one pass.
module_paths, layer_names = tv.recorded_order(VGG, MIN_SIZE)


tv.register_family(
  "tv_vgg",
  VGG,
  CFGS,
  layer_names,
  module_paths,
  min_size=MIN_SIZE,
  feature_layer="features",
  classifier="classifier/6",
  stem_layers=("features/0", "features/2"),
  options={"dropout": 0.5},
)
