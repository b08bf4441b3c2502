"""The Flax EfficientNet / V2 against Keras' own: layers, shapes, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtl import models, tree
from flaxtl.errors import UserError
from flaxtl.models import common, efficientnet
from flaxtl.weights.mappings import keras_names
from tests import keras_oracle as oracle

SIZE = 32
# arch -> Keras builder. B0 and V2B0 are the representatives the parity tests
# use; the rest build big Keras models (B7: ~800 layers) and are marked slow.
BUILDERS = {
  **{a: f"EfficientNetB{a[-1]}" for a in efficientnet.V1_ARCHS},
  **{
    a: "EfficientNetV2" + a.removeprefix("efficientnetv2").upper()
    for a in efficientnet.V2_ARCHS
  },
}
REPRESENTATIVES = ("efficientnetb0", "efficientnetv2b0")
PARAMS = [
  pytest.param(
    a, marks=[] if a in REPRESENTATIVES else [pytest.mark.slow], id=a
  )
  for a in sorted(BUILDERS, key=lambda a: (a not in REPRESENTATIVES, a))
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


@pytest.mark.parametrize("arch", PARAMS)
def test_layers_and_shapes_match_keras(keras, arch):
  builder = getattr(keras.applications, BUILDERS[arch])
  model = oracle.keras_model(keras, builder, True, SIZE, 1)
  names = [layer.name for layer in model.layers]
  ours = models.keras_layer_names(arch, include_top=True)
  assert names[0].startswith(ours[0])  # Keras may suffix input_layer.
  assert ours[1:] == names[1:]
  slots = _flax_slots(arch, True)
  weighted = {layer.name: layer for layer in model.layers if layer.weights}
  assert set(slots) == set(weighted)
  momentum, epsilon = (
    efficientnet.V1_BN if arch in efficientnet.V1_ARCHS else efficientnet.V2_BN
  )
  for name, layer in weighted.items():
    want = [tuple(w.shape) for w in layer.weights]
    assert [s for _, _, s in slots[name]] == want, name
    assert efficientnet.keras_weight_shapes(arch)[name] == want
    kind = type(layer).__name__
    if kind == "BatchNormalization":
      assert (layer.momentum, layer.epsilon) == (momentum, epsilon), name
    if kind == "Normalization":  # Non-trainable, beside the BN statistics.
      assert [c for c, _, _ in slots[name]] == ["batch_stats"] * 3
  # Stochastic depth: per-sample Dropout layers with Keras' rates.
  dropouts = {
    layer.name: (layer.rate, layer.noise_shape is not None)
    for layer in model.layers
    if type(layer).__name__ == "Dropout"
  }
  assert dropouts == efficientnet.trace(arch).dropouts


def test_notop_layers_match_keras(keras):
  model = oracle.keras_model(
    keras, keras.applications.EfficientNetV2B0, False, SIZE, 1, pooling="max"
  )
  names = [layer.name for layer in model.layers]
  ours = models.keras_layer_names("efficientnetv2b0", False, "max")
  assert ours[1:] == names[1:] and names[-1] == "max_pool"
  assert names[-2] == models.get("efficientnetv2b0").feature_layer


def test_registry_entries():
  for arch in BUILDERS:
    spec = models.get(arch)
    assert spec.preprocess == "none" and spec.batch_stats
    assert (spec.feature_layer, spec.classifier) == (
      "top_activation",
      "predictions",
    )
    assert ("imagenet_rescaling" in spec.options) == (
      arch in efficientnet.V1_ARCHS
    )
  names = models.keras_layer_names("efficientnetb0", imagenet_rescaling=True)
  assert names[1:5] == [
    "rescaling",
    "normalization",
    "rescaling_1",
    "stem_conv_pad",
  ]
  with pytest.raises(UserError, match="unknown option"):
    models.create("efficientnetv2s", imagenet_rescaling=True)


@pytest.mark.parametrize(
  "arch,layer",
  [
    ("efficientnetb0", "normalization"),
    ("efficientnetb0", "block2b_drop"),
    ("efficientnetv2b0", "block1a_project_activation"),
    ("efficientnetv2b0", "block4a_se_excite"),
  ],
)
def test_output_layer_has_no_params_after_it(arch, layer):
  names = models.keras_layer_names(arch)
  model = models.create(arch, include_top=False, output_layer=layer)
  shapes = common.variable_shapes(model, SIZE)
  have = {n for v in shapes.values() for n in tree.layers(tree.paths(v))}
  before = set(names[: names.index(layer) + 1])
  assert have <= before
  assert have == before & set(_flax_slots(arch, True))


def test_dropout_acts_in_training_and_normalization_never_moves():
  """Training: stochastic depth and BN updates; Normalization stays put."""
  model = models.create("efficientnetb0", include_top=False, pooling="avg")
  variables = common.init_variables(model, SIZE)
  stats = dict(variables["batch_stats"])
  stats["normalization"] = {
    "mean": jnp.full((3,), 0.5),
    "var": jnp.full((3,), 0.05),
    "count": jnp.asarray(9, jnp.int32),
  }
  variables = {**variables, "batch_stats": stats}
  x = jnp.asarray(oracle.images(SIZE, n=4))
  fn = jax.jit(
    lambda v, x, rng: model.apply(
      v, x, train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
    )
  )
  y1, new = fn(variables, x, jax.random.PRNGKey(1))
  y2, _ = fn(variables, x, jax.random.PRNGKey(2))
  assert not np.allclose(y1, y2)  # Different dropout draws.
  for k, v in stats["normalization"].items():
    np.testing.assert_array_equal(new["batch_stats"]["normalization"][k], v)
  assert not np.allclose(
    new["batch_stats"]["stem_bn"]["var"], stats["stem_bn"]["var"]
  )
  infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
  np.testing.assert_array_equal(infer(variables, x), infer(variables, x))


def test_bfloat16_compute():
  x = jnp.zeros((2, SIZE, SIZE, 3))
  for arch in REPRESENTATIVES:
    model = models.create(arch, include_top=False, dtype=jnp.bfloat16)
    v = common.variable_shapes(model, SIZE)
    assert v["params"]["stem_conv"]["kernel"].dtype == jnp.float32
    y = jax.eval_shape(lambda v, m=model: m.apply(v, x), v)
    assert y.dtype == jnp.bfloat16 and y.shape[-1] == 1280


@pytest.mark.parametrize(
  "kwargs,shape,msg",
  [
    ({}, (1, 24, 24, 3), "at least 32x32"),
    ({"output_layer": "block9a_add"}, (1, 32, 32, 3), "not a layer"),
    ({"pooling": "sum"}, (1, 32, 32, 3), "pooling"),
    (
      {"arch": "efficientnetv2b0", "imagenet_rescaling": True},
      (1, 32, 32, 3),
      "EfficientNet \\(V1\\) option",
    ),
  ],
)
def test_bad_input_is_a_user_error(kwargs, shape, msg):
  model = efficientnet.EfficientNet(**kwargs)
  with pytest.raises(UserError, match=msg):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))
