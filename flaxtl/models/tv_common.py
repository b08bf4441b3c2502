"""What the PyTorch-named families share: torch's layers under torch's names.

Parameter paths follow the PyTorch module paths ('layer1/0/conv1/kernel' for
`layer1.0.conv1.weight`), so a state dict maps by name and a freeze regex
reads like the PyTorch code. Containers (`nn.Sequential`, blocks) are Flax
submodules named like the torch attribute or index ('layer1', '0'); leaf
layers are created by `Layers` inside the container's compact method.

Conversions the weight mappings apply (flaxtl.weights.mappings.tv_common):
conv weights OIHW -> kernel HWIO, linear weights (out, in) -> kernel (in, out),
BatchNorm weight/bias -> params scale/bias, running_mean/var -> batch_stats
mean/var. BatchNorm momentum: torch's 0.1 is Flax's 0.9.

output_layer: any module path in forward order ('layer2', 'layer2/1/bn2',
'features/4'): the output of that module, as a torch forward hook sees it.
A container's output comes after its last child's (post-order). A model built
to stop early has no parameters after that module.

A family module holds only its own structure: `register_family` registers
its archs (torch naming, 'torch' input unless told), `check` / `check_arch`
validate a model's options and input, `with_top` / `pool` / `output` give the
torchvision top (avgpool + classifier) or the pooled features without it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.errors import UserError
from flaxtl.models import common, registry
from flaxtl.ops import conv as conv_ops

BN_MOMENTUM = 0.9  # torch.nn.BatchNorm2d's momentum=0.1.
TORCH_BN_EPS = 1e-5

# torchvision's conv init (kaiming_normal_, fan_out, relu) and
# nn.Linear's default (uniform within 1/sqrt(fan_in)).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def sub_stop(stop: str | None, name: str) -> str | None:
  """The part of `stop` inside child `name` ('layer1/0/bn1' -> '0/bn1')."""
  if stop is not None and stop.startswith(name + "/"):
    return stop[len(name) + 1 :]
  return None


def post_order(leaves: Iterable[str]) -> list[str]:
  """Module paths in forward order, each container right after its last child.

  ['a/0', 'a/1', 'b'] -> ['a/0', 'a/1', 'a', 'b']: the order in which the
  modules' outputs become available.
  """
  out: list[str] = []
  open_: list[str] = []  # Containers entered and not yet finished.
  for leaf in leaves:
    parts = leaf.split("/")
    ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
    while open_ and open_[-1] not in ancestors:
      out.append(open_.pop())
    for a in ancestors:
      if a not in open_:
        open_.append(a)
    out.append(leaf)
  out.extend(reversed(open_))
  return out


# (module path, whether it holds parameters), in the order outputs are ready.
Modules = list[tuple[str, bool]]


def pool_module(pooling: str) -> str:
  """The module a global pool without the top is named ('avgpool')."""
  return "avgpool" if pooling == "avg" else "maxpool"


def with_top(
  features: Iterable[tuple[str, bool]],
  classifier: Sequence[bool],
  include_top: bool,
  pooling: str | None,
) -> Modules:
  """`features`, then avgpool, `classifier/{i}` (params: classifier[i]).

  Without the top, the global pool (if any) as module 'avgpool'/'maxpool'.
  """
  mods = list(features)
  if include_top:
    top = [(f"classifier/{i}", p) for i, p in enumerate(classifier)]
    return [*mods, ("avgpool", False), *top, ("classifier", False)]
  if pooling is not None:
    mods.append((pool_module(pooling), False))
  return mods


def paths(mods: Modules) -> list[str]:
  """Every module path of `mods` (the `output_layer`s), in order."""
  return [m for m, _ in mods]


def param_paths(mods: Modules) -> list[str]:
  """The paths of `mods` that hold parameters (`layer_names`), in order."""
  return [m for m, params in mods if params]


def check_arch(arch: str, archs: Collection[str], pooling: str | None) -> None:
  """`arch` is one of `archs` and `pooling` one the registry knows."""
  if arch not in archs:
    raise UserError(
      f"unknown architecture {arch!r}; expected one of {sorted(archs)}"
    )
  if pooling not in registry.POOLINGS:
    raise UserError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")


def check_output_layer(
  arch: str, output_layer: str | None, names: Sequence[str]
) -> None:
  if output_layer is not None and output_layer not in names:
    top = [n for n in names if "/" not in n]
    raise UserError(
      f"output_layer {output_layer!r} is not a module of {arch} (module paths "
      f"like {top[:6]} or {names[:3]}, '/'-joined)"
    )


def check(
  arch: str,
  output_layer: str | None,
  names: Sequence[str],
  shape: Sequence[int],
  min_size: int,
) -> None:
  """`output_layer` is one of the module paths `names`; the input fits."""
  check_output_layer(arch, output_layer, names)
  common.check_input(arch, tuple(shape), min_size)


def _for_arch(fn: Callable[..., list[str]], arch: str) -> Callable:
  """fn(arch, include_top, pooling) as the registry calls it."""

  def call(
    include_top: bool = True, pooling: str | None = None, **_: Any
  ) -> list[str]:
    return fn(arch, include_top, pooling)  # Family options: no effect.

  return call


def register(
  arch: str,
  family: str,
  build: Callable[..., nn.Module],
  layer_names: Callable[..., list[str]],
  output_layers: Callable[..., list[str]],
  preprocess: str = "torch",
  **fields: Any,
) -> None:
  """Registers a PyTorch-named backbone; fields: the rest of its Backbone."""
  registry.register(
    registry.Backbone(
      arch=arch,
      family=family,
      build=build,
      layer_names=layer_names,
      output_layers=output_layers,
      preprocess=preprocess,
      naming="torch",
      **fields,
    )
  )


def register_family(
  family: str,
  model: type[nn.Module],
  archs: Iterable[str],
  layer_names: Callable[[str, bool, str | None], list[str]],
  module_paths: Callable[[str, bool, str | None], list[str]],
  **fields: Any,
) -> None:
  """`register`s `model(arch=arch)` for each arch of a family.

  layer_names, module_paths: (arch, include_top, pooling) -> module paths.
  """
  for arch in archs:
    register(
      arch,
      family,
      functools.partial(model, arch=arch),
      _for_arch(layer_names, arch),
      _for_arch(module_paths, arch),
      **fields,
    )


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow's 'SAME' padding (more after than before when odd)."""
  out = math.ceil(size / stride)
  pad = max((out - 1) * stride + kernel - size, 0)
  return pad // 2, pad - pad // 2


@dataclasses.dataclass(frozen=True)
class Layers:
  """Creates torch layers in the calling module's compact method.

  Each layer becomes a child of that module under `name`, holding its
  parameters the way the weight mappings write them.
  """

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def conv(
    self,
    x: jax.Array,
    features: int,
    kernel_size: int,
    name: str,
    stride: int = 1,
    padding: int | str = 0,
    groups: int = 1,
    bias: bool = False,
  ) -> jax.Array:
    """torch.nn.Conv2d; padding is torch's symmetric int or 'tf_same'."""
    if padding == "tf_same":
      pads = tuple(
        tf_same_padding(n, kernel_size, stride) for n in x.shape[1:3]
      )
    else:
      pads = ((padding, padding), (padding, padding))
    return nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(stride, stride),
      padding=pads,
      feature_group_count=groups,
      conv_general_dilated=conv_ops.conv_general_dilated,
      use_bias=bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=conv_init,
      name=name,
    )(x)

  def bn(
    self,
    x: jax.Array,
    train: Any,
    name: str,
    eps: float = TORCH_BN_EPS,
    momentum: float = BN_MOMENTUM,
  ) -> jax.Array:
    """torch.nn.BatchNorm2d (Keras' frozen-layer rule via `train`)."""
    bn = common.BatchNorm(
      momentum=momentum,
      epsilon=eps,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )
    return bn(x, train)

  def linear(
    self,
    x: jax.Array,
    features: int,
    name: str,
    kernel_init: Any = linear_init,
  ) -> jax.Array:
    """torch.nn.Linear."""
    return nn.Dense(
      features,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=kernel_init,
      bias_init=nn.initializers.zeros_init(),
      name=name,
    )(x)


def max_pool(
  x: jax.Array, kernel: int, stride: int, padding: int = 0
) -> jax.Array:
  """torch.nn.MaxPool2d (padding counts as -inf, floor mode)."""
  return nn.max_pool(
    x,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((padding, padding), (padding, padding)),
  )


def adaptive_avg_pool(x: jax.Array, out: tuple[int, int]) -> jax.Array:
  """torch.nn.AdaptiveAvgPool2d: bin i is [floor(i*n/o), ceil((i+1)*n/o))."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(out):
    return x
  ph, pw = _pool_matrix(h, out[0]), _pool_matrix(w, out[1])
  return jnp.einsum(
    "nhwc,oh,pw->nopc", x, ph.astype(x.dtype), pw.astype(x.dtype)
  )


def _pool_matrix(n: int, o: int) -> jax.Array:
  rows = []
  for i in range(o):
    start, end = (i * n) // o, -((-(i + 1) * n) // o)
    rows.append(
      [1.0 / (end - start) if start <= j < end else 0.0 for j in range(n)]
    )
  return jnp.asarray(rows, jnp.float32)


def dropout(x: jax.Array, rate: float, train: Any, name: str) -> jax.Array:
  """torch.nn.Dropout: active while training (needs a 'dropout' rng)."""
  if not rate:
    return x
  return nn.Dropout(rate, deterministic=not train, name=name)(x)


def logits(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def pool(taps: common.Taps, x: jax.Array, pooling: str | None) -> jax.Array:
  """Without the top: the global pool, as module 'avgpool' / 'maxpool'."""
  if pooling is None:
    return x
  return taps(pool_module(pooling), common.global_pool(x, pooling))


def output(x: jax.Array, include_top: bool, dtype: Any) -> jax.Array:
  """Logits in float32; features in the compute dtype."""
  return x.astype(jnp.float32 if include_top else dtype)


def tools(module: nn.Module) -> tuple[Layers, common.Taps]:
  """A container's `Layers` (its dtypes) and `Taps` (its `stop`)."""
  return Layers(module.dtype, module.param_dtype), common.Taps(module.stop)


ACTIVATIONS = {
  "relu": nn.relu,
  "relu6": nn.relu6,
  "silu": nn.silu,
  "hardswish": nn.hard_swish,
}


class ConvNormActivation(nn.Module):
  """torchvision.ops.Conv2dNormActivation: children '0' conv, '1' BN, '2'.

  `stop` is the part of output_layer inside this module ('1' stops after the
  BatchNorm); the caller's `common.Taps.run` catches it.
  """

  features: int
  kernel_size: int = 3
  stride: int = 1
  groups: int = 1
  activation: str | None = "relu"
  eps: float = TORCH_BN_EPS
  padding: int | str | None = None  # None: (kernel_size - 1) // 2.
  stop: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    layers, taps = Layers(self.dtype, self.param_dtype), common.Taps(self.stop)
    pad = (self.kernel_size - 1) // 2 if self.padding is None else self.padding
    x = layers.conv(
      x, self.features, self.kernel_size, "0", self.stride, pad, self.groups
    )
    x = taps("0", x)
    x = taps("1", layers.bn(x, train, "1", eps=self.eps))
    if self.activation is not None:
      x = taps("2", ACTIVATIONS[self.activation](x))
    return x


def conv_norm_activation_leaves(activation: str | None = "relu") -> list[str]:
  return ["0", "1"] + (["2"] if activation is not None else [])
