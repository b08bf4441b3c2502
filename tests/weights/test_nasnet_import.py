"""NASNetMobile files of every layout -> flaxtl -> Keras' outputs."""

import inspect
import re

import pytest

from flaxtl.weights import keras_file, sources
from flaxtl.weights.mappings import nasnet as nasnet_mapping
from tests import keras_layouts
from tests import keras_oracle as oracle

ARCH, SIZE = "nasnet_mobile", 32


@pytest.fixture(scope="module")
def cases(keras, module_tmp):
  root = module_tmp("nasnet_mobile")
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


@pytest.mark.parametrize("layout", keras_layouts.NESTED_LAYOUTS)
def test_nested_parity_with_keras(keras, cases, tmp_path, layout):
  """Inside a bigger model; its legacy h5 keeps NASNet's name scopes."""
  case = cases[False]
  src = keras_layouts.write_nested(keras, case.model, tmp_path)[layout]
  prov = oracle.check_conversion(case, src, tmp_path / "c")
  assert any(s.startswith("head ") for s in prov["skipped_file_layers"])
