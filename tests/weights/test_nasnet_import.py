"""NASNetMobile files of every layout -> flaxtl -> Keras' outputs."""

import inspect
import re

import pytest

from flaxtl.weights import keras_file, sources
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


def test_imagenet_table_is_keras_own(keras):
  from keras.src.applications import nasnet as knasnet

  base = sources.KERAS_BASE_URL
  # The first two hashes in the source are NASNetMobile's (top, notop).
  top, notop = re.findall(
    r'file_hash="([0-9a-f]{32})"', inspect.getsource(knasnet)
  )[:2]
  assert sources.IMAGENET_FILES[(ARCH, True)] == (
    knasnet.NASNET_MOBILE_WEIGHT_PATH.removeprefix(base),
    top,
  )
  assert sources.IMAGENET_FILES[(ARCH, False)] == (
    knasnet.NASNET_MOBILE_WEIGHT_PATH_NO_TOP.removeprefix(base),
    notop,
  )
