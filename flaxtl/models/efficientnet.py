"""EfficientNetB0-B7 and EfficientNetV2B0-B3/S/M/kl as in Keras.

Written once as Keras' layer sequence (`flaxtl.models.mobile_layers`): the
parameter tree is flat and named like the Keras layers (`block2a_dwconv/
depthwise_kernel`, `block2a_se_reduce/{kernel,bias}`, `stem_bn` ...) and
`keras_layer_names` is `[l.name for l in model.layers]` of
`keras.applications.EfficientNet*` built in a fresh Keras session.

Both normalise inside the model, as Keras does, and take 0..255 input:
- EfficientNet: Rescaling(1/255) then a Normalization layer whose mean,
  variance and count are variables (kept in 'batch_stats' beside the BN
  statistics, imported and checked the same way, never updated). Keras built
  with weights='imagenet' adds a third layer, Rescaling(1/sqrt(stddev))
  ('rescaling_1'), because the official files hold the ImageNet stddev where
  the variance belongs (tensorflow/tensorflow#49930); `imagenet_rescaling=
  True` builds that model (one more layer, same variables).
- EfficientNetV2: B0-B3 Rescaling(1/255) and a constant Normalization
  (ImageNet mean and variance, no variables); S/M/kl Rescaling to [-1, 1].

Dropout layers (the per-sample `blockNx_drop` stochastic depth and
`top_dropout`) act when `train` is truthy, with the 'dropout' rng.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.errors import UserError
from flaxtl.models import common, mobile_layers, registry
from flaxtl.models.mobile_layers import make_divisible

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


def _pooled_top(kl, x, cfg, dropout: float):
  if cfg.include_top:
    x = kl.global_avg_pool("avg_pool", x)
    if dropout > 0:
      x = kl.dropout("top_dropout", x, dropout)
    return kl.dense(
      "predictions",
      x,
      cfg.num_classes,
      cfg.classifier_activation,
      kernel_init=DENSE_INIT,
    )
  if cfg.pooling == "avg":
    return kl.global_avg_pool("avg_pool", x)
  if cfg.pooling == "max":
    return kl.global_max_pool("max_pool", x)
  return x


def _squeeze_excite(kl, x, name, filters, filters_se):
  se = kl.global_avg_pool(f"{name}se_squeeze", x)
  se = kl.reshape_1x1(f"{name}se_reshape", se)
  se = kl.conv(
    f"{name}se_reduce",
    se,
    filters_se,
    1,
    use_bias=True,
    activation="swish",
    kernel_init=CONV_INIT,
  )
  se = kl.conv(
    f"{name}se_expand",
    se,
    filters,
    1,
    use_bias=True,
    activation="sigmoid",
    kernel_init=CONV_INIT,
  )
  return kl.multiply(f"{name}se_excite", x, se)


def _residual(kl, x, inputs, name, drop_rate):
  if drop_rate > 0:
    x = kl.dropout(f"{name}drop", x, drop_rate, per_sample=True)
  return kl.add(f"{name}add", x, inputs)


# --- EfficientNet ---


def _v1_block(
  kl, inputs, drop_rate, name, fin, fout, kernel, stride, expand, se
):
  filters = fin * expand
  x = inputs
  if expand != 1:
    x = kl.conv(f"{name}expand_conv", x, filters, 1, kernel_init=CONV_INIT)
    x = kl.bn(f"{name}expand_bn", x)
    x = kl.activation(f"{name}expand_activation", x, "swish")
  padding = "same"
  if stride == 2:
    x = kl.pad(f"{name}dwconv_pad", x, kernel)
    padding = "valid"
  x = kl.dwconv(f"{name}dwconv", x, kernel, stride, padding, CONV_INIT)
  x = kl.bn(f"{name}bn", x)
  x = kl.activation(f"{name}activation", x, "swish")
  if 0 < se <= 1:
    x = _squeeze_excite(kl, x, name, filters, max(1, int(fin * se)))
  x = kl.conv(f"{name}project_conv", x, fout, 1, kernel_init=CONV_INIT)
  x = kl.bn(f"{name}project_bn", x)
  if stride == 1 and fin == fout:
    x = _residual(kl, x, inputs, name, drop_rate)
  return x


def v1_forward(kl, x, cfg):
  width, depth, dropout = V1_ARCHS[cfg.arch]

  def filters(f):
    return make_divisible(f * width, 8)

  def repeats(r):
    return math.ceil(depth * r)

  x = kl.input(x)
  x = kl.rescaling(None, x, 1.0 / 255.0)
  x = kl.normalization(None, x)
  if cfg.imagenet_rescaling:
    scale = [1.0 / math.sqrt(s) for s in IMAGENET_STDDEV_RGB]
    x = kl.rescaling(None, x, scale)
  x = kl.pad("stem_conv_pad", x, 3)
  x = kl.conv("stem_conv", x, filters(32), 3, 2, "valid", kernel_init=CONV_INIT)
  x = kl.bn("stem_bn", x)
  x = kl.activation("stem_activation", x, "swish")
  b, total = 0, float(sum(repeats(a[1]) for a in V1_BLOCKS))
  for i, (kernel, n, fin, fout, expand, stride, se) in enumerate(V1_BLOCKS):
    fin, fout = filters(fin), filters(fout)
    for j in range(repeats(n)):
      if j > 0:
        stride, fin = 1, fout
      name = f"block{i + 1}{chr(j + 97)}_"
      rate = DROP_CONNECT_RATE * b / total
      x = _v1_block(kl, x, rate, name, fin, fout, kernel, stride, expand, se)
      b += 1
  x = kl.conv("top_conv", x, filters(1280), 1, kernel_init=CONV_INIT)
  x = kl.bn("top_bn", x)
  x = kl.activation("top_activation", x, "swish")
  return _pooled_top(kl, x, cfg, dropout)


# --- EfficientNetV2 ---


def _v2_filters(f, width):
  """Keras' round_filters (min_depth 8, no +10% correction)."""
  return int(max(8, int(f * width + 4) // 8 * 8))


def _mbconv(kl, inputs, drop_rate, name, fin, fout, kernel, stride, expand, se):
  filters = fin * expand
  x = inputs
  if expand != 1:
    x = kl.conv(f"{name}expand_conv", x, filters, 1, kernel_init=CONV_INIT)
    x = kl.bn(f"{name}expand_bn", x)
    x = kl.activation(f"{name}expand_activation", x, "swish")
  x = kl.dwconv(f"{name}dwconv2", x, kernel, stride, "same", CONV_INIT)
  x = kl.bn(f"{name}bn", x)
  x = kl.activation(f"{name}activation", x, "swish")
  if 0 < se <= 1:
    x = _squeeze_excite(kl, x, name, filters, max(1, int(fin * se)))
  x = kl.conv(f"{name}project_conv", x, fout, 1, kernel_init=CONV_INIT)
  x = kl.bn(f"{name}project_bn", x)
  if stride == 1 and fin == fout:
    x = _residual(kl, x, inputs, name, drop_rate)
  return x


def _fused_mbconv(
  kl, inputs, drop_rate, name, fin, fout, kernel, stride, expand, se
):
  filters = fin * expand
  x = inputs
  if expand != 1:
    x = kl.conv(
      f"{name}expand_conv", x, filters, kernel, stride, kernel_init=CONV_INIT
    )
    x = kl.bn(f"{name}expand_bn", x)
    x = kl.activation(f"{name}expand_activation", x, "swish")
  if 0 < se <= 1:
    x = _squeeze_excite(kl, x, name, filters, max(1, int(fin * se)))
  k, s = (1, 1) if expand != 1 else (kernel, stride)
  x = kl.conv(f"{name}project_conv", x, fout, k, s, kernel_init=CONV_INIT)
  x = kl.bn(f"{name}project_bn", x)
  if expand == 1:
    x = kl.activation(f"{name}project_activation", x, "swish")
  if stride == 1 and fin == fout:
    x = _residual(kl, x, inputs, name, drop_rate)
  return x


def v2_forward(kl, x, cfg):
  blocks, width, depth, b_variant = V2_ARCHS[cfg.arch]
  x = kl.input(x)
  if b_variant:
    x = kl.rescaling(None, x, 1.0 / 255)
    variance = [s**2 for s in IMAGENET_STDDEV_RGB]
    x = kl.normalization(None, x, IMAGENET_MEAN_RGB, variance)
  else:
    x = kl.rescaling(None, x, 1.0 / 128.0, -1)
  stem = _v2_filters(blocks[0][2], width)
  x = kl.conv("stem_conv", x, stem, 3, 2, kernel_init=CONV_INIT)
  x = kl.bn("stem_bn", x)
  x = kl.activation("stem_activation", x, "swish")
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
      x = block(kl, x, rate, name, fin, fout, kernel, stride, expand, se)
      b += 1
  x = kl.conv("top_conv", x, _v2_filters(1280, width), 1, kernel_init=CONV_INIT)
  x = kl.bn("top_bn", x)
  x = kl.activation("top_activation", x, "swish")
  return _pooled_top(kl, x, cfg, V2_DROPOUT)


# --- The Flax module ---

FORWARDS = {
  **dict.fromkeys(V1_ARCHS, v1_forward),
  **dict.fromkeys(V2_ARCHS, v2_forward),
}


class EfficientNet(nn.Module):
  """keras.applications.EfficientNet* (V1 and V2); `arch` picks the variant.

  Attributes:
    arch: 'efficientnetb0' ... 'efficientnetb7', 'efficientnetv2b0' ...
      'efficientnetv2b3', 'efficientnetv2s', 'efficientnetv2m',
      'efficientnetv2l'.
    include_top / num_classes / pooling / classifier_activation: as Keras'
      (classifier_activation None gives logits).
    output_layer: any Keras layer name; the model ends there.
    imagenet_rescaling: (V1 only) the extra Rescaling layer Keras adds when
      built with weights='imagenet'; True for the official ImageNet files.
  """

  arch: str = "efficientnetb0"
  include_top: bool = True
  num_classes: int = 1000
  pooling: str | None = None
  classifier_activation: str | None = None
  output_layer: str | None = None
  imagenet_rescaling: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    _check(self)
    common.check_input(self.arch, tuple(x.shape), MIN_SIZE)
    names = keras_layer_names(
      self.arch,
      self.include_top,
      self.pooling,
      imagenet_rescaling=self.imagenet_rescaling,
    )
    momentum, epsilon = V1_BN if self.arch in V1_ARCHS else V2_BN
    return mobile_layers.run(
      FORWARDS[self.arch], self, x, train, names, momentum, epsilon
    )


class _Cfg:
  """What a forward reads, without building a Flax module."""

  def __init__(self, arch, include_top, pooling, imagenet_rescaling):
    self.arch, self.include_top, self.pooling = arch, include_top, pooling
    self.imagenet_rescaling = imagenet_rescaling
    self.num_classes = 1000
    self.classifier_activation = None


@functools.lru_cache(maxsize=256)
def _trace(arch, include_top, pooling, imagenet_rescaling):
  cfg = _Cfg(arch, include_top, pooling, imagenet_rescaling)
  return mobile_layers.trace(FORWARDS[arch], cfg)


def trace(
  arch: str,
  include_top: bool = True,
  pooling: str | None = None,
  imagenet_rescaling: bool = False,
) -> mobile_layers.Names:
  """The Keras model on names: layers, weight shapes, dropout layers."""
  if arch not in FORWARDS:
    raise UserError(f"unknown architecture {arch!r}; expected {list(FORWARDS)}")
  pool = None if include_top else pooling
  rescale = bool(imagenet_rescaling) and arch in V1_ARCHS
  return _trace(arch, bool(include_top), pool, rescale)


def keras_layers(
  arch: str,
  include_top: bool = True,
  pooling: str | None = None,
  imagenet_rescaling: bool = False,
) -> list[tuple[str, str]]:
  """[(name, Keras class)] of Keras' model.layers for `arch`."""
  traced = trace(arch, include_top, pooling, imagenet_rescaling)
  return list(traced.layers)


def keras_weight_shapes(
  arch: str, include_top: bool = True
) -> dict[str, list[tuple[int, ...]]]:
  """{weighted layer: its arrays' shapes in Keras' order}, in pure Python."""
  return dict(trace(arch, include_top, None, False).weights)


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
  layers = keras_layers(arch, include_top, pooling, imagenet_rescaling)
  return [n for n, _ in layers]


def _check(m: EfficientNet) -> None:
  if m.arch not in FORWARDS:
    raise UserError(f"unknown architecture {m.arch!r}")
  if m.pooling not in registry.POOLINGS:
    raise UserError(f"pooling must be None, 'avg' or 'max', got {m.pooling!r}")
  if m.classifier_activation not in (None, "softmax"):
    raise UserError(
      "classifier_activation must be None or 'softmax', "
      f"got {m.classifier_activation!r}"
    )
  if m.imagenet_rescaling and m.arch not in V1_ARCHS:
    raise UserError(
      f"{m.arch}: imagenet_rescaling is an EfficientNet (V1) option"
    )


for _arch in FORWARDS:
  _options: dict[str, Any] = {"classifier_activation": None}
  if _arch in V1_ARCHS:
    _options["imagenet_rescaling"] = False
  registry.register(
    registry.Backbone(
      arch=_arch,
      family="efficientnet",
      build=functools.partial(EfficientNet, arch=_arch),
      layer_names=functools.partial(keras_layer_names, _arch),
      preprocess="none",
      min_size=MIN_SIZE,
      feature_layer="top_activation",
      classifier="predictions",
      batch_stats=True,
      stem_layers=("stem_conv",),
      options=_options,
    )
  )
