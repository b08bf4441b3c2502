"""InceptionV3 and InceptionResNetV2 as in `keras.applications`.

Both build from `conv2d_bn`: a bias-free convolution, a BatchNormalization
with `scale=False` (no `scale` parameter: Keras' gamma is absent, not
frozen at 1) and a ReLU. Most of these layers have no name in the Keras
source, so Keras numbers them by class in creation order (`conv2d_17`,
`batch_normalization_17`, `activation_17`) and lists them in `model.layers`
in its own graph order; both are reproduced here (`flaxtl.models.
keras_model`). BatchNormalization: momentum 0.99, epsilon 1e-3 (Keras'
defaults). Input: `preprocess_input` mode 'tf' ([-1, 1]).
"""

from __future__ import annotations

from flaxtl.models import checkpoints, keras_model

MIN_SIZE = 75


def conv2d_bn(
  net, x, filters, num_row, num_col, padding="same", strides=1, name=None
):
  """inception_v3.conv2d_bn."""
  conv_name = None if name is None else f"{name}_conv"
  bn_name = None if name is None else f"{name}_bn"
  x = net.conv(
    x,
    filters,
    (num_row, num_col),
    strides=strides,
    padding=padding,
    use_bias=False,
    name=conv_name,
  )
  x = net.bn(x, scale=False, name=bn_name)
  return net.act(x, "relu", name=name)


def _avg_branch(net, x, filters):
  pool = net.avg_pool(x, 3, strides=1, padding="same")
  return conv2d_bn(net, pool, filters, 1, 1)


def inception_v3(net: keras_model.Net, x, config):
  """keras/src/applications/inception_v3.py, layer for layer."""
  x = conv2d_bn(net, x, 32, 3, 3, strides=2, padding="valid")
  x = conv2d_bn(net, x, 32, 3, 3, padding="valid")
  x = conv2d_bn(net, x, 64, 3, 3)
  x = net.max_pool(x, 3, strides=2)
  x = conv2d_bn(net, x, 80, 1, 1, padding="valid")
  x = conv2d_bn(net, x, 192, 3, 3, padding="valid")
  x = net.max_pool(x, 3, strides=2)

  # mixed 0, 1, 2: 35 x 35 x 256/288/288.
  for i, pool_filters in enumerate((32, 64, 64)):
    b1 = conv2d_bn(net, x, 64, 1, 1)
    b5 = conv2d_bn(net, x, 48, 1, 1)
    b5 = conv2d_bn(net, b5, 64, 5, 5)
    b3 = conv2d_bn(net, x, 64, 1, 1)
    b3 = conv2d_bn(net, b3, 96, 3, 3)
    b3 = conv2d_bn(net, b3, 96, 3, 3)
    bp = _avg_branch(net, x, pool_filters)
    x = net.concat([b1, b5, b3, bp], name=f"mixed{i}")

  # mixed 3: 17 x 17 x 768.
  b3 = conv2d_bn(net, x, 384, 3, 3, strides=2, padding="valid")
  bd = conv2d_bn(net, x, 64, 1, 1)
  bd = conv2d_bn(net, bd, 96, 3, 3)
  bd = conv2d_bn(net, bd, 96, 3, 3, strides=2, padding="valid")
  bp = net.max_pool(x, 3, strides=2)
  x = net.concat([b3, bd, bp], name="mixed3")

  # mixed 4, 5, 6, 7: 17 x 17 x 768, factorised 7x7 convolutions.
  for i, width in zip((4, 5, 6, 7), (128, 160, 160, 192)):
    b1 = conv2d_bn(net, x, 192, 1, 1)
    b7 = conv2d_bn(net, x, width, 1, 1)
    b7 = conv2d_bn(net, b7, width, 1, 7)
    b7 = conv2d_bn(net, b7, 192, 7, 1)
    bd = conv2d_bn(net, x, width, 1, 1)
    bd = conv2d_bn(net, bd, width, 7, 1)
    bd = conv2d_bn(net, bd, width, 1, 7)
    bd = conv2d_bn(net, bd, width, 7, 1)
    bd = conv2d_bn(net, bd, 192, 1, 7)
    bp = _avg_branch(net, x, 192)
    x = net.concat([b1, b7, bd, bp], name=f"mixed{i}")

  # mixed 8: 8 x 8 x 1280.
  b3 = conv2d_bn(net, x, 192, 1, 1)
  b3 = conv2d_bn(net, b3, 320, 3, 3, strides=2, padding="valid")
  b7 = conv2d_bn(net, x, 192, 1, 1)
  b7 = conv2d_bn(net, b7, 192, 1, 7)
  b7 = conv2d_bn(net, b7, 192, 7, 1)
  b7 = conv2d_bn(net, b7, 192, 3, 3, strides=2, padding="valid")
  bp = net.max_pool(x, 3, strides=2)
  x = net.concat([b3, b7, bp], name="mixed8")

  # mixed 9, 10: 8 x 8 x 2048.
  for i in range(2):
    b1 = conv2d_bn(net, x, 320, 1, 1)
    b3 = conv2d_bn(net, x, 384, 1, 1)
    b3_1 = conv2d_bn(net, b3, 384, 1, 3)
    b3_2 = conv2d_bn(net, b3, 384, 3, 1)
    b3 = net.concat([b3_1, b3_2], name=f"mixed9_{i}")
    bd = conv2d_bn(net, x, 448, 1, 1)
    bd = conv2d_bn(net, bd, 384, 3, 3)
    bd_1 = conv2d_bn(net, bd, 384, 1, 3)
    bd_2 = conv2d_bn(net, bd, 384, 3, 1)
    bd = net.concat([bd_1, bd_2])
    bp = _avg_branch(net, x, 192)
    x = net.concat([b1, b3, bd, bp], name=f"mixed{9 + i}")
  return keras_model.classifier_top(net, x, config)


def irv2_conv2d_bn(
  net,
  x,
  filters,
  kernel_size,
  strides=1,
  padding="same",
  activation="relu",
  use_bias=False,
  name=None,
):
  """inception_resnet_v2.conv2d_bn."""
  x = net.conv(
    x,
    filters,
    kernel_size,
    strides=strides,
    padding=padding,
    use_bias=use_bias,
    name=name,
  )
  if not use_bias:
    bn_name = None if name is None else f"{name}_bn"
    x = net.bn(x, scale=False, name=bn_name)
  if activation is not None:
    ac_name = None if name is None else f"{name}_ac"
    x = net.act(x, activation, name=ac_name)
  return x


def _irv2_block(net, x, scale, block_type, block_idx, activation="relu"):
  """inception_resnet_v2.inception_resnet_block."""
  c = irv2_conv2d_bn
  if block_type == "block35":
    b0 = c(net, x, 32, 1)
    b1 = c(net, x, 32, 1)
    b1 = c(net, b1, 32, 3)
    b2 = c(net, x, 32, 1)
    b2 = c(net, b2, 48, 3)
    b2 = c(net, b2, 64, 3)
    branches = [b0, b1, b2]
  elif block_type == "block17":
    b0 = c(net, x, 192, 1)
    b1 = c(net, x, 128, 1)
    b1 = c(net, b1, 160, (1, 7))
    b1 = c(net, b1, 192, (7, 1))
    branches = [b0, b1]
  else:
    b0 = c(net, x, 192, 1)
    b1 = c(net, x, 192, 1)
    b1 = c(net, b1, 224, (1, 3))
    b1 = c(net, b1, 256, (3, 1))
    branches = [b0, b1]
  block_name = f"{block_type}_{block_idx}"
  mixed = net.concat(branches, name=f"{block_name}_mixed")
  up = c(
    net,
    mixed,
    net.channels(x),
    1,
    activation=None,
    use_bias=True,
    name=f"{block_name}_conv",
  )
  x = net.custom_scale([x, up], scale)
  if activation is not None:
    x = net.act(x, activation, name=f"{block_name}_ac")
  return x


def inception_resnet_v2(net: keras_model.Net, x, config):
  """keras/src/applications/inception_resnet_v2.py, layer for layer."""
  c = irv2_conv2d_bn
  x = c(net, x, 32, 3, strides=2, padding="valid")
  x = c(net, x, 32, 3, padding="valid")
  x = c(net, x, 64, 3)
  x = net.max_pool(x, 3, strides=2)
  x = c(net, x, 80, 1, padding="valid")
  x = c(net, x, 192, 3, padding="valid")
  x = net.max_pool(x, 3, strides=2)

  b0 = c(net, x, 96, 1)
  b1 = c(net, x, 48, 1)
  b1 = c(net, b1, 64, 5)
  b2 = c(net, x, 64, 1)
  b2 = c(net, b2, 96, 3)
  b2 = c(net, b2, 96, 3)
  bp = net.avg_pool(x, 3, strides=1, padding="same")
  bp = c(net, bp, 64, 1)
  x = net.concat([b0, b1, b2, bp], name="mixed_5b")
  for i in range(1, 11):
    x = _irv2_block(net, x, 0.17, "block35", i)

  b0 = c(net, x, 384, 3, strides=2, padding="valid")
  b1 = c(net, x, 256, 1)
  b1 = c(net, b1, 256, 3)
  b1 = c(net, b1, 384, 3, strides=2, padding="valid")
  bp = net.max_pool(x, 3, strides=2, padding="valid")
  x = net.concat([b0, b1, bp], name="mixed_6a")
  for i in range(1, 21):
    x = _irv2_block(net, x, 0.1, "block17", i)

  b0 = c(net, x, 256, 1)
  b0 = c(net, b0, 384, 3, strides=2, padding="valid")
  b1 = c(net, x, 256, 1)
  b1 = c(net, b1, 288, 3, strides=2, padding="valid")
  b2 = c(net, x, 256, 1)
  b2 = c(net, b2, 288, 3)
  b2 = c(net, b2, 320, 3, strides=2, padding="valid")
  bp = net.max_pool(x, 3, strides=2, padding="valid")
  x = net.concat([b0, b1, b2, bp], name="mixed_7a")
  for i in range(1, 10):
    x = _irv2_block(net, x, 0.2, "block8", i)
  x = _irv2_block(net, x, 1.0, "block8", 10, activation=None)
  x = c(net, x, 1536, 1, name="conv_7b")
  return keras_model.classifier_top(net, x, config)


def InceptionV3(**kwargs) -> keras_model.KerasApp:  # noqa: N802
  return keras_model.KerasApp(arch="inception_v3", **kwargs)


def InceptionResNetV2(**kwargs) -> keras_model.KerasApp:  # noqa: N802
  return keras_model.KerasApp(arch="inception_resnet_v2", **kwargs)


for _arch, _forward, _feature in (
  ("inception_v3", inception_v3, "mixed10"),
  ("inception_resnet_v2", inception_resnet_v2, "conv_7b_ac"),
):
  keras_model.register(
    _arch,
    _forward,
    family="inception",
    preprocess="tf",
    min_size=MIN_SIZE,
    feature_layer=_feature,
    stem_layers=("conv2d", "conv2d_1", "conv2d_2"),
  )


# Pretrained checkpoints: the official Keras files.
_BASE = "inception_resnet_v2/inception_resnet_v2_weights_tf_dim_ordering_tf"
# Official ImageNet files: (arch, include_top) -> (path under
# https://storage.googleapis.com/tensorflow/keras-applications/, md5), from
# keras/src/applications/inception_v3.py and inception_resnet_v2.py (Keras
# 3.15; get_file checks the md5).
IMAGENET_FILES = {
  ("inception_v3", True): (
    "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
    "9a0d58056eeedaa3f26cb7ebd46da564",
  ),
  ("inception_v3", False): (
    "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "bcbd6486424b2319ff4ef7d526e38f63",
  ),
  ("inception_resnet_v2", True): (
    f"{_BASE}_kernels.h5",
    "e693bd0210a403b3192acc6073ad2e96",
  ),
  ("inception_resnet_v2", False): (
    f"{_BASE}_kernels_notop.h5",
    "d19885ff4a710c122648d3b5c3b684e4",
  ),
}
checkpoints.register(*checkpoints.keras_imagenet(IMAGENET_FILES))
