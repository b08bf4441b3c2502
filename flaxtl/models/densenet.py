"""DenseNet121/169/201 as in `keras.applications`.

Parameters are flat and named like the Keras layers (`conv2_block1_0_bn`,
`conv2_block1_1_conv`, `pool2_conv`, ...), with Keras' shapes; convolutions
have no bias; BatchNormalization keeps Keras' momentum (0.99) and epsilon
(1.001e-5). The layer list is Keras' `model.layers` (its two unnamed
ZeroPadding2D layers named as in a fresh Keras session).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.models import keras_graph, registry

# Conv blocks per dense block (conv2..conv5).
BLOCKS: dict[str, tuple[int, int, int, int]] = {
  "densenet121": (6, 12, 24, 16),
  "densenet169": (6, 12, 32, 32),
  "densenet201": (6, 12, 48, 32),
}
GROWTH = 32
REDUCTION = 0.5
BN_MOMENTUM = 0.99  # Keras' BatchNormalization default.
BN_EPSILON = 1.001e-5  # keras/src/applications/densenet.py
MIN_SIZE = 32


def _conv_block(net, x, name: str):
  x1 = net.relu(f"{name}_0_relu", net.bn(f"{name}_0_bn", x))
  x1 = net.conv(f"{name}_1_conv", x1, 4 * GROWTH, 1, use_bias=False)
  x1 = net.relu(f"{name}_1_relu", net.bn(f"{name}_1_bn", x1))
  x1 = net.conv(f"{name}_2_conv", x1, GROWTH, 3, padding="same", use_bias=False)
  return net.concat(f"{name}_concat", [x, x1])


def _transition(net, x, channels: int, name: str):
  x = net.relu(f"{name}_relu", net.bn(f"{name}_bn", x))
  x = net.conv(f"{name}_conv", x, channels, 1, use_bias=False)
  return net.avg_pool(f"{name}_pool", x, 2, 2)


def forward(
  net: keras_graph.Layers,
  x: Any,
  *,
  arch: str,
  include_top: bool = True,
  num_classes: int = 1000,
  pooling: str | None = None,
  classifier_activation: str | None = None,
):
  """keras/src/applications/densenet.py `DenseNet`, layer by layer."""
  x = net.input(x)
  x = net.pad(net.auto("zero_padding2d"), x, 3)
  x = net.conv("conv1_conv", x, 64, 7, strides=2, use_bias=False)
  x = net.relu("conv1_relu", net.bn("conv1_bn", x))
  x = net.pad(net.auto("zero_padding2d"), x, 1)
  x = net.max_pool("pool1", x, 3, 2)
  channels = 64
  for stage, blocks in enumerate(BLOCKS[arch]):
    for i in range(1, blocks + 1):
      x = _conv_block(net, x, f"conv{stage + 2}_block{i}")
    channels += GROWTH * blocks
    if stage < 3:
      channels = int(channels * REDUCTION)
      x = _transition(net, x, channels, f"pool{stage + 2}")
  x = net.relu("relu", net.bn("bn", x))
  if include_top:
    x = net.global_pool("avg_pool", x, "avg")
    return net.dense("predictions", x, num_classes, classifier_activation)
  if pooling == "avg":
    return net.global_pool("avg_pool", x, "avg")
  if pooling == "max":
    return net.global_pool("max_pool", x, "max")
  return x


def _forward(arch: str, include_top: bool = True, pooling=None):
  return functools.partial(
    forward, arch=arch, include_top=include_top, pooling=pooling
  )


def keras_layer_names(
  arch: str, include_top: bool = True, pooling: str | None = None, **_
) -> list[str]:
  """`[l.name for l in keras.applications.<Arch>(...).layers]`."""
  return keras_graph.layer_names(_forward(arch, include_top, pooling))


def weighted_layer_names(arch: str, include_top: bool = True) -> list[str]:
  return keras_graph.weighted_layer_names(_forward(arch, include_top))


class DenseNet(nn.Module):
  """DenseNet as in `keras.applications`, returning logits by default.

  Attributes: as `flaxtl.models.resnet.ResNet` (arch: a key of BLOCKS).
  """

  arch: str = "densenet121"
  include_top: bool = True
  num_classes: int = 1000
  pooling: str | None = None
  classifier_activation: str | None = None
  output_layer: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    keras_graph.check_options(
      self.arch, self.pooling, self.classifier_activation
    )
    fwd = functools.partial(
      forward,
      arch=self.arch,
      include_top=self.include_top,
      num_classes=self.num_classes,
      pooling=self.pooling,
      classifier_activation=self.classifier_activation,
    )
    y = keras_graph.run(
      fwd,
      x,
      arch=self.arch,
      min_size=MIN_SIZE,
      output_layer=self.output_layer,
      train=train,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      bn_momentum=BN_MOMENTUM,
      bn_epsilon=BN_EPSILON,
    )
    top = self.include_top and self.output_layer is None
    return y.astype(jnp.float32) if top else y


for _arch in BLOCKS:
  registry.register(
    registry.Backbone(
      arch=_arch,
      family="densenet",
      build=lambda arch=_arch, **options: DenseNet(arch=arch, **options),
      layer_names=functools.partial(keras_layer_names, _arch),
      preprocess="torch",
      min_size=MIN_SIZE,
      feature_layer="relu",
      classifier="predictions",
      batch_stats=True,
      stem_layers=("conv1_conv",),
      options={"classifier_activation": None},
    )
  )
