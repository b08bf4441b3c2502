"""NASNetMobile files of every layout -> flaxtl -> Keras' outputs."""

import pytest

from flaxtl.weights import keras_file
from flaxtl.weights.mappings import nasnet as nasnet_mapping
from tests import keras_apps as ka

ARCH, SIZE = "nasnet_mobile", 32


@pytest.fixture(scope="module")
def cases(keras, tmp_path_factory):
  root = tmp_path_factory.mktemp("nasnet_mobile")
  return {
    top: ka.Case(keras, ARCH, top, SIZE, root / str(top))
    for top in (True, False)
  }


@pytest.mark.parametrize("layout", ka.LAYOUTS)
@pytest.mark.parametrize("include_top", [True, False])
def test_parity_with_keras(
  cases, tmp_path, record_property, include_top, layout
):
  case = cases[include_top]
  prov = ka.check_conversion(
    case, case.files[layout], tmp_path / "c", record_property
  )
  assert prov["layout"] == layout


def test_detect(cases):
  read = keras_file.read(cases[False].files["keras_archive"])
  assert nasnet_mapping.detect(read) == ARCH
