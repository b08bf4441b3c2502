"""The repository's config files at test size, shared by the workflow tests."""

from pathlib import Path

import ml_collections

from flaxtl import config_files

ROOT = Path(__file__).resolve().parents[1]


def quick(spec: str, tmp: Path, **overrides) -> ml_collections.ConfigDict:
  """A config file (with its :variant) at test size: a few steps on 100
  digits, 32x32 unless the Keras top needs its own size."""
  c = config_files.load(str(ROOT / spec))
  c.progress = False
  c.data.max_examples = 100
  c.batch_size = 8
  c.eval_batch_size = 50
  c.total_steps = 3
  c.log_every_steps = 1
  c.model.features_cache_dir = str(tmp / "feature_cache")
  if c.model.name == "transfer" and c.model.head != "keras_top":
    c.image_size = 32
  for k, v in overrides.items():
    config_files.override(c, f"{k}={v!r}")
  return c
