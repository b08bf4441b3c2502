"""Xception against Keras' own: layers, weights, outputs, BN statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtl import models, tree
from flaxtl.errors import UserError
from flaxtl.models import common
from flaxtl.models.heads import TransferModel
from flaxtl.train import freeze
from tests import keras_oracle as oracle

ARCH, SIZE = "xception", 71  # Keras' minimum input size.


@pytest.fixture(scope="module")
def notop(keras):
  model = oracle.build(keras, ARCH, False, SIZE)
  return model, oracle.variables_from(model, ARCH, False)


@pytest.mark.parametrize("include_top,pooling", [(True, None), (False, "max")])
def test_layers_and_weights_match_keras(keras, include_top, pooling):
  model = oracle.build(keras, ARCH, include_top, SIZE, pooling)
  oracle.check_layer_names(model, ARCH, include_top, pooling)
  variables = oracle.variables_from(model, ARCH, include_top)
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))
  assert n == model.count_params()
  # The unnamed residual layers keep Keras' auto names; BN has 4 arrays.
  assert set(variables["params"]["batch_normalization"]) == {"scale", "bias"}
  assert set(variables["batch_stats"]["batch_normalization_3"]) == {
    "mean",
    "var",
  }
  assert set(variables["params"]["block2_sepconv1"]) == {
    "depthwise_kernel",
    "pointwise_kernel",
  }


def test_notop_layer_names_match_keras(notop):
  oracle.check_layer_names(notop[0], ARCH, False)


@pytest.mark.parametrize(
  "layer",
  [
    "block1_conv1_bn",
    "conv2d_1",
    "block3_pool",
    "add_4",
    "block14_sepconv2_act",
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


def test_model_stopped_early_has_no_later_params():
  model = models.create(ARCH, include_top=False, output_layer="block4_pool")
  params = common.variable_shapes(model, SIZE)["params"]
  assert "block4_sepconv2" in params and "block5_sepconv1" not in params


def test_train_mode_batch_statistics_match_keras(keras, notop):
  """Keras' BN momentum (0.99) and epsilon (1e-3) in a training pass."""
  model, variables = notop
  x = oracle.keras_images(keras, ARCH, SIZE, n=4, seed=1)
  out, updates = models.create(ARCH, include_top=False).apply(
    variables, x, train=True, mutable=["batch_stats"]
  )
  want = model(x, training=True)  # Also updates Keras' moving statistics.
  assert oracle.rel_diff(out, want) <= oracle.TOL
  after = oracle.keras_arrays(model)
  for name, stats in updates["batch_stats"].items():
    old = variables["batch_stats"][name]
    assert not np.allclose(stats["mean"], old["mean"])
    np.testing.assert_allclose(
      stats["mean"], after[name][2], rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
      stats["var"], after[name][3], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
  "options,shape,msg",
  [
    ({}, (1, 70, 70, 3), "at least 71x71"),
    ({"output_layer": "predictions"}, (1, 71, 71, 3), "output_layer"),
    ({"pooling": "sum"}, (1, 71, 71, 3), "pooling"),
    ({}, (1, 71, 71, 1), "width, 3"),
  ],
)
def test_bad_input_is_a_user_error(options, shape, msg):
  with pytest.raises(UserError, match=msg):
    model = models.create(ARCH, include_top=False, **options)
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))


def test_registry_entry():
  spec = models.get(ARCH)
  assert (spec.preprocess, spec.min_size, spec.top_size) == ("tf", 71, None)
  assert spec.batch_stats and spec.family == "xception"
  names = models.keras_layer_names(ARCH, include_top=False)
  assert spec.feature_layer == names[-1]


def test_transfer_model_keeps_frozen_bn_layers_in_inference_mode():
  """freeze.first_layers=7 is Keras' layers[:7]: block1's convs and BNs."""
  model = TransferModel(
    arch=ARCH,
    head="mlp",
    num_classes=3,
    hidden=(8,),
    activations=("relu",),
    dropout=(0.0,),
    pooling="avg",
  )
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, SIZE, SIZE, 3)) * 2 - 1
  variables = model.init(jax.random.PRNGKey(0), x)
  spec = models.get(ARCH)
  rules = freeze.first_layers_rules(7, variables["params"], spec, False)
  plan = freeze.plan(variables["params"], rules)
  bn_layers = set(tree.layers(tree.paths(variables["batch_stats"])))
  inference = bn_layers & plan.frozen_layers()
  assert inference == {"backbone/block1_conv1_bn", "backbone/block1_conv2_bn"}
  logits, updates = model.apply(
    variables,
    x,
    train=common.TrainMode(frozenset(inference)),
    mutable=["batch_stats"],
  )
  assert logits.shape == (2, 3)
  old = tree.flatten(variables["batch_stats"])
  new = tree.flatten(updates["batch_stats"])
  for path, value in new.items():
    frozen = tree.layer_of(path) in inference
    assert np.array_equal(value, old[path]) == frozen, path
