"""DenseNet121/169/201 as in `keras.applications`.

Written once in `flaxtl.models.keras_model`: parameters are flat and named
like the Keras layers (`conv2_block1_0_bn`, `conv2_block1_1_conv`,
`pool2_conv`, ...), with Keras' shapes; convolutions have no bias;
BatchNormalization keeps Keras' momentum (0.99) and epsilon (1.001e-5). The
layer list is Keras' `model.layers` (its two unnamed ZeroPadding2D layers
named as in a fresh Keras session).
"""

from __future__ import annotations

from flaxtl.models import checkpoints, keras_model

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


def _bn_relu(net, x, bn_name: str, relu_name: str):
  x = net.bn(x, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=bn_name)
  return net.act(x, "relu", name=relu_name)


def _conv_block(net, x, name: str):
  x1 = _bn_relu(net, x, f"{name}_0_bn", f"{name}_0_relu")
  x1 = net.conv(x1, 4 * GROWTH, 1, use_bias=False, name=f"{name}_1_conv")
  x1 = _bn_relu(net, x1, f"{name}_1_bn", f"{name}_1_relu")
  x1 = net.conv(
    x1, GROWTH, 3, padding="same", use_bias=False, name=f"{name}_2_conv"
  )
  return net.concat([x, x1], name=f"{name}_concat")


def _transition(net, x, name: str):
  x = _bn_relu(net, x, f"{name}_bn", f"{name}_relu")
  channels = int(net.channels(x) * REDUCTION)
  x = net.conv(x, channels, 1, use_bias=False, name=f"{name}_conv")
  return net.avg_pool(x, 2, strides=2, name=f"{name}_pool")


def forward(net: keras_model.Net, x, config):
  """keras/src/applications/densenet.py `DenseNet`, layer by layer."""
  x = net.zero_pad(x, 3)
  x = net.conv(x, 64, 7, strides=2, use_bias=False, name="conv1_conv")
  x = _bn_relu(net, x, "conv1_bn", "conv1_relu")
  x = net.zero_pad(x, 1)
  x = net.max_pool(x, 3, strides=2, name="pool1")
  for stage, blocks in enumerate(BLOCKS[config.arch]):
    for i in range(1, blocks + 1):
      x = _conv_block(net, x, f"conv{stage + 2}_block{i}")
    if stage < 3:
      x = _transition(net, x, f"pool{stage + 2}")
  x = _bn_relu(net, x, "bn", "relu")
  return keras_model.classifier_top(net, x, config, "avg_pool", "max_pool")


def keras_layer_names(
  arch: str, include_top: bool = True, pooling: str | None = None, **_
) -> list[str]:
  """`[l.name for l in keras.applications.<Arch>(...).layers]`."""
  return keras_model.layer_names(arch, include_top, pooling)


class DenseNet(keras_model.KerasApp):
  """DenseNet as in `keras.applications` (attributes: `KerasApp`'s; arch a
  key of BLOCKS), returning logits by default."""

  ARCHS = tuple(BLOCKS)

  arch: str = "densenet121"


for _arch in BLOCKS:
  keras_model.register(
    _arch,
    forward,
    family="densenet",
    build=DenseNet,
    preprocess="torch",
    min_size=MIN_SIZE,
    feature_layer="relu",
    stem_layers=("conv1_conv",),
  )


# Pretrained checkpoints: the official Keras files.
# Official ImageNet files: (arch, include_top) -> (path under
# https://storage.googleapis.com/tensorflow/keras-applications/, md5), from
# keras/src/applications/py.
_MD5 = {
  "densenet121": (
    "9d60b8095a5708f2dcce2bca79d332c7",
    "30ee3e1110167f948a6b9946edeeb738",
  ),
  "densenet169": (
    "d699b8f76981ab1b30698df4c175e90b",
    "b8c4d4c20dd625c148057b9ff1c1176b",
  ),
  "densenet201": (
    "1ceb130c1ea1b78c3bf6114dbdfd8807",
    "c13680b51ded0fb44dff2d8f86ac8bb1",
  ),
}
IMAGENET_FILES = checkpoints.tf_dim_ordering_files("densenet", _MD5)
checkpoints.register(*checkpoints.keras_imagenet(IMAGENET_FILES))
