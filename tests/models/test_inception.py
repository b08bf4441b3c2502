"""InceptionV3 and InceptionResNetV2 against Keras' own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtl import models
from flaxtl.errors import UserError
from tests import keras_oracle as oracle

V3, IRV2, SIZE = "inception_v3", "inception_resnet_v2", 75  # Keras' minimum.


@pytest.fixture(scope="module")
def v3_notop(keras):
  model = oracle.build(keras, V3, False, SIZE)
  return model, oracle.variables_from(model, V3, False)


def test_v3_with_top_layers_and_weights_match_keras(keras):
  model = oracle.build(keras, V3, True, SIZE)
  oracle.check_layer_names(model, V3, True)
  variables = oracle.variables_from(model, V3, True)
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))
  assert n == model.count_params()
  # BatchNormalization(scale=False): no gamma at all.
  assert set(variables["params"]["batch_normalization_93"]) == {"bias"}
  assert "conv2d_93" in variables["params"]
  assert "conv2d_94" not in variables["params"]


def test_v3_notop_layer_names_match_keras(v3_notop):
  oracle.check_layer_names(v3_notop[0], V3, False)


@pytest.mark.parametrize(
  "layer",
  [
    "average_pooling2d",  # Keras' 'same' average excludes the padding.
    "mixed3",
    "concatenate",  # The unnamed concatenation inside mixed9.
    "activation_84",
    "mixed10",
  ],
)
def test_v3_any_layer_is_an_output_like_keras(keras, v3_notop, layer):
  model, variables = v3_notop
  x = oracle.keras_images(keras, V3, SIZE)
  want = keras.Model(model.input, model.get_layer(layer).output)(x)
  got = models.create(V3, include_top=False, output_layer=layer).apply(
    variables, x
  )
  assert oracle.rel_diff(got, want) <= oracle.TOL


def test_v3_train_mode_batch_statistics_match_keras(keras, v3_notop):
  """Keras' BN momentum (0.99) and epsilon (1e-3) in a training pass.

  Up to mixed2 (7x7 maps): deeper, at this input size, BN normalises 1x1 maps
  over a batch of 4, where float rounding alone grows to 1e-3.
  """
  model, variables = v3_notop
  x = oracle.keras_images(keras, V3, SIZE, n=4, seed=1)
  flax_model = models.create(V3, include_top=False, output_layer="mixed2")
  out, updates = flax_model.apply(
    variables, x, train=True, mutable=["batch_stats"]
  )
  head = keras.Model(model.input, model.get_layer("mixed2").output)
  want = head(x, training=True)  # Also updates Keras' moving statistics.
  assert oracle.rel_diff(out, want) <= oracle.TOL
  after = oracle.keras_arrays(model)
  ran = [layer.name for layer in head.layers if "batch_norm" in layer.name]
  assert len(ran) == 26
  for name in ran:
    old = variables["batch_stats"][name]["var"]
    assert not np.allclose(updates["batch_stats"][name]["var"], old)
  for name, stats in updates["batch_stats"].items():  # The rest: unchanged.
    np.testing.assert_allclose(
      stats["mean"], after[name][1], rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
      stats["var"], after[name][2], rtol=1e-4, atol=1e-5
    )


def test_inception_resnet_v2_matches_keras(keras, record_property):
  """Layers, weights and the output (no top) of the optional family member."""
  model = oracle.build(keras, IRV2, False, SIZE, pooling="avg")
  oracle.check_layer_names(model, IRV2, False, "avg")
  variables = oracle.variables_from(model, IRV2, False)
  assert set(variables["params"]["block35_1_conv"]) == {"kernel", "bias"}
  x = oracle.keras_images(keras, IRV2, SIZE)
  got = oracle.apply_fn(IRV2, False, pooling="avg")(variables, x)
  rel = oracle.rel_diff(got, model(x))
  record_property("max_rel_diff", float(rel))
  assert rel <= oracle.TOL


def test_inception_resnet_v2_with_top_layer_names():
  names = models.keras_layer_names(IRV2, include_top=True)
  assert len(names) == 782  # len(keras.applications.InceptionResNetV2().layers)
  assert names[-3:] == ["conv_7b_ac", "avg_pool", "predictions"]
  assert names[:4] == [
    "input_layer",
    "conv2d",
    "batch_normalization",
    "activation",
  ]


@pytest.mark.parametrize("arch", [V3, IRV2])
def test_too_small_is_a_user_error(arch):
  model = models.create(arch, include_top=False)
  with pytest.raises(UserError, match="at least 75x75"):
    jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 74, 74, 3)))
    )


def test_registry_entries():
  for arch, feature in ((V3, "mixed10"), (IRV2, "conv_7b_ac")):
    spec = models.get(arch)
    assert (spec.preprocess, spec.min_size, spec.family) == (
      "tf",
      75,
      "inception",
    )
    assert spec.feature_layer == models.keras_layer_names(arch, False)[-1]
    assert spec.feature_layer == feature
