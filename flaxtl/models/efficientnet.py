"""EfficientNetB0-B7 and EfficientNetV2B0-B3/S/M/L as in Keras.

Written once in `flaxtl.models.keras_model`: the parameter tree is flat and
named like the Keras layers (`block2a_dwconv/depthwise_kernel`,
`block2a_se_reduce/{kernel,bias}`, `stem_bn` ...) and `keras_layer_names`
is `[l.name for l in model.layers]` of `keras.applications.EfficientNet*`
built in a fresh Keras session.

Both normalise inside the model, as Keras does, and take 0..255 input:
- EfficientNet: Rescaling(1/255) then a Normalization layer whose mean,
  variance and count are variables (kept in 'batch_stats' beside the BN
  statistics, imported and checked the same way, never updated). Keras built
  with weights='imagenet' adds a third layer, Rescaling(1/sqrt(stddev))
  ('rescaling_1'), because the official files hold the ImageNet stddev where
  the variance belongs (tensorflow/tensorflow#49930); `imagenet_rescaling=
  True` builds that model (one more layer, same variables).
- EfficientNetV2: B0-B3 Rescaling(1/255) and a constant Normalization
  (ImageNet mean and variance, no variables); S/M/L Rescaling to [-1, 1].

Dropout layers (the per-sample `blockNx_drop` stochastic depth and
`top_dropout`) act when `train` is truthy, with the 'dropout' rng.
"""

from __future__ import annotations

import math

import flax.linen as nn

from flaxtl.errors import UserError
from flaxtl.models import checkpoints, keras_model
from flaxtl.models.keras_model import correct_pad, make_divisible

MIN_SIZE = 32
DROP_CONNECT_RATE = 0.2  # Keras' drop_connect_rate, both versions.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
# Keras' initialisers for these families (VarianceScaling, fan_out).
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")
DENSE_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")

# EfficientNet (keras/src/applications/efficientnet.py): BN defaults.
V1_BN = (0.99, 1e-3)
# Blocks: (kernel, repeats, filters_in, filters_out, expand, stride, se).
V1_BLOCKS = (
  (3, 1, 32, 16, 1, 1, 0.25),
  (3, 2, 16, 24, 6, 2, 0.25),
  (5, 2, 24, 40, 6, 2, 0.25),
  (3, 3, 40, 80, 6, 2, 0.25),
  (5, 3, 80, 112, 6, 1, 0.25),
  (5, 4, 112, 192, 6, 2, 0.25),
  (3, 1, 192, 320, 6, 1, 0.25),
)
# arch -> (width, depth, top dropout).
V1_ARCHS = {
  "efficientnetb0": (1.0, 1.0, 0.2),
  "efficientnetb1": (1.0, 1.1, 0.2),
  "efficientnetb2": (1.1, 1.2, 0.3),
  "efficientnetb3": (1.2, 1.4, 0.3),
  "efficientnetb4": (1.4, 1.8, 0.4),
  "efficientnetb5": (1.6, 2.2, 0.4),
  "efficientnetb6": (1.8, 2.6, 0.5),
  "efficientnetb7": (2.0, 3.1, 0.5),
}

# EfficientNetV2 (keras/src/applications/efficientnet_v2.py).
V2_BN = (0.9, 1e-3)
V2_DROPOUT = 0.2
# Blocks: (kernel, repeats, filters_in, filters_out, expand, stride, se,
# fused).
V2_B = (
  (3, 1, 32, 16, 1, 1, 0, True),
  (3, 2, 16, 32, 4, 2, 0, True),
  (3, 2, 32, 48, 4, 2, 0, True),
  (3, 3, 48, 96, 4, 2, 0.25, False),
  (3, 5, 96, 112, 6, 1, 0.25, False),
  (3, 8, 112, 192, 6, 2, 0.25, False),
)
V2_S = (
  (3, 2, 24, 24, 1, 1, 0, True),
  (3, 4, 24, 48, 4, 2, 0, True),
  (3, 4, 48, 64, 4, 2, 0, True),
  (3, 6, 64, 128, 4, 2, 0.25, False),
  (3, 9, 128, 160, 6, 1, 0.25, False),
  (3, 15, 160, 256, 6, 2, 0.25, False),
)
V2_M = (
  (3, 3, 24, 24, 1, 1, 0, True),
  (3, 5, 24, 48, 4, 2, 0, True),
  (3, 5, 48, 80, 4, 2, 0, True),
  (3, 7, 80, 160, 4, 2, 0.25, False),
  (3, 14, 160, 176, 6, 1, 0.25, False),
  (3, 18, 176, 304, 6, 2, 0.25, False),
  (3, 5, 304, 512, 6, 1, 0.25, False),
)
V2_L = (
  (3, 4, 32, 32, 1, 1, 0, True),
  (3, 7, 32, 64, 4, 2, 0, True),
  (3, 7, 64, 96, 4, 2, 0, True),
  (3, 10, 96, 192, 4, 2, 0.25, False),
  (3, 19, 192, 224, 6, 1, 0.25, False),
  (3, 25, 224, 384, 6, 2, 0.25, False),
  (3, 7, 384, 640, 6, 1, 0.25, False),
)
# arch -> (blocks, width, depth, ImageNet-normalised B variant).
V2_ARCHS = {
  "efficientnetv2b0": (V2_B, 1.0, 1.0, True),
  "efficientnetv2b1": (V2_B, 1.0, 1.1, True),
  "efficientnetv2b2": (V2_B, 1.1, 1.2, True),
  "efficientnetv2b3": (V2_B, 1.2, 1.4, True),
  "efficientnetv2s": (V2_S, 1.0, 1.0, False),
  "efficientnetv2m": (V2_M, 1.0, 1.0, False),
  "efficientnetv2l": (V2_L, 1.0, 1.0, False),
}


def _top(net, x, config, dropout: float):
  if config.include_top:
    x = net.global_avg_pool(x, name="avg_pool")
    if dropout > 0:
      x = net.dropout(x, dropout, name="top_dropout")
    return net.dense(
      x,
      config.num_classes,
      activation=config.classifier_activation,
      kernel_initializer=DENSE_INIT,
      name="predictions",
    )
  return keras_model.pooled(net, x, config, "avg_pool", "max_pool")


def _conv(net, x, filters, kernel=1, strides=1, padding="same", **kw):
  """Keras' convolutions here: no bias, fan-out initialiser."""
  kw.setdefault("use_bias", False)
  return net.conv(
    x,
    filters,
    kernel,
    strides=strides,
    padding=padding,
    kernel_initializer=CONV_INIT,
    **kw,
  )


def _bn_act(net, x, bn: tuple[float, float], bn_name: str, act_name: str):
  x = net.bn(x, momentum=bn[0], epsilon=bn[1], name=bn_name)
  return net.act(x, "swish", name=act_name)


def _squeeze_excite(net, x, name, filters, filters_se):
  se = net.global_avg_pool(x, name=f"{name}se_squeeze")
  se = net.reshape(se, (1, 1, filters), name=f"{name}se_reshape")
  se = _conv(
    net,
    se,
    filters_se,
    use_bias=True,
    activation="swish",
    name=f"{name}se_reduce",
  )
  se = _conv(
    net,
    se,
    filters,
    use_bias=True,
    activation="sigmoid",
    name=f"{name}se_expand",
  )
  return net.multiply([x, se], name=f"{name}se_excite")


def _residual(net, x, inputs, name, drop_rate):
  if drop_rate > 0:  # Stochastic depth: drops whole samples.
    x = net.dropout(x, drop_rate, (None, 1, 1, 1), name=f"{name}drop")
  return net.add([x, inputs], name=f"{name}add")


def _expand(net, x, bn, name, filters, kernel=1, stride=1):
  x = _conv(net, x, filters, kernel, stride, name=f"{name}expand_conv")
  return _bn_act(net, x, bn, f"{name}expand_bn", f"{name}expand_activation")


# --- EfficientNet ---


def _v1_block(
  net, inputs, drop_rate, name, fin, fout, kernel, stride, expand, se
):
  filters = fin * expand
  x = inputs
  if expand != 1:
    x = _expand(net, x, V1_BN, name, filters)
  padding = "same"
  if stride == 2:
    pad = correct_pad(net.spatial(x), kernel)
    x = net.zero_pad(x, pad, name=f"{name}dwconv_pad")
    padding = "valid"
  x = net.depthwise_conv(
    x,
    kernel,
    strides=stride,
    padding=padding,
    use_bias=False,
    depthwise_initializer=CONV_INIT,
    name=f"{name}dwconv",
  )
  x = _bn_act(net, x, V1_BN, f"{name}bn", f"{name}activation")
  if 0 < se <= 1:
    x = _squeeze_excite(net, x, name, filters, max(1, int(fin * se)))
  x = _conv(net, x, fout, name=f"{name}project_conv")
  x = net.bn(x, momentum=V1_BN[0], epsilon=V1_BN[1], name=f"{name}project_bn")
  if stride == 1 and fin == fout:
    x = _residual(net, x, inputs, name, drop_rate)
  return x


def v1_forward(net: keras_model.Net, x, config):
  width, depth, dropout = V1_ARCHS[config.arch]

  def filters(f):
    return make_divisible(f * width, 8)

  def repeats(r):
    return math.ceil(depth * r)

  x = net.rescaling(x, 1.0 / 255.0)
  x = net.normalization(x)
  if config.imagenet_rescaling:
    scale = [1.0 / math.sqrt(s) for s in IMAGENET_STDDEV_RGB]
    x = net.rescaling(x, scale)
  x = net.zero_pad(x, correct_pad(net.spatial(x), 3), name="stem_conv_pad")
  x = _conv(net, x, filters(32), 3, 2, "valid", name="stem_conv")
  x = _bn_act(net, x, V1_BN, "stem_bn", "stem_activation")
  b, total = 0, float(sum(repeats(a[1]) for a in V1_BLOCKS))
  for i, (kernel, n, fin, fout, expand, stride, se) in enumerate(V1_BLOCKS):
    fin, fout = filters(fin), filters(fout)
    for j in range(repeats(n)):
      if j > 0:
        stride, fin = 1, fout
      name = f"block{i + 1}{chr(j + 97)}_"
      rate = DROP_CONNECT_RATE * b / total
      x = _v1_block(net, x, rate, name, fin, fout, kernel, stride, expand, se)
      b += 1
  x = _conv(net, x, filters(1280), name="top_conv")
  x = _bn_act(net, x, V1_BN, "top_bn", "top_activation")
  return _top(net, x, config, dropout)


# --- EfficientNetV2 ---


def _v2_filters(f, width):
  """Keras' round_filters (min_depth 8, no +10% correction)."""
  return int(max(8, int(f * width + 4) // 8 * 8))


def _mbconv(
  net, inputs, drop_rate, name, fin, fout, kernel, stride, expand, se
):
  filters = fin * expand
  x = inputs
  if expand != 1:
    x = _expand(net, x, V2_BN, name, filters)
  x = net.depthwise_conv(
    x,
    kernel,
    strides=stride,
    padding="same",
    use_bias=False,
    depthwise_initializer=CONV_INIT,
    name=f"{name}dwconv2",
  )
  x = _bn_act(net, x, V2_BN, f"{name}bn", f"{name}activation")
  if 0 < se <= 1:
    x = _squeeze_excite(net, x, name, filters, max(1, int(fin * se)))
  x = _conv(net, x, fout, name=f"{name}project_conv")
  x = net.bn(x, momentum=V2_BN[0], epsilon=V2_BN[1], name=f"{name}project_bn")
  if stride == 1 and fin == fout:
    x = _residual(net, x, inputs, name, drop_rate)
  return x


def _fused_mbconv(
  net, inputs, drop_rate, name, fin, fout, kernel, stride, expand, se
):
  filters = fin * expand
  x = inputs
  if expand != 1:
    x = _expand(net, x, V2_BN, name, filters, kernel, stride)
  if 0 < se <= 1:
    x = _squeeze_excite(net, x, name, filters, max(1, int(fin * se)))
  k, s = (1, 1) if expand != 1 else (kernel, stride)
  x = _conv(net, x, fout, k, s, name=f"{name}project_conv")
  x = net.bn(x, momentum=V2_BN[0], epsilon=V2_BN[1], name=f"{name}project_bn")
  if expand == 1:
    x = net.act(x, "swish", name=f"{name}project_activation")
  if stride == 1 and fin == fout:
    x = _residual(net, x, inputs, name, drop_rate)
  return x


def v2_forward(net: keras_model.Net, x, config):
  blocks, width, depth, b_variant = V2_ARCHS[config.arch]
  if b_variant:
    x = net.rescaling(x, 1.0 / 255)
    variance = [s**2 for s in IMAGENET_STDDEV_RGB]
    x = net.normalization(x, IMAGENET_MEAN_RGB, variance)
  else:
    x = net.rescaling(x, 1.0 / 128.0, -1)
  stem = _v2_filters(blocks[0][2], width)
  x = _conv(net, x, stem, 3, 2, name="stem_conv")
  x = _bn_act(net, x, V2_BN, "stem_bn", "stem_activation")
  # Keras divides by the unscaled repeat count here.
  b, total = 0, float(sum(a[1] for a in blocks))
  for i, (kernel, n, fin, fout, expand, stride, se, fused) in enumerate(blocks):
    fin, fout = _v2_filters(fin, width), _v2_filters(fout, width)
    block = _fused_mbconv if fused else _mbconv
    for j in range(math.ceil(depth * n)):
      if j > 0:
        stride, fin = 1, fout
      name = f"block{i + 1}{chr(j + 97)}_"
      rate = DROP_CONNECT_RATE * b / total
      x = block(net, x, rate, name, fin, fout, kernel, stride, expand, se)
      b += 1
  x = _conv(net, x, _v2_filters(1280, width), name="top_conv")
  x = _bn_act(net, x, V2_BN, "top_bn", "top_activation")
  return _top(net, x, config, V2_DROPOUT)


# --- The Flax module ---

FORWARDS = {
  **dict.fromkeys(V1_ARCHS, v1_forward),
  **dict.fromkeys(V2_ARCHS, v2_forward),
}


class EfficientNet(keras_model.KerasApp):
  """keras.applications.EfficientNet* (V1 and V2); `arch` picks the variant.

  Attributes: `KerasApp`'s (arch: 'efficientnetb0' ... 'efficientnetb7',
  'efficientnetv2b0' ... 'efficientnetv2b3', 'efficientnetv2s', 'm', 'l'),
  and
    imagenet_rescaling: (V1 only) the extra Rescaling layer Keras adds when
      built with weights='imagenet'; True for the official ImageNet files.
  """

  ARCHS = tuple(FORWARDS)

  arch: str = "efficientnetb0"
  imagenet_rescaling: bool = False

  def check(self) -> None:
    super().check()
    if self.imagenet_rescaling and self.arch not in V1_ARCHS:
      raise UserError(
        f"{self.arch}: imagenet_rescaling is an EfficientNet (V1) option"
      )


def trace(
  arch: str,
  include_top: bool = True,
  pooling: str | None = None,
  imagenet_rescaling: bool = False,
) -> keras_model.Layers:
  """The Keras model on names: layers, weight shapes, dropout layers."""
  options = {"imagenet_rescaling": imagenet_rescaling}
  return keras_model.recorded(arch, include_top, pooling, **options)


def keras_weight_shapes(
  arch: str, include_top: bool = True
) -> dict[str, list[tuple[int, ...]]]:
  """{weighted layer: its arrays' shapes in Keras' order}, in pure Python."""
  return dict(trace(arch, include_top).weights)


def keras_layer_names(
  arch: str,
  include_top: bool = True,
  pooling: str | None = None,
  imagenet_rescaling: bool = False,
  classifier_activation: str | None = None,
) -> list[str]:
  """`[l.name for l in model.layers]` of the Keras model (input included).

  classifier_activation changes no layer; accepted like every build option.
  """
  del classifier_activation
  return list(trace(arch, include_top, pooling, imagenet_rescaling).names)


for _arch, _forward in FORWARDS.items():
  keras_model.register(
    _arch,
    _forward,
    family="efficientnet",
    build=EfficientNet,
    min_size=MIN_SIZE,
    feature_layer="top_activation",
    stem_layers=("stem_conv",),
    layer_options={"imagenet_rescaling": False} if _arch in V1_ARCHS else {},
  )


# Pretrained checkpoints: the official Keras files.
# Official ImageNet files, MD5 as Keras checks them (keras/src/applications/
# py, efficientnet_v2.py: WEIGHTS_HASHES, (top, no top)).
_V1_MD5 = {
  "b0": (
    "902e53a9f72be733fc0bcb005b3ebbac",
    "50bc09e76180e00e4465e1a485ddc09d",
  ),
  "b1": (
    "1d254153d4ab51201f1646940f018540",
    "74c4e6b3e1f6a1eea24c589628592432",
  ),
  "b2": (
    "b15cce36ff4dcbd00b6dd88e7857a6ad",
    "111f8e2ac8aa800a7a99e3239f7bfb39",
  ),
  "b3": (
    "ffd1fdc53d0ce67064dc6a9c7960ede0",
    "af6d107764bb5b1abb91932881670226",
  ),
  "b4": (
    "18c95ad55216b8f92d7e70b3a046e2fc",
    "ebc24e6d6c33eaebbd558eafbeedf1ba",
  ),
  "b5": (
    "ace28f2a6363774853a83a0b21b9421a",
    "38879255a25d3c92d5e44e04ae6cec6f",
  ),
  "b6": (
    "165f6e37dce68623721b423839de8be5",
    "9ecce42647a20130c1f39a5d4cb75743",
  ),
  "b7": (
    "8c03f828fec3ef71311cd463b6759d99",
    "cbcfe4450ddf6f3ad90b1b398090fe4a",
  ),
}
_V2_MD5 = {
  "b0": (
    "21ecbf6da12460d5c40bb2f29ceb2188",
    "893217f2bb855e2983157299931e43ff",
  ),
  "b1": (
    "069f0534ff22adf035c89e2d9547a9dc",
    "0e80663031ca32d657f9caa404b6ec37",
  ),
  "b2": (
    "424e49f28180edbde1e94797771950a7",
    "1dfe2e7a5d45b6632553a8961ea609eb",
  ),
  "b3": (
    "1f1fc43bd98a6e4fd8fdfd551e02c7a0",
    "f6abf7b5849ac99a89b50dd3fd532856",
  ),
  "s": (
    "e1d88a8495beba45748fedd0cecbe016",
    "af0682fb74e8c54910f2d4393339c070",
  ),
  "m": (
    "a3bf6aa3276309f4fc6a34aa114c95cd",
    "1b8dc055df72dde80d614482840fe342",
  ),
  "l": (
    "27e6d408b53c7ebc868fefa357689935",
    "b0b66b5c863aef5b46e8608fe1711615",
  ),
}
HASH_ALGORITHM = "md5"
# EfficientNet (V1) files are NOT under the common base URL
# https://storage.googleapis.com/tensorflow/keras-applications/ but here:
V1_BASE_URL = "https://storage.googleapis.com/keras-applications/"
IMAGENET_BASE_URLS = dict.fromkeys(V1_ARCHS, V1_BASE_URL)
# (arch, include_top) -> (path under the arch's base URL, md5).
IMAGENET_FILES = {
  **{
    (f"efficientnet{v}", top): (
      f"efficientnet{v}{'' if top else '_notop'}.h5",
      _V1_MD5[v][0 if top else 1],
    )
    for v in _V1_MD5
    for top in (True, False)
  },
  **{
    (f"efficientnetv2{v}", top): (
      f"efficientnet_v2/efficientnetv2-{v}{'' if top else '_notop'}.h5",
      _V2_MD5[v][0 if top else 1],
    )
    for v in _V2_MD5
    for top in (True, False)
  },
}
# Build options the official files need (Keras' weights='imagenet' model).
IMAGENET_OPTIONS = {arch: {"imagenet_rescaling": True} for arch in V1_ARCHS}
checkpoints.register(
  *checkpoints.keras_imagenet(
    {k: v for k, v in IMAGENET_FILES.items() if k[0] in V1_ARCHS},
    V1_BASE_URL,
    IMAGENET_OPTIONS,
  ),
  *checkpoints.keras_imagenet(
    {k: v for k, v in IMAGENET_FILES.items() if k[0] not in V1_ARCHS}
  ),
)
