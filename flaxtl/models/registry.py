"""The backbone registry: what code above `models/` may know about a backbone.

Training, freezing, merging, feature caching, weight import, prediction and
the CPU tuning ask `get(arch)` and never name a family. A family module
registers each architecture it provides with `register(Backbone(...))` when
`flaxtl.models` is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from types import MappingProxyType
from typing import Any

import flax.linen as nn

from flaxtl.errors import UserError

# Options every backbone's `build` accepts.
COMMON_OPTIONS = (
  "include_top",  # The model's own classifier (Keras' include_top).
  "num_classes",  # Outputs of that classifier.
  "pooling",  # Without the top: None (4D features), 'avg' or 'max'.
  "output_layer",  # Stop at this layer and return its output.
  "dtype",  # Compute dtype.
  "param_dtype",  # Parameter storage dtype.
)
POOLINGS = (None, "avg", "max")
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
    poolings: the `pooling` values it takes (ViTs add 'token' and 'map').
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

  def input_size(self, include_top: bool) -> int:
    """The smallest square input the model takes with or without its top."""
    return self.top_size if include_top and self.top_size else self.min_size


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
    raise UserError(
      f"unknown architecture {arch!r}; expected one of {names()}"
    ) from None


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
