"""The Flax VGG against Keras' own: layer lists, parameter names, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtl import models
from flaxtl.errors import UserError
from flaxtl.models import common, vgg


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
@pytest.mark.parametrize("include_top", [True, False])
def test_keras_layer_order_matches_keras(keras, arch, include_top):
  builder = {
    "vgg16": keras.applications.VGG16,
    "vgg19": keras.applications.VGG19,
  }[arch]
  shape = (224, 224, 3) if include_top else (32, 32, 3)
  model = builder(weights=None, include_top=include_top, input_shape=shape)
  names = [layer.name for layer in model.layers]
  ours = models.keras_layer_names(arch, include_top)
  assert len(ours) == len(names) and names[0].startswith(
    ours[0]
  )  # Keras uniquifies input_layer_N.
  assert ours[1:] == names[1:]
  weighted = [layer.name for layer in model.layers if layer.weights]
  size = 224 if include_top else 32
  shapes = common.variable_shapes(
    models.create(arch, include_top=include_top), size
  )
  assert list(shapes["params"]) == weighted


def test_first_eight_layers_are_the_five_convs():
  shapes = common.variable_shapes(vgg.VGG16(include_top=False), 32)["params"]
  first8 = models.keras_layer_names("vgg16")[:8]
  convs = [n for n in first8 if n in shapes]
  assert convs == [
    "block1_conv1",
    "block1_conv2",
    "block2_conv1",
    "block2_conv2",
    "block3_conv1",
  ]
  n = sum(
    int(np.prod(shapes[c][p].shape)) for c in convs for p in ("kernel", "bias")
  )
  assert n == 555_328  # REFERENCE.md section 2


@pytest.mark.parametrize(
  "arch,count", [("vgg16", 138_357_544), ("vgg19", 143_667_240)]
)
def test_param_tree_named_like_keras(arch, count):
  shapes = common.variable_shapes(vgg.VGG(arch=arch), 224)["params"]
  assert list(shapes) == [
    *vgg.conv_layer_names(arch),
    "fc1",
    "fc2",
    "predictions",
  ]
  assert all(set(v) == {"kernel", "bias"} for v in shapes.values())
  assert shapes["fc1"]["kernel"].shape == (25088, 4096)
  assert (
    sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == count
  )  # Keras' count


def test_pooling_and_output_layer():
  model = vgg.VGG16(include_top=False, pooling="avg")
  params = common.init_variables(model, 64)["params"]
  x = jnp.ones((2, 64, 64, 3))
  assert model.apply({"params": params}, x).shape == (2, 512)
  assert vgg.VGG16(include_top=False, pooling="max").apply(
    {"params": params}, x
  ).shape == (2, 512)
  feats = vgg.VGG16(include_top=False, output_layer="block3_pool").apply(
    {"params": params}, x
  )
  assert feats.shape == (2, 8, 8, 256)
  acts = vgg.VGG16(
    include_top=False, return_layers=("block1_conv1", "block3_pool")
  ).apply({"params": params}, x)
  assert list(acts) == ["block1_conv1", "block3_pool"]
  assert acts["block1_conv1"].shape == (2, 64, 64, 64)
  np.testing.assert_allclose(acts["block3_pool"], feats, rtol=1e-6)


@pytest.mark.parametrize("impl", ["im2col", "winograd"])
def test_conv_impls_match_xla_conv_whole_network(impl):
  model = vgg.VGG16(include_top=False)
  params = common.init_variables(model, 32)["params"]
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3)) * 255
  a = vgg.VGG16(include_top=False, conv_impl=impl).apply({"params": params}, x)
  b = vgg.VGG16(include_top=False, conv_impl="direct").apply(
    {"params": params}, x
  )
  np.testing.assert_allclose(
    a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max())
  )


@pytest.mark.parametrize(
  "kwargs,shape,msg",
  [
    ({"include_top": True}, (1, 64, 64, 3), "224x224"),
    ({"include_top": False}, (1, 16, 16, 3), "at least 32x32"),
    ({"include_top": False}, (1, 64, 64, 1), "width, 3"),
    ({"include_top": False, "pooling": "sum"}, (1, 64, 64, 3), "pooling"),
    (
      {"include_top": False, "output_layer": "fc1"},
      (1, 64, 64, 3),
      "output_layer",
    ),
    ({"include_top": False, "conv_impl": "fft"}, (1, 64, 64, 3), "conv_impl"),
  ],
)
def test_bad_shapes_and_options_are_clear_errors(kwargs, shape, msg):
  with pytest.raises(UserError, match=msg):
    jax.eval_shape(
      lambda: vgg.VGG16(**kwargs).init(jax.random.PRNGKey(0), jnp.zeros(shape))
    )
