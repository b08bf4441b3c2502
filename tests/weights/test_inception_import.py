"""InceptionV3 files of every layout -> flaxtl -> Keras' outputs."""

import inspect
import re

import h5py
import pytest

from flaxtl import weights
from flaxtl.errors import UserError
from flaxtl.weights import keras_file, sources
from flaxtl.weights.mappings import inception as inception_mapping
from tests import keras_oracle as oracle

ARCH, SIZE = "inception_v3", 75


@pytest.fixture(scope="module")
def cases(keras, module_tmp):
  root = module_tmp("inception_v3")
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


def test_auto_names_from_another_session_nested(keras, cases, tmp_path):
  """Keras 2 numbered from conv2d_1, a second model goes on from conv2d_94:
  every layer of a nested InceptionV3 maps by its rank in its class."""
  from keras.src.legacy.saving import legacy_h5_format

  case = cases[False]
  inner = keras.applications.InceptionV3(
    weights=None, include_top=False, input_shape=(SIZE, SIZE, 3)
  )
  inner.set_weights(case.model.get_weights())
  inp = keras.Input((SIZE, SIZE, 3))
  feats = keras.layers.GlobalAveragePooling2D()(inner(inp))
  outer = keras.Model(inp, keras.layers.Dense(3, name="head")(feats))
  path = tmp_path / "nested.h5"
  with h5py.File(path, "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, outer)
  names = [layer.name for layer in keras_file.read(path).layers]
  assert names[0] == "conv2d_94" and "head" in names
  prov = oracle.check_conversion(case, path, tmp_path / "c")
  assert prov["skipped_file_layers"] == ["head at /head"]


def test_unnamed_keras3_file_maps_by_class_keys(cases, tmp_path):
  case = cases[True]
  src = oracle.strip_names(
    case.files["keras3_weights_h5"], tmp_path / "old.weights.h5"
  )
  prov = oracle.check_conversion(case, src, tmp_path / "c", arch=ARCH)
  assert prov["mapping"] == "by_class_order"


def test_detect_and_wrong_architecture(cases):
  src = cases[False].files["legacy_weights_h5"]
  assert inception_mapping.detect(keras_file.read(src)) == ARCH
  with pytest.raises(UserError, match="holds an inception_v3 model"):
    weights.load_file(src, "inception_resnet_v2")
  with pytest.raises(
    UserError, match="holds a inception_v3 model, not xception"
  ):
    weights.load_file(src, "xception")


def test_imagenet_table_is_keras_own(keras):
  from keras.src.applications import inception_resnet_v2 as kirv2
  from keras.src.applications import inception_v3 as kv3

  base = sources.KERAS_BASE_URL
  v3 = re.findall(r'file_hash="([0-9a-f]{32})"', inspect.getsource(kv3))
  assert sources.IMAGENET_FILES[(ARCH, True)] == (
    kv3.WEIGHTS_PATH.removeprefix(base),
    v3[0],
  )
  assert sources.IMAGENET_FILES[(ARCH, False)] == (
    kv3.WEIGHTS_PATH_NO_TOP.removeprefix(base),
    v3[1],
  )
  text = inspect.getsource(kirv2)
  irv2 = re.findall(r'file_hash="([0-9a-f]{32})"', text)
  names = re.findall(r'"(inception_resnet_v2_weights_[a-z_]+\.h5)"', text)
  folder = kirv2.BASE_WEIGHT_URL.removeprefix(base)
  for top, name, digest in zip((True, False), names, irv2):
    assert sources.IMAGENET_FILES[("inception_resnet_v2", top)] == (
      folder + name,
      digest,
    )
