"""DenseNet against Keras' own: layers, shapes, outputs in every layout."""

import jax
import numpy as np
import pytest

from flaxtl import models, weights
from flaxtl.models import common, densenet
from flaxtl.weights.mappings import densenet as densenet_mapping
from tests import keras_oracle as oracle
from tests.keras_layouts import DENSENET_KERAS2_NAMES as KERAS2_NAMES

ARCHS = {
  "densenet121": "DenseNet121",
  "densenet169": "DenseNet169",
  "densenet201": "DenseNet201",
}
# The official files' Keras-2 names (keras-applications' DenseNet).
CASES = {
  False: oracle.ALL_LAYOUTS,
  True: ("official_keras2", "keras_archive", "nested_legacy_h5"),
}
PARAMS = [(t, layout) for t, layouts in CASES.items() for layout in layouts]


def test_registry_entries():
  assert models.names("densenet") == sorted(ARCHS)
  for arch in ARCHS:
    spec = models.get(arch)
    assert spec.preprocess == "torch" and spec.batch_stats
    assert spec.feature_layer == "relu" and spec.classifier == "predictions"
    assert spec.min_size == 32 and spec.top_size is None
  assert set(densenet_mapping.ALIASES.items()) <= {
    (old, new) for new, old in KERAS2_NAMES.items()
  }


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layers_and_shapes_match_keras(keras, arch):
  oracle.check_architecture(
    keras,
    getattr(keras.applications, ARCHS[arch]),
    arch,
    pooling_variants=arch == "densenet121",
  )


def test_batch_norm_momentum_and_epsilon_are_keras(cases):
  bns = [
    x
    for x in cases(False).model.layers
    if type(x).__name__ == "BatchNormalization"
  ]
  assert bns and {(x.momentum, x.epsilon) for x in bns} == {
    (densenet.BN_MOMENTUM, densenet.BN_EPSILON)
  }


@pytest.fixture(scope="module")
def cases(keras, module_tmp):
  built = {}

  def get(include_top):
    if include_top not in built:
      built[include_top] = oracle.Case(
        keras,
        "densenet121",
        module_tmp(f"densenet121_{include_top}"),
        include_top=include_top,
        layouts=CASES[include_top],
        rename=KERAS2_NAMES,
      )
    return built[include_top]

  return get


@pytest.mark.parametrize("include_top,layout", PARAMS)
def test_parity_with_keras(cases, record_property, include_top, layout):
  oracle.check_parity(
    cases(include_top), "densenet121", layout, record_property
  )


@pytest.mark.parametrize(
  "layer", ["zero_padding2d_1", "pool2_pool", "conv3_block2_concat"]
)
def test_any_keras_layer_is_an_output_layer(keras, cases, layer):
  case = cases(False)
  sub = keras.Model(case.model.inputs, case.model.get_layer(layer).output)
  want = np.asarray(sub(case.x, training=False))
  model = models.create("densenet121", include_top=False, output_layer=layer)
  shapes = common.variable_shapes(model, 32)
  weighted = {x.name for x in sub.layers if x.weights}
  assert set(shapes.get("params", {})) == weighted
  converted, _ = weights.load_file(case.files["keras3_weights_h5"])
  variables = {
    c: {k: v for k, v in converted.variables[c].items() if k in weighted}
    for c in ("params", "batch_stats")
  }
  got = np.asarray(jax.jit(model.apply)(variables, case.x))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
