"""ResNet50/101/152 (v1) and ResNet50V2/101V2/152V2 as in `keras.applications`.

Written once in `flaxtl.models.keras_model`: parameters are flat and named
like the Keras layers (`conv2_block1_1_conv`, `conv2_block1_1_bn`, ...), with
Keras' shapes; BatchNormalization keeps Keras' momentum (0.99) and epsilon
(1.001e-5) and its moving statistics in `batch_stats`. The layer list is
Keras' `model.layers`, so `freeze.first_layers=k` freezes what
`model.layers[:k]` does in Keras.
"""

from __future__ import annotations

from flaxtl.models import checkpoints, keras_model

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


def _bn(net, x, name: str):
  return net.bn(x, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def _block_v1(net, x, filters: int, stride: int, shortcut_conv: bool, name):
  if shortcut_conv:
    shortcut = net.conv(
      x, 4 * filters, 1, strides=stride, name=f"{name}_0_conv"
    )
    shortcut = _bn(net, shortcut, f"{name}_0_bn")
  else:
    shortcut = x
  x = net.conv(x, filters, 1, strides=stride, name=f"{name}_1_conv")
  x = net.act(_bn(net, x, f"{name}_1_bn"), "relu", name=f"{name}_1_relu")
  x = net.conv(x, filters, 3, padding="same", name=f"{name}_2_conv")
  x = net.act(_bn(net, x, f"{name}_2_bn"), "relu", name=f"{name}_2_relu")
  x = net.conv(x, 4 * filters, 1, name=f"{name}_3_conv")
  x = _bn(net, x, f"{name}_3_bn")
  x = net.add([shortcut, x], name=f"{name}_add")
  return net.act(x, "relu", name=f"{name}_out")


def _block_v2(net, x, filters: int, stride: int, shortcut_conv: bool, name):
  preact = _bn(net, x, f"{name}_preact_bn")
  preact = net.act(preact, "relu", name=f"{name}_preact_relu")
  if shortcut_conv:
    shortcut = net.conv(
      preact, 4 * filters, 1, strides=stride, name=f"{name}_0_conv"
    )
  elif stride > 1:  # Keras leaves this 1x1 max pool unnamed.
    shortcut = net.max_pool(x, 1, strides=stride)
  else:
    shortcut = x
  x = net.conv(preact, filters, 1, use_bias=False, name=f"{name}_1_conv")
  x = net.act(_bn(net, x, f"{name}_1_bn"), "relu", name=f"{name}_1_relu")
  x = net.zero_pad(x, 1, name=f"{name}_2_pad")
  x = net.conv(
    x, filters, 3, strides=stride, use_bias=False, name=f"{name}_2_conv"
  )
  x = net.act(_bn(net, x, f"{name}_2_bn"), "relu", name=f"{name}_2_relu")
  x = net.conv(x, 4 * filters, 1, name=f"{name}_3_conv")
  return net.add([shortcut, x], name=f"{name}_out")


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


def forward(net: keras_model.Net, x, config):
  """keras/src/applications/resnet.py `ResNet`, layer by layer."""
  v2 = is_v2(config.arch)
  x = net.zero_pad(x, 3, name="conv1_pad")
  x = net.conv(x, 64, 7, strides=2, name="conv1_conv")
  if not v2:
    x = net.act(_bn(net, x, "conv1_bn"), "relu", name="conv1_relu")
  x = net.zero_pad(x, 1, name="pool1_pad")
  x = net.max_pool(x, 3, strides=2, name="pool1_pool")
  for stack, blocks in enumerate(STACKS[config.arch]):
    x = _stack(net, x, config.arch, stack, blocks)
  if v2:
    x = net.act(_bn(net, x, "post_bn"), "relu", name="post_relu")
  return keras_model.classifier_top(net, x, config, "avg_pool", "max_pool")


def keras_layer_names(
  arch: str, include_top: bool = True, pooling: str | None = None, **_
) -> list[str]:
  """`[l.name for l in keras.applications.<Arch>(...).layers]`."""
  return keras_model.layer_names(arch, include_top, pooling)


class ResNet(keras_model.KerasApp):
  """ResNet v1/v2 as in `keras.applications` (attributes: `KerasApp`'s;
  arch a key of STACKS), returning logits by default."""

  ARCHS = tuple(STACKS)

  arch: str = "resnet50"


for _arch in STACKS:
  keras_model.register(
    _arch,
    forward,
    family="resnet",
    build=ResNet,
    preprocess="tf" if is_v2(_arch) else "caffe",
    min_size=MIN_SIZE,
    feature_layer="post_relu" if is_v2(_arch) else "conv5_block3_out",
    stem_layers=("conv1_conv",),
  )


# Pretrained checkpoints: the official Keras files.
# Official ImageNet files: (arch, include_top) -> (path under
# https://storage.googleapis.com/tensorflow/keras-applications/, md5), from
# keras/src/applications/py WEIGHTS_HASHES (same files for v2).
_MD5 = {
  "resnet50": (
    "2cb95161c43110f7111970584f804107",
    "4d473c1dd8becc155b73f8504c6f6626",
  ),
  "resnet101": (
    "f1aeb4b969a6efcfb50fad2f0c20cfc5",
    "88cf7a10940856eca736dc7b7e228a21",
  ),
  "resnet152": (
    "100835be76be38e30d865e96f2aaae62",
    "ee4c566cf9a93f14d82f913c2dc6dd0c",
  ),
  "resnet50v2": (
    "3ef43a0b657b3be2300d5770ece849e0",
    "fac2f116257151a9d068a22e544a4917",
  ),
  "resnet101v2": (
    "6343647c601c52e1368623803854d971",
    "c0ed64b8031c3730f411d2eb4eea35b5",
  ),
  "resnet152v2": (
    "a49b44d1979771252814e80f8ec446f9",
    "ed17cf2e0169df9d443503ef94b23b33",
  ),
}
IMAGENET_FILES = checkpoints.tf_dim_ordering_files("resnet", _MD5)
checkpoints.register(*checkpoints.keras_imagenet(IMAGENET_FILES))
