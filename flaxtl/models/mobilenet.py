"""MobileNetV2 and MobileNetV3 (Small, Large, minimalistic) as in Keras.

Written once in `flaxtl.models.keras_model`, so the parameter tree is flat
and named like the Keras layers (`block_3_expand/kernel`, `block_3_expand_BN/
{scale,bias}` + batch_stats `{mean,var}`, `block_3_depthwise/
depthwise_kernel` of shape (3, 3, C, 1)) and `keras_layer_names` is
`[l.name for l in model.layers]` of `keras.applications.MobileNetV2/V3*`
built in a fresh Keras session (V3's unnamed ReLU / Activation layers are
`re_lu_N` / `activation_N` there).

Stride-2 depthwise convolutions pad like Keras' `ZeroPadding2D(correct_pad)`
for the actual input size (TF 'same'); a Keras model built with an unknown
input size pads (0, 1) even for odd sizes, so odd sizes may differ from such
a model at the border.

MobileNetV2 takes `preprocess_input` 'tf' ([-1, 1]) input; MobileNetV3 has
Keras' Rescaling layer inside and takes 0..255.
"""

from __future__ import annotations

from flaxtl.errors import UserError
from flaxtl.models import checkpoints, keras_model
from flaxtl.models.keras_model import correct_pad, make_divisible

MIN_SIZE = 32
# Keras' BatchNormalization settings for both versions.
BN_MOMENTUM = 0.999
BN_EPSILON = 1e-3
# The alphas Keras has ImageNet weights for (any positive alpha builds).
V2_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
V3_ALPHAS = (0.75, 1.0)

# MobileNetV2 inverted residual blocks 0..16: (filters, stride, expansion).
V2_BLOCKS = (
  (16, 1, 1),
  (24, 2, 6),
  (24, 1, 6),
  (32, 2, 6),
  (32, 1, 6),
  (32, 1, 6),
  (64, 2, 6),
  (64, 1, 6),
  (64, 1, 6),
  (64, 1, 6),
  (96, 1, 6),
  (96, 1, 6),
  (96, 1, 6),
  (160, 2, 6),
  (160, 1, 6),
  (160, 1, 6),
  (320, 1, 6),
)

# MobileNetV3 blocks: (expansion, filters, kernel, stride, se, activation).
# kernel "k", se True and activation "act" take the variant's values (5,
# 0.25, hard_swish; minimalistic: 3, no SE, relu).
V3_SMALL = (
  (1, 16, 3, 2, True, "relu"),
  (72.0 / 16, 24, 3, 2, False, "relu"),
  (88.0 / 24, 24, 3, 1, False, "relu"),
  (4, 40, "k", 2, True, "act"),
  (6, 40, "k", 1, True, "act"),
  (6, 40, "k", 1, True, "act"),
  (3, 48, "k", 1, True, "act"),
  (3, 48, "k", 1, True, "act"),
  (6, 96, "k", 2, True, "act"),
  (6, 96, "k", 1, True, "act"),
  (6, 96, "k", 1, True, "act"),
)
V3_LARGE = (
  (1, 16, 3, 1, False, "relu"),
  (4, 24, 3, 2, False, "relu"),
  (3, 24, 3, 1, False, "relu"),
  (3, 40, "k", 2, True, "relu"),
  (3, 40, "k", 1, True, "relu"),
  (3, 40, "k", 1, True, "relu"),
  (6, 80, 3, 2, False, "act"),
  (2.5, 80, 3, 1, False, "act"),
  (2.3, 80, 3, 1, False, "act"),
  (2.3, 80, 3, 1, False, "act"),
  (6, 112, 3, 1, True, "act"),
  (6, 112, 3, 1, True, "act"),
  (6, 160, "k", 2, True, "act"),
  (6, 160, "k", 1, True, "act"),
  (6, 160, "k", 1, True, "act"),
)
# arch -> (blocks, minimalistic, last point-wise channels).
V3_ARCHS = {
  "mobilenetv3small": (V3_SMALL, False, 1024),
  "mobilenetv3large": (V3_LARGE, False, 1280),
  "mobilenetv3small_minimalistic": (V3_SMALL, True, 1024),
  "mobilenetv3large_minimalistic": (V3_LARGE, True, 1280),
}
V3_DROPOUT = 0.2  # Keras' default dropout_rate before `logits`.


def _bn(net, x, name: str):
  return net.bn(x, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def _conv1x1(net, x, filters: int, name: str, use_bias: bool = False):
  return net.conv(x, filters, 1, padding="same", use_bias=use_bias, name=name)


def _depthwise(net, x, kernel: int, stride: int, pad_name: str, name: str):
  """A depthwise convolution, strided ones after Keras' `correct_pad`."""
  if stride == 2:
    x = net.zero_pad(x, correct_pad(net.spatial(x), kernel), name=pad_name)
  padding = "same" if stride == 1 else "valid"
  return net.depthwise_conv(
    x, kernel, strides=stride, padding=padding, use_bias=False, name=name
  )


# --- MobileNetV2 (keras/src/applications/mobilenet_v2.py) ---


def _v2_block(net, inputs, filters, alpha, stride, expansion, block_id):
  in_channels = net.channels(inputs)
  pointwise = make_divisible(int(filters * alpha), 8)
  x = inputs
  prefix = f"block_{block_id}_"
  if block_id:
    x = _conv1x1(net, x, expansion * in_channels, f"{prefix}expand")
    x = _bn(net, x, f"{prefix}expand_BN")
    x = net.relu(x, 6.0, name=f"{prefix}expand_relu")
  else:
    prefix = "expanded_conv_"
  x = _depthwise(net, x, 3, stride, f"{prefix}pad", f"{prefix}depthwise")
  x = _bn(net, x, f"{prefix}depthwise_BN")
  x = net.relu(x, 6.0, name=f"{prefix}depthwise_relu")
  x = _conv1x1(net, x, pointwise, f"{prefix}project")
  x = _bn(net, x, f"{prefix}project_BN")
  if in_channels == pointwise and stride == 1:
    return net.add([inputs, x], name=f"{prefix}add")
  return x


def v2_forward(net: keras_model.Net, x, config):
  alpha = config.alpha
  first = make_divisible(32 * alpha, 8)
  x = net.conv(
    x, first, 3, strides=2, padding="same", use_bias=False, name="Conv1"
  )
  x = _bn(net, x, "bn_Conv1")
  x = net.relu(x, 6.0, name="Conv1_relu")
  for block_id, (filters, stride, expansion) in enumerate(V2_BLOCKS):
    x = _v2_block(net, x, filters, alpha, stride, expansion, block_id)
  last = make_divisible(1280 * alpha, 8) if alpha > 1.0 else 1280
  x = net.conv(x, last, 1, use_bias=False, name="Conv_1")
  x = _bn(net, x, "Conv_1_bn")
  x = net.relu(x, 6.0, name="out_relu")
  if config.include_top:
    x = net.global_avg_pool(x)
    return net.dense(
      x,
      config.num_classes,
      activation=config.classifier_activation,
      name="predictions",
    )
  return keras_model.pooled(net, x, config)


# --- MobileNetV3 (keras/src/applications/mobilenet_v3.py) ---


def _v3_activation(net, x, kind: str):
  if kind == "relu":
    return net.relu(x)
  return net.act(x, "hard_swish")


def _v3_se_block(net, inputs, filters, se_ratio, prefix):
  x = net.global_avg_pool(
    inputs, keepdims=True, name=f"{prefix}squeeze_excite_avg_pool"
  )
  squeezed = make_divisible(filters * se_ratio)
  x = _conv1x1(net, x, squeezed, f"{prefix}squeeze_excite_conv", True)
  x = net.relu(x, name=f"{prefix}squeeze_excite_relu")
  x = _conv1x1(net, x, filters, f"{prefix}squeeze_excite_conv_1", True)
  # Keras' hard_sigmoid: ReLU(6.0)(x + 3.0) * (1.0 / 6.0).
  x = net.op(lambda t: t + 3.0, x)
  x = net.relu(x, 6.0)
  x = net.op(lambda t: t * (1.0 / 6.0), x)
  return net.multiply([inputs, x], name=f"{prefix}squeeze_excite_mul")


def _v3_block(net, x, expansion, filters, kernel, stride, se_ratio, act, i):
  shortcut = x
  prefix = "expanded_conv_"
  infilters = net.channels(x)
  if i:
    prefix = f"expanded_conv_{i}_"
    expanded = make_divisible(infilters * expansion)
    x = _conv1x1(net, x, expanded, f"{prefix}expand")
    x = _bn(net, x, f"{prefix}expand_bn")
    x = _v3_activation(net, x, act)
  x = _depthwise(
    net, x, kernel, stride, f"{prefix}depthwise_pad", f"{prefix}depthwise"
  )
  x = _bn(net, x, f"{prefix}depthwise_bn")
  x = _v3_activation(net, x, act)
  if se_ratio:
    expanded = make_divisible(infilters * expansion)
    x = _v3_se_block(net, x, expanded, se_ratio, prefix)
  x = _conv1x1(net, x, filters, f"{prefix}project")
  x = _bn(net, x, f"{prefix}project_bn")
  if stride == 1 and infilters == filters:
    x = net.add([shortcut, x], name=f"{prefix}add")
  return x


def v3_forward(net: keras_model.Net, x, config):
  blocks, minimalistic, last_point = V3_ARCHS[config.arch]
  kernel, act, se_ratio = (3, "relu", None) if minimalistic else (5, "hs", 0.25)
  alpha = config.alpha
  x = net.rescaling(x, 1.0 / 127.5, -1.0)
  x = net.conv(x, 16, 3, strides=2, padding="same", use_bias=False, name="conv")
  x = _bn(net, x, "conv_bn")
  x = _v3_activation(net, x, act)
  for i, (expansion, filters, k, stride, se, a) in enumerate(blocks):
    x = _v3_block(
      net,
      x,
      expansion,
      make_divisible(filters * alpha),
      kernel if k == "k" else k,
      stride,
      se_ratio if se else None,
      act if a == "act" else a,
      i,
    )
  last_conv = make_divisible(net.channels(x) * 6)
  if alpha > 1.0:
    last_point = make_divisible(last_point * alpha)
  x = _conv1x1(net, x, last_conv, "conv_1")
  x = _bn(net, x, "conv_1_bn")
  x = _v3_activation(net, x, act)
  if config.include_top:
    x = net.global_avg_pool(x, keepdims=True)
    x = _conv1x1(net, x, last_point, "conv_2", True)
    x = _v3_activation(net, x, act)
    if V3_DROPOUT > 0:
      x = net.dropout(x, V3_DROPOUT)
    x = _conv1x1(net, x, config.num_classes, "logits", True)
    x = net.flatten(x)
    return net.act(x, config.classifier_activation, name="predictions")
  return keras_model.pooled(net, x, config, "avg_pool", "max_pool")


# --- The Flax modules ---


class MobileNetV2(keras_model.KerasApp):
  """keras.applications.MobileNetV2; returns logits by default.

  Attributes: `KerasApp`'s, and
    alpha: width multiplier (Keras' ImageNet files: 0.35, 0.5, 0.75, 1.0,
      1.3, 1.4).
  """

  ARCHS = ("mobilenetv2",)

  arch: str = "mobilenetv2"
  alpha: float = 1.0

  def check(self) -> None:
    super().check()
    if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
      raise UserError(
        f"{self.arch}: alpha must be a positive number, got {self.alpha!r}"
      )


class MobileNetV3(MobileNetV2):
  """keras.applications.MobileNetV3Small/Large; `arch` picks the variant.

  The Rescaling layer (0..255 -> [-1, 1]) is part of the model, as in Keras.
  """

  ARCHS = tuple(V3_ARCHS)

  arch: str = "mobilenetv3small"


FORWARDS = {"mobilenetv2": v2_forward, **dict.fromkeys(V3_ARCHS, v3_forward)}


def keras_weight_shapes(
  arch: str, include_top: bool = True, alpha: float = 1.0
) -> dict[str, list[tuple[int, ...]]]:
  """{weighted layer: its arrays' shapes in Keras' order}, in pure Python."""
  return dict(keras_model.recorded(arch, include_top, alpha=alpha).weights)


def keras_layer_names(
  arch: str,
  include_top: bool = True,
  pooling: str | None = None,
  alpha: float = 1.0,
  classifier_activation: str | None = None,
) -> list[str]:
  """`[l.name for l in model.layers]` of the Keras model (input included).

  classifier_activation changes no layer; accepted like every build option.
  """
  del classifier_activation
  return keras_model.layer_names(arch, include_top, pooling, alpha=alpha)


for _arch, _forward in FORWARDS.items():
  keras_model.register(
    _arch,
    _forward,
    family="mobilenet",
    build=MobileNetV2 if _arch == "mobilenetv2" else MobileNetV3,
    preprocess="tf" if _arch == "mobilenetv2" else "none",
    min_size=MIN_SIZE,
    classifier="predictions" if _arch == "mobilenetv2" else "logits",
    stem_layers=("Conv1",) if _arch == "mobilenetv2" else ("conv",),
    layer_options={"alpha": 1.0},
  )


# Pretrained checkpoints: the official Keras files.
# Official ImageNet files: (arch, include_top) -> (path under
# https://storage.googleapis.com/tensorflow/keras-applications/, digest),
# for alpha 1.0 at 224 px. Keras' mobilenet_v3.py checks MD5 digests;
# mobilenet_v2.py passes no hash at all (None: nothing to verify against).
# keras/src/applications/mobilenet_v3.py: model name -> (top, no top).
_V3_MD5 = {
  "large_224_0.75_float": (
    "765b44a33ad4005b3ac83185abf1d0eb",
    "40af19a13ebea4e2ee0c676887f69a2e",
  ),
  "large_224_1.0_float": (
    "59e551e166be033d707958cf9e29a6a7",
    "07fb09a5933dd0c8eaafa16978110389",
  ),
  "large_minimalistic_224_1.0_float": (
    "675e7b876c45c57e9e63e6d90a36599c",
    "ec5221f64a2f6d1ef965a614bdae7973",
  ),
  "small_224_0.75_float": (
    "cb65d4e5be93758266aa0a7f2c6708b7",
    "ebdb5cc8e0b497cd13a7c275d475c819",
  ),
  "small_224_1.0_float": (
    "8768d4c2e7dee89b9d02b2d03d65d862",
    "d3e8ec802a04aa4fc771ee12a9a9b836",
  ),
  "small_minimalistic_224_1.0_float": (
    "99cd97fb2fcdad2bf028eb838de69e37",
    "cde8136e733e811080d9fcd8a252f7e4",
  ),
}
HASH_ALGORITHM = {"mobilenetv2": None, "mobilenetv3": "md5"}


def _v2_file(include_top: bool, alpha: float, rows: int = 224):
  suffix = "" if include_top else "_no_top"
  name = (
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_"
    f"{float(alpha)}_{rows}{suffix}.h5"
  )
  return f"mobilenet_v2/{name}", None


def _v3_file(arch: str, include_top: bool, alpha: float):
  size = "small" if arch.startswith("mobilenetv3small") else "large"
  minimal = "_minimalistic" if arch.endswith("_minimalistic") else ""
  model = f"{size}{minimal}_224_{alpha}_float"
  top, notop = _V3_MD5[model]
  if include_top:
    return f"mobilenet_v3/weights_mobilenet_v3_{model}.h5", top
  return f"mobilenet_v3/weights_mobilenet_v3_{model}_no_top_v2.h5", notop


# Every (arch, include_top, alpha) Keras has a file for (V2 at 224 px; Keras
# also has V2 files for 96, 128, 160 and 192 px, same names with the size).
IMAGENET_ALPHA_FILES = {
  **{
    ("mobilenetv2", top, a): _v2_file(top, a)
    for a in V2_ALPHAS
    for top in (True, False)
  },
  **{
    (arch, top, a): _v3_file(arch, top, a)
    for arch in ("mobilenetv3small", "mobilenetv3large")
    for a in V3_ALPHAS
    for top in (True, False)
  },
  **{
    (arch, top, 1.0): _v3_file(arch, top, 1.0)
    for arch in (
      "mobilenetv3small_minimalistic",
      "mobilenetv3large_minimalistic",
    )
    for top in (True, False)
  },
}
IMAGENET_FILES = {
  (arch, top): entry
  for (arch, top, alpha), entry in IMAGENET_ALPHA_FILES.items()
  if alpha == 1.0
}
checkpoints.register(*checkpoints.keras_imagenet(IMAGENET_ALPHA_FILES))
