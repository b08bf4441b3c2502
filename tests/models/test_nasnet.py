"""NASNetMobile against Keras' own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtl import models
from flaxtl.errors import UserError
from tests import keras_oracle as oracle

ARCH, SIZE = "nasnet_mobile", 32  # Keras' minimum input size.


@pytest.fixture(scope="module")
def notop(keras):
  model = oracle.build(keras, ARCH, False, SIZE)
  return model, oracle.variables_from(model, ARCH, False)


def test_notop_layers_weights_and_output_match_keras(keras, notop):
  model, variables = notop
  oracle.check_layer_names(model, ARCH, False)
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))
  assert n == model.count_params()
  x = oracle.keras_images(keras, ARCH, SIZE)
  got = oracle.apply_fn(ARCH, False)(variables, x)
  assert oracle.rel_diff(got, model(x)) <= oracle.TOL


@pytest.mark.parametrize(
  "layer",
  [
    "reduction_pad_1_stem_1",  # correct_pad at an odd size (15x15).
    "cropping2d",  # The adjust block's shifted path.
    "adjust_bn_0",
    "normal_concat_3",
  ],
)
def test_any_layer_is_an_output_like_keras(keras, notop, layer):
  model, variables = notop
  x = oracle.keras_images(keras, ARCH, SIZE)
  want = keras.Model(model.input, model.get_layer(layer).output)(x)
  got = models.create(ARCH, include_top=False, output_layer=layer).apply(
    variables, x
  )
  assert oracle.rel_diff(got, want) <= oracle.TOL


def test_with_top_at_an_odd_size_matches_keras(keras):
  """33x33: every strided cell pads by the other parity."""
  model = oracle.build(keras, ARCH, True, 33)
  oracle.check_layer_names(model, ARCH, True)
  variables = oracle.variables_from(model, ARCH, True)
  x = oracle.keras_images(keras, ARCH, 33)
  got = oracle.apply_fn(ARCH, True)(variables, x)
  assert oracle.rel_diff(got, model(x)) <= oracle.TOL


def test_too_small_is_a_user_error():
  model = models.create(ARCH, include_top=False)
  with pytest.raises(UserError, match="at least 32x32"):
    jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 31, 31, 3)))
    )


def test_registry_entry():
  spec = models.get(ARCH)
  assert (spec.preprocess, spec.min_size, spec.family) == ("tf", 32, "nasnet")
  assert spec.feature_layer == models.keras_layer_names(ARCH, False)[-1]
