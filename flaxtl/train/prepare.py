"""What training needs once data and weights are in place: the `Run`.

The splits (checked against the model and the batch size), the model and its
initial variables with the pretrained weights merged in, created sharded in
place, and, for a head on a frozen backbone, the backbone's features computed
once (cached on disk).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections

from flaxtl import data as data_lib
from flaxtl.errors import UserError
from flaxtl.models.heads import HeadOnly, MLPHead
from flaxtl.preprocess import prepare_images
from flaxtl.train import config as config_lib
from flaxtl.train import features, run_spec, setup
from flaxtl.train import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class Run:
  """What training needs once data and weights are in place."""

  model: nn.Module
  variables: dict  # {'params': ..., 'batch_stats': ...}
  prepare: Any  # Device-side batch["image"] -> model input.
  splits: Any  # Backbone features instead of images when features are cached.
  provenance: dict | None
  spec: run_spec.RunSpec  # The model side, resolved once.
  frozen_backbone: dict | None = None  # Host variables of a cached backbone.


def load_data(config: ml_collections.ConfigDict):
  """The train/val/test splits, checked against the model and batch size."""
  splits = data_lib.load(config.data)
  num_classes = len(splits.class_names)
  if num_classes < 2:
    raise UserError(
      f"data.source={config.data.source!r} has only one class "
      f"({splits.class_names[0]!r}); a classifier needs at least 2"
    )
  if config.model.num_classes and config.model.num_classes != num_classes:
    raise UserError(
      f"model.num_classes={config.model.num_classes} but the data has "
      f"{num_classes} classes ({config.data.source})"
    )
  if splits.train is None or len(splits.train) == 0:
    raise UserError(f"data.source={config.data.source!r}: no training examples")
  if len(splits.train) < config.batch_size:
    raise UserError(
      f"batch_size={config.batch_size} is larger than the "
      f"{len(splits.train)} training examples"
    )
  return splits


def _split_backbone(variables: dict) -> tuple[dict, dict]:
  """(backbone variables, the rest), per collection."""
  inner = {c: v["backbone"] for c, v in variables.items() if "backbone" in v}
  rest = {
    c: {k: x for k, x in v.items() if k != "backbone"}
    for c, v in variables.items()
  }
  return inner, rest


def with_backbone(variables: dict, backbone: dict) -> dict:
  """A head's variables with the cached backbone's put back under 'backbone'."""
  out = {c: dict(v) for c, v in variables.items()}
  for c, v in backbone.items():
    out.setdefault(c, {})["backbone"] = v
  return out


def _cached_features_run(config, run: Run, compiler_options) -> Run:
  """The head alone on backbone features computed once (and cached on disk)."""
  spec = run.spec
  backbone_vars, head_vars = _split_backbone(jax.device_get(run.variables))
  backbone = spec.backbone.build(
    include_top=False,
    output_layer=spec.feature_layer,
    dtype=config_lib.DTYPES[config.model.dtype],
    **spec.options,
  )

  def convert(ds, split: str):
    if ds is None:
      return None
    feats = features.extract(
      backbone,
      backbone_vars,
      ds,
      image_size=config.image_size,
      preprocess=spec.preprocess,
      cache_dir=Path(config.model.features_cache_dir),
      split=split,
      compiler_options=compiler_options,
      options=data_lib.Options.from_config(config),
    )
    return data_lib.Dataset.from_arrays(feats, ds.labels, name=split)

  splits = dataclasses.replace(
    run.splits,
    train=convert(run.splits.train, "train"),
    val=convert(run.splits.val, "val"),
    test=convert(run.splits.test, "test"),
  )
  head = MLPHead(**run.model.head_kwargs(), parent=None)
  return Run(
    model=HeadOnly(head, pooling=config.model.pooling),
    variables=head_vars,  # Host arrays: the trainer places them.
    prepare=lambda feats: feats.astype(jnp.float32),
    splits=splits,
    provenance=run.provenance,
    spec=spec,
    frozen_backbone=backbone_vars,
  )


def prepare(config, splits, init_rng: jax.Array, mesh) -> Run:
  """Model, initial variables (pretrained merged in), cached features.

  The variables are created in place, sharded as `sharding.rules` say (the
  cached-features path keeps them whole: its backbone runs on the host's).
  """
  pretrained = setup.resolve_pretrained(config)
  spec = run_spec.resolve(config, pretrained[1] if pretrained else None)
  model = setup.build_model(config, len(splits.class_names), spec=spec)
  cached = bool(config.model.cache_features)
  if cached:
    config_lib.check_feature_mode(config)
  # Shape-first: every phase's rules are checked on abstract params first.
  abstract = setup.abstract_variables(model, config.image_size, init_rng)
  params = abstract["params"]
  for k in [config.freeze.first_layers, *(k for _, k in config.freeze.phases)]:
    setup.freeze_plan(
      config,
      {"head": params["head"]} if cached else params,
      k,
      log_matches=False,
      spec=spec,
    )

  placed = (
    NamedSharding(mesh, P())
    if cached
    else sharding_lib.from_config(abstract, mesh, config.sharding)
  )
  variables = jax.jit(
    setup.init_fn(model, config.image_size), out_shardings=placed
  )(init_rng)
  variables, provenance = setup.merge_pretrained(config, variables, pretrained)
  run = Run(
    model=model,
    variables=jax.device_put(variables, placed),
    prepare=lambda images: prepare_images(
      images, config.image_size, spec.preprocess
    ),
    splits=splits,
    provenance=provenance,
    spec=spec,
  )
  if cached:
    options = setup.compiler_options(config, dtype=config.model.dtype)
    run = _cached_features_run(config, run, options)
  return run
