"""ConvNeXt Tiny/Small/Base/Large/XLarge against Keras' own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtl import models
from flaxtl.errors import UserError
from flaxtl.models import common
from flaxtl.train import freeze
from tests import keras_oracle as oracle

TINY, SIZE = "convnext_tiny", 32  # Keras' minimum input size.


@pytest.fixture(scope="module")
def notop(keras):
  model = oracle.build(keras, TINY, False, SIZE)
  return model, oracle.variables_from(model, TINY, False)


@pytest.mark.parametrize(
  "arch",
  [
    "convnext_tiny",
    "convnext_small",
    "convnext_base",
    "convnext_large",
    "convnext_xlarge",
  ],
)
def test_layers_and_weights_match_keras(keras, arch):
  model = oracle.build(keras, arch, True, SIZE)
  oracle.check_layer_names(model, arch, True)
  variables = oracle.variables_from(model, arch, True)
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables))
  assert n == model.count_params()
  params = variables["params"]
  # The stem, a Keras Sequential, nests its layers like Keras' variables.
  assert set(params[f"{arch}_stem"]) == {
    f"{arch}_stem_conv",
    f"{arch}_stem_layernorm",
  }
  assert set(params[f"{arch}_stage_0_block_0_layer_scale"]) == {"gamma"}
  assert set(params[f"{arch}_stage_0_block_0_layernorm"]) == {"scale", "bias"}
  del model


def test_notop_layer_names_match_keras(notop):
  oracle.check_layer_names(notop[0], TINY, False)
  assert models.keras_layer_names(TINY, False)[-1] == "layer_normalization"


@pytest.mark.parametrize(
  "layer",
  [
    "convnext_tiny_prestem_normalization",  # Takes 0..255 pixels as Keras.
    "convnext_tiny_stem",
    "convnext_tiny_stage_1_block_2_identity",  # The branch, before the sum.
    "convnext_tiny_downsampling_block_2",
    "layer_normalization",
  ],
)
def test_any_layer_is_an_output_like_keras(keras, notop, layer):
  model, variables = notop
  x = oracle.keras_images(keras, TINY, SIZE)
  assert x.max() > 200  # ConvNeXt's preprocess_input leaves pixels as they are.
  want = keras.Model(model.input, model.get_layer(layer).output)(x)
  got = models.create(TINY, include_top=False, output_layer=layer).apply(
    variables, x
  )
  assert oracle.rel_diff(got, want) <= oracle.TOL


def test_first_layers_freeze_counts_the_stem_as_one_layer():
  shapes = common.variable_shapes(models.create(TINY, include_top=False), SIZE)
  params = {"backbone": shapes["params"]}
  names = models.keras_layer_names(TINY, False)
  assert names[:3] == [
    "input_layer",
    "convnext_tiny_prestem_normalization",
    "convnext_tiny_stem",
  ]
  rules = freeze.first_layers_rules(
    4, params, models.get(TINY), include_top=False
  )
  plan = freeze.plan(params, rules)
  frozen = {p for p, state, _ in plan.rows if state == freeze.FROZEN}
  assert frozen == {
    "backbone/convnext_tiny_stem/convnext_tiny_stem_conv/kernel",
    "backbone/convnext_tiny_stem/convnext_tiny_stem_conv/bias",
    "backbone/convnext_tiny_stem/convnext_tiny_stem_layernorm/scale",
    "backbone/convnext_tiny_stem/convnext_tiny_stem_layernorm/bias",
    "backbone/convnext_tiny_stage_0_block_0_depthwise_conv/kernel",
    "backbone/convnext_tiny_stage_0_block_0_depthwise_conv/bias",
  }


def test_too_small_is_a_user_error():
  model = models.create(TINY, include_top=False)
  with pytest.raises(UserError, match="at least 32x32"):
    jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 31, 40, 3)))
    )


def test_registry_entries():
  for arch in models.names("convnext"):
    spec = models.get(arch)
    assert (spec.preprocess, spec.min_size, spec.batch_stats) == (
      "none",
      32,
      False,
    )
    assert spec.classifier == f"{arch}_head_dense"
    assert spec.classifier == models.keras_layer_names(arch)[-1]
    assert spec.feature_layer == models.keras_layer_names(arch, False)[-1]
  assert len(models.names("convnext")) == 5


def test_freeze_until_the_stem_freezes_its_nested_layers():
  shapes = common.variable_shapes(models.create(TINY, include_top=False), SIZE)
  params = {"backbone": shapes["params"]}
  rules = freeze.until_rules(
    "convnext_tiny_stem", params, models.get(TINY), include_top=False
  )
  plan = freeze.plan(params, rules)
  frozen = {p for p, state, _ in plan.rows if state == freeze.FROZEN}
  assert len(frozen) == 4
  assert all(p.startswith("backbone/convnext_tiny_stem/") for p in frozen)
