"""Keras files of every layout -> flaxtl -> the same outputs as Keras itself."""

import json
import os
from pathlib import Path
import re
import shutil
import subprocess
import sys

import h5py
import jax
import numpy as np
import pytest

from flaxtl import convert, files, models, weights
from flaxtl.errors import UserError
from flaxtl.weights import keras_file
from flaxtl.weights.mappings import vgg as vgg_mapping
from tests import keras_oracle as oracle
from tests.keras_layouts import write_keras3, write_official

TOL = 1e-4  # Largest |difference| relative to the largest |Keras output|.


def _keras_model(keras, arch, include_top, size):
  builder = {
    "vgg16": keras.applications.VGG16,
    "vgg19": keras.applications.VGG19,
  }[arch]
  kwargs = {"classifier_activation": None} if include_top else {}
  keras.utils.set_random_seed(1)
  return builder(
    weights=None, include_top=include_top, input_shape=(size, size, 3), **kwargs
  )


def _nested(keras, inner, size):
  """VGG16 as a sub-model of a bigger model, like the HED backbone."""
  inp = keras.Input((size, size, 3))
  x = keras.layers.GlobalAveragePooling2D()(inner(inp))
  return keras.Model(inp, keras.layers.Dense(10, name="head")(x))


def _images(size, n=2):
  rng = np.random.default_rng(size)
  return rng.integers(0, 256, (n, size, size, 3)).astype(np.float32)


class Case:
  """A Keras model, its reference outputs, and its weights in many layouts."""

  def __init__(
    self, keras, tmp: Path, arch: str, include_top: bool, size: int, layouts
  ):
    from keras.applications import vgg16 as kvgg16

    self.arch, self.include_top, self.size = arch, include_top, size
    model = _keras_model(keras, arch, include_top, size)
    self.x = kvgg16.preprocess_input(_images(size))
    self.want = np.asarray(model(self.x))
    self.files: dict[str, Path] = {}
    tmp.mkdir(parents=True, exist_ok=True)
    if set(layouts) & {
      "keras3_weights_h5",
      "keras_archive",
      "legacy_model_h5",
      "legacy_weights_h5",
    }:
      written = write_keras3(model, tmp)
      self.files.update({k: v for k, v in written.items() if k in layouts})
      for k, v in written.items():
        if k not in layouts:
          v.unlink()
    for style in ("keras1", "keras2"):
      if f"official_{style}" in layouts:
        self.files[f"official_{style}"] = write_official(
          model, tmp / f"official_{style}.h5", style
        )
    if "nested_weights_h5" in layouts or "nested_legacy_h5" in layouts:
      from keras.src.legacy.saving import legacy_h5_format

      outer = _nested(keras, model, size)
      outer.save_weights(tmp / "nested.weights.h5")
      with h5py.File(tmp / "nested_legacy.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, outer)
      self.files["nested_weights_h5"] = tmp / "nested.weights.h5"
      self.files["nested_legacy_h5"] = tmp / "nested_legacy.h5"
    self.model = model


NOTOP_LAYOUTS = [
  "keras3_weights_h5",
  "keras_archive",
  "legacy_model_h5",
  "legacy_weights_h5",
  "official_keras1",
  "official_keras2",
  "nested_weights_h5",
  "nested_legacy_h5",
]
CASES = {
  ("vgg16", False): (64, NOTOP_LAYOUTS),
  ("vgg19", False): (
    64,
    ["keras3_weights_h5", "official_keras1", "legacy_model_h5"],
  ),
  ("vgg16", True): (224, ["official_keras1", "keras3_weights_h5"]),
  ("vgg19", True): (224, ["keras_archive"]),
}
PARAMS = [
  (a, t, layout) for (a, t), (_, layouts) in CASES.items() for layout in layouts
]


@pytest.fixture(scope="module")
def cases(keras, module_tmp):
  built = {}

  def get(arch, include_top):
    if (arch, include_top) not in built:
      size, layouts = CASES[(arch, include_top)]
      tmp = module_tmp(f"{arch}_{'top' if include_top else 'notop'}")
      built[(arch, include_top)] = Case(
        keras, tmp, arch, include_top, size, layouts
      )
    return built[(arch, include_top)]

  return get


@pytest.mark.parametrize("arch,include_top,layout", PARAMS)
def test_parity_with_keras(
  cases, tmp_path, record_property, arch, include_top, layout
):
  case = cases(arch, include_top)
  src = case.files[layout]
  out = weights.convert_file(
    src, tmp_path / "ckpt"
  )  # arch and top inferred from the file
  prov = weights.read_provenance(out)
  assert (prov["arch"], prov["include_top"]) == (arch, include_top)
  assert prov["layout"] == oracle.READ_AS[layout]
  assert prov["source_sha256"] == files.file_hash(src)

  params = weights.restore(out)
  model = models.create(arch, include_top=include_top)
  got = np.asarray(jax.jit(model.apply)({"params": params}, case.x))
  assert got.shape == case.want.shape
  rel = np.abs(got - case.want).max() / np.abs(case.want).max()
  record_property("max_rel_diff", float(rel))
  assert rel <= TOL

  # Restored params are bit-identical to the arrays in the file.
  layers = {layer.name: layer for layer in keras_file.read(src).layers}
  for name, p in params.items():
    kernel, bias = layers[name].arrays
    np.testing.assert_array_equal(p["kernel"], kernel)
    np.testing.assert_array_equal(p["bias"], bias)


def test_explicit_notop_from_a_top_file(cases, tmp_path):
  case = cases("vgg16", True)
  out = weights.convert_file(
    case.files["keras3_weights_h5"], tmp_path / "c", include_top=False
  )
  params = weights.restore(out)
  assert "fc1" not in params and "block5_conv3" in params
  np.testing.assert_array_equal(
    params["block1_conv1"]["kernel"], case.model.layers[1].get_weights()[0]
  )


def test_by_order_mapping_without_names(cases, tmp_path):
  """A Keras 3 file whose groups have no `name` attribute maps by order."""
  src = cases("vgg16", False).files["keras3_weights_h5"]
  stripped = tmp_path / "noname.weights.h5"
  shutil.copy(src, stripped)
  with h5py.File(stripped, "r+") as f:
    f.visititems(
      lambda n, o: o.attrs.__delitem__("name") if "name" in o.attrs else None
    )
  conv = vgg_mapping.from_keras(keras_file.read(stripped))
  assert conv.mapping == "by_order" and conv.arch == "vgg16"
  ref = vgg_mapping.from_keras(keras_file.read(src))
  assert ref.mapping == "by_name"
  got, want = conv.variables["params"], ref.variables["params"]
  for name in want:  # conv2d_10 must not be taken for the third conv.
    np.testing.assert_array_equal(got[name]["kernel"], want[name]["kernel"])


# --- bad input: one line, exit 2, nothing written, nothing existing harmed ---


def _run_cli(capsys, *argv):
  with pytest.raises(SystemExit) as e:
    convert.main([str(a) for a in argv])
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert e.value.code == 2
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert "Traceback" not in err
  return lines[0]


@pytest.fixture
def good_file(cases, tmp_path):
  dst = tmp_path / "good.h5"
  shutil.copy(cases("vgg16", False).files["legacy_weights_h5"], dst)
  return dst


def _edit_legacy(path, fn):
  with h5py.File(path, "r+") as f:
    fn(f)
  return path


def _drop_block5_conv3(f):
  del f["block5_conv3"]
  names = [
    n if isinstance(n, bytes) else n.encode() for n in f.attrs["layer_names"]
  ]
  f.attrs["layer_names"] = np.array([n for n in names if n != b"block5_conv3"])


def _reshape_block2_conv1(f):
  g = f["block2_conv1"]
  name = next(iter(g.attrs["weight_names"]))
  name = name.decode() if isinstance(name, bytes) else name
  del g[name]
  g.create_dataset(name, data=np.zeros((3, 3, 64, 64), np.float32))


@pytest.mark.parametrize(
  "make,extra,msg",
  [
    (
      lambda p, c: (
        p.with_name("notes.txt").write_text("hello")
        and p.with_name("notes.txt")
      ),
      [],
      "not a Keras file",
    ),
    (
      lambda p, c: (
        p.with_name("empty.h5").write_bytes(b"") or p.with_name("empty.h5")
      ),
      [],
      "file is empty",
    ),
    (
      lambda p, c: (
        p.with_name("trunc.h5").write_bytes(
          p.read_bytes()[: p.stat().st_size // 2]
        )
        and p.with_name("trunc.h5")
      ),
      [],
      "corrupt",
    ),
    (
      lambda p, c: c("vgg19", False).files["keras3_weights_h5"],
      ["--arch", "vgg16"],
      "holds a VGG19 conv stack",
    ),
    (lambda p, c: _edit_legacy(p, _drop_block5_conv3), [], "missing layer"),
    (
      lambda p, c: _edit_legacy(p, _reshape_block2_conv1),
      [],
      r"block2_conv1.*\(3, 3, 64, 64\), expected \(3, 3, 64, 128\)",
    ),
    (lambda p, c: p.with_name("nope.h5"), [], "no such file"),
    (lambda p, c: p.parent, [], "is a directory"),
  ],
  ids=[
    "not_hdf5",
    "empty",
    "truncated",
    "vgg19_as_vgg16",
    "missing_layer",
    "shape_mismatch",
    "missing_file",
    "directory",
  ],
)
def test_bad_input_is_one_line_and_leaves_existing_output_intact(
  capsys, cases, good_file, tmp_path, make, extra, msg
):
  out = tmp_path / "out"
  weights.convert_file(cases("vgg16", False).files["keras3_weights_h5"], out)
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  capsys.readouterr()

  src = make(good_file, cases)
  line = _run_cli(capsys, src, "--out", out, "--force", *extra)
  assert re.search(msg, line), line
  assert str(Path(src).name) in line or "vgg16" in line.lower()
  after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  assert after == before  # The existing checkpoint is untouched.
  assert (
    sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
  )  # No temp leftovers.
  weights.restore(out)


def test_existing_output_needs_force(capsys, good_file, tmp_path):
  out = tmp_path / "out"
  convert.main([str(good_file), "--out", str(out)])
  capsys.readouterr()
  line = _run_cli(capsys, good_file, "--out", out)
  assert "already exists" in line and str(out) in line
  convert.main(
    [str(good_file), "--out", str(out), "--force"]
  )  # Replacing works with --force.
  weights.restore(out)


def test_unwritable_output_dir(capsys, good_file, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  line = _run_cli(capsys, good_file, "--out", blocker / "sub" / "out")
  assert "cannot write" in line and "sub" in line


def test_restore_rejects_mismatched_checkpoint(good_file, tmp_path):
  out = weights.convert_file(good_file, tmp_path / "c")
  prov = json.loads((out / "provenance.json").read_text())
  prov["arch"] = "vgg19"
  (out / "provenance.json").write_text(json.dumps(prov))
  with pytest.raises(UserError, match="block3_conv4/kernel missing"):
    weights.restore(out)


def test_cli_subprocess_exit_code_and_single_line(tmp_path):
  bad = tmp_path / "bad.h5"
  bad.write_text("not hdf5 at all")
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "flaxtl.convert",
      str(bad),
      "--out",
      str(tmp_path / "o"),
    ],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
    f"error: {bad}: not a Keras file (neither HDF5 nor a .keras zip archive)"
  ]
  assert not (tmp_path / "o").exists()
