"""The Flax VGG against Keras' own: layer lists, parameter names, preprocessing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtl import imagenet, preprocess
from flaxtl.errors import UserError
from flaxtl.models import vgg


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
@pytest.mark.parametrize("include_top", [True, False])
def test_keras_layer_order_matches_keras(keras, arch, include_top):
  builder = {"vgg16": keras.applications.VGG16, "vgg19": keras.applications.VGG19}[arch]
  shape = (224, 224, 3) if include_top else (32, 32, 3)
  model = builder(weights=None, include_top=include_top, input_shape=shape)
  names = [l.name for l in model.layers]
  ours = vgg.keras_layer_names(arch, include_top)
  assert len(ours) == len(names) and names[0].startswith(ours[0])  # Keras uniquifies input_layer_N.
  assert ours[1:] == names[1:]
  weighted = [l.name for l in model.layers if l.weights]
  assert vgg.param_layer_names(arch, include_top) == weighted


def test_first_eight_layers_are_the_five_convs():
  first8 = vgg.keras_layer_names("vgg16")[:8]
  convs = [n for n in first8 if n in vgg.param_layer_names("vgg16")]
  assert convs == ["block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2", "block3_conv1"]
  shapes = vgg.param_shapes(vgg.VGG16(include_top=False), 32)
  n = sum(int(np.prod(shapes[c][p].shape)) for c in convs for p in ("kernel", "bias"))
  assert n == 555_328  # REFERENCE.md section 2


@pytest.mark.parametrize("arch,count", [("vgg16", 138_357_544), ("vgg19", 143_667_240)])
def test_param_tree_named_like_keras(arch, count):
  shapes = vgg.param_shapes(vgg.VGG(arch=arch), 224)
  assert list(shapes) == vgg.param_layer_names(arch)
  assert all(set(v) == {"kernel", "bias"} for v in shapes.values())
  assert shapes["fc1"]["kernel"].shape == (25088, 4096)
  assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == count  # Keras' count


def test_pooling_and_output_layer():
  model = vgg.VGG16(include_top=False, pooling="avg")
  params = vgg.init_params(model, 64)
  x = jnp.ones((2, 64, 64, 3))
  assert model.apply({"params": params}, x).shape == (2, 512)
  assert vgg.VGG16(include_top=False, pooling="max").apply({"params": params}, x).shape == (2, 512)
  feats = vgg.VGG16(include_top=False, output_layer="block3_pool").apply({"params": params}, x)
  assert feats.shape == (2, 8, 8, 256)
  out, acts = vgg.VGG16(include_top=False, return_layers=("block1_conv1", "block3_pool")).apply(
      {"params": params}, x
  )
  assert out.shape == (2, 2, 2, 512)
  assert acts["block1_conv1"].shape == (2, 64, 64, 64)
  np.testing.assert_allclose(acts["block3_pool"], feats, rtol=1e-6)


@pytest.mark.parametrize("impl", ["im2col", "winograd"])
def test_conv_impls_match_xla_conv_whole_network(impl):
  model = vgg.VGG16(include_top=False)
  params = vgg.init_params(model, 32)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3)) * 255
  a = vgg.VGG16(include_top=False, conv_impl=impl).apply({"params": params}, x)
  b = vgg.VGG16(include_top=False, conv_impl="direct").apply({"params": params}, x)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("impl", ["im2col", "winograd"])
@pytest.mark.parametrize("shape", [(2, 6, 6, 8), (1, 7, 5, 3)])  # Odd sizes: Winograd's padded edge tiles.
def test_conv_impls_match_xla_conv_values_and_gradients(impl, shape):
  kx, kk, kd = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, shape)
  k = jax.random.normal(kk, (3, 3, shape[-1], 4))
  dy = jax.random.normal(kd, (*shape[:3], 4))
  ref_y, ref_vjp = jax.vjp(vgg._direct_conv, x, k)
  y, vjp = jax.vjp(vgg._CONVS[impl], x, k)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  for g, ref_g in zip(vjp(dy), ref_vjp(dy)):
    np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-5)


def test_auto_conv_impl_by_shape_and_platform():
  assert vgg.conv_impl_for(2, 2, 512, "cpu") == "im2col"
  assert vgg.conv_impl_for(4, 4, 512, "cpu") == "im2col"
  assert vgg.conv_impl_for(224, 224, 64, "cpu") == "direct"  # Few input channels.
  assert vgg.conv_impl_for(112, 112, 128, "cpu") == "winograd"
  assert vgg.conv_impl_for(32, 32, 128, "cpu") == "direct"  # 64x64 input's block2: measured slower.
  assert vgg.conv_impl_for(28, 28, 512, "cpu") == "winograd"
  assert vgg.conv_impl_for(14, 14, 512, "cpu") == "direct"
  assert vgg.conv_impl_for(28, 28, 512, "cpu", jnp.bfloat16) == "direct"  # Slower in bf16 on XLA:CPU.
  assert vgg.conv_impl_for(112, 112, 128, "gpu") == "direct"  # cuDNN picks its own algorithm.
  assert vgg.conv_impl_for(2, 2, 512, "tpu") == "direct"


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2)])  # Odd sizes drop the last row/column.
def test_max_pool_2x2_matches_flax_max_pool_and_its_gradient(shape):
  import flax.linen as nn

  x = jax.random.normal(jax.random.PRNGKey(1), shape)  # No ties: both gradients pick the same element.
  ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
  np.testing.assert_array_equal(vgg.max_pool_2x2(x), ref(x))
  dy = jax.random.normal(jax.random.PRNGKey(2), ref(x).shape)
  grad = lambda f: jax.vjp(f, x)[1](dy)[0]
  np.testing.assert_array_equal(grad(vgg.max_pool_2x2), grad(ref))


@pytest.mark.parametrize(
    "kwargs,shape,msg",
    [
        ({"include_top": True}, (1, 64, 64, 3), "224x224"),
        ({"include_top": False}, (1, 16, 16, 3), "at least 32x32"),
        ({"include_top": False}, (1, 64, 64, 1), "width, 3"),
        ({"include_top": False, "pooling": "sum"}, (1, 64, 64, 3), "pooling"),
        ({"include_top": False, "output_layer": "fc1"}, (1, 64, 64, 3), "output_layer"),
        ({"include_top": False, "conv_impl": "fft"}, (1, 64, 64, 3), "conv_impl"),
    ],
)
def test_bad_shapes_and_options_are_clear_errors(kwargs, shape, msg):
  with pytest.raises(UserError, match=msg):
    jax.eval_shape(lambda: vgg.VGG16(**kwargs).init(jax.random.PRNGKey(0), jnp.zeros(shape)))


def test_preprocess_input_matches_keras(keras, images64):
  from keras.applications import vgg16 as kvgg16

  x = images64.astype(np.float32)
  want = kvgg16.preprocess_input(x.copy())
  np.testing.assert_allclose(preprocess.preprocess_input(jnp.asarray(x)), want, rtol=0, atol=1e-4)
  np.testing.assert_allclose(preprocess.preprocess_input(x), want, rtol=0, atol=1e-4)


def test_grayscale_is_tiled_to_rgb():
  gray = np.arange(2 * 40 * 40, dtype=np.uint8).reshape(2, 40, 40, 1)
  out = jax.jit(lambda x: preprocess.prepare_images(x, 40, mode="none"))(gray)
  assert out.shape == (2, 40, 40, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], gray[..., 0].astype(np.float32))


def test_decode_predictions_offline():
  preds = np.zeros((2, 1000), np.float32)
  preds[0, 1] = 0.9  # goldfish
  preds[0, 281] = 0.1  # tabby
  preds[1, 999] = 1.0
  decoded = imagenet.decode_predictions(preds, top=2)
  assert decoded[0] == [("n01443537", "goldfish", pytest.approx(0.9)), ("n02123045", "tabby", pytest.approx(0.1))]
  assert decoded[1][0][:2] == ("n15075141", "toilet_tissue")
  assert len({wnid for wnid, _ in imagenet.class_index()}) == 1000
