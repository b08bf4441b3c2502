"""Keras functional models in Flax, each written once for two uses.

Every Keras family (ResNet, DenseNet, MobileNet, EfficientNet, Xception,
Inception, ConvNeXt, NASNet) writes its architecture as `forward(net, x,
config)`, calling `net.conv(...)`, `net.bn(...)`, `net.act(...)`, ... with
the arguments and names of the Keras layers, in the order the Keras source
creates them (unnamed layers get Keras' per-class auto names, `conv2d_7`,
`re_lu_3`, counted in that order):

    def forward(net, x, config):
      x = net.zero_pad(x, 3, name="conv1_pad")
      x = net.conv(x, 64, 7, strides=2, name="conv1_conv")
      ...

    define("resnet50", forward, min_size=32)
    KerasApp(arch="resnet50", include_top=False).apply(variables, x)
    layer_names("resnet50", include_top=False)  # Keras' model.layers names

`Record` runs it on layer names and (h, w, c) shapes (some Keras code
branches on shapes: NASNet) and keeps which layer feeds which; `recorded`
lists the layers the way Keras' `model.layers` does (`keras_order`), with
each weighted layer's array shapes and Keras 3 file keys. `Compute` runs it
inside `KerasApp`: parameters flat and named like the Keras layers (a Keras
Sequential's nest under it), Keras' shapes and numerics. A model cut at
`output_layer` computes, and has parameters for, only the layers that one
depends on, like Keras' `Model(inputs, model.get_layer(name).output)`. One
definition gives both, so the layer list `freeze.first_layers` counts and
the parameter tree cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import types
from typing import Any, ClassVar

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from flaxtl.errors import UserError
from flaxtl.models import common, registry
from flaxtl.ops import conv as conv_ops

INPUT = "input_layer"  # Keras 3's name for a model's first input.
NORMALIZATION_EPSILON = 1e-7  # keras.backend.epsilon(), Normalization's floor.

# Keras' default initialisers, so a model trained from scratch starts where
# the Keras one does.
kernel_init = nn.initializers.glorot_uniform()
zeros = nn.initializers.zeros_init()


def _linear(x):
  return x


ACTIVATIONS: dict[str | None, Callable[[jax.Array], jax.Array]] = {
  None: _linear,
  "linear": _linear,
  "relu": nn.relu,
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
  "swish": nn.silu,
  "sigmoid": nn.sigmoid,
  "hard_swish": jax.nn.hard_silu,
  "softmax": jax.nn.softmax,
}


# ---------------------------------------------------------------------------
# Architectures and Keras' helpers.


@dataclasses.dataclass(frozen=True)
class Arch:
  forward: Callable[..., Any]  # forward(net, x, config) -> output.
  min_size: int
  default_size: int = 224  # Recording runs at this size (Keras' default).
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_ARCHS: dict[str, Arch] = {}


def define(
  arch: str,
  forward: Callable[..., Any],
  min_size: int,
  default_size: int = 224,
  options: Mapping[str, Any] | None = None,
) -> None:
  """Declares `arch`'s forward function (see the module docstring).

  options: the family options that change the layers (MobileNet's alpha),
  with their defaults; the forward reads them from its `config`.
  """
  if arch in _ARCHS:
    raise ValueError(f"architecture {arch!r} defined twice")
  _ARCHS[arch] = Arch(forward, min_size, default_size, dict(options or {}))


def register(
  arch: str,
  forward: Callable[..., Any],
  *,
  family: str,
  min_size: int,
  feature_layer: str | None = None,
  classifier: str = "predictions",
  preprocess: str = "none",
  batch_stats: bool = True,
  stem_layers: tuple[str, ...] = (),
  layer_options: Mapping[str, Any] | None = None,
  build: Callable[..., nn.Module] | None = None,
  default_size: int = 224,
  **fields: Any,
) -> registry.Backbone:
  """`define`s a Keras architecture and registers it: one call per arch.

  layer_options: options that change the layers (alpha), with defaults.
  build: the module class (default `KerasApp`); feature_layer: default the
  last layer without the top. fields: the rest of its `registry.Backbone`.
  """
  layer_options = dict(layer_options or {})
  define(arch, forward, min_size, default_size, layer_options)

  def names(include_top=True, pooling=None, **options):
    return layer_names(arch, include_top, pooling, **options)

  return registry.register(
    registry.Backbone(
      arch=arch,
      family=family,
      build=functools.partial(build or KerasApp, arch=arch),
      layer_names=names,
      preprocess=preprocess,
      min_size=min_size,
      feature_layer=feature_layer or names(include_top=False)[-1],
      classifier=classifier,
      batch_stats=batch_stats,
      stem_layers=stem_layers,
      options={"classifier_activation": None, **layer_options},
      **fields,
    )
  )


def _get(arch: str) -> Arch:
  if arch not in _ARCHS:
    raise UserError(
      f"unknown architecture {arch!r}; expected one of {sorted(_ARCHS)}"
    )
  return _ARCHS[arch]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None):
  """Keras' `_make_divisible` / `_depth`: round to a multiple of `divisor`."""
  min_value = divisor if min_value is None else min_value
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


def correct_pad(size: Sequence[int], kernel: int):
  """`imagenet_utils.correct_pad` for a known input size: TF 'same' padding
  before a stride of 2, as ((top, bottom), (left, right))."""
  adjust = (1 - size[0] % 2, 1 - size[1] % 2)
  k = kernel // 2
  return ((k - adjust[0], k), (k - adjust[1], k))


def pooled(net: Net, x, config, avg_name=None, max_name=None):
  """Keras' `pooling` argument without the top: None, 'avg' or 'max'."""
  if config.pooling == "avg":
    return net.global_avg_pool(x, name=avg_name)
  if config.pooling == "max":
    return net.global_max_pool(x, name=max_name)
  return x


def classifier_top(net: Net, x, config, avg_name=None, max_name=None):
  """The top most families share: global 'avg_pool' and the 'predictions'
  Dense; without it, Keras' `pooling` (`pooled`)."""
  if config.include_top:
    x = net.global_avg_pool(x, name="avg_pool")
    return net.dense(
      x,
      config.num_classes,
      activation=config.classifier_activation,
      name="predictions",
    )
  return pooled(net, x, config, avg_name, max_name)


# ---------------------------------------------------------------------------
# The layer vocabulary.


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _padding2d(p) -> tuple[tuple[int, int], tuple[int, int]]:
  """ZeroPadding2D / Cropping2D's argument: n, (rows, cols) or nested."""
  if isinstance(p, int):
    return ((p, p), (p, p))
  rows, cols = p
  rows = (rows, rows) if isinstance(rows, int) else tuple(rows)
  cols = (cols, cols) if isinstance(cols, int) else tuple(cols)
  return rows, cols


def _window(kernel_size, strides, padding, filters=None):
  """The output shape (h, w, c) of a convolution or pooling, as Keras'."""
  (kh, kw), (sh, sw) = _pair(kernel_size), _pair(strides)

  def size(n, k, step):
    return -(-n // step) if padding == "same" else (n - k) // step + 1

  return lambda s: (size(s[0], kh, sh), size(s[1], kw, sw), filters or s[2])


def _op(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """A weightless layer's computation, given its name and inputs."""
  return lambda name, *arrays: fn(*arrays)


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
  """The Keras layers an architecture calls; defaults are Keras'.

  Every method takes the layer's arguments as Keras does, `name=None`
  meaning Keras' auto name, and returns its output. Subclasses say what a
  tensor is through `_layer`, `op`, `sequential` and `shape`.
  """

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  train: Any = False

  def __init__(self, names: _Names | None = None):
    self.names = names or _Names()

  def _layer(
    self,
    kind: str,
    name: str | None,
    inputs: Sequence[Any],
    fn: Callable[..., jax.Array],
    shape: Callable[..., tuple[int, ...]] | None = None,
    weights: Callable[..., list[tuple[int, ...]]] | None = None,
  ) -> Any:
    """One layer of Keras class `kind` (snake_case).

    fn(name, *arrays): its output; shape(*input shapes): its output shape
    (default: the first input's); weights(*input shapes): its arrays' shapes
    in Keras' stored order, for layers with weights.
    """
    raise NotImplementedError

  def op(self, fn: Callable[..., jax.Array], *xs) -> Any:
    """A tensor operation between layers (`x + 3.0`): no layer in Keras 3."""
    raise NotImplementedError

  def sequential(self, x, name: str, body: Callable[[Net, Any], Any]):
    """A Keras Sequential used as one layer: `body(net, x)` its layers."""
    raise NotImplementedError

  def shape(self, x) -> tuple[int, ...]:
    """x's shape without the batch: (h, w, c) or (c,)."""
    raise NotImplementedError

  def channels(self, x) -> int:
    return self.shape(x)[-1]

  def spatial(self, x) -> tuple[int, int]:
    return self.shape(x)[0], self.shape(x)[1]

  def _module(self, cls, name: str, **kw) -> nn.Module:
    return cls(dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)

  # --- Layers with weights.

  def conv(
    self,
    x,
    filters: int,
    kernel_size,
    strides=1,
    padding: str = "valid",
    use_bias: bool = True,
    groups: int = 1,
    activation: str | None = None,
    kernel_initializer=kernel_init,
    name: str | None = None,
  ):
    """Conv2D: `kernel` (kh, kw, cin // groups, filters) [+ `bias`]."""
    ks, st = _pair(kernel_size), _pair(strides)

    def fn(name, a):
      y = self._module(
        Conv,
        name,
        filters=filters,
        kernel_size=ks,
        strides=st,
        padding=padding,
        use_bias=use_bias,
        groups=groups,
        kernel_init=kernel_initializer,
      )(a)
      return ACTIVATIONS[activation](y)

    return self._layer(
      "conv2d",
      name,
      [x],
      fn,
      shape=_window(ks, st, padding, filters),
      weights=lambda s: (
        [(*ks, s[-1] // groups, filters)] + ([(filters,)] if use_bias else [])
      ),
    )

  def depthwise_conv(
    self,
    x,
    kernel_size,
    strides=1,
    padding: str = "valid",
    use_bias: bool = True,
    depthwise_initializer=kernel_init,
    name: str | None = None,
  ):
    """DepthwiseConv2D (multiplier 1): `depthwise_kernel` (kh, kw, c, 1)."""
    ks, st = _pair(kernel_size), _pair(strides)

    def fn(name, a):
      return self._module(
        DepthwiseConv,
        name,
        kernel_size=ks,
        strides=st,
        padding=padding,
        use_bias=use_bias,
        kernel_init=depthwise_initializer,
      )(a)

    return self._layer(
      "depthwise_conv2d",
      name,
      [x],
      fn,
      shape=_window(ks, st, padding),
      weights=lambda s: [(*ks, s[-1], 1)] + ([(s[-1],)] if use_bias else []),
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
    ks, st = _pair(kernel_size), _pair(strides)

    def fn(name, a):
      return self._module(
        SeparableConv,
        name,
        filters=filters,
        kernel_size=ks,
        strides=st,
        padding=padding,
        use_bias=use_bias,
      )(a)

    return self._layer(
      "separable_conv2d",
      name,
      [x],
      fn,
      shape=_window(ks, st, padding, filters),
      weights=lambda s: (
        [(*ks, s[-1], 1), (1, 1, s[-1], filters)]
        + ([(filters,)] if use_bias else [])
      ),
    )

  def bn(
    self,
    x,
    scale: bool = True,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    name: str | None = None,
  ):
    """BatchNormalization: `scale` (unless scale=False), `bias`; batch_stats
    `mean`, `var`. Keras' frozen-layer rule: `common.BatchNorm`."""

    def fn(name, a):
      bn = self._module(
        common.BatchNorm,
        name,
        use_scale=scale,
        momentum=momentum,
        epsilon=epsilon,
      )
      return bn(a, self.train)

    return self._layer(
      "batch_normalization",
      name,
      [x],
      fn,
      weights=lambda s: [(s[-1],)] * (4 if scale else 3),
    )

  def dense(
    self,
    x,
    units: int,
    activation: str | None = None,
    kernel_initializer=kernel_init,
    name: str | None = None,
  ):
    def fn(name, a):
      y = self._module(
        nn.Dense,
        name,
        features=units,
        kernel_init=kernel_initializer,
        bias_init=zeros,
      )(a)
      return ACTIVATIONS[activation](y)

    return self._layer(
      "dense",
      name,
      [x],
      fn,
      shape=lambda s: (*s[:-1], units),
      weights=lambda s: [(s[-1], units), (units,)],
    )

  def layernorm(self, x, epsilon: float = 1e-3, name: str | None = None):
    def fn(name, a):
      return self._module(
        nn.LayerNorm, name, epsilon=epsilon, use_fast_variance=False
      )(a)

    return self._layer(
      "layer_normalization",
      name,
      [x],
      fn,
      weights=lambda s: [(s[-1],), (s[-1],)],
    )

  def layer_scale(self, x, init_value: float, dim: int, name: str):
    """ConvNeXt's LayerScale: x * `gamma`."""

    def fn(name, a):
      return self._module(LayerScale, name, init_value=init_value, dim=dim)(a)

    return self._layer("layer_scale", name, [x], fn, weights=lambda s: [(dim,)])

  def normalization(self, x, mean=None, variance=None, name: str | None = None):
    """Keras' Normalization: with fixed statistics (no weights), or its own
    adapted mean, variance and count (in 'batch_stats', never updated)."""
    if mean is None:
      return self._layer(
        "normalization",
        name,
        [x],
        lambda name, a: Normalization(dtype=self.dtype, name=name)(a),
        weights=lambda s: [(s[-1],), (s[-1],), ()],
      )
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.sqrt(jnp.asarray(variance, jnp.float32))
    std = jnp.maximum(std, NORMALIZATION_EPSILON)
    op = lambda a: ((a - mean) / std).astype(a.dtype)  # noqa: E731
    return self._layer("normalization", name, [x], _op(op))

  # --- Layers without weights.

  def rescaling(self, x, scale, offset=0.0, name: str | None = None):
    def op(a):
      return a * jnp.asarray(scale, a.dtype) + jnp.asarray(offset, a.dtype)

    return self._layer("rescaling", name, [x], _op(op))

  def act(self, x, activation: str | None, name: str | None = None):
    """Activation(activation)."""
    return self._layer("activation", name, [x], _op(ACTIVATIONS[activation]))

  def relu(self, x, max_value: float | None = None, name: str | None = None):
    """ReLU(max_value): a class of its own in Keras (auto names `re_lu`)."""

    def op(a):
      a = nn.relu(a)
      return a if max_value is None else jnp.minimum(a, max_value)

    return self._layer("re_lu", name, [x], _op(op))

  def zero_pad(self, x, padding, name: str | None = None):
    (top, bottom), (left, right) = _padding2d(padding)
    op = functools.partial(
      jnp.pad, pad_width=((0, 0), (top, bottom), (left, right), (0, 0))
    )
    return self._layer(
      "zero_padding2d",
      name,
      [x],
      _op(op),
      shape=lambda s: (s[0] + top + bottom, s[1] + left + right, s[2]),
    )

  def crop(self, x, cropping, name: str | None = None):
    (top, bottom), (left, right) = _padding2d(cropping)

    def op(a):
      h, w = a.shape[1], a.shape[2]
      return a[:, top : h - bottom, left : w - right]

    return self._layer(
      "cropping2d",
      name,
      [x],
      _op(op),
      shape=lambda s: (s[0] - top - bottom, s[1] - left - right, s[2]),
    )

  def max_pool(self, x, pool_size, strides=None, padding="valid", name=None):
    op = functools.partial(
      _max_pool,
      size=_pair(pool_size),
      strides=_pair(strides or pool_size),
      padding=padding,
    )
    shape = _window(pool_size, strides or pool_size, padding)
    return self._layer("max_pooling2d", name, [x], _op(op), shape=shape)

  def avg_pool(self, x, pool_size, strides=None, padding="valid", name=None):
    op = functools.partial(
      _avg_pool,
      size=_pair(pool_size),
      strides=_pair(strides or pool_size),
      padding=padding,
    )
    shape = _window(pool_size, strides or pool_size, padding)
    return self._layer("average_pooling2d", name, [x], _op(op), shape=shape)

  def global_avg_pool(self, x, keepdims: bool = False, name: str | None = None):
    op = functools.partial(jnp.mean, axis=(1, 2), keepdims=keepdims)
    return self._layer(
      "global_average_pooling2d",
      name,
      [x],
      _op(op),
      shape=lambda s: (1, 1, s[-1]) if keepdims else (s[-1],),
    )

  def global_max_pool(self, x, name: str | None = None):
    op = functools.partial(jnp.max, axis=(1, 2))
    return self._layer(
      "global_max_pooling2d", name, [x], _op(op), shape=lambda s: (s[-1],)
    )

  def add(self, xs: Sequence[Any], name: str | None = None):
    return self._layer("add", name, xs, _op(_sum))

  def multiply(self, xs: Sequence[Any], name: str | None = None):
    return self._layer("multiply", name, xs, _op(_product))

  def concat(self, xs: Sequence[Any], name: str | None = None):
    def op(*a):
      return jnp.concatenate(a, axis=-1)

    return self._layer(
      "concatenate",
      name,
      xs,
      _op(op),
      shape=lambda *s: (*s[0][:-1], sum(c[-1] for c in s)),
    )

  def custom_scale(self, xs: Sequence[Any], scale: float, name=None):
    """InceptionResNetV2's CustomScaleLayer: xs[0] + xs[1] * scale."""
    return self._layer(
      "custom_scale_layer", name, xs, _op(lambda a, b: a + b * scale)
    )

  def dropout(self, x, rate: float, noise_shape=None, name: str | None = None):
    """Dropout; noise_shape (None, 1, 1, 1) drops whole samples. Acts when
    `train` is truthy, with the 'dropout' rng."""

    def fn(name, a):
      dims = tuple(i for i, d in enumerate(noise_shape or ()) if d == 1)
      layer = nn.Dropout(rate, broadcast_dims=dims, name=name)
      return layer(a, deterministic=not self.train)

    return self._layer("dropout", name, [x], fn)

  def flatten(self, x, name: str | None = None):
    def op(a):
      return a.reshape(a.shape[0], -1)

    def shape(s):
      n = 1
      for d in s:
        n *= d
      return (n,)

    return self._layer("flatten", name, [x], _op(op), shape=shape)

  def reshape(self, x, target_shape: tuple[int, ...], name=None):
    def op(a):
      return a.reshape(a.shape[0], *target_shape)

    return self._layer(
      "reshape", name, [x], _op(op), shape=lambda s: tuple(target_shape)
    )


def _sum(*xs):
  return functools.reduce(jnp.add, xs)


def _product(*xs):
  return functools.reduce(jnp.multiply, xs)


def _max_pool(x, size, strides, padding):
  return lax.reduce_window(
    x, -jnp.inf, lax.max, (1, *size, 1), (1, *strides, 1), padding.upper()
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

  def __init__(
    self,
    input_shape: Sequence[int] = (224, 224, 3),
    names: _Names | None = None,
  ):
    super().__init__(names)
    self.shapes: dict[str, tuple[int, ...]] = {INPUT: tuple(input_shape)}
    self.parents: dict[str, tuple[str, ...]] = {INPUT: ()}
    self.kind: dict[str, str] = {INPUT: "input_layer"}  # Layers, not ops.
    self.weights: dict[str, list[tuple[int, ...]]] = {}  # Keras' order.
    self.dropouts: dict[str, tuple[float, bool]] = {}
    self.inner: dict[str, Record] = {}  # Sequentials' own layers.
    self._ops = 0

  def input(self) -> str:
    return INPUT

  def _node(self, name: str, inputs, kind: str | None, shape) -> str:
    if name in self.parents:
      raise ValueError(f"layer name {name!r} used twice")
    self.parents[name] = tuple(inputs)
    self.shapes[name] = tuple(shape)
    if kind is not None:
      self.kind[name] = kind
    return name

  def _layer(self, kind, name, inputs, fn, shape=None, weights=None):
    name = self.names(kind, name)
    shapes = [self.shapes[i] for i in inputs]
    if weights is not None:
      self.weights[name] = [tuple(w) for w in weights(*shapes)]
    return self._node(
      name, inputs, kind, shape(*shapes) if shape else shapes[0]
    )

  def op(self, fn, *xs):
    self._ops += 1
    return self._node(f"<op {self._ops}>", xs, None, self.shapes[xs[0]])

  def sequential(self, x, name, body):
    inner = Record(self.shapes[x], self.names)
    out = body(inner, inner.input())
    self.inner[name] = inner
    return self._node(name, [x], "sequential", inner.shapes[out])

  def dropout(self, x, rate, noise_shape=None, name=None):
    y = super().dropout(x, rate, noise_shape, name)
    self.dropouts[y] = (rate, noise_shape is not None)
    return y

  def shape(self, x) -> tuple[int, ...]:
    return self.shapes[x]


def keras_order(parents: Mapping[str, Sequence[str]], output: str) -> list[str]:
  """The nodes `output` depends on, in Keras' `Functional.layers` order.

  keras/src/ops/function.py `map_graph`: by decreasing depth (the longest
  path to the output), ties in the order a depth-first walk from the output,
  inputs in call order, first reaches them. Nodes the output does not depend
  on are not part of the model.
  """
  index = {output: 0}
  postorder: list[str] = []
  stack = [(output, iter(parents[output]))]
  while stack:  # Iterative: DenseNet201 is ~700 layers deep.
    name, pending = stack[-1]
    nxt = next(pending, None)
    if nxt is None:
      stack.pop()
      postorder.append(name)
    elif nxt not in index:
      index[nxt] = len(index)
      stack.append((nxt, iter(parents[nxt])))
  depth: dict[str, int] = {}
  for name in reversed(postorder):
    d = depth.setdefault(name, 0)
    for p in parents[name]:
      depth[p] = max(depth.get(p, 0), d + 1)
  return sorted(postorder, key=lambda n: (-depth[n], index[n]))


def ancestors(parents: Mapping[str, Sequence[str]], name: str) -> set[str]:
  """`name` and every node it depends on."""
  seen, todo = {name}, [name]
  while todo:
    for p in parents[todo.pop()]:
      if p not in seen:
        seen.add(p)
        todo.append(p)
  return seen


@dataclasses.dataclass(frozen=True)
class Layers:
  """A recorded model, as Keras lists and stores it.

  names: `[l.name for l in model.layers]`, input included.
  weighted: the layers with weights in Keras' order; a Sequential's layers
    as 'sequential_name/layer_name', like the Flax variables.
  kinds: weighted layer -> its Keras class, snake_case ('conv2d').
  keys: weighted layer -> its group names in a Keras 3 weights file
    (`layers/<class>[_<rank among that class in model.layers>]`, nested for
    Sequentials: ('sequential', 'conv2d')).
  weights: weighted layer -> its arrays' shapes in Keras' stored order.
  dropouts: Dropout layer -> (rate, whether it drops whole samples).
  parents: node -> the nodes it is computed from (tensor ops included).
  """

  names: tuple[str, ...]
  weighted: tuple[str, ...]
  kinds: Mapping[str, str]
  keys: Mapping[str, tuple[str, ...]]
  weights: Mapping[str, list[tuple[int, ...]]]
  dropouts: Mapping[str, tuple[float, bool]]
  parents: Mapping[str, tuple[str, ...]]


def _weighted(rec: Record, order: list[str]) -> list[tuple]:
  """(path, kind, keys, shapes) of each weighted layer, in Keras' order."""
  out, ranks = [], {}
  for name in order:
    kind = rec.kind[name]
    rank = ranks[kind] = ranks.get(kind, -1) + 1
    key = kind if rank == 0 else f"{kind}_{rank}"
    if name in rec.inner:  # A Sequential's layers, without its input.
      sub = rec.inner[name]
      inner = [n for n in sub.parents if n in sub.kind][1:]
      out += [
        (f"{name}/{path}", k, (key, *keys), shapes)
        for path, k, keys, shapes in _weighted(sub, inner)
      ]
    elif name in rec.weights:
      out.append((name, kind, (key,), rec.weights[name]))
  return out


def config(
  arch: str,
  include_top: bool = True,
  pooling: str | None = None,
  num_classes: int = 1000,
  classifier_activation: str | None = None,
  **options: Any,
) -> types.SimpleNamespace:
  """What a forward reads: the build options, family options included."""
  return types.SimpleNamespace(
    arch=arch,
    include_top=include_top,
    pooling=pooling,
    num_classes=num_classes,
    classifier_activation=classifier_activation,
    **options,
  )


def recorded(
  arch: str, include_top: bool = True, pooling: str | None = None, **options
) -> Layers:
  """The Keras model's layers, recorded from `arch`'s forward (cached).

  options: the arch's layer options (others, like classifier_activation,
  change no layer and are ignored).
  """
  spec = _get(arch)
  layer_options = tuple((k, options.get(k, d)) for k, d in spec.options.items())
  return _recorded(
    arch, bool(include_top), None if include_top else pooling, layer_options
  )


@functools.cache
def _recorded(arch, include_top, pooling, options) -> Layers:
  spec = _get(arch)
  rec = Record((spec.default_size, spec.default_size, 3))
  cfg = config(arch, include_top, pooling, **dict(options))
  out = spec.forward(rec, rec.input(), cfg)
  order = [n for n in keras_order(rec.parents, out) if n in rec.kind]
  weighted = _weighted(rec, order)
  return Layers(
    names=tuple(order),
    weighted=tuple(p for p, *_ in weighted),
    kinds={p: k for p, k, _, _ in weighted},
    keys={p: keys for p, _, keys, _ in weighted},
    weights={p: shapes for p, _, _, shapes in weighted},
    dropouts=dict(rec.dropouts),
    parents=dict(rec.parents),
  )


def layer_names(
  arch: str, include_top: bool = True, pooling: str | None = None, **options
) -> list[str]:
  """`[l.name for l in model.layers]` of the Keras model, input included."""
  return list(recorded(arch, include_top, pooling, **options).names)


# ---------------------------------------------------------------------------
# Computing: Flax layers with Keras' parameter names and shapes.


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A layer output a model cut at `output_layer` does not compute."""

  shape: tuple[int, ...]  # Without the batch.


def _shape(x) -> tuple[int, ...]:
  return x.shape if isinstance(x, Skipped) else tuple(x.shape[1:])


class Compute(Net):
  """Runs a forward inside a Flax module's compact `__call__`.

  Layers become submodules of that module, named like the Keras layers; each
  output passes through `taps`, which stops the pass at `output_layer`.
  needed: the layers to compute (None: all); the others only pass on their
  shapes, so a cut model has no parameters it does not use.
  """

  def __init__(
    self,
    taps: common.Taps,
    needed: set[str] | None,
    train: Any,
    dtype: Any,
    param_dtype: Any,
    names: _Names | None = None,
  ):
    super().__init__(names)
    self.taps, self.needed, self.train = taps, needed, train
    self.dtype, self.param_dtype = dtype, param_dtype

  def _skips(self, name: str, inputs) -> bool:
    return any(isinstance(i, Skipped) for i in inputs) or (
      self.needed is not None and name not in self.needed
    )

  def _layer(self, kind, name, inputs, fn, shape=None, weights=None):
    name = self.names(kind, name)
    if self._skips(name, inputs):
      shapes = [_shape(i) for i in inputs]
      return Skipped(tuple(shape(*shapes)) if shape else shapes[0])
    return self.taps(name, fn(name, *inputs))

  def op(self, fn, *xs):
    if any(isinstance(x, Skipped) for x in xs):
      return Skipped(_shape(xs[0]))
    return fn(*xs)

  def sequential(self, x, name, body):
    if self._skips(name, [x]):  # Its auto names still count.
      inner = Record(_shape(x), self.names)
      return Skipped(inner.shapes[body(inner, inner.input())])
    sequential = _Sequential(
      body, self.names, self.train, self.dtype, self.param_dtype, name=name
    )
    return self.taps(name, sequential(x))

  def shape(self, x) -> tuple[int, ...]:
    return tuple(int(d) for d in _shape(x))


class Conv(nn.Module):
  """Keras Conv2D ('same' is TensorFlow's: extra padding bottom/right)."""

  filters: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: str = "valid"
  use_bias: bool = True
  groups: int = 1
  kernel_init: Callable = kernel_init
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    shape = (*self.kernel_size, cin // self.groups, self.filters)
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    y = conv_ops.conv_general_dilated(
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


class DepthwiseConv(nn.Module):
  """Keras DepthwiseConv2D (multiplier 1): `depthwise_kernel` has Keras'
  shape (kh, kw, channels, 1)."""

  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: str = "valid"
  use_bias: bool = True
  kernel_init: Callable = kernel_init
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    w = self.param(
      "depthwise_kernel",
      self.kernel_init,
      (*self.kernel_size, c, 1),
      self.param_dtype,
    )
    y = conv_ops.conv_general_dilated(
      x.astype(self.dtype),
      w.reshape(*self.kernel_size, 1, c).astype(self.dtype),
      self.strides,
      self.padding.upper(),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=c,
    )
    if self.use_bias:
      bias = self.param("bias", zeros, (c,), self.param_dtype)
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
    y = conv_ops.conv_general_dilated(
      x.astype(self.dtype),
      depthwise.reshape(*self.kernel_size, 1, cin).astype(self.dtype),
      self.strides,
      self.padding.upper(),
      dimension_numbers=dn,
      feature_group_count=cin,
    )
    y = conv_ops.conv_general_dilated(
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


class Normalization(nn.Module):
  """Keras' Normalization layer with its own (adapted) statistics.

  mean, var and count are non-trainable, like BN's moving statistics, and live
  in the same 'batch_stats' collection, so they are imported, checked, merged
  and checkpointed the same way; nothing ever updates them.
  """

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    self.variable("batch_stats", "count", jnp.zeros, (), jnp.int32)
    std = jnp.sqrt(var.value.astype(self.dtype))
    return (x.astype(self.dtype) - mean.value.astype(self.dtype)) / (
      jnp.maximum(std, NORMALIZATION_EPSILON)
    )


class _Sequential(nn.Module):
  """A Keras Sequential inside the model: its layers nest under its name."""

  body: Callable[[Net, Any], Any]
  names: _Names  # The model's auto-name counters, shared as in Keras.
  train: Any = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    net = Compute(
      common.Taps(), None, self.train, self.dtype, self.param_dtype, self.names
    )
    return self.body(net, x)


class KerasApp(nn.Module):
  """A `keras.applications` model defined with `define`.

  Attributes:
    arch: the architecture ('resnet50', 'xception', 'convnext_tiny', ...).
    include_top: keep Keras' classifier (logits unless
      classifier_activation='softmax'; float32 whatever `dtype`).
    num_classes: outputs of that classifier.
    pooling: without the top, None (4D features), 'avg' or 'max'.
    classifier_activation: None (logits, what losses want) or 'softmax'.
    output_layer: stop at this Keras layer and return its output.
    return_layers: return {name: output} for these layers instead, computing
      only what they depend on.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.

  A family with layer options (alpha) subclasses it with those fields.
  """

  # The architectures a subclass builds (empty: any defined one).
  ARCHS: ClassVar[tuple[str, ...]] = ()

  arch: str
  include_top: bool = True
  num_classes: int = 1000
  pooling: str | None = None
  classifier_activation: str | None = None
  output_layer: str | None = None
  return_layers: tuple[str, ...] = ()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def check(self) -> None:
    """Raises UserError for a bad option; subclasses add their own."""
    if self.ARCHS and self.arch not in self.ARCHS:
      raise UserError(
        f"{type(self).__name__}: arch must be one of {list(self.ARCHS)}, "
        f"got {self.arch!r}"
      )
    _get(self.arch)
    if self.pooling not in (None, "avg", "max"):
      raise UserError(
        f"{self.arch}: pooling must be None, 'avg' or 'max', "
        f"got {self.pooling!r}"
      )
    if self.classifier_activation not in (None, "softmax"):
      raise UserError(
        f"{self.arch}: classifier_activation must be None or 'softmax', "
        f"got {self.classifier_activation!r}"
      )

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    self.check()
    spec = _get(self.arch)
    options = {k: getattr(self, k) for k in spec.options}
    layers = recorded(self.arch, self.include_top, self.pooling, **options)
    common.check_input(self.arch, tuple(x.shape), spec.min_size)
    asked = (self.output_layer,) if self.output_layer else self.return_layers
    for name in asked:
      common.check_output_layer(self.arch, name, list(layers.names))
    taps = common.Taps(self.output_layer, self.return_layers)
    needed = None
    if asked:
      needed = set().union(*(ancestors(layers.parents, n) for n in asked))
    net = Compute(taps, needed, train, self.dtype, self.param_dtype)
    cfg = config(
      self.arch,
      self.include_top,
      self.pooling,
      self.num_classes,
      self.classifier_activation,
      **options,
    )
    y = taps.run(
      lambda: spec.forward(net, taps(INPUT, x.astype(self.dtype)), cfg)
    )
    if self.include_top and self.output_layer in (None, layers.names[-1]):
      y = y.astype(jnp.float32)
    return y
