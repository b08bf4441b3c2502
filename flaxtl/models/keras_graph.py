"""Keras functional models written once: run by Flax, listed like Keras.

A Keras family writes its model as one function of a layer set `net`:

    def forward(net, x, **options):
      x = net.input(x)
      x = net.pad("conv1_pad", x, 3)
      x = net.conv("conv1_conv", x, 64, 7, strides=2)
      ...
      return x

`Recorder` runs it on layer names only and lists the layers the way Keras
lists a functional model's `model.layers`; `FlaxLayers` runs it on arrays
inside a module's compact `__call__`, each weighted layer a flat submodule
named like the Keras layer. One definition gives both, so the layer list that
`freeze.first_layers` counts and the parameter tree cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.errors import UserError
from flaxtl.models import common

# Keras' default initialisers, so a model trained from scratch starts where
# the Keras one does.
KERNEL_INIT = nn.initializers.glorot_uniform()
BIAS_INIT = nn.initializers.zeros_init()
INPUT_NAME = "input_layer"  # Keras 3's name for a model's first input.

Forward = Callable[["Layers", Any], Any]


def keras_order(parents: dict[str, tuple[str, ...]], output: str) -> list[str]:
  """The layers `output` depends on, in Keras' `Functional.layers` order.

  keras/src/ops/function.py `map_graph`: by decreasing depth (the longest
  path to the output), ties in the order a depth-first walk from the output,
  inputs in call order, first reaches them. Layers the output does not depend
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


class Layers:
  """The Keras Applications layer vocabulary (channels-last).

  Every method takes the Keras layer name first and returns the layer's
  output; subclasses decide what a "tensor" is through `apply`. A layer not
  listed here is `apply(name, inputs, fn, weighted)` with `fn` computing it
  from arrays (creating any Flax submodule with `name=name`).
  """

  def __init__(self, bn_momentum: float = 0.99, bn_epsilon: float = 1e-3):
    self.bn_momentum = bn_momentum
    self.bn_epsilon = bn_epsilon
    self.dtype: Any = jnp.float32
    self.param_dtype: Any = jnp.float32
    self.train: Any = False
    self._uids: dict[str, int] = {}

  def apply(
    self, name: str, inputs: Sequence[Any], fn: Callable, weighted: bool
  ) -> Any:
    raise NotImplementedError

  def input(self, x: Any) -> Any:
    raise NotImplementedError

  def auto(self, base: str) -> str:
    """Keras' default name for an unnamed layer in a fresh session.

    Keras counts per session ('zero_padding2d', 'zero_padding2d_1', ...); a
    model built first in a fresh session gets these.
    """
    n = self._uids.get(base, 0)
    self._uids[base] = n + 1
    return base if n == 0 else f"{base}_{n}"

  def conv(
    self,
    name: str,
    x: Any,
    filters: int,
    kernel: int,
    strides: int = 1,
    padding: str = "valid",
    use_bias: bool = True,
  ) -> Any:
    def fn(a):
      return nn.Conv(
        filters,
        (kernel, kernel),
        (strides, strides),
        padding=padding.upper(),
        use_bias=use_bias,
        kernel_init=KERNEL_INIT,
        bias_init=BIAS_INIT,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
      )(a)

    return self.apply(name, (x,), fn, weighted=True)

  def bn(self, name: str, x: Any) -> Any:
    def fn(a):
      bn = common.BatchNorm(
        momentum=self.bn_momentum,
        epsilon=self.bn_epsilon,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
      )
      return bn(a, self.train)

    return self.apply(name, (x,), fn, weighted=True)

  def dense(
    self, name: str, x: Any, units: int, activation: str | None = None
  ) -> Any:
    def fn(a):
      y = nn.Dense(
        units,
        kernel_init=KERNEL_INIT,
        bias_init=BIAS_INIT,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
      )(a)
      return jax.nn.softmax(y) if activation == "softmax" else y

    return self.apply(name, (x,), fn, weighted=True)

  def relu(self, name: str, x: Any) -> Any:
    return self.apply(name, (x,), nn.relu, weighted=False)

  def pad(
    self,
    name: str,
    x: Any,
    pad: int | tuple[tuple[int, int], tuple[int, int]],
  ) -> Any:
    """ZeroPadding2D: `pad` pixels each side, or ((top, bottom), (l, r))."""
    rows, cols = ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad

    def fn(a):
      return jnp.pad(a, ((0, 0), tuple(rows), tuple(cols), (0, 0)))

    return self.apply(name, (x,), fn, weighted=False)

  def max_pool(self, name: str, x: Any, size: int, strides: int) -> Any:
    def fn(a):
      return nn.max_pool(a, (size, size), (strides, strides), "VALID")

    return self.apply(name, (x,), fn, weighted=False)

  def avg_pool(self, name: str, x: Any, size: int, strides: int) -> Any:
    def fn(a):
      return nn.avg_pool(a, (size, size), (strides, strides), "VALID")

    return self.apply(name, (x,), fn, weighted=False)

  def global_pool(self, name: str, x: Any, mode: str) -> Any:
    return self.apply(
      name, (x,), lambda a: common.global_pool(a, mode), weighted=False
    )

  def add(self, name: str, xs: Sequence[Any]) -> Any:
    return self.apply(name, xs, lambda *a: sum(a[1:], a[0]), weighted=False)

  def concat(self, name: str, xs: Sequence[Any]) -> Any:
    def fn(*a):
      return jnp.concatenate(a, axis=-1)

    return self.apply(name, xs, fn, weighted=False)


class Recorder(Layers):
  """Runs a forward function on names: the layer graph, nothing computed."""

  def __init__(self):
    super().__init__()
    self.parents: dict[str, tuple[str, ...]] = {}
    self.weighted: list[str] = []  # In creation order.

  def input(self, x: Any) -> str:
    del x
    self.parents[INPUT_NAME] = ()
    return INPUT_NAME

  def apply(self, name, inputs, fn, weighted):
    del fn
    if name in self.parents:
      raise ValueError(f"layer name {name!r} used twice")
    self.parents[name] = tuple(inputs)
    if weighted:
      self.weighted.append(name)
    return name

  def ancestors(self, name: str) -> set[str]:
    """`name` and every layer it depends on."""
    seen, todo = {name}, [name]
    while todo:
      for p in self.parents[todo.pop()]:
        if p not in seen:
          seen.add(p)
          todo.append(p)
    return seen


def record(forward: Forward) -> tuple[Recorder, str]:
  """The layer graph of `forward` and its output layer."""
  rec = Recorder()
  return rec, forward(rec, None)


def layer_names(forward: Forward) -> list[str]:
  """`[l.name for l in model.layers]` of the Keras model `forward` writes."""
  rec, output = record(forward)
  return keras_order(rec.parents, output)


def weighted_layer_names(forward: Forward) -> list[str]:
  """The layers with weights, in Keras' `model.layers` order."""
  rec, output = record(forward)
  weighted = set(rec.weighted)
  return [n for n in keras_order(rec.parents, output) if n in weighted]


class FlaxLayers(Layers):
  """Runs a forward function on arrays, inside a compact `__call__`.

  needed: the layers to compute (those the output layer depends on; None for
  all), so a model cut at `output_layer` has no parameters it does not use.
  """

  def __init__(
    self,
    x: jax.Array,
    taps: common.Taps,
    needed: Iterable[str] | None,
    *,
    train: Any,
    dtype: Any,
    param_dtype: Any,
    bn_momentum: float,
    bn_epsilon: float,
  ):
    super().__init__(bn_momentum, bn_epsilon)
    self.x, self.taps = x, taps
    self.needed = None if needed is None else set(needed)
    self.train, self.dtype, self.param_dtype = train, dtype, param_dtype

  def input(self, x: Any) -> jax.Array:
    del x
    return self.taps(INPUT_NAME, self.x)

  def apply(self, name, inputs, fn, weighted):
    del weighted
    if self.needed is not None and name not in self.needed:
      return None
    return self.taps(name, fn(*inputs))


def run(
  forward: Forward,
  x: jax.Array,
  *,
  arch: str,
  min_size: int,
  output_layer: str | None,
  train: Any,
  dtype: Any,
  param_dtype: Any,
  bn_momentum: float,
  bn_epsilon: float,
) -> jax.Array:
  """Computes `forward` on `x`; call it from a compact `__call__`.

  Stops at `output_layer` (any Keras layer name) when given.
  """
  common.check_input(arch, tuple(x.shape), min_size)
  rec, output = record(forward)
  names = keras_order(rec.parents, output)
  common.check_output_layer(arch, output_layer, names)
  needed = rec.ancestors(output_layer) if output_layer else None
  taps = common.Taps(output_layer)
  layers = FlaxLayers(
    x.astype(dtype),
    taps,
    needed,
    train=train,
    dtype=dtype,
    param_dtype=param_dtype,
    bn_momentum=bn_momentum,
    bn_epsilon=bn_epsilon,
  )
  return taps.run(lambda: forward(layers, x))


def check_options(
  arch: str, pooling: str | None, classifier_activation: str | None
) -> None:
  if pooling not in (None, "avg", "max"):
    raise UserError(
      f"{arch}: pooling must be None, 'avg' or 'max', got {pooling!r}"
    )
  if classifier_activation not in (None, "softmax"):
    raise UserError(
      f"{arch}: classifier_activation must be None or 'softmax', "
      f"got {classifier_activation!r}"
    )
