"""Xception as in `keras.applications.xception`, parameters named like Keras'.

The four residual 1x1 convolutions and their BatchNormalizations have no
name in the Keras source, so Keras calls them `conv2d`, `conv2d_1`, ... and
`batch_normalization`, ...: those are their names here too (a file whose
session numbered them differently is renamed by position on import, see
`flaxtl.weights.mappings.xception`). BatchNormalization: Keras' defaults,
momentum 0.99, epsilon 1e-3. Input: `preprocess_input` mode 'tf' ([-1, 1]).
"""

from __future__ import annotations

from flaxtl.models import checkpoints, keras_model

ARCH = "xception"
MIN_SIZE = 71


def _sep_bn(net, x, filters: int, name: str):
  x = net.sepconv(x, filters, 3, padding="same", use_bias=False, name=name)
  return net.bn(x, name=f"{name}_bn")


def _residual(net, x, filters: int):
  r = net.conv(x, filters, 1, strides=2, padding="same", use_bias=False)
  return net.bn(r)


def forward(net: keras_model.Net, x, config):
  """keras/src/applications/xception.py, layer for layer."""
  x = net.conv(x, 32, 3, strides=2, use_bias=False, name="block1_conv1")
  x = net.bn(x, name="block1_conv1_bn")
  x = net.act(x, "relu", name="block1_conv1_act")
  x = net.conv(x, 64, 3, use_bias=False, name="block1_conv2")
  x = net.bn(x, name="block1_conv2_bn")
  x = net.act(x, "relu", name="block1_conv2_act")

  # Entry flow: blocks 2-4 halve the size, with a strided 1x1 residual.
  for block, filters in ((2, 128), (3, 256), (4, 728)):
    residual = _residual(net, x, filters)
    if block > 2:
      x = net.act(x, "relu", name=f"block{block}_sepconv1_act")
    x = _sep_bn(net, x, filters, f"block{block}_sepconv1")
    x = net.act(x, "relu", name=f"block{block}_sepconv2_act")
    x = _sep_bn(net, x, filters, f"block{block}_sepconv2")
    x = net.max_pool(x, 3, strides=2, padding="same", name=f"block{block}_pool")
    x = net.add([x, residual])

  # Middle flow: eight identity-residual blocks of three separable convs.
  for block in range(5, 13):
    residual = x
    for i in (1, 2, 3):
      x = net.act(x, "relu", name=f"block{block}_sepconv{i}_act")
      x = _sep_bn(net, x, 728, f"block{block}_sepconv{i}")
    x = net.add([x, residual])

  residual = _residual(net, x, 1024)
  x = net.act(x, "relu", name="block13_sepconv1_act")
  x = _sep_bn(net, x, 728, "block13_sepconv1")
  x = net.act(x, "relu", name="block13_sepconv2_act")
  x = _sep_bn(net, x, 1024, "block13_sepconv2")
  x = net.max_pool(x, 3, strides=2, padding="same", name="block13_pool")
  x = net.add([x, residual])

  x = _sep_bn(net, x, 1536, "block14_sepconv1")
  x = net.act(x, "relu", name="block14_sepconv1_act")
  x = _sep_bn(net, x, 2048, "block14_sepconv2")
  x = net.act(x, "relu", name="block14_sepconv2_act")
  return keras_model.classifier_top(net, x, config)


def Xception(**kwargs) -> keras_model.KerasApp:  # noqa: N802 (Keras' spelling)
  return keras_model.KerasApp(arch=ARCH, **kwargs)


keras_model.register(
  ARCH,
  forward,
  family="xception",
  preprocess="tf",
  min_size=MIN_SIZE,
  feature_layer="block14_sepconv2_act",
  stem_layers=("block1_conv1", "block1_conv2"),
)


# Pretrained checkpoints: the official Keras files.
# Official ImageNet files: (arch, include_top) -> (path under
# https://storage.googleapis.com/tensorflow/keras-applications/, md5), from
# keras/src/applications/py (Keras 3.15; get_file checks the md5).
IMAGENET_FILES = {
  ("xception", True): (
    "xception/xception_weights_tf_dim_ordering_tf_kernels.h5",
    "0a58e3b7378bc2990ea3b43d5981f1f6",
  ),
  ("xception", False): (
    "xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "b0042744bf5b25fce3cb969f33bebb97",
  ),
}
checkpoints.register(*checkpoints.keras_imagenet(IMAGENET_FILES))
