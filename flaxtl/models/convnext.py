"""ConvNeXt Tiny/Small/Base/Large/XLarge as in `keras.applications.convnext`.

Like Keras' own, the model normalises its input (the `..._prestem_
normalization` layer, ImageNet mean and std on 0..255 RGB), so it takes raw
0..255 pixels: preprocess 'none'. The stem and the three downsampling blocks
are Keras Sequentials, one entry each in `model.layers`; their layers' weights
nest under them (`convnext_tiny_stem/convnext_tiny_stem_conv/kernel`), which
is also Keras' variable path. A block's residual sum is a tensor operation in
Keras, not a layer, so `..._identity` (the last layer of a block) is the
branch output before the sum. Without the top Keras ends with a
LayerNormalization (named `layer_normalization`), after the pooling if any.
LayerNormalization epsilon 1e-6; GELU exact (erf); no BatchNormalization.
"""

from __future__ import annotations

import jax.numpy as jnp

from flaxtl.models import checkpoints, keras_model

MIN_SIZE = 32
# Keras' MODEL_CONFIGS: blocks per stage and stage widths.
CONFIGS = {
  "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
  "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
  "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
  "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
  "convnext_xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}
LAYER_SCALE_INIT = 1e-6
EPS = 1e-6
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_VAR = ((0.229 * 255) ** 2, (0.224 * 255) ** 2, (0.225 * 255) ** 2)


def _block(net, x, dim: int, name: str):
  """ConvNeXtBlock (drop_path_rate 0: the last layer is a linear Activation)."""
  inputs = x
  x = net.conv(
    x, dim, 7, padding="same", groups=dim, name=f"{name}_depthwise_conv"
  )
  x = net.layernorm(x, EPS, name=f"{name}_layernorm")
  x = net.dense(x, 4 * dim, name=f"{name}_pointwise_conv_1")
  x = net.act(x, "gelu", name=f"{name}_gelu")
  x = net.dense(x, dim, name=f"{name}_pointwise_conv_2")
  x = net.layer_scale(x, LAYER_SCALE_INIT, dim, name=f"{name}_layer_scale")
  x = net.act(x, "linear", name=f"{name}_identity")
  return net.op(jnp.add, inputs, x)  # Keras: a tensor op, not a layer.


def _stem(name: str, dim: int):
  def body(net, x):
    x = net.conv(x, dim, 4, strides=4, name=f"{name}_stem_conv")
    return net.layernorm(x, EPS, name=f"{name}_stem_layernorm")

  return body


def _downsampling(name: str, i: int, dim: int):
  def body(net, x):
    x = net.layernorm(x, EPS, name=f"{name}_downsampling_layernorm_{i}")
    return net.conv(x, dim, 2, strides=2, name=f"{name}_downsampling_conv_{i}")

  return body


def forward(net: keras_model.Net, x, config):
  """keras/src/applications/convnext.py, layer for layer."""
  name = config.arch
  depths, dims = CONFIGS[name]
  x = net.normalization(
    x, IMAGENET_MEAN, IMAGENET_VAR, name=f"{name}_prestem_normalization"
  )
  for i in range(4):
    if i == 0:
      x = net.sequential(x, f"{name}_stem", _stem(name, dims[0]))
    else:
      x = net.sequential(
        x,
        f"{name}_downsampling_block_{i - 1}",
        _downsampling(name, i - 1, dims[i]),
      )
    for j in range(depths[i]):
      x = _block(net, x, dims[i], f"{name}_stage_{i}_block_{j}")
  if config.include_top:
    x = net.global_avg_pool(x, name=f"{name}_head_gap")
    x = net.layernorm(x, EPS, name=f"{name}_head_layernorm")
    return net.dense(
      x,
      config.num_classes,
      activation=config.classifier_activation,
      name=f"{name}_head_dense",
    )
  return net.layernorm(keras_model.pooled(net, x, config), EPS)


def ConvNeXt(arch: str = "convnext_tiny", **kwargs) -> keras_model.KerasApp:  # noqa: N802
  return keras_model.KerasApp(arch=arch, **kwargs)


for _arch in CONFIGS:
  keras_model.register(
    _arch,
    forward,
    family="convnext",
    min_size=MIN_SIZE,
    feature_layer="layer_normalization",
    classifier=f"{_arch}_head_dense",
    batch_stats=False,
    stem_layers=(f"{_arch}_stem_conv",),
  )


# Pretrained checkpoints: the official Keras files.
# Official ImageNet files: (arch, include_top) -> (path under
# https://storage.googleapis.com/tensorflow/keras-applications/, sha256),
# from keras/src/applications/py (Keras 3.15; get_file checks the
# sha256).
_SHA256 = {
  "convnext_tiny": (
    "8ae6e78ce2933352b1ef4008e6dd2f17bc40771563877d156bc6426c7cf503ff",
    "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1",
  ),
  "convnext_small": (
    "ce1277d8f1ee5a0ef0e171469089c18f5233860ceaf9b168049cb9263fd7483c",
    "6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab",
  ),
  "convnext_base": (
    "52cbb006d3dadd03f6e095a8ca1aca47aecdd75acb4bc74bce1f5c695d0086e6",
    "40a20c5548a5e9202f69735ecc06c990e6b7c9d2de39f0361e27baeb24cb7c45",
  ),
  "convnext_large": (
    "070c5ed9ed289581e477741d3b34beffa920db8cf590899d6d2c67fba2a198a6",
    "96f02b6f0753d4f543261bc9d09bed650f24dd6bc02ddde3066135b63d23a1cd",
  ),
  "convnext_xlarge": (
    "c1f5ccab661354fc3a79a10fa99af82f0fbf10ec65cb894a3ae0815f17a889ee",
    "de3f8a54174130e0cecdc71583354753d557fcf1f4487331558e2a16ba0cfe05",
  ),
}
IMAGENET_FILES = {
  (arch, top): (f"convnext/{arch}{'' if top else '_notop'}.h5", digest)
  for arch, digests in _SHA256.items()
  for top, digest in zip((True, False), digests)
}
checkpoints.register(*checkpoints.keras_imagenet(IMAGENET_FILES))
