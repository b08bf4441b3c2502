"""ConvNeXt files of every layout -> flaxtl -> Keras' outputs."""

import pytest

from flaxtl import weights
from flaxtl.errors import UserError
from flaxtl.models import convnext
from flaxtl.weights import keras_file, sources
from flaxtl.weights.mappings import convnext as convnext_mapping
from tests import keras_oracle as oracle

ARCH, SIZE = "convnext_tiny", 32


@pytest.fixture(scope="module")
def cases(keras, module_tmp):
  root = module_tmp("convnext_tiny")
  return oracle.top_and_notop(keras, ARCH, root, SIZE)


@pytest.mark.parametrize("layout", oracle.LAYOUTS)
@pytest.mark.parametrize("include_top", [True, False])
def test_parity_with_keras(
  cases, tmp_path, record_property, include_top, layout
):
  case = cases[include_top]
  prov = oracle.check_conversion(
    case, case.files[layout], tmp_path / "c", record_property
  )
  assert prov["layout"] == layout
  assert prov["mapping"] == "by_name"


def test_unnamed_keras3_file_maps_by_class_keys(cases, tmp_path):
  """Sequential layers sit under `layers/sequential/layers/conv2d`."""
  case = cases[False]
  src = oracle.strip_names(
    case.files["keras3_weights_h5"], tmp_path / "old.weights.h5"
  )
  prov = oracle.check_conversion(case, src, tmp_path / "c", arch=ARCH)
  assert prov["mapping"] == "by_class_order"


def test_model_built_under_another_name(keras, cases, tmp_path):
  case = cases[True]
  other = keras.applications.ConvNeXtTiny(
    weights=None,
    input_shape=(SIZE, SIZE, 3),
    classes=case.model.output_shape[-1],
    classifier_activation=None,
    name="my_convnext",
  )
  other.set_weights(case.model.get_weights())
  other.save(tmp_path / "mine.keras")
  read = keras_file.read(tmp_path / "mine.keras")
  assert "my_convnext_stem_conv" in [layer.name for layer in read.layers]
  assert convnext_mapping.detect(read) == ARCH
  oracle.check_conversion(case, tmp_path / "mine.keras", tmp_path / "c")


def test_wrong_size_is_named(cases):
  src = cases[False].files["legacy_weights_h5"]
  with pytest.raises(UserError, match="holds a convnext_tiny model, not conv"):
    weights.load_file(src, "convnext_small")


def test_imagenet_table_is_keras_own(keras):
  from keras.src.applications import convnext as kconvnext

  folder = kconvnext.BASE_WEIGHTS_PATH.removeprefix(sources.KERAS_BASE_URL)
  for arch, (top, notop) in kconvnext.WEIGHTS_HASHES.items():
    assert sources.IMAGENET_FILES[(arch, True)] == (f"{folder}{arch}.h5", top)
    assert sources.IMAGENET_FILES[(arch, False)] == (
      f"{folder}{arch}_notop.h5",
      notop,
    )
  assert set(convnext.IMAGENET_FILES) == {
    (a, t) for a in kconvnext.WEIGHTS_HASHES for t in (True, False)
  }
