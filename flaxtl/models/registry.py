"""The backbone registry: what code above `models/` may know about a backbone.

Training, freezing, merging, feature caching, weight import, prediction and
the CPU tuning ask `get(arch)` and never name a family. A family module
registers each architecture it provides with `register(Backbone(...))` when
`flaxtl.models` is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import functools
import math
from types import MappingProxyType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.errors import UserError, did_you_mean

# Options every backbone's `build` accepts.
COMMON_OPTIONS = (
  "include_top",  # The model's own classifier (Keras' include_top).
  "num_classes",  # Outputs of that classifier.
  "pooling",  # Without the top: None (4D features), 'avg' or 'max'.
  "output_layer",  # Stop at this layer and return its output.
  "return_layers",  # Return {name: output} for these layers instead.
  "dtype",  # Compute dtype.
  "param_dtype",  # Parameter storage dtype.
)
POOLINGS = (None, "avg", "max")  # What CNN backbones take (Keras').


@dataclasses.dataclass(frozen=True)
class Stage:
  """A feature stage, timm's `feature_info` entry: the last layer of the
  shallowest module path at each output stride."""

  name: str  # A layer `output_layer` / `return_layers` / freeze.until take.
  stride: int  # Input size / output size.
  channels: int


PREPROCESS_MODES = ("caffe", "tf", "torch", "clip", "none")


@dataclasses.dataclass(frozen=True)
class Backbone:
  """One architecture, as the rest of flaxtl sees it.

  Attributes:
    arch: registry name ('vgg16', 'resnet50', 'tv_resnet50').
    family: the module in `flaxtl.models` that defines it.
    build: `build(**options) -> nn.Module`; options are COMMON_OPTIONS plus the
      keys of `options`. The module is called as `module(x, train=...)` on
      NHWC float input in the range `preprocess` produces.
    layer_names: `layer_names(include_top, pooling, **options)`: every layer
      in forward order. For Keras families exactly `[l.name for l in
      model.layers]` (input included), so `model.layers[:k]` is
      `layer_names(...)[:k]`; for PyTorch families the module paths with
      parameters ('layer1/0/conv1'). Parameter paths start with these names.
    preprocess: what the family's `preprocess_input` does to 0..255 RGB:
      'caffe', 'tf', 'torch', or 'none' (the model normalises inside).
    min_size: smallest square input it accepts without the top.
    top_size: the input size its top needs (None: any size >= min_size).
    feature_layer: the default layer a new head reads (before the top).
    classifier: the top's final layer: replaced for a new task.
    batch_stats: whether it has a 'batch_stats' collection.
    stem_layers: its first convolutions (XLA:CPU tuning, `flaxtl.ops.cpu`).
    options: family options with their defaults (e.g. {'alpha': 1.0}).
    naming: 'keras' (Keras layer names) or 'torch' (PyTorch module paths).
    output_layers: `output_layers(include_top, pooling, **options)`: every
      name `output_layer` (and so a head's feature layer) accepts, in forward
      order. None: `layer_names` without the input layer. PyTorch families
      accept every module path, containers and weightless modules included.
    poolings: the `pooling` values the backbone takes without its top.
    declared_stages: the stages, where they cannot be derived from the layer
      shapes (token models); None: `stages()` derives them.
  """

  arch: str
  family: str
  build: Callable[..., nn.Module]
  layer_names: Callable[..., list[str]]
  preprocess: str
  min_size: int
  feature_layer: str
  classifier: str = "predictions"
  top_size: int | None = None
  batch_stats: bool = False
  stem_layers: tuple[str, ...] = ()
  options: Mapping[str, Any] = dataclasses.field(
    default_factory=lambda: MappingProxyType({})
  )
  naming: str = "keras"
  output_layers: Callable[..., list[str]] | None = None
  poolings: tuple[str | None, ...] = POOLINGS
  declared_stages: tuple[Stage, ...] | None = None

  def __post_init__(self):
    if self.preprocess not in PREPROCESS_MODES:
      raise ValueError(f"{self.arch}: preprocess {self.preprocess!r}")
    if self.naming not in ("keras", "torch"):
      raise ValueError(f"{self.arch}: naming {self.naming!r}")

  def check_options(self, options: Mapping[str, Any]) -> None:
    allowed = set(COMMON_OPTIONS) | set(self.options)
    unknown = sorted(set(options) - allowed)
    if unknown:
      raise UserError(
        f"{self.arch}: unknown option(s) {unknown}; it takes {sorted(allowed)}"
      )
    if options.get("pooling") not in self.poolings:
      raise UserError(
        f"{self.arch}: pooling must be one of {list(self.poolings)}, "
        f"got {options['pooling']!r}"
      )

  def create(self, **options: Any) -> nn.Module:
    self.check_options(options)
    return self.build(**options)

  def layers(
    self, include_top: bool = True, pooling: str | None = None, **options: Any
  ) -> list[str]:
    self.check_options({"pooling": pooling, **options})
    return self.layer_names(include_top=include_top, pooling=pooling, **options)

  def outputs(
    self, include_top: bool = True, pooling: str | None = None, **options: Any
  ) -> list[str]:
    """The layers `output_layer` can name, in forward order."""
    self.check_options({"pooling": pooling, **options})
    if self.output_layers is None:
      return self.layer_names(
        include_top=include_top, pooling=pooling, **options
      )[1:]
    return self.output_layers(
      include_top=include_top, pooling=pooling, **options
    )

  def stages(self, **options: Any) -> tuple[Stage, ...]:
    """Each output stride's stage, without the top (timm's feature_info)."""
    if self.declared_stages is not None:
      return self.declared_stages
    self.check_options(options)
    return _stages(self.arch, tuple(sorted(options.items())))

  def stage(self, stride: int, **options: Any) -> Stage:
    """The stage at `stride` ('through the stride-8 stage')."""
    found = {s.stride: s for s in self.stages(**options)}
    if stride not in found:
      raise UserError(
        f"{self.arch} has no stride-{stride} stage (strides: {sorted(found)})"
      )
    return found[stride]

  def input_size(self, include_top: bool) -> int:
    """The smallest square input the model takes with or without its top."""
    return self.top_size if include_top and self.top_size else self.min_size


STAGE_SIZE = 224  # Strides are read off the layer shapes at this input.


def layer_shapes(
  backbone: Backbone, **options: Any
) -> list[tuple[str, tuple[int, ...]]]:
  """(layer, output shape without the batch) of every output layer without
  the top, in forward order, at STAGE_SIZE; no FLOPs (`jax.eval_shape`)."""
  names = backbone.outputs(include_top=False, **options)
  model = backbone.build(
    include_top=False, return_layers=tuple(names), **options
  )
  x = jax.ShapeDtypeStruct((1, STAGE_SIZE, STAGE_SIZE, 3), jnp.float32)

  def run(x):
    variables = model.init(jax.random.PRNGKey(0), x)
    return model.apply(variables, x)

  out = jax.eval_shape(run, x)
  return [(n, tuple(out[n].shape[1:])) for n in names]


def _stride(shape: tuple[int, ...]) -> int | None:
  """The output stride of a (h, w, c) map at STAGE_SIZE: a power of two up to
  64 whose 'same' size h is, or a 'valid' size a few pixels under it (111 in
  Xception). Tokens, padded maps (57x57) and 1x1 squeeze-excite maps: None."""
  if len(shape) != 3:
    return None
  stride = 2 ** round(math.log2(STAGE_SIZE / shape[0]))
  same = -(-STAGE_SIZE // stride)
  if stride > 64 or not 0.85 * same <= shape[0] <= same:
    return None
  return stride


@functools.cache
def _stages(arch: str, options: tuple) -> tuple[Stage, ...]:
  backbone = get(arch)
  by_stride: dict[int, list[tuple[int, str, int]]] = {}
  for i, (name, shape) in enumerate(layer_shapes(backbone, **dict(options))):
    stride = _stride(shape)
    if stride is None or i == 0:
      continue
    by_stride.setdefault(stride, []).append((name.count("/"), name, shape[2]))
  stages = []
  for stride, layers in sorted(by_stride.items()):
    depth = min(d for d, _, _ in layers)
    _, name, channels = [t for t in layers if t[0] == depth][-1]
    stages.append(Stage(name, stride, channels))
  return tuple(stages)


_REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
  if backbone.arch in _REGISTRY:
    raise ValueError(f"architecture {backbone.arch!r} registered twice")
  _REGISTRY[backbone.arch] = backbone
  return backbone


def get(arch: str) -> Backbone:
  try:
    return _REGISTRY[arch]
  except KeyError:
    hint = did_you_mean(str(arch), names()) or (
      "; `python -m flaxtl.convert --help` lists them"
    )
    raise UserError(f"unknown architecture {arch!r}{hint}") from None


def names(family: str | None = None) -> list[str]:
  return sorted(a for a, b in _REGISTRY.items() if family in (None, b.family))


def create(arch: str, **options: Any) -> nn.Module:
  """The Flax module of `arch`; `.apply(variables, x, train=False)` runs it."""
  return get(arch).create(**options)


def keras_layer_names(
  arch: str, include_top: bool = True, pooling: str | None = None, **options
) -> list[str]:
  """`[l.name for l in model.layers]` of the Keras model (input included)."""
  return get(arch).layers(include_top, pooling, **options)
