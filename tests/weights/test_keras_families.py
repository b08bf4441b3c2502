"""ResNet and DenseNet weight files: the ImageNet table, downloads served on
127.0.0.1, files without layer names, and bad input (one line, exit 2)."""

import hashlib
import inspect
from pathlib import Path
import re
import shutil

import h5py
import numpy as np
import pytest

from flaxtl import convert, models, weights
from flaxtl.models import densenet, resnet
from flaxtl.weights import keras_file, sources
from flaxtl.weights.mappings import resnet as resnet_mapping
from tests import keras_layouts
from tests import keras_oracle as oracle
from tests.keras_layouts import DENSENET_KERAS2_NAMES as KERAS2_NAMES


@pytest.fixture(scope="module")
def files(keras, module_tmp):
  """Official-layout files of a perturbed ResNet50 (notop) and DenseNet121
  (top, its Keras-2 layer names), a Keras 3 ResNet50 file, and their arrays.
  """
  root = module_tmp("families")
  out = {}
  r50 = oracle.keras_model(
    keras, keras.applications.ResNet50, False, 32, seed=5
  )
  keras_layouts.perturb(r50, 5)
  out["resnet50"] = keras_layouts.write_official(
    r50, root / "resnet50_notop.h5", "keras2"
  )
  out["resnet50_keras3"] = root / "resnet50.weights.h5"
  r50.save_weights(out["resnet50_keras3"])
  out["resnet50_arrays"] = oracle.keras_arrays(r50)
  d121 = oracle.keras_model(
    keras, keras.applications.DenseNet121, True, 32, seed=6
  )
  keras_layouts.perturb(d121, 6)
  out["densenet121"] = keras_layouts.write_official(
    d121, root / "densenet121.h5", "keras2", rename=KERAS2_NAMES
  )
  out["densenet121_arrays"] = oracle.keras_arrays(d121)
  return out


def test_imagenet_table_is_keras_own(keras):
  from keras.src.applications import densenet as kdensenet
  from keras.src.applications import resnet as kresnet

  base = sources.KERAS_BASE_URL
  assert base + "resnet/" == kresnet.BASE_WEIGHTS_PATH
  for arch in models.names("resnet"):
    top, notop = kresnet.WEIGHTS_HASHES[arch]
    name = f"resnet/{arch}_weights_tf_dim_ordering_tf_kernels"
    assert sources.IMAGENET_FILES[(arch, True)] == (f"{name}.h5", top)
    assert sources.IMAGENET_FILES[(arch, False)] == (f"{name}_notop.h5", notop)
  # DenseNet's hashes are literals next to each file name in its source.
  text = inspect.getsource(kdensenet)
  pairs = re.findall(
    r'"(densenet\d+_weights_tf_dim_ordering_tf_kernels(?:_notop)?\.h5)",'
    r'\s*\w+,\s*cache_subdir="models",\s*file_hash="([0-9a-f]{32})"',
    text,
  )
  assert len(pairs) == 6
  table = {
    rel: digest
    for key, (rel, digest) in sources.IMAGENET_FILES.items()
    if key[0].startswith("densenet")
  }
  assert table == {f"densenet/{name}": digest for name, digest in pairs}
  url = base + "densenet/densenet121_weights_tf_dim_ordering_tf_kernels.h5"
  assert url == kdensenet.DENSENET121_WEIGHT_PATH
  assert set(resnet.IMAGENET_FILES) | set(densenet.IMAGENET_FILES) == {
    (a, t)
    for f in ("resnet", "densenet")
    for a in models.names(f)
    for t in (True, False)
  }


def _md5(path) -> str:
  return hashlib.md5(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize(
  "arch,include_top", [("resnet50", False), ("densenet121", True)]
)
def test_convert_imagenet_cli_from_a_local_server(
  files,
  serve,
  tmp_path,
  monkeypatch,
  capsys,
  arch,
  include_top,
):
  rel, _ = sources.IMAGENET_FILES[(arch, include_top)]
  site = tmp_path / "site"
  (site / rel).parent.mkdir(parents=True)
  shutil.copy(files[arch], site / rel)
  # A real Keras file in the official layout, not the official one: its MD5.
  monkeypatch.setitem(
    sources.IMAGENET_FILES, (arch, include_top), (rel, _md5(files[arch]))
  )
  base = serve(site)
  monkeypatch.setenv("FLAXTL_KERAS_BASE_URL", base)
  argv = ["imagenet", "--arch", arch, "--weights-dir", tmp_path / "w"]
  argv += ["--cache-dir", tmp_path / "cache"]
  argv += [] if include_top else ["--notop"]
  out = convert.main([str(a) for a in argv])
  suffix = "" if include_top else "_notop"
  assert out == tmp_path / "w" / f"{arch}_imagenet{suffix}"
  assert (
    f"wrote {out}: {arch} include_top={include_top}" in capsys.readouterr().out
  )
  prov = weights.read_provenance(out)
  assert prov["url"] == base + rel and prov["source"] == "imagenet"
  assert (prov["layout"], prov["mapping"]) == ("legacy_weights_h5", "by_name")
  got = oracle.flaxtl_arrays(weights.restore_variables(out))
  want = files[f"{arch}_arrays"]
  assert set(got) == set(want)
  for name, arrays in want.items():
    for a, b in zip(got[name], arrays):
      np.testing.assert_array_equal(a, b)


def test_files_without_layer_names_map_by_order(files, tmp_path, capsys):
  """Keras 3 groups are numbered per layer class; names stripped."""
  src = tmp_path / "noname.weights.h5"
  shutil.copy(files["resnet50_keras3"], src)
  with h5py.File(src, "r+") as f:
    f.visititems(
      lambda n, o: o.attrs.__delitem__("name") if "name" in o.attrs else None
    )
  read = keras_file.read(src)
  assert all(layer.name is None for layer in read.layers)
  line = oracle.run_cli_error(capsys, src, "--out", tmp_path / "o")
  assert "cannot tell which architecture" in line
  converted = resnet_mapping.from_keras(read, "resnet50")
  assert converted.mapping == "by_order" and not converted.include_top
  got = oracle.flaxtl_arrays(converted.variables)
  for name, arrays in files["resnet50_arrays"].items():
    for a, b in zip(got[name], arrays):
      np.testing.assert_array_equal(a, b)


def _drop(name):
  def edit(f):
    del f[name]
    names = [
      n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]
    ]
    f.attrs["layer_names"] = np.array([n.encode() for n in names if n != name])

  return edit


def _reshape(layer, var, shape):
  def edit(f):
    g = f[layer]
    del g[f"{layer}/{var}:0"]
    g.create_dataset(f"{layer}/{var}:0", data=np.ones(shape, np.float32))

  return edit


@pytest.mark.parametrize(
  "src,edit,extra,msg",
  [
    (
      "densenet121",
      None,
      ["--arch", "resnet50"],
      r"holds a densenet121 model, not resnet50; use --arch densenet121",
    ),
    ("resnet50", None, ["--arch", "densenet121"], "holds a resnet50 model"),
    ("resnet50", None, ["--arch", "resnet101"], "holds a resnet50 model"),
    ("resnet50", None, ["--arch", "resnet50v2"], "holds a resnet50 model"),
    (
      "resnet50",
      _drop("conv3_block2_2_bn"),
      [],
      r"missing layer\(s\) conv3_block2_2_bn$",
    ),
    (
      "densenet121",
      _drop("conv1/conv"),
      [],
      r"missing layer\(s\) conv1_conv$",
    ),
    (
      "resnet50",
      _reshape("conv2_block1_1_bn", "moving_variance", (3,)),
      [],
      r"layer conv2_block1_1_bn \(.*\) var has shape \(3,\), expected \(64,\)",
    ),
  ],
  ids=[
    "densenet_as_resnet",
    "resnet_as_densenet",
    "resnet50_as_resnet101",
    "v1_as_v2",
    "missing_bn",
    "missing_keras2_named_stem",
    "misshaped_bn_statistic",
  ],
)
def test_bad_input_is_one_line_and_writes_nothing(
  files, tmp_path, capsys, src, edit, extra, msg
):
  path = tmp_path / Path(files[src]).name
  shutil.copy(files[src], path)
  if edit is not None:
    with h5py.File(path, "r+") as f:
      edit(f)
  before = sorted(p.name for p in tmp_path.iterdir())
  line = oracle.run_cli_error(capsys, path, "--out", tmp_path / "out", *extra)
  assert re.search(msg, line), line
  assert str(path) in line
  assert sorted(p.name for p in tmp_path.iterdir()) == before  # Nothing new.
