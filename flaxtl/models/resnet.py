"""ResNet50/101/152 (v1) and ResNet50V2/101V2/152V2 as in `keras.applications`.

Parameters are flat and named like the Keras layers (`conv2_block1_1_conv`,
`conv2_block1_1_bn`, ...), with Keras' shapes; BatchNormalization keeps
Keras' momentum (0.99) and epsilon (1.001e-5) and its moving statistics in
`batch_stats`. The layer list is Keras' `model.layers`, so
`freeze.first_layers=k` freezes what `model.layers[:k]` does in Keras.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.models import keras_graph, registry

# Blocks per stack (conv2..conv5); every stack's bottleneck widths.
STACKS: dict[str, tuple[int, int, int, int]] = {
  "resnet50": (3, 4, 6, 3),
  "resnet101": (3, 4, 23, 3),
  "resnet152": (3, 8, 36, 3),
  "resnet50v2": (3, 4, 6, 3),
  "resnet101v2": (3, 4, 23, 3),
  "resnet152v2": (3, 8, 36, 3),
}
FILTERS = (64, 128, 256, 512)
BN_MOMENTUM = 0.99  # Keras' BatchNormalization default.
BN_EPSILON = 1.001e-5  # keras/src/applications/resnet.py
MIN_SIZE = 32


def is_v2(arch: str) -> bool:
  return arch.endswith("v2")


def _block_v1(
  net, x, filters: int, stride: int, shortcut_conv: bool, name: str
):
  if shortcut_conv:
    shortcut = net.conv(f"{name}_0_conv", x, 4 * filters, 1, strides=stride)
    shortcut = net.bn(f"{name}_0_bn", shortcut)
  else:
    shortcut = x
  x = net.conv(f"{name}_1_conv", x, filters, 1, strides=stride)
  x = net.relu(f"{name}_1_relu", net.bn(f"{name}_1_bn", x))
  x = net.conv(f"{name}_2_conv", x, filters, 3, padding="same")
  x = net.relu(f"{name}_2_relu", net.bn(f"{name}_2_bn", x))
  x = net.conv(f"{name}_3_conv", x, 4 * filters, 1)
  x = net.bn(f"{name}_3_bn", x)
  x = net.add(f"{name}_add", [shortcut, x])
  return net.relu(f"{name}_out", x)


def _block_v2(
  net, x, filters: int, stride: int, shortcut_conv: bool, name: str
):
  preact = net.relu(f"{name}_preact_relu", net.bn(f"{name}_preact_bn", x))
  if shortcut_conv:
    shortcut = net.conv(
      f"{name}_0_conv", preact, 4 * filters, 1, strides=stride
    )
  elif stride > 1:  # Keras leaves this 1x1 max pool unnamed.
    shortcut = net.max_pool(net.auto("max_pooling2d"), x, 1, stride)
  else:
    shortcut = x
  x = net.conv(f"{name}_1_conv", preact, filters, 1, use_bias=False)
  x = net.relu(f"{name}_1_relu", net.bn(f"{name}_1_bn", x))
  x = net.pad(f"{name}_2_pad", x, 1)
  x = net.conv(f"{name}_2_conv", x, filters, 3, strides=stride, use_bias=False)
  x = net.relu(f"{name}_2_relu", net.bn(f"{name}_2_bn", x))
  x = net.conv(f"{name}_3_conv", x, 4 * filters, 1)
  return net.add(f"{name}_out", [shortcut, x])


def _stack(net, x, arch: str, stack: int, blocks: int):
  filters, name = FILTERS[stack], f"conv{stack + 2}"
  if not is_v2(arch):  # Downsamples in its first block, except conv2.
    stride = 1 if stack == 0 else 2
    x = _block_v1(net, x, filters, stride, True, f"{name}_block1")
    for i in range(2, blocks + 1):
      x = _block_v1(net, x, filters, 1, False, f"{name}_block{i}")
    return x
  # v2 downsamples in its last block, except conv5.
  x = _block_v2(net, x, filters, 1, True, f"{name}_block1")
  for i in range(2, blocks):
    x = _block_v2(net, x, filters, 1, False, f"{name}_block{i}")
  stride = 1 if stack == 3 else 2
  return _block_v2(net, x, filters, stride, False, f"{name}_block{blocks}")


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
  """keras/src/applications/resnet.py `ResNet`, layer by layer."""
  v2 = is_v2(arch)
  x = net.input(x)
  x = net.pad("conv1_pad", x, 3)
  x = net.conv("conv1_conv", x, 64, 7, strides=2)
  if not v2:
    x = net.relu("conv1_relu", net.bn("conv1_bn", x))
  x = net.pad("pool1_pad", x, 1)
  x = net.max_pool("pool1_pool", x, 3, 2)
  for stack, blocks in enumerate(STACKS[arch]):
    x = _stack(net, x, arch, stack, blocks)
  if v2:
    x = net.relu("post_relu", net.bn("post_bn", x))
  if include_top:
    x = net.global_pool("avg_pool", x, "avg")
    return net.dense("predictions", x, num_classes, classifier_activation)
  if pooling == "avg":
    return net.global_pool("avg_pool", x, "avg")
  if pooling == "max":
    return net.global_pool("max_pool", x, "max")
  return x


def _forward(arch: str, include_top: bool = True, pooling=None, **options):
  options = {
    k: v
    for k, v in options.items()
    if k in ("num_classes", "classifier_activation")
  }
  return functools.partial(
    forward, arch=arch, include_top=include_top, pooling=pooling, **options
  )


def keras_layer_names(
  arch: str, include_top: bool = True, pooling: str | None = None, **_
) -> list[str]:
  """`[l.name for l in keras.applications.<Arch>(...).layers]`."""
  return keras_graph.layer_names(_forward(arch, include_top, pooling))


def weighted_layer_names(arch: str, include_top: bool = True) -> list[str]:
  return keras_graph.weighted_layer_names(_forward(arch, include_top))


class ResNet(nn.Module):
  """ResNet v1/v2 as in `keras.applications`, returning logits by default.

  Attributes:
    arch: a key of STACKS.
    include_top: global average pool + `predictions` (any input size).
    num_classes: size of `predictions`.
    pooling: without the top, None (4D features), 'avg' or 'max'.
    classifier_activation: None for logits (what losses want) or 'softmax'.
    output_layer: stop at this Keras layer and return its output.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
  """

  arch: str = "resnet50"
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


for _arch in STACKS:
  registry.register(
    registry.Backbone(
      arch=_arch,
      family="resnet",
      build=lambda arch=_arch, **options: ResNet(arch=arch, **options),
      layer_names=functools.partial(keras_layer_names, _arch),
      preprocess="tf" if is_v2(_arch) else "caffe",
      min_size=MIN_SIZE,
      feature_layer="post_relu" if is_v2(_arch) else "conv5_block3_out",
      classifier="predictions",
      batch_stats=True,
      stem_layers=("conv1_conv",),
      options={"classifier_activation": None},
    )
  )
