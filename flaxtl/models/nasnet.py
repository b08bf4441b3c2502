"""NASNetMobile as in `keras.applications.nasnet`.

Every weighted layer has a Keras name; the ReLUs, paddings and croppings
that have none are numbered by Keras (`activation_17`, `zero_padding2d_3`),
and so here. Some layers exist or not depending on the shapes that meet in a
cell (`_adjust_block`), and strided separable convolutions pad by the parity
of their input (`correct_pad`): both are computed from the actual shapes, and
`model.layers` from Keras' default 224x224 (the same list at any size Keras
accepts). BatchNormalization: momentum 0.9997, epsilon 1e-3. Input:
`preprocess_input` mode 'tf' ([-1, 1]).
"""

from __future__ import annotations

from flaxtl.models import checkpoints, keras_model
from flaxtl.models.keras_model import correct_pad

ARCH = "nasnet_mobile"
MIN_SIZE = 32
# NASNetMobile's arguments to Keras' NASNet().
PENULTIMATE_FILTERS = 1056
NUM_BLOCKS = 4
STEM_FILTERS = 32
FILTER_MULTIPLIER = 2
BN = {"momentum": 0.9997, "epsilon": 1e-3}


def _sep_block(net, x, filters, kernel=3, strides=1, block_id=""):
  """nasnet._separable_conv_block."""
  x = net.act(x, "relu")
  if strides == 2:
    x = net.zero_pad(
      x,
      correct_pad(net.spatial(x), kernel),
      name=f"separable_conv_1_pad_{block_id}",
    )
    padding = "valid"
  else:
    padding = "same"
  x = net.sepconv(
    x,
    filters,
    kernel,
    strides=strides,
    padding=padding,
    use_bias=False,
    name=f"separable_conv_1_{block_id}",
  )
  x = net.bn(x, name=f"separable_conv_1_bn_{block_id}", **BN)
  x = net.act(x, "relu")
  x = net.sepconv(
    x,
    filters,
    kernel,
    padding="same",
    use_bias=False,
    name=f"separable_conv_2_{block_id}",
  )
  return net.bn(x, name=f"separable_conv_2_bn_{block_id}", **BN)


def _conv_bn(net, x, filters, conv_name, bn_name):
  x = net.conv(x, filters, 1, padding="same", use_bias=False, name=conv_name)
  return net.bn(x, name=bn_name, **BN)


def _adjust_block(net, p, ip, filters, block_id):
  """nasnet._adjust_block: matches the previous cell's output to this one."""
  if p is None:
    return ip
  if net.spatial(p)[1] != net.spatial(ip)[1]:
    p = net.act(p, "relu", name=f"adjust_relu_1_{block_id}")
    p1 = net.avg_pool(p, 1, strides=2, name=f"adjust_avg_pool_1_{block_id}")
    p1 = net.conv(
      p1,
      filters // 2,
      1,
      padding="same",
      use_bias=False,
      name=f"adjust_conv_1_{block_id}",
    )
    p2 = net.zero_pad(p, ((0, 1), (0, 1)))
    p2 = net.crop(p2, ((1, 0), (1, 0)))
    p2 = net.avg_pool(p2, 1, strides=2, name=f"adjust_avg_pool_2_{block_id}")
    p2 = net.conv(
      p2,
      filters // 2,
      1,
      padding="same",
      use_bias=False,
      name=f"adjust_conv_2_{block_id}",
    )
    p = net.concat([p1, p2])
    return net.bn(p, name=f"adjust_bn_{block_id}", **BN)
  if net.channels(p) != filters:
    p = net.act(p, "relu")
    return _conv_bn(
      net,
      p,
      filters,
      f"adjust_conv_projection_{block_id}",
      f"adjust_bn_{block_id}",
    )
  return p


def _normal_cell(net, ip, p, filters, block_id):
  """nasnet._normal_a_cell."""
  p = _adjust_block(net, p, ip, filters, block_id)
  h = net.act(ip, "relu")
  h = _conv_bn(
    net, h, filters, f"normal_conv_1_{block_id}", f"normal_bn_1_{block_id}"
  )
  x1_1 = _sep_block(net, h, filters, 5, block_id=f"normal_left1_{block_id}")
  x1_2 = _sep_block(net, p, filters, block_id=f"normal_right1_{block_id}")
  x1 = net.add([x1_1, x1_2], name=f"normal_add_1_{block_id}")
  x2_1 = _sep_block(net, p, filters, 5, block_id=f"normal_left2_{block_id}")
  x2_2 = _sep_block(net, p, filters, 3, block_id=f"normal_right2_{block_id}")
  x2 = net.add([x2_1, x2_2], name=f"normal_add_2_{block_id}")
  x3 = net.avg_pool(
    h, 3, strides=1, padding="same", name=f"normal_left3_{block_id}"
  )
  x3 = net.add([x3, p], name=f"normal_add_3_{block_id}")
  x4_1 = net.avg_pool(
    p, 3, strides=1, padding="same", name=f"normal_left4_{block_id}"
  )
  x4_2 = net.avg_pool(
    p, 3, strides=1, padding="same", name=f"normal_right4_{block_id}"
  )
  x4 = net.add([x4_1, x4_2], name=f"normal_add_4_{block_id}")
  x5 = _sep_block(net, h, filters, block_id=f"normal_left5_{block_id}")
  x5 = net.add([x5, h], name=f"normal_add_5_{block_id}")
  x = net.concat([p, x1, x2, x3, x4, x5], name=f"normal_concat_{block_id}")
  return x, ip


def _reduction_cell(net, ip, p, filters, block_id):
  """nasnet._reduction_a_cell."""
  p = _adjust_block(net, p, ip, filters, block_id)
  h = net.act(ip, "relu")
  h = _conv_bn(
    net,
    h,
    filters,
    f"reduction_conv_1_{block_id}",
    f"reduction_bn_1_{block_id}",
  )
  h3 = net.zero_pad(
    h, correct_pad(net.spatial(h), 3), name=f"reduction_pad_1_{block_id}"
  )
  x1_1 = _sep_block(
    net, h, filters, 5, 2, block_id=f"reduction_left1_{block_id}"
  )
  x1_2 = _sep_block(
    net, p, filters, 7, 2, block_id=f"reduction_right1_{block_id}"
  )
  x1 = net.add([x1_1, x1_2], name=f"reduction_add_1_{block_id}")
  x2_1 = net.max_pool(h3, 3, strides=2, name=f"reduction_left2_{block_id}")
  x2_2 = _sep_block(
    net, p, filters, 7, 2, block_id=f"reduction_right2_{block_id}"
  )
  x2 = net.add([x2_1, x2_2], name=f"reduction_add_2_{block_id}")
  x3_1 = net.avg_pool(h3, 3, strides=2, name=f"reduction_left3_{block_id}")
  x3_2 = _sep_block(
    net, p, filters, 5, 2, block_id=f"reduction_right3_{block_id}"
  )
  x3 = net.add([x3_1, x3_2], name=f"reduction_add3_{block_id}")
  x4 = net.avg_pool(
    x1, 3, strides=1, padding="same", name=f"reduction_left4_{block_id}"
  )
  x4 = net.add([x2, x4])
  x5_1 = _sep_block(net, x1, filters, 3, block_id=f"reduction_left4_{block_id}")
  x5_2 = net.max_pool(h3, 3, strides=2, name=f"reduction_right5_{block_id}")
  x5 = net.add([x5_1, x5_2], name=f"reduction_add4_{block_id}")
  x = net.concat([x2, x3, x4, x5], name=f"reduction_concat_{block_id}")
  return x, ip


def forward(net: keras_model.Net, x, config):
  """keras/src/applications/nasnet.py NASNet() with NASNetMobile's values."""
  filters = PENULTIMATE_FILTERS // 24
  m = FILTER_MULTIPLIER
  x = net.conv(x, STEM_FILTERS, 3, strides=2, use_bias=False, name="stem_conv1")
  x = net.bn(x, name="stem_bn1", **BN)
  x, p = _reduction_cell(net, x, None, filters // m**2, "stem_1")
  x, p = _reduction_cell(net, x, p, filters // m, "stem_2")
  for stage in range(3):
    if stage:  # skip_reduction=False: the reduction's input goes on as p.
      block = f"reduce_{stage * NUM_BLOCKS}"
      x, p = _reduction_cell(net, x, p, filters * m**stage, block)
    for i in range(NUM_BLOCKS):
      block = str(stage * NUM_BLOCKS + i + (1 if stage else 0))
      x, p = _normal_cell(net, x, p, filters * m**stage, block)
  x = net.act(x, "relu")
  if config.include_top:
    x = net.global_avg_pool(x)
    return net.dense(
      x,
      config.num_classes,
      activation=config.classifier_activation,
      name="predictions",
    )
  return keras_model.pooled(net, x, config)


def NASNetMobile(**kwargs) -> keras_model.KerasApp:  # noqa: N802
  return keras_model.KerasApp(arch=ARCH, **kwargs)


keras_model.register(
  ARCH,
  forward,
  family="nasnet",
  preprocess="tf",
  min_size=MIN_SIZE,
  stem_layers=("stem_conv1",),
)


# Pretrained checkpoints: the official Keras files.
# Official ImageNet files: (arch, include_top) -> (path under
# https://storage.googleapis.com/tensorflow/keras-applications/, md5), from
# keras/src/applications/py (Keras 3.15; get_file checks the md5).
IMAGENET_FILES = {
  ("nasnet_mobile", True): (
    "nasnet/NASNet-mobile.h5",
    "020fb642bf7360b370c678b08e0adf61",
  ),
  ("nasnet_mobile", False): (
    "nasnet/NASNet-mobile-no-top.h5",
    "1ed92395b5b598bdda52abe5c0dbfd63",
  ),
}
checkpoints.register(*checkpoints.keras_imagenet(IMAGENET_FILES))
