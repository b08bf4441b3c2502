"""The Keras layers MobileNet and EfficientNet are written in, run two ways.

A family writes its Keras model once, as `forward(kl, x, cfg)` over a layer
vocabulary `kl` whose methods take the Keras layer name first:

    x = kl.conv("Conv1", x, 32, 3, strides=2)
    x = kl.bn("bn_Conv1", x)
    x = kl.relu("Conv1_relu", x, max_value=6.0)

`Names` runs it on channel counts and lists `model.layers` as Keras does
(name and class; unnamed layers get Keras' per-class counters: `re_lu`,
`re_lu_1`, ...); `FlaxLayers` runs it on arrays inside a module's compact
`__call__`, each weighted layer a flat submodule named like the Keras layer,
each output passed through `common.Taps` so any layer can end the model. One
definition gives both, so the layer list that `freeze.first_layers` counts
and the parameter tree cannot drift apart. For these families Keras' layer
order is the call order (no layer sits on a shortcut path); the tests hold
every variant to Keras' own list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.models import common
from flaxtl.ops import conv as conv_ops

INPUT_NAME = "input_layer"  # Keras 3's name for a model's first input.
NORMALIZATION_EPSILON = 1e-7  # keras.backend.epsilon(), Normalization's floor.

# Keras' default initialisers (Conv2D, DepthwiseConv2D, Dense).
GLOROT = nn.initializers.glorot_uniform()
ZEROS = nn.initializers.zeros_init()

ACTIVATIONS: dict[str | None, Callable[[jax.Array], jax.Array]] = {
  None: lambda x: x,
  "linear": lambda x: x,
  "relu": nn.relu,
  "swish": nn.silu,
  "sigmoid": nn.sigmoid,
  "hard_swish": jax.nn.hard_silu,
  "softmax": nn.softmax,
}


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None):
  """Keras' `_make_divisible` / `_depth`: round to a multiple of `divisor`."""
  min_value = divisor if min_value is None else min_value
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


def correct_pad(size: tuple[int, int], kernel: int) -> tuple:
  """`imagenet_utils.correct_pad` for a known input size: TF 'same' padding."""
  adjust = (1 - size[0] % 2, 1 - size[1] % 2)
  c = kernel // 2
  return ((c - adjust[0], c), (c - adjust[1], c))


def snake_case(name: str) -> str:
  """Keras' to_snake_case: 'BatchNormalization' -> 'batch_normalization'."""
  name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
  return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


class Layers:
  """The vocabulary. Subclasses say what a tensor is through `_apply`."""

  def __init__(self):
    self.counts: dict[str, int] = {}

  def _name(self, name: str | None, cls: str) -> str:
    if name is not None:
      return name
    # Keras' auto_name: snake_case of the class, _N from the second one on.
    prefix = snake_case(cls)
    n = self.counts.get(prefix, 0)
    self.counts[prefix] = n + 1
    return prefix if n == 0 else f"{prefix}_{n}"

  # Subclass hooks. `spec` is ('kind', *arguments), or a function for the
  # input layer; `activation` is fused into the layer, as Keras does.
  def channels(self, x) -> int:
    raise NotImplementedError

  def _apply(self, name: str | None, cls: str, spec, x, activation=None):
    raise NotImplementedError

  def op(self, fn: Callable[[jax.Array], jax.Array], x):
    """A tensor op between layers (`x + 3.0`): not a layer in Keras 3."""
    raise NotImplementedError

  # The Keras layers (name first; None means Keras' automatic name).
  def input(self, x):
    return self._apply(INPUT_NAME, "InputLayer", lambda t: t, x)

  def rescaling(self, name, x, scale, offset=0.0):
    return self._apply(name, "Rescaling", ("rescaling", scale, offset), x)

  def normalization(self, name, x, mean=None, variance=None):
    """Keras' Normalization: weighted (mean, variance, count) unless given."""
    cls = "Normalization"
    return self._apply(name, cls, ("normalization", mean, variance), x)

  def pad(self, name, x, kernel: int):
    return self._apply(name, "ZeroPadding2D", ("pad", kernel), x)

  def conv(
    self,
    name,
    x,
    filters: int,
    kernel: int,
    strides: int = 1,
    padding: str = "same",
    use_bias: bool = False,
    activation: str | None = None,
    kernel_init=GLOROT,
  ):
    spec = ("conv", filters, kernel, strides, padding, use_bias, kernel_init)
    return self._apply(name, "Conv2D", spec, x, activation=activation)

  def dwconv(
    self,
    name,
    x,
    kernel: int,
    strides: int = 1,
    padding: str = "same",
    kernel_init=GLOROT,
  ):
    spec = ("dwconv", kernel, strides, padding, kernel_init)
    return self._apply(name, "DepthwiseConv2D", spec, x)

  def bn(self, name, x):
    return self._apply(name, "BatchNormalization", ("bn",), x)

  def relu(self, name, x, max_value: float | None = None):
    return self._apply(name, "ReLU", ("relu", max_value), x)

  def activation(self, name, x, fn: str | None):
    return self._apply(name, "Activation", ("act",), x, activation=fn)

  def add(self, name, a, b):
    return self._apply(name, "Add", ("add", b), a)

  def multiply(self, name, a, b):
    return self._apply(name, "Multiply", ("mul", b), a)

  def global_avg_pool(self, name, x, keepdims: bool = False):
    cls = "GlobalAveragePooling2D"
    return self._apply(name, cls, ("gap", keepdims), x)

  def global_max_pool(self, name, x):
    return self._apply(name, "GlobalMaxPooling2D", ("gmp",), x)

  def reshape_1x1(self, name, x):
    return self._apply(name, "Reshape", ("reshape",), x)

  def dropout(self, name, x, rate: float, per_sample: bool = False):
    return self._apply(name, "Dropout", ("dropout", rate, per_sample), x)

  def flatten(self, name, x):
    return self._apply(name, "Flatten", ("flatten",), x)

  def dense(self, name, x, units: int, activation=None, kernel_init=GLOROT):
    spec = ("dense", units, kernel_init)
    return self._apply(name, "Dense", spec, x, activation=activation)


class Names(Layers):
  """Runs a forward on channel counts; `layers` is Keras' model.layers."""

  def __init__(self):
    super().__init__()
    self.layers: list[tuple[str, str]] = []  # (name, Keras class name)
    # Weighted layers: {name: shapes of its arrays in Keras' stored order}.
    self.weights: dict[str, list[tuple[int, ...]]] = {}
    # Dropout layers: {name: (rate, one draw per sample)}.
    self.dropouts: dict[str, tuple[float, bool]] = {}

  def channels(self, x) -> int:
    return x

  def op(self, fn, x):
    return x

  def _apply(self, name, cls, spec, x, activation=None):
    name = self._name(name, cls)
    self.layers.append((name, cls))
    kind = spec[0] if isinstance(spec, tuple) else None
    shapes: list[tuple[int, ...]] = []
    out = x
    if kind == "conv":
      _, out, k, _, _, use_bias, _ = spec
      shapes = [(k, k, x, out)] + ([(out,)] if use_bias else [])
    elif kind == "dwconv":
      shapes = [(spec[1], spec[1], x, 1)]
    elif kind == "bn":
      shapes = [(x,)] * 4
    elif kind == "normalization" and spec[1] is None:
      shapes = [(x,), (x,), ()]
    elif kind == "dense":
      out = spec[1]
      shapes = [(x, out), (out,)]
    elif kind == "dropout":
      self.dropouts[name] = (spec[1], spec[2])
    if shapes:
      self.weights[name] = shapes
    return out


class FlaxLayers(Layers):
  """Runs a forward on arrays inside a compact `__call__`.

  Weighted layers are created as submodules named like the Keras layer (the
  parent is the module whose `__call__` is running); every output goes
  through `taps`, which ends the forward at the requested output layer.
  """

  def __init__(
    self,
    taps: common.Taps,
    train: Any,
    dtype: Any,
    param_dtype: Any,
    bn_momentum: float,
    bn_epsilon: float,
  ):
    super().__init__()
    self.taps = taps
    self.train = train
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.bn_momentum = bn_momentum
    self.bn_epsilon = bn_epsilon

  def channels(self, x) -> int:
    return x.shape[-1]

  def op(self, fn, x):
    return fn(x)

  def _apply(self, name, cls, spec, x, activation=None):
    name = self._name(name, cls)
    if callable(spec):
      y = spec(x)
    else:
      y = getattr(self, "_" + spec[0])(name, x, *spec[1:])
    if activation is not None:
      y = ACTIVATIONS[activation](y)
    return self.taps(name, y)

  def _rescaling(self, name, x, scale, offset):
    scale = jnp.asarray(scale, self.dtype)
    return x.astype(self.dtype) * scale + jnp.asarray(offset, self.dtype)

  def _normalization(self, name, x, mean, variance):
    if mean is None:
      return Normalization(dtype=self.dtype, name=name)(x)
    mean = jnp.asarray(mean, self.dtype)
    std = jnp.sqrt(jnp.asarray(variance, self.dtype))
    return (x - mean) / jnp.maximum(std, NORMALIZATION_EPSILON)

  def _pad(self, name, x, kernel):
    (top, bottom), (left, right) = correct_pad(x.shape[1:3], kernel)
    return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))

  def _conv(self, name, x, filters, kernel, strides, padding, bias, init):
    return nn.Conv(
      filters,
      (kernel, kernel),
      strides=(strides, strides),
      padding=padding.upper(),  # lax 'SAME' is TF's (and Keras') 'same'.
      use_bias=bias,
      kernel_init=init,
      bias_init=ZEROS,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )(x)

  def _dwconv(self, name, x, kernel, strides, padding, init):
    return DepthwiseConv2D(
      kernel,
      strides,
      padding.upper(),
      kernel_init=init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )(x)

  def _bn(self, name, x):
    bn = common.BatchNorm(
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      use_fast_variance=False,  # Keras' moments: jnp.var, not E[x²] - E[x]².
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )
    return bn(x, self.train)

  def _relu(self, name, x, max_value):
    x = nn.relu(x)
    return x if max_value is None else jnp.minimum(x, max_value)

  def _act(self, name, x):
    return x  # The activation itself is applied by `_apply`.

  def _add(self, name, a, b):
    return a + b

  def _mul(self, name, a, b):
    return a * b

  def _gap(self, name, x, keepdims):
    return jnp.mean(x, axis=(1, 2), keepdims=keepdims)

  def _gmp(self, name, x):
    return jnp.max(x, axis=(1, 2))

  def _reshape(self, name, x):
    return x.reshape(x.shape[0], 1, 1, x.shape[-1])

  def _dropout(self, name, x, rate, per_sample):
    # Keras' noise_shape (None, 1, 1, 1): one draw per sample.
    dims = tuple(range(1, x.ndim)) if per_sample else ()
    layer = nn.Dropout(rate, broadcast_dims=dims, name=name)
    return layer(x, deterministic=not self.train)

  def _flatten(self, name, x):
    return x.reshape(x.shape[0], -1)

  def _dense(self, name, x, units, init):
    return nn.Dense(
      units,
      kernel_init=init,
      bias_init=ZEROS,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )(x)


class DepthwiseConv2D(nn.Module):
  """Keras' DepthwiseConv2D (multiplier 1, no bias).

  `depthwise_kernel` has Keras' shape (kh, kw, channels, 1).
  """

  kernel: int
  strides: int = 1
  padding: str = "SAME"
  kernel_init: Callable = GLOROT
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    k = self.kernel
    w = self.param(
      "depthwise_kernel", self.kernel_init, (k, k, c, 1), self.param_dtype
    )
    return conv_ops.conv_general_dilated(
      x.astype(self.dtype),
      w.reshape(k, k, 1, c).astype(self.dtype),
      (self.strides, self.strides),
      self.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=c,
    )


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


def trace(forward: Callable, cfg: Any) -> Names:
  """`forward` built with `cfg` on names: its layers and weight shapes."""
  names = Names()
  forward(names, 3, cfg)
  return names


def run(
  forward: Callable,
  cfg: Any,
  x: jax.Array,
  train: Any,
  names: Sequence[str],
  bn_momentum: float,
  bn_epsilon: float,
) -> jax.Array:
  """`forward` on arrays, inside `cfg`'s compact `__call__`."""
  common.check_output_layer(cfg.arch, cfg.output_layer, list(names))
  taps = common.Taps(cfg.output_layer)
  layers = FlaxLayers(
    taps, train, cfg.dtype, cfg.param_dtype, bn_momentum, bn_epsilon
  )
  out = taps.run(lambda: forward(layers, x.astype(cfg.dtype), cfg))
  return out.astype(jnp.float32) if out.ndim == 2 else out
