"""ResNet v1/v2 against Keras' own: layers, shapes, outputs in every layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtl import models, weights
from flaxtl.errors import UserError
from flaxtl.models import common, resnet
from tests import keras_oracle as oracle

ARCHS = {
  "resnet50": "ResNet50",
  "resnet101": "ResNet101",
  "resnet152": "ResNet152",
  "resnet50v2": "ResNet50V2",
  "resnet101v2": "ResNet101V2",
  "resnet152v2": "ResNet152V2",
}
# One representative per variant, at the smallest size Keras accepts.
CASES = {
  ("resnet50", False): oracle.ALL_LAYOUTS,
  ("resnet50", True): (
    "keras3_weights_h5",
    "official_keras2",
    "nested_archive",
  ),
  ("resnet50v2", False): (
    "keras3_weights_h5",
    "official_keras1",
    "nested_legacy_h5",
  ),
  ("resnet50v2", True): ("keras_archive",),
}
PARAMS = [
  (a, t, layout) for (a, t), layouts in CASES.items() for layout in layouts
]


def _builder(keras, arch):
  return getattr(keras.applications, ARCHS[arch])


def test_registry_entries():
  assert models.names("resnet") == sorted(ARCHS)
  for arch in ARCHS:
    spec = models.get(arch)
    v2 = arch.endswith("v2")
    assert spec.preprocess == ("tf" if v2 else "caffe")
    assert spec.batch_stats and spec.naming == "keras"
    assert spec.min_size == 32 and spec.top_size is None
    names = models.keras_layer_names(arch, include_top=True)
    assert names[-2:] == ["avg_pool", spec.classifier]
    notop = models.keras_layer_names(arch, include_top=False)
    assert spec.feature_layer == notop[-1]


@pytest.mark.parametrize(
  "options,shape",
  [
    ({"num_classes": 7}, (2, 7)),
    ({"include_top": False}, (2, 2, 2, 2048)),
    ({"include_top": False, "pooling": "avg"}, (2, 2048)),
    ({"include_top": False, "pooling": "max"}, (2, 2048)),
    (
      {"include_top": False, "output_layer": "conv3_block4_out"},
      (2, 4, 4, 512),
    ),
    ({"include_top": False, "dtype": jnp.bfloat16}, (2, 2, 2, 2048)),
  ],
)
def test_options_and_output_shapes(options, shape):
  model = models.create("resnet50v2", **options)
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  out = jax.eval_shape(model.apply, variables, x)
  assert out.shape == shape
  assert {a.dtype for a in jax.tree.leaves(variables)} == {np.dtype("float32")}


@pytest.mark.parametrize(
  "options,size,msg",
  [
    ({"output_layer": "block5_pool"}, 64, "not a layer of resnet50"),
    ({"pooling": "sum"}, 64, "pooling"),
    ({"classifier_activation": "tanh"}, 64, "classifier_activation"),
    ({}, 16, "at least 32x32"),
  ],
)
def test_bad_options_are_clear_errors(options, size, msg):
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  with pytest.raises(UserError, match=msg):
    jax.eval_shape(
      resnet.ResNet(include_top=False, **options).init,
      jax.random.PRNGKey(0),
      x,
    )


@pytest.mark.parametrize("arch", list(ARCHS))
def test_layers_and_shapes_match_keras(keras, arch):
  oracle.check_architecture(
    keras, _builder(keras, arch), arch, pooling_variants=arch == "resnet50"
  )


def test_batch_norm_momentum_and_epsilon_are_keras(keras):
  model = oracle.keras_model(keras, keras.applications.ResNet50V2, False, 32)
  bns = [x for x in model.layers if type(x).__name__ == "BatchNormalization"]
  assert bns and {(x.momentum, x.epsilon) for x in bns} == {
    (resnet.BN_MOMENTUM, resnet.BN_EPSILON)
  }


@pytest.fixture(scope="module")
def cases(keras, module_tmp):
  built = {}

  def get(arch, include_top):
    key = (arch, include_top)
    if key not in built:
      built[key] = oracle.Case(
        keras,
        arch,
        module_tmp(f"{arch}_{include_top}"),
        include_top=include_top,
        layouts=CASES[key],
      )
    return built[key]

  return get


@pytest.mark.parametrize("arch,include_top,layout", PARAMS)
def test_parity_with_keras(cases, record_property, arch, include_top, layout):
  oracle.check_parity(cases(arch, include_top), arch, layout, record_property)


def test_converted_checkpoint_round_trip(cases, tmp_path):
  case = cases("resnet50", False)
  out = weights.convert_file(case.files["legacy_model_h5"], tmp_path / "c")
  prov = weights.read_provenance(out)
  assert prov["collections"] == ["batch_stats", "params"]
  variables = weights.restore_variables(out)
  got = oracle.flaxtl_arrays(variables)
  for name, arrays in case.arrays.items():
    for a, b in zip(got[name], arrays):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
  "layer",
  ["pool1_pad", "conv2_block1_0_bn", "conv3_block1_add", "conv4_block2_out"],
)
def test_any_keras_layer_is_an_output_layer(keras, cases, layer):
  case = cases("resnet50", False)
  sub = keras.Model(case.model.inputs, case.model.get_layer(layer).output)
  want = np.asarray(sub(case.x, training=False))
  model = models.create("resnet50", include_top=False, output_layer=layer)
  shapes = common.variable_shapes(model, 32)
  # No parameters beyond what the Keras sub-model has.
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
