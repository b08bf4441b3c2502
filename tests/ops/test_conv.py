"""The alternative 3x3 convolution forms and max pool against XLA's own."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtl.ops import conv


@pytest.mark.parametrize("impl", ["im2col", "winograd"])
@pytest.mark.parametrize(
  "shape", [(2, 6, 6, 8), (1, 7, 5, 3)]
)  # Odd sizes: Winograd's padded edge tiles.
def test_conv_impls_match_xla_conv_values_and_gradients(impl, shape):
  kx, kk, kd = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, shape)
  k = jax.random.normal(kk, (3, 3, shape[-1], 4))
  dy = jax.random.normal(kd, (*shape[:3], 4))
  ref_y, ref_vjp = jax.vjp(conv.direct_conv, x, k)
  y, vjp = jax.vjp(conv._CONVS[impl], x, k)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  for g, ref_g in zip(vjp(dy), ref_vjp(dy)):
    np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-5)


def test_auto_conv_impl_by_shape_and_platform():
  assert conv.conv_impl_for(2, 2, 512, "cpu") == "im2col"
  assert conv.conv_impl_for(4, 4, 512, "cpu") == "im2col"
  assert (
    conv.conv_impl_for(224, 224, 64, "cpu") == "direct"
  )  # Few input channels.
  assert conv.conv_impl_for(112, 112, 128, "cpu") == "winograd"
  assert (
    conv.conv_impl_for(32, 32, 128, "cpu") == "direct"
  )  # 64x64 input's block2: measured slower.
  assert conv.conv_impl_for(28, 28, 512, "cpu") == "winograd"
  assert conv.conv_impl_for(14, 14, 512, "cpu") == "direct"
  assert (
    conv.conv_impl_for(28, 28, 512, "cpu", jnp.bfloat16) == "direct"
  )  # Slower in bf16 on XLA:CPU.
  assert (
    conv.conv_impl_for(112, 112, 128, "gpu") == "direct"
  )  # cuDNN picks its own algorithm.
  assert conv.conv_impl_for(2, 2, 512, "tpu") == "direct"


@pytest.mark.parametrize(
  "shape", [(2, 8, 8, 3), (1, 7, 9, 2)]
)  # Odd sizes drop the last row/column.
def test_max_pool_2x2_matches_flax_max_pool_and_its_gradient(shape):
  # No ties: both gradients pick the same element.
  x = jax.random.normal(jax.random.PRNGKey(1), shape)

  def ref(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")

  np.testing.assert_array_equal(conv.max_pool_2x2(x), ref(x))
  dy = jax.random.normal(jax.random.PRNGKey(2), ref(x).shape)

  def grad(f):
    return jax.vjp(f, x)[1](dy)[0]

  np.testing.assert_array_equal(grad(conv.max_pool_2x2), grad(ref))
