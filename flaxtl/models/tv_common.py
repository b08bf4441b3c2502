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

One way to tap: a top-level model's `__call__` runs its forward pass in
`run(self, arch, forward)`, and every container reports each child's output
with `tap(self, name, x)`, the path '/'-joined from the top-level model
('layer2/1/bn2'). A container's output comes right after its last child's
(post-order), as torch forward hooks see them. The model's `output_layer`
(any such path) stops the pass there and returns that output;
`return_layers` (a tuple of paths) returns {path: output}, stopping after
the last of them. A model built to stop early has no parameters after the
cut. `module_paths` / `layer_names` (`recorded_order`) are recorded from
those taps in one pass under `jax.eval_shape`, so they cannot drift from
the modules.

A family module holds only its own structure: `register_family` registers
its archs (torch naming, 'torch' input unless told, option
`return_layers`), `check_arch` validates an arch and pooling, `pool` /
`output` give the pooled features without the top and the output dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
import contextvars
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


class _Stop(Exception):
  def __init__(self, value: Any):
    super().__init__()
    self.value = value


class _Trace:
  """One forward pass of a top-level model: its taps, cut and wanted layers.

  root: the top-level model's own path (it may sit inside a larger model,
  e.g. at 'backbone'); paths are reported relative to it.
  """

  def __init__(
    self,
    root: tuple[str, ...],
    output_layer: str | None,
    return_layers: Sequence[str] | None,
  ):
    self.root = len(root)
    self.output_layer = output_layer
    self.wanted = (
      None if return_layers is None else dict.fromkeys(return_layers)
    )
    self.found: dict[str, jax.Array] = {}
    self.seen: list[str] = []


# The trace of the top-level torch model whose forward pass is running.
_TRACE: contextvars.ContextVar[_Trace | None] = contextvars.ContextVar(
  "flaxtl_torch_trace", default=None
)
# While a module order is recorded: the traces the passes make.
_RECORDING: contextvars.ContextVar[list[_Trace] | None] = (
  contextvars.ContextVar("flaxtl_torch_recording", default=None)
)


def tap(module: nn.Module, name: str, x: Any) -> Any:
  """Reports the output `x` of `module`'s child `name`; returns `x`.

  Every container reports each child's output (leaf layers and containers)
  right after it is computed, so a container's output follows its last
  child's (post-order), as torch forward hooks see them. Stops the pass at
  the trace's `output_layer`, or after the last of its `return_layers`.
  Outside a top-level model's `run` it does nothing.
  """
  trace = _TRACE.get()
  if trace is None:
    return x
  path = "/".join((*module.path[trace.root :], name))
  trace.seen.append(path)
  if path == trace.output_layer:
    raise _Stop(x)
  if trace.wanted is not None and path in trace.wanted:
    trace.found[path] = x
    if len(trace.found) == len(trace.wanted):
      raise _Stop({n: trace.found[n] for n in trace.wanted})
  return x


def run(model: nn.Module, arch: str, forward: Callable[[], Any]) -> Any:
  """`forward()` of a top-level `model`, cut at its output_layer.

  `model.output_layer`: the output of that module path. `model.return_layers`:
  {path: output} for those module paths, stopping after the last one in
  forward order. Either way nothing after the cut runs, so a model built to
  stop early has no parameters after it.
  """
  output_layer, wanted = model.output_layer, model.return_layers
  if output_layer is not None and wanted is not None:
    raise UserError(
      f"{arch}: give output_layer or return_layers, not both "
      f"(got {output_layer!r} and {wanted!r})"
    )
  if wanted is not None and (isinstance(wanted, str) or not wanted):
    raise UserError(
      f"{arch}: return_layers must be a non-empty tuple of module paths, "
      f"got {wanted!r}"
    )
  trace = _Trace(tuple(model.path), output_layer, wanted)
  recording = _RECORDING.get()
  if recording is not None:
    recording.append(trace)
  token = _TRACE.set(trace)
  try:
    out = forward()
  except _Stop as stop:
    return stop.value
  finally:
    _TRACE.reset(token)
  # The pass ran to its end: a cut it never reached names no module.
  check_output_layer(arch, output_layer, trace.seen)
  if wanted is not None:
    missing = [n for n in wanted if n not in trace.found]
    check_output_layer(arch, missing[0], trace.seen, "return_layers")
  return out


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


def pool_module(pooling: str) -> str:
  """The module a global pool without the top is named ('avgpool')."""
  return "avgpool" if pooling == "avg" else "maxpool"


def check_arch(arch: str, archs: Collection[str], pooling: str | None) -> None:
  """`arch` is one of `archs` and `pooling` one the registry knows."""
  if arch not in archs:
    raise UserError(
      f"unknown architecture {arch!r}; expected one of {sorted(archs)}"
    )
  if pooling not in registry.POOLINGS:
    raise UserError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")


def check_output_layer(
  arch: str,
  output_layer: str | None,
  names: Sequence[str],
  option: str = "output_layer",
) -> None:
  if output_layer is not None and output_layer not in names:
    top = [n for n in names if "/" not in n]
    raise UserError(
      f"{option} {output_layer!r} is not a module of {arch} (module paths "
      f"like {top[:6]} or {list(names[:3])}, '/'-joined)"
    )


# Model fields that never change which modules a pass goes through.
_NOT_STRUCTURE = frozenset(
  {"output_layer", "return_layers", "num_classes", "dtype", "param_dtype"}
)


@functools.cache
def _recorded(
  model: type[nn.Module],
  min_size: int,
  include_top: bool,
  pooling: str | None,
  fields: tuple[tuple[str, Any], ...],
) -> tuple[tuple[str, bool], ...]:
  """(module path, holds parameters) in forward order, from one traced init."""
  net = model(include_top=include_top, pooling=pooling, **dict(fields))
  recording: list[_Trace] = []
  token = _RECORDING.set(recording)
  try:
    shapes = common.variable_shapes(net, min_size)
  finally:
    _RECORDING.reset(token)
  (trace,) = recording
  owners = {
    "/".join(str(k.key) for k in keys[:-1])
    for keys, _ in jax.tree_util.tree_flatten_with_path(
      shapes.get("params", {})
    )[0]
  }
  seen = trace.seen
  # A module reported twice, or parameters no tap reports: a family's bug.
  if len(set(seen)) != len(seen) or not owners <= set(seen):
    raise AssertionError(
      f"{model.__name__}: taps {seen} miss {sorted(owners - set(seen))}"
    )
  return tuple((p, p in owners) for p in seen)


def recorded_order(
  model: type[nn.Module], min_size: int
) -> tuple[Callable[..., list[str]], Callable[..., list[str]]]:
  """A family's `module_paths` and `layer_names`, recorded from its taps.

  Both take (arch, include_top, pooling, **options) and run `model` once
  under `jax.eval_shape` at `min_size` per distinct arguments (cached):
  module_paths are every module `tap` reports (the `output_layer`s and
  `return_layers`), layer_names those holding parameters, in forward order.
  Options that are no field of `model`, or never change the structure
  (output_layer, num_classes, dtypes), are ignored.
  """
  names = set(model.__dataclass_fields__) - _NOT_STRUCTURE
  names -= {"include_top", "pooling", "parent", "name"}

  def modules(arch, include_top, pooling, options):
    if arch is not None and "arch" in names:
      options = {**options, "arch": arch}
    fields = tuple(sorted((k, v) for k, v in options.items() if k in names))
    return _recorded(model, min_size, include_top, pooling, fields)

  def module_paths(
    arch: str | None = None,
    include_top: bool = True,
    pooling: str | None = None,
    **options: Any,
  ) -> list[str]:
    """Every module path, in the order its output is ready."""
    return [p for p, _ in modules(arch, include_top, pooling, options)]

  def layer_names(
    arch: str | None = None,
    include_top: bool = True,
    pooling: str | None = None,
    **options: Any,
  ) -> list[str]:
    """The module paths holding parameters, in forward order."""
    mods = modules(arch, include_top, pooling, options)
    return [p for p, params in mods if params]

  return module_paths, layer_names


def _for_arch(fn: Callable[..., list[str]], arch: str) -> Callable:
  """fn(arch, include_top, pooling, **options) as the registry calls it."""

  def call(
    include_top: bool = True, pooling: str | None = None, **options: Any
  ) -> list[str]:
    return fn(arch, include_top, pooling, **options)

  return call


def register_family(
  family: str,
  model: type[nn.Module],
  archs: Iterable[str],
  layer_names: Callable[..., list[str]],
  module_paths: Callable[..., list[str]],
  preprocess: str = "torch",
  options: Mapping[str, Any] | None = None,
  **fields: Any,
) -> None:
  """Registers `model(arch=arch)` for each arch of a PyTorch-named family.

  layer_names, module_paths: (arch, include_top, pooling, **options) ->
  module paths (`recorded_order`). Every torch family takes the option
  `return_layers`; fields: the rest of each Backbone.
  """
  takes_arch = "arch" in model.__dataclass_fields__
  for arch in archs:
    registry.register(
      registry.Backbone(
        arch=arch,
        family=family,
        build=functools.partial(model, arch=arch) if takes_arch else model,
        layer_names=_for_arch(layer_names, arch),
        output_layers=_for_arch(module_paths, arch),
        preprocess=preprocess,
        naming="torch",
        options={**(options or {}), "return_layers": None},
        **fields,
      )
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

  @classmethod
  def of(cls, module: nn.Module) -> Layers:
    """The layers of a container with `dtype` / `param_dtype` fields."""
    return cls(module.dtype, module.param_dtype)

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


def pool(module: nn.Module, x: jax.Array, pooling: str | None) -> jax.Array:
  """Without the top: the global pool, as module 'avgpool' / 'maxpool'."""
  if pooling is None:
    return x
  return tap(module, pool_module(pooling), common.global_pool(x, pooling))


def output(x: Any, include_top: bool, dtype: Any) -> Any:
  """Logits in float32; features in the compute dtype (each of a dict)."""
  dtype = jnp.float32 if include_top else dtype
  return jax.tree.map(lambda a: a.astype(dtype), x)


ACTIVATIONS = {
  "relu": nn.relu,
  "relu6": nn.relu6,
  "silu": nn.silu,
  "hardswish": nn.hard_swish,
}


class ConvNormActivation(nn.Module):
  """torchvision.ops.Conv2dNormActivation: children '0' conv, '1' BN, '2'.

  Symmetric padding (kernel_size - 1) // 2 unless `padding` says otherwise;
  BatchNorm with torch's eps and (Flax's) momentum.
  """

  features: int
  kernel_size: int = 3
  stride: int = 1
  groups: int = 1
  activation: str | None = "relu"
  eps: float = TORCH_BN_EPS
  momentum: float = BN_MOMENTUM
  padding: int | str | None = None  # None: (kernel_size - 1) // 2.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    layers = Layers.of(self)
    pad = (self.kernel_size - 1) // 2 if self.padding is None else self.padding
    x = layers.conv(
      x, self.features, self.kernel_size, "0", self.stride, pad, self.groups
    )
    x = tap(self, "0", x)
    x = layers.bn(x, train, "1", eps=self.eps, momentum=self.momentum)
    x = tap(self, "1", x)
    if self.activation is not None:
      x = tap(self, "2", ACTIVATIONS[self.activation](x))
    return x
