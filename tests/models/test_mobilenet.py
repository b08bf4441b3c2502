"""The Flax MobileNetV2 / V3 against Keras' own: layers, shapes, options."""

import jax
import jax.numpy as jnp
import pytest

from flaxtl import models, tree
from flaxtl.errors import UserError
from flaxtl.models import common, mobilenet
from flaxtl.weights.mappings import keras_names
from tests import keras_oracle as oracle

SIZE = 32
# (arch, Keras builder, Keras kwargs, alpha): every alpha / variant Keras has
# ImageNet weights for. The first of each version is the representative the
# parity tests use; the rest build bigger Keras models (marked slow).
VARIANTS = [
  ("mobilenetv2", "MobileNetV2", {}, 0.35),
  ("mobilenetv3small", "MobileNetV3Small", {}, 1.0),
  *[("mobilenetv2", "MobileNetV2", {}, a) for a in (0.5, 0.75, 1.0, 1.3, 1.4)],
  ("mobilenetv3small", "MobileNetV3Small", {}, 0.75),
  ("mobilenetv3large", "MobileNetV3Large", {}, 1.0),
  ("mobilenetv3large", "MobileNetV3Large", {}, 0.75),
  (
    "mobilenetv3small_minimalistic",
    "MobileNetV3Small",
    {"minimalistic": True},
    1.0,
  ),
  (
    "mobilenetv3large_minimalistic",
    "MobileNetV3Large",
    {"minimalistic": True},
    1.0,
  ),
]
PARAMS = [
  pytest.param(
    *v, id=f"{v[0]}-{v[3]}", marks=[pytest.mark.slow] if i > 1 else []
  )
  for i, v in enumerate(VARIANTS)
]


def _flax_slots(arch, include_top, **options):
  model = models.create(arch, include_top=include_top, **options)
  shapes = common.variable_shapes(model, SIZE)
  return keras_names.layer_slots(
    {
      c: {p: s.shape for p, s in tree.flatten(v).items()}
      for c, v in shapes.items()
    }
  )


@pytest.mark.parametrize("arch,builder,kwargs,alpha", PARAMS)
def test_layers_and_shapes_match_keras(keras, arch, builder, kwargs, alpha):
  model = oracle.keras_model(
    keras,
    getattr(keras.applications, builder),
    True,
    SIZE,
    1,
    alpha=alpha,
    **kwargs,
  )
  names = [layer.name for layer in model.layers]
  ours = models.keras_layer_names(arch, include_top=True, alpha=alpha)
  assert names[0].startswith(ours[0])  # Keras may suffix input_layer.
  assert ours[1:] == names[1:]
  # Every weighted Keras layer is a flaxtl layer with the same arrays, in
  # Keras' stored order (BN: gamma, beta, moving mean, moving variance).
  slots = _flax_slots(arch, True, alpha=alpha)
  weighted = {layer.name: layer for layer in model.layers if layer.weights}
  assert set(slots) == set(weighted)
  for name, layer in weighted.items():
    want = [tuple(w.shape) for w in layer.weights]
    assert [s for _, _, s in slots[name]] == want, name
    assert mobilenet.keras_weight_shapes(arch, True, alpha)[name] == want
    if type(layer).__name__ == "BatchNormalization":
      assert [c for c, _, _ in slots[name]] == ["params"] * 2 + [
        "batch_stats"
      ] * 2
      assert (layer.momentum, layer.epsilon) == (
        mobilenet.BN_MOMENTUM,
        mobilenet.BN_EPSILON,
      )


@pytest.mark.parametrize(
  "arch,builder,pooling",
  [
    ("mobilenetv2", "MobileNetV2", "max"),
    ("mobilenetv3small", "MobileNetV3Small", "avg"),
  ],
)
def test_notop_layers_match_keras(keras, arch, builder, pooling):
  model = oracle.keras_model(
    keras, getattr(keras.applications, builder), False, SIZE, 1, pooling=pooling
  )
  names = [layer.name for layer in model.layers]
  assert models.keras_layer_names(arch, False, pooling)[1:] == names[1:]
  no_pool = models.keras_layer_names(arch, False)
  assert no_pool[-1] == models.get(arch).feature_layer == names[-2]


def test_registry_entries():
  v2, v3 = models.get("mobilenetv2"), models.get("mobilenetv3small")
  assert (v2.preprocess, v3.preprocess) == ("tf", "none")
  assert v2.batch_stats and v3.batch_stats
  assert (v2.feature_layer, v2.classifier) == ("out_relu", "predictions")
  assert (v3.feature_layer, v3.classifier) == ("activation_17", "logits")
  assert models.get("mobilenetv3small_minimalistic").feature_layer == "re_lu_22"
  assert v2.options["alpha"] == 1.0 and v2.input_size(True) == SIZE
  assert set(models.names("mobilenet")) == {
    "mobilenetv2",
    *mobilenet.V3_ARCHS,
  }


@pytest.mark.parametrize(
  "arch,layer",
  [
    ("mobilenetv2", "block_3_pad"),
    ("mobilenetv2", "block_2_add"),
    ("mobilenetv3small", "re_lu_1"),
    ("mobilenetv3small", "expanded_conv_3_squeeze_excite_mul"),
  ],
)
def test_output_layer_has_no_params_after_it(arch, layer):
  names = models.keras_layer_names(arch)
  model = models.create(arch, include_top=False, output_layer=layer)
  shapes = common.variable_shapes(model, SIZE)
  have = set(tree.layers(tree.paths(shapes["params"])))
  before = set(names[: names.index(layer) + 1])
  assert have <= before
  assert have == before & set(_flax_slots(arch, True))
  y = jax.eval_shape(
    lambda v: model.apply(v, jnp.zeros((2, SIZE, SIZE, 3))), shapes
  )
  assert y.ndim == 4


def test_pooling_and_classes():
  x = jnp.zeros((2, SIZE, SIZE, 3))
  for pooling, ndim in ((None, 4), ("avg", 2), ("max", 2)):
    m = models.create("mobilenetv3small", include_top=False, pooling=pooling)
    v = common.variable_shapes(m, SIZE)
    assert jax.eval_shape(lambda v, m=m: m.apply(v, x), v).ndim == ndim
  m = models.create("mobilenetv2", num_classes=7, alpha=0.5)
  v = common.variable_shapes(m, SIZE)
  assert v["params"]["predictions"]["kernel"].shape == (1280, 7)
  assert jax.eval_shape(lambda v: m.apply(v, x), v).shape == (2, 7)


def test_bfloat16_compute():
  x = jnp.zeros((2, SIZE, SIZE, 3))
  for arch in ("mobilenetv2", "mobilenetv3small"):
    model = models.create(arch, dtype=jnp.bfloat16)
    v = common.variable_shapes(model, SIZE)
    assert (
      v["params"]["predictions" if arch == "mobilenetv2" else "logits"][
        "kernel"
      ].dtype
      == jnp.float32
    )
    y = jax.eval_shape(lambda v, m=model: m.apply(v, x), v)
    assert (y.shape, y.dtype) == ((2, 1000), jnp.float32)


@pytest.mark.parametrize(
  "kwargs,shape,msg",
  [
    ({}, (1, 31, 31, 3), "at least 32x32"),
    ({}, (1, 32, 32, 1), r"\(batch, height, width, 3\)"),
    ({"output_layer": "block_99_add"}, (1, 32, 32, 3), "not a layer"),
    ({"pooling": "sum"}, (1, 32, 32, 3), "pooling"),
    ({"alpha": 0}, (1, 32, 32, 3), "alpha must be a positive"),
    ({"arch": "mobilenetv3small"}, (1, 32, 32, 3), "arch must be one of"),
    (
      {"classifier_activation": "relu"},
      (1, 32, 32, 3),
      "classifier_activation",
    ),
  ],
)
def test_bad_input_is_a_user_error(kwargs, shape, msg):
  model = mobilenet.MobileNetV2(**kwargs)
  with pytest.raises(UserError, match=msg):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))


def test_unknown_option_is_a_user_error():
  with pytest.raises(UserError, match="unknown option"):
    models.create("mobilenetv2", minimalistic=True)
