"""Keras functional models in Flax, each written once for two uses.

A family writes its architecture as `forward(net, x, config)`, calling
`net.conv(...)`, `net.bn(...)`, `net.act(...)`, ... with the arguments and
names of the Keras layers, in the order the Keras source creates them (auto
names such as `conv2d_7` count in that order). `Compute` runs it inside a
Flax module: parameters named like the Keras layers, Keras' shapes and
numerics. `Record` runs it on layer names and (h, w, c) shapes only (some
Keras code branches on shapes, e.g. NASNet) and keeps which layer feeds
which; `layer_names` then orders the layers the way Keras' `model.layers`
does (deepest first, ties by first visit from the output:
keras/src/ops/function.py `map_graph`), which is not call order for
branching models such as InceptionV3.

    define("xception", forward, min_size=71)
    KerasApp(arch="xception", include_top=False).apply(variables, x)
    layer_names("xception", include_top=False)  # Keras' model.layers names

`flaxtl.models.keras_graph` does the same for ResNet and DenseNet, whose
Keras code needs only named Conv/BN/ReLU/pool/add/concat layers; these
families also need separable and grouped convolutions, LayerNormalization,
Sequentials inside the model, Keras' per-class auto names, shapes while
recording (NASNet), and the class keys of Keras 3 weight files. Both use
`keras_graph.keras_order`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from flaxtl.errors import UserError
from flaxtl.models import common
from flaxtl.models.keras_graph import keras_order

INPUT = "input_layer"

# Keras' default initialisers, so a model trained from scratch starts where
# the Keras one does.
kernel_init = nn.initializers.glorot_uniform()
zeros = nn.initializers.zeros_init()


@dataclasses.dataclass(frozen=True)
class Arch:
  forward: Callable[..., Any]  # forward(net, x, config) -> output.
  min_size: int
  default_size: int = 224  # Recording runs at this size (Keras' default).


_ARCHS: dict[str, Arch] = {}


def define(
  arch: str,
  forward: Callable[..., Any],
  min_size: int,
  default_size: int = 224,
) -> None:
  """Declares `arch`'s forward function (see the module docstring)."""
  if arch in _ARCHS:
    raise ValueError(f"architecture {arch!r} defined twice")
  _ARCHS[arch] = Arch(forward, min_size, default_size)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _Names:
  """Keras' auto names: snake_case class name + a per-class counter."""

  def __init__(self):
    self.counts: dict[str, int] = {}

  def __call__(self, kind: str, name: str | None) -> str:
    if name is not None:
      return name
    n = self.counts.get(kind, 0)
    self.counts[kind] = n + 1
    return kind if n == 0 else f"{kind}_{n}"


class Net:
  """The layer calls an architecture makes; defaults are Keras'."""

  def __init__(self):
    self.names = _Names()

  # Subclasses implement `_layer` (and `channels`, `spatial`, `plus`).
  def _layer(self, kind: str, name: str | None, inputs: list, fn, **kw):
    raise NotImplementedError

  def conv(
    self,
    x,
    filters: int,
    kernel_size,
    strides=1,
    padding: str = "valid",
    use_bias: bool = True,
    groups: int = 1,
    name: str | None = None,
  ):
    """Conv2D: `kernel` (kh, kw, cin // groups, filters) [+ `bias`]."""
    return self._layer(
      "conv2d",
      name,
      [x],
      Conv,
      shape=_window(kernel_size, strides, padding, filters),
      filters=filters,
      kernel_size=_pair(kernel_size),
      strides=_pair(strides),
      padding=padding,
      use_bias=use_bias,
      groups=groups,
    )

  def sepconv(
    self,
    x,
    filters: int,
    kernel_size,
    strides=1,
    padding: str = "valid",
    use_bias: bool = True,
    name: str | None = None,
  ):
    """SeparableConv2D: `depthwise_kernel`, `pointwise_kernel` [+ `bias`]."""
    return self._layer(
      "separable_conv2d",
      name,
      [x],
      SeparableConv,
      shape=_window(kernel_size, strides, padding, filters),
      filters=filters,
      kernel_size=_pair(kernel_size),
      strides=_pair(strides),
      padding=padding,
      use_bias=use_bias,
    )

  def bn(
    self,
    x,
    scale: bool = True,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    name: str | None = None,
  ):
    return self._layer(
      "batch_normalization",
      name,
      [x],
      common.BatchNorm,
      use_scale=scale,
      momentum=momentum,
      epsilon=epsilon,
    )

  def dense(self, x, units: int, name: str | None = None):
    return self._layer(
      "dense",
      name,
      [x],
      nn.Dense,
      shape=lambda s: (*s[:-1], units),
      features=units,
      kernel_init=kernel_init,
      bias_init=zeros,
    )

  def layernorm(self, x, epsilon: float = 1e-3, name: str | None = None):
    return self._layer(
      "layer_normalization",
      name,
      [x],
      nn.LayerNorm,
      epsilon=epsilon,
      use_fast_variance=False,
    )

  def layer_scale(self, x, init_value: float, dim: int, name: str):
    return self._layer(
      "layer_scale", name, [x], LayerScale, init_value=init_value, dim=dim
    )

  def act(self, x, activation: str, name: str | None = None):
    return self._layer(
      "activation", name, [x], None, op=_ACTIVATIONS[activation]
    )

  def max_pool(self, x, pool_size, strides=None, padding="valid", name=None):
    op = functools.partial(
      _max_pool,
      size=_pair(pool_size),
      strides=_pair(strides or pool_size),
      padding=padding,
    )
    shape = _window(pool_size, strides or pool_size, padding)
    return self._layer("max_pooling2d", name, [x], None, op=op, shape=shape)

  def avg_pool(self, x, pool_size, strides=None, padding="valid", name=None):
    op = functools.partial(
      _avg_pool,
      size=_pair(pool_size),
      strides=_pair(strides or pool_size),
      padding=padding,
    )
    shape = _window(pool_size, strides or pool_size, padding)
    return self._layer("average_pooling2d", name, [x], None, op=op, shape=shape)

  def global_avg_pool(self, x, name: str | None = None):
    op = functools.partial(jnp.mean, axis=(1, 2))
    return self._layer(
      "global_average_pooling2d", name, [x], None, op=op, shape=_pooled
    )

  def global_max_pool(self, x, name: str | None = None):
    op = functools.partial(jnp.max, axis=(1, 2))
    return self._layer(
      "global_max_pooling2d", name, [x], None, op=op, shape=_pooled
    )

  def add(self, xs: list, name: str | None = None):
    return self._layer("add", name, xs, None, op=_sum)

  def concat(self, xs: list, name: str | None = None):
    op = functools.partial(jnp.concatenate, axis=-1)
    return self._layer(
      "concatenate",
      name,
      xs,
      None,
      op=lambda *a: op(a),
      shape=lambda *s: (*s[0][:-1], sum(c[-1] for c in s)),
    )

  def custom_scale(self, xs: list, scale: float, name: str | None = None):
    """InceptionResNetV2's CustomScaleLayer: xs[0] + xs[1] * scale."""
    return self._layer(
      "custom_scale_layer", name, xs, None, op=lambda a, b: a + b * scale
    )

  def zero_pad(self, x, padding, name: str | None = None):
    (top, bottom), (left, right) = padding
    op = functools.partial(
      jnp.pad, pad_width=((0, 0), (top, bottom), (left, right), (0, 0))
    )
    return self._layer(
      "zero_padding2d",
      name,
      [x],
      None,
      op=op,
      shape=lambda s: (s[0] + top + bottom, s[1] + left + right, s[2]),
    )

  def crop(self, x, cropping, name: str | None = None):
    (top, bottom), (left, right) = cropping

    def op(a):
      h, w = a.shape[1], a.shape[2]
      return a[:, top : h - bottom, left : w - right]

    return self._layer(
      "cropping2d",
      name,
      [x],
      None,
      op=op,
      shape=lambda s: (s[0] - top - bottom, s[1] - left - right, s[2]),
    )

  def normalization(self, x, mean, variance, name: str | None = None):
    """Keras' Normalization with fixed statistics (no weights)."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.maximum(jnp.sqrt(jnp.asarray(variance, jnp.float32)), 1e-7)
    op = lambda a: ((a - mean) / std).astype(a.dtype)  # noqa: E731
    return self._layer("normalization", name, [x], None, op=op)

  def sequential(self, x, name: str, body: Callable[[Net, Any], Any]):
    """A Keras Sequential used as one layer: `body(net, x)` its layers."""
    raise NotImplementedError

  def plus(self, a, b):
    """`a + b` on Keras tensors: an operation, not a layer."""
    raise NotImplementedError

  def channels(self, x) -> int:
    raise NotImplementedError

  def spatial(self, x) -> tuple[int, int]:
    raise NotImplementedError


def _window(kernel_size, strides, padding, filters=None):
  """The output shape (h, w, c) of a convolution or pooling, as Keras'."""
  (kh, kw), (sh, sw) = _pair(kernel_size), _pair(strides)

  def size(n, k, step):
    return -(-n // step) if padding == "same" else (n - k) // step + 1

  return lambda s: (size(s[0], kh, sh), size(s[1], kw, sw), filters or s[2])


def _pooled(s):
  return (s[-1],)


def _sum(*xs):
  return functools.reduce(jnp.add, xs)


def _linear(x):
  return x


_ACTIVATIONS = {
  "relu": nn.relu,
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
  "linear": _linear,
}


def _max_pool(x, size, strides, padding):
  return lax.reduce_window(
    x,
    -jnp.inf,
    lax.max,
    (1, *size, 1),
    (1, *strides, 1),
    padding.upper(),
  )


def _avg_pool(x, size, strides, padding):
  """Keras' average: 'same' padding is left out of the count."""
  dims, steps = (1, *size, 1), (1, *strides, 1)
  total = lax.reduce_window(x, 0.0, lax.add, dims, steps, padding.upper())
  if padding == "valid":
    return total / (size[0] * size[1])
  ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
  count = lax.reduce_window(ones, 0.0, lax.add, dims, steps, padding.upper())
  return total / count


# ---------------------------------------------------------------------------
# Recording: names, edges and shapes only.


class Record(Net):
  """Runs a forward on layer names and shapes; `parents` is the graph."""

  def __init__(self, input_shape: tuple[int, ...] = (224, 224, 3), names=None):
    super().__init__()
    if names is not None:
      self.names = names
    self.shapes: dict[str, tuple[int, ...]] = {INPUT: tuple(input_shape)}
    self.parents: dict[str, tuple[str, ...]] = {INPUT: ()}
    self.is_layer: dict[str, bool] = {INPUT: True}
    self.kind: dict[str, str] = {INPUT: "input_layer"}  # Keras class.
    self.weighted: set[str] = set()
    self.inner: dict[str, Record] = {}  # Sequentials' own layers.
    self._ops = 0

  def input(self) -> str:
    return INPUT

  def _node(self, name: str, inputs, kind: str | None) -> str:
    if name in self.parents:
      raise ValueError(f"layer name {name!r} used twice")
    self.parents[name] = tuple(inputs)
    self.is_layer[name] = kind is not None
    if kind is not None:
      self.kind[name] = kind
    return name

  def _layer(self, kind, name, inputs, fn, shape=None, **kw):
    name = self.names(kind, name)
    if fn is not None:
      self.weighted.add(name)
    shapes = [self.shapes[i] for i in inputs]
    self.shapes[name] = shape(*shapes) if shape else shapes[0]
    return self._node(name, inputs, kind)

  def sequential(self, x, name, body):
    inner = Record(self.shapes[x], self.names)
    out = body(inner, inner.input())
    self.inner[name] = inner
    self.shapes[name] = inner.shapes[out]
    return self._node(name, [x], "sequential")

  def plus(self, a, b):
    self._ops += 1
    name = f"<op {self._ops}>"
    self.shapes[name] = self.shapes[a]
    return self._node(name, [a, b], None)

  def channels(self, x) -> int:
    return self.shapes[x][-1]

  def spatial(self, x) -> tuple[int, int]:
    return self.shapes[x][0], self.shapes[x][1]


@dataclasses.dataclass(frozen=True)
class _Config:
  """What a forward reads from its module, for recording."""

  arch: str
  include_top: bool
  pooling: str | None
  num_classes: int = 1000


@dataclasses.dataclass(frozen=True)
class Layers:
  """A recorded model, as Keras lists and stores it.

  names: `[l.name for l in model.layers]`, input included.
  weighted: the parameter layers in Keras' weight order; a Sequential's
    layers as 'sequential_name/layer_name', like the Flax variables.
  kinds: parameter layer -> its Keras class, snake_case ('conv2d').
  keys: parameter layer -> its group names in a Keras 3 weights file
    (`layers/<class>[_<rank among that class in model.layers>]`, nested for
    Sequentials: ('sequential', 'conv2d')).
  """

  names: tuple[str, ...]
  weighted: tuple[str, ...]
  kinds: dict[str, str]
  keys: dict[str, tuple[str, ...]]


def _weighted(
  rec: Record, order: list[str]
) -> list[tuple[str, str, tuple[str, ...]]]:
  """(path, kind, keys) of each parameter layer, in Keras' order."""
  out, ranks = [], {}
  for name in order:
    kind = rec.kind[name]
    rank = ranks[kind] = ranks.get(kind, -1) + 1
    key = kind if rank == 0 else f"{kind}_{rank}"
    if name in rec.inner:  # A Sequential's layers, without its input.
      sub = rec.inner[name]
      inner = [n for n in sub.parents if sub.is_layer[n]][1:]
      out += [
        (f"{name}/{path}", k, (key, *keys))
        for path, k, keys in _weighted(sub, inner)
      ]
    elif name in rec.weighted:
      out.append((name, kind, (key,)))
  return out


@functools.cache
def recorded(
  arch: str, include_top: bool = True, pooling: str | None = None
) -> Layers:
  """The Keras model's layers, recorded from `arch`'s forward (cached)."""
  spec = _get(arch)
  rec = Record((spec.default_size, spec.default_size, 3))
  out = spec.forward(rec, rec.input(), _Config(arch, include_top, pooling))
  order = [n for n in keras_order(rec.parents, out) if rec.is_layer[n]]
  weighted = _weighted(rec, order)
  return Layers(
    names=tuple(order),
    weighted=tuple(p for p, _, _ in weighted),
    kinds={p: k for p, k, _ in weighted},
    keys={p: keys for p, _, keys in weighted},
  )


def layer_names(
  arch: str, include_top: bool = True, pooling: str | None = None
) -> list[str]:
  """`[l.name for l in model.layers]` of the Keras model, input included."""
  return list(recorded(arch, include_top, pooling).names)


def _get(arch: str) -> Arch:
  if arch not in _ARCHS:
    raise UserError(
      f"unknown architecture {arch!r}; expected one of {sorted(_ARCHS)}"
    )
  return _ARCHS[arch]


# ---------------------------------------------------------------------------
# Computing: Flax layers with Keras' parameter names and shapes.


class Conv(nn.Module):
  """Keras Conv2D ('same' is TensorFlow's: extra padding bottom/right)."""

  filters: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: str = "valid"
  use_bias: bool = True
  groups: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    shape = (*self.kernel_size, cin // self.groups, self.filters)
    kernel = self.param("kernel", kernel_init, shape, self.param_dtype)
    y = lax.conv_general_dilated(
      x.astype(self.dtype),
      kernel.astype(self.dtype),
      self.strides,
      self.padding.upper(),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=self.groups,
    )
    if self.use_bias:
      bias = self.param("bias", zeros, (self.filters,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class SeparableConv(nn.Module):
  """Keras SeparableConv2D (depth multiplier 1): depthwise, then 1x1."""

  filters: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: str = "valid"
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    depthwise = self.param(
      "depthwise_kernel",
      kernel_init,
      (*self.kernel_size, cin, 1),
      self.param_dtype,
    )
    pointwise = self.param(
      "pointwise_kernel",
      kernel_init,
      (1, 1, cin, self.filters),
      self.param_dtype,
    )
    dn = ("NHWC", "HWIO", "NHWC")
    y = lax.conv_general_dilated(
      x.astype(self.dtype),
      depthwise.reshape(*self.kernel_size, 1, cin).astype(self.dtype),
      self.strides,
      self.padding.upper(),
      dimension_numbers=dn,
      feature_group_count=cin,
    )
    y = lax.conv_general_dilated(
      y, pointwise.astype(self.dtype), (1, 1), "VALID", dimension_numbers=dn
    )
    if self.use_bias:
      bias = self.param("bias", zeros, (self.filters,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class LayerScale(nn.Module):
  """ConvNeXt's LayerScale: x * gamma."""

  init_value: float
  dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param(
      "gamma",
      nn.initializers.constant(self.init_value),
      (self.dim,),
      self.param_dtype,
    )
    return x * gamma.astype(self.dtype)


class _Sequential(nn.Module):
  """A Keras Sequential inside the model: its layers nest under its name."""

  body: Callable[[Net, Any], Any]
  names: _Names  # The model's auto-name counters, shared as in Keras.
  train: Any = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    net = Compute(common.Taps(), self.train, self.dtype, self.param_dtype)
    net.names = self.names
    return self.body(net, x)


class Compute(Net):
  """Runs a forward inside a Flax module's compact `__call__`.

  Layers become submodules of that module, named like the Keras layers; each
  output passes through `taps`, which stops the pass at `output_layer`.
  """

  def __init__(self, taps: common.Taps, train, dtype, param_dtype):
    super().__init__()
    self.taps, self.train = taps, train
    self.dtype, self.param_dtype = dtype, param_dtype

  def _layer(self, kind, name, inputs, fn, op=None, shape=None, **kw):
    name = self.names(kind, name)
    if fn is common.BatchNorm:
      module = fn(
        dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw
      )
      y = module(inputs[0], self.train)
    elif fn is not None:
      module = fn(
        dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw
      )
      y = module(inputs[0])
    else:
      y = op(*inputs)
    return self.taps(name, y)

  def sequential(self, x, name, body):
    sequential = _Sequential(
      body, self.names, self.train, self.dtype, self.param_dtype, name=name
    )
    y = sequential(x)
    return self.taps(name, y)

  def plus(self, a, b):
    return a + b

  def channels(self, x) -> int:
    return int(x.shape[-1])

  def spatial(self, x) -> tuple[int, int]:
    return int(x.shape[1]), int(x.shape[2])


class KerasApp(nn.Module):
  """A `keras.applications` model defined with `define`.

  Attributes:
    arch: the registry name ('xception', 'inception_v3', 'convnext_tiny').
    include_top: keep Keras' classifier (logits, no softmax).
    num_classes: outputs of that classifier.
    pooling: without the top, None (4D features), 'avg' or 'max'.
    output_layer: stop at this Keras layer and return its output.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
  """

  arch: str
  include_top: bool = True
  num_classes: int = 1000
  pooling: str | None = None
  output_layer: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    spec = _get(self.arch)
    if self.pooling not in (None, "avg", "max"):
      raise UserError(
        f"pooling must be None, 'avg' or 'max', got {self.pooling!r}"
      )
    names = layer_names(self.arch, self.include_top, self.pooling)
    common.check_output_layer(self.arch, self.output_layer, names)
    common.check_input(self.arch, tuple(x.shape), spec.min_size)
    taps = common.Taps(self.output_layer)
    net = Compute(taps, train, self.dtype, self.param_dtype)
    x = x.astype(self.dtype)
    y = taps.run(lambda: spec.forward(net, x, self))
    if self.include_top and self.output_layer in (None, names[-1]):
      y = y.astype(jnp.float32)
    return y
