"""What a run builds, resolved once from its config and its weights.

Model building, the freeze plan, the compiler options and feature caching
read the same `RunSpec` instead of each re-reading the config: the backbone
options a file was converted with (MobileNet's alpha, EfficientNet's ImageNet
rescaling) therefore reach all of them (the layer order `freeze.first_layers`
counts depends on them).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

import ml_collections

from flaxtl.models import registry
from flaxtl.peft import core as peft_core
from flaxtl.train import config as config_lib


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """The resolved model side of a run.

  backbone: the registered backbone (None for the pixel baselines).
  options: the backbone's options: model.options, the family keys
    (model.alpha, model.conv_impl), those the weights were converted with and
    those PEFT sets (prompt tokens).
  include_top: whether the backbone keeps its own top (model.head keras_top).
  feature_layer: the layer a new head reads (None with the top).
  pooling: how a new head pools that layer.
  preprocess: the resolved preprocess mode.
  """

  backbone: registry.Backbone | None
  options: Mapping[str, Any]
  include_top: bool
  feature_layer: str | None
  pooling: str | None
  preprocess: str

  @property
  def arch(self) -> str | None:
    return self.backbone.arch if self.backbone is not None else None

  def layer_options(self) -> dict[str, Any]:
    """What the registry's layer lists take for this run's model."""
    return {"include_top": self.include_top, "pooling": self.pooling}


def resolve(
  config: ml_collections.ConfigDict, provenance: dict | None = None
) -> RunSpec:
  """The run's spec; `provenance`: its pretrained weights' (for options)."""
  spec = config_lib.backbone(config)
  include_top = spec is not None and config.model.head == "keras_top"
  return RunSpec(
    backbone=spec,
    options={
      **config_lib.backbone_options(config, provenance),
      **peft_core.backbone_options(config),  # The ViT's prompt tokens.
    },
    include_top=include_top,
    feature_layer=(
      None if spec is None or include_top else config_lib.feature_layer(config)
    ),
    pooling=config.model.pooling,
    preprocess=config_lib.preprocess_mode(config),
  )
