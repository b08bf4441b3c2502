"""MobileNetV2 and MobileNetV3 (Small, Large, minimalistic) as in Keras.

Written once as Keras' layer sequence (`flaxtl.models.mobile_layers`), so the
parameter tree is flat and named like the Keras layers (`block_3_expand/
kernel`, `block_3_expand_BN/{scale,bias}` + batch_stats `{mean,var}`,
`block_3_depthwise/depthwise_kernel` of shape (3, 3, C, 1)) and
`keras_layer_names` is `[l.name for l in model.layers]` of
`keras.applications.MobileNetV2/V3*` built in a fresh Keras session (V3's
unnamed ReLU / Activation layers are `re_lu_N` / `activation_N` there).

Stride-2 depthwise convolutions pad like Keras' `ZeroPadding2D(correct_pad)`
for the actual input size (TF 'same'); a Keras model built with an unknown
input size pads (0, 1) even for odd sizes, so odd sizes may differ from such
a model at the border.

MobileNetV2 takes `preprocess_input` 'tf' ([-1, 1]) input; MobileNetV3 has
Keras' Rescaling layer inside and takes 0..255.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.errors import UserError
from flaxtl.models import common, mobile_layers, registry
from flaxtl.models.mobile_layers import make_divisible

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


def _top(kl, x, cfg, pool_names: tuple[str | None, str | None, str | None]):
  """Without the top: pooling layers (avg name, max name)."""
  _, avg_name, max_name = pool_names
  if cfg.pooling == "avg":
    return kl.global_avg_pool(avg_name, x)
  if cfg.pooling == "max":
    return kl.global_max_pool(max_name, x)
  return x


# --- MobileNetV2 (keras/src/applications/mobilenet_v2.py) ---


def _v2_block(kl, inputs, filters, alpha, stride, expansion, block_id):
  in_channels = kl.channels(inputs)
  pointwise = make_divisible(int(filters * alpha), 8)
  x = inputs
  prefix = f"block_{block_id}_"
  if block_id:
    x = kl.conv(f"{prefix}expand", x, expansion * in_channels, 1)
    x = kl.bn(f"{prefix}expand_BN", x)
    x = kl.relu(f"{prefix}expand_relu", x, 6.0)
  else:
    prefix = "expanded_conv_"
  if stride == 2:
    x = kl.pad(f"{prefix}pad", x, 3)
  padding = "same" if stride == 1 else "valid"
  x = kl.dwconv(f"{prefix}depthwise", x, 3, stride, padding)
  x = kl.bn(f"{prefix}depthwise_BN", x)
  x = kl.relu(f"{prefix}depthwise_relu", x, 6.0)
  x = kl.conv(f"{prefix}project", x, pointwise, 1)
  x = kl.bn(f"{prefix}project_BN", x)
  if in_channels == pointwise and stride == 1:
    return kl.add(f"{prefix}add", inputs, x)
  return x


def v2_forward(kl, x, cfg):
  alpha = cfg.alpha
  x = kl.input(x)
  x = kl.conv("Conv1", x, make_divisible(32 * alpha, 8), 3, strides=2)
  x = kl.bn("bn_Conv1", x)
  x = kl.relu("Conv1_relu", x, 6.0)
  for block_id, (filters, stride, expansion) in enumerate(V2_BLOCKS):
    x = _v2_block(kl, x, filters, alpha, stride, expansion, block_id)
  last = make_divisible(1280 * alpha, 8) if alpha > 1.0 else 1280
  x = kl.conv("Conv_1", x, last, 1)
  x = kl.bn("Conv_1_bn", x)
  x = kl.relu("out_relu", x, 6.0)
  if cfg.include_top:
    x = kl.global_avg_pool(None, x)
    return kl.dense(
      "predictions", x, cfg.num_classes, cfg.classifier_activation
    )
  return _top(kl, x, cfg, (None, None, None))


# --- MobileNetV3 (keras/src/applications/mobilenet_v3.py) ---


def _v3_activation(kl, x, kind: str):
  if kind == "relu":
    return kl.relu(None, x)
  return kl.activation(None, x, "hard_swish")


def _v3_se_block(kl, inputs, filters, se_ratio, prefix):
  x = kl.global_avg_pool(f"{prefix}squeeze_excite_avg_pool", inputs, True)
  squeezed = make_divisible(filters * se_ratio)
  x = kl.conv(f"{prefix}squeeze_excite_conv", x, squeezed, 1, use_bias=True)
  x = kl.relu(f"{prefix}squeeze_excite_relu", x)
  x = kl.conv(f"{prefix}squeeze_excite_conv_1", x, filters, 1, use_bias=True)
  # Keras' hard_sigmoid: ReLU(6.0)(x + 3.0) * (1.0 / 6.0).
  x = kl.op(lambda t: t + 3.0, x)
  x = kl.relu(None, x, 6.0)
  x = kl.op(lambda t: t * (1.0 / 6.0), x)
  return kl.multiply(f"{prefix}squeeze_excite_mul", inputs, x)


def _v3_block(kl, x, expansion, filters, kernel, stride, se_ratio, act, i):
  shortcut = x
  prefix = "expanded_conv_"
  infilters = kl.channels(x)
  if i:
    prefix = f"expanded_conv_{i}_"
    x = kl.conv(f"{prefix}expand", x, make_divisible(infilters * expansion), 1)
    x = kl.bn(f"{prefix}expand_bn", x)
    x = _v3_activation(kl, x, act)
  if stride == 2:
    x = kl.pad(f"{prefix}depthwise_pad", x, kernel)
  padding = "same" if stride == 1 else "valid"
  x = kl.dwconv(f"{prefix}depthwise", x, kernel, stride, padding)
  x = kl.bn(f"{prefix}depthwise_bn", x)
  x = _v3_activation(kl, x, act)
  if se_ratio:
    expanded = make_divisible(infilters * expansion)
    x = _v3_se_block(kl, x, expanded, se_ratio, prefix)
  x = kl.conv(f"{prefix}project", x, filters, 1)
  x = kl.bn(f"{prefix}project_bn", x)
  if stride == 1 and infilters == filters:
    x = kl.add(f"{prefix}add", shortcut, x)
  return x


def v3_forward(kl, x, cfg):
  blocks, minimalistic, last_point = V3_ARCHS[cfg.arch]
  kernel, act, se_ratio = (3, "relu", None) if minimalistic else (5, "hs", 0.25)
  alpha = cfg.alpha
  x = kl.input(x)
  x = kl.rescaling(None, x, 1.0 / 127.5, -1.0)
  x = kl.conv("conv", x, 16, 3, strides=2)
  x = kl.bn("conv_bn", x)
  x = _v3_activation(kl, x, act)
  for i, (expansion, filters, k, stride, se, a) in enumerate(blocks):
    x = _v3_block(
      kl,
      x,
      expansion,
      make_divisible(filters * alpha),
      kernel if k == "k" else k,
      stride,
      se_ratio if se else None,
      act if a == "act" else a,
      i,
    )
  last_conv = make_divisible(kl.channels(x) * 6)
  if alpha > 1.0:
    last_point = make_divisible(last_point * alpha)
  x = kl.conv("conv_1", x, last_conv, 1)
  x = kl.bn("conv_1_bn", x)
  x = _v3_activation(kl, x, act)
  if cfg.include_top:
    x = kl.global_avg_pool(None, x, True)
    x = kl.conv("conv_2", x, last_point, 1, use_bias=True)
    x = _v3_activation(kl, x, act)
    if V3_DROPOUT > 0:
      x = kl.dropout(None, x, V3_DROPOUT)
    x = kl.conv("logits", x, cfg.num_classes, 1, use_bias=True)
    x = kl.flatten(None, x)
    return kl.activation("predictions", x, cfg.classifier_activation)
  return _top(kl, x, cfg, (None, "avg_pool", "max_pool"))


# --- The Flax modules ---


class _MobileNet(nn.Module):
  """Shared fields and checks; subclasses set `forward`."""

  arch: str = "mobilenetv2"
  alpha: float = 1.0
  include_top: bool = True
  num_classes: int = 1000
  pooling: str | None = None
  classifier_activation: str | None = None
  output_layer: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def archs(self) -> tuple[str, ...]:
    return tuple(FORWARDS)

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    _check(self)
    common.check_input(self.arch, tuple(x.shape), MIN_SIZE)
    names = keras_layer_names(
      self.arch, self.include_top, self.pooling, self.alpha
    )
    return mobile_layers.run(
      FORWARDS[self.arch], self, x, train, names, BN_MOMENTUM, BN_EPSILON
    )


class MobileNetV2(_MobileNet):
  """keras.applications.MobileNetV2; returns logits by default.

  Attributes:
    alpha: width multiplier (Keras' ImageNet files: 0.35, 0.5, 0.75, 1.0,
      1.3, 1.4).
    include_top / num_classes / pooling / classifier_activation: as Keras'
      (classifier_activation None gives logits).
    output_layer: any Keras layer name; the model ends there.
  """

  def archs(self) -> tuple[str, ...]:
    return ("mobilenetv2",)


class MobileNetV3(_MobileNet):
  """keras.applications.MobileNetV3Small/Large; `arch` picks the variant.

  The Rescaling layer (0..255 -> [-1, 1]) is part of the model, as in Keras.
  """

  arch: str = "mobilenetv3small"

  def archs(self) -> tuple[str, ...]:
    return tuple(V3_ARCHS)


FORWARDS = {"mobilenetv2": v2_forward, **dict.fromkeys(V3_ARCHS, v3_forward)}


class _Cfg:
  """What a forward reads, without building a Flax module."""

  def __init__(self, arch, include_top, pooling, alpha):
    self.arch, self.include_top, self.pooling = arch, include_top, pooling
    self.alpha = alpha
    self.num_classes = 1000
    self.classifier_activation = None


@functools.lru_cache(maxsize=256)
def _trace(arch: str, options: tuple) -> mobile_layers.Names:
  include_top, pooling, alpha = options
  cfg = _Cfg(arch, include_top, pooling, alpha)
  return mobile_layers.trace(FORWARDS[arch], cfg)


def trace(
  arch: str,
  include_top: bool = True,
  pooling: str | None = None,
  alpha: float = 1.0,
) -> mobile_layers.Names:
  """The Keras model on names: layers, weight shapes, dropout layers."""
  if arch not in FORWARDS:
    raise UserError(f"unknown architecture {arch!r}; expected {list(FORWARDS)}")
  top, pool = bool(include_top), None if include_top else pooling
  return _trace(arch, (top, pool, float(alpha)))


def keras_layers(
  arch: str,
  include_top: bool = True,
  pooling: str | None = None,
  alpha: float = 1.0,
) -> list[tuple[str, str]]:
  """[(name, Keras class)] of Keras' model.layers for `arch`."""
  return list(trace(arch, include_top, pooling, alpha).layers)


def keras_weight_shapes(
  arch: str, include_top: bool = True, alpha: float = 1.0
) -> dict[str, list[tuple[int, ...]]]:
  """{weighted layer: its arrays' shapes in Keras' order}, in pure Python."""
  return dict(trace(arch, include_top, None, alpha).weights)


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
  return [n for n, _ in keras_layers(arch, include_top, pooling, alpha)]


def _check(m: _MobileNet) -> None:
  if m.arch not in m.archs():
    raise UserError(
      f"{type(m).__name__}: arch must be one of {list(m.archs())}, "
      f"got {m.arch!r}"
    )
  if m.pooling not in registry.POOLINGS:
    raise UserError(f"pooling must be None, 'avg' or 'max', got {m.pooling!r}")
  if m.classifier_activation not in (None, "softmax"):
    raise UserError(
      "classifier_activation must be None or 'softmax', "
      f"got {m.classifier_activation!r}"
    )
  if not (isinstance(m.alpha, (int, float)) and m.alpha > 0):
    raise UserError(
      f"{m.arch}: alpha must be a positive number, got {m.alpha!r}"
    )


def _build(arch: str, **options: Any) -> nn.Module:
  cls = MobileNetV2 if arch == "mobilenetv2" else MobileNetV3
  return cls(arch=arch, **options)


for _arch in FORWARDS:
  registry.register(
    registry.Backbone(
      arch=_arch,
      family="mobilenet",
      build=functools.partial(_build, _arch),
      layer_names=functools.partial(keras_layer_names, _arch),
      preprocess="tf" if _arch == "mobilenetv2" else "none",
      min_size=MIN_SIZE,
      feature_layer=keras_layer_names(_arch, include_top=False)[-1],
      classifier="predictions" if _arch == "mobilenetv2" else "logits",
      batch_stats=True,
      stem_layers=("Conv1",) if _arch == "mobilenetv2" else ("conv",),
      options={"alpha": 1.0, "classifier_activation": None},
    )
  )
