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


def _grouped_conv(x, k, strides, padding):
  return jax.lax.conv_general_dilated(
    x,
    k,
    strides,
    padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=x.shape[-1],
  )


@pytest.mark.parametrize(
  ("shape", "kernel", "strides", "padding"),
  [
    ((2, 7, 9, 4), 3, (1, 1), "SAME"),
    ((1, 8, 8, 3), 3, (2, 2), "SAME"),  # Even size: TF's (0, 1) padding.
    ((2, 9, 7, 5), 5, (2, 2), "SAME"),
    ((1, 9, 9, 2), 3, (2, 2), ((1, 1), (1, 1))),  # Keras' correct_pad.
    ((1, 6, 6, 3), 5, (1, 1), "VALID"),
    # The custom VJP's phases: every kernel size the families use at both
    # strides, odd and even maps, TF 'SAME', explicit and 'VALID' pads.
    ((2, 6, 7, 3), 3, (2, 2), "SAME"),
    ((1, 7, 7, 2), 3, (2, 2), "VALID"),
    ((2, 8, 6, 3), 5, (1, 1), "SAME"),
    ((1, 8, 8, 2), 5, (2, 2), "SAME"),
    ((1, 9, 9, 2), 5, (2, 2), ((2, 2), (2, 2))),
    ((1, 10, 9, 2), 5, (2, 2), "VALID"),
    ((2, 9, 8, 3), 7, (1, 1), "SAME"),
    ((1, 9, 9, 2), 7, (2, 2), "SAME"),
    ((1, 8, 8, 2), 7, (1, 1), ((3, 3), (3, 3))),
    ((1, 5, 6, 2), 3, (1, 2), ((0, 2), (1, 0))),  # Uneven strides and pads.
  ],
)
def test_depthwise_taps_match_xla_grouped_conv_values_and_gradients(
  shape, kernel, strides, padding
):
  kx, kk, kd = jax.random.split(jax.random.PRNGKey(3), 3)
  x = jax.random.normal(kx, shape)
  k = jax.random.normal(kk, (kernel, kernel, 1, shape[-1]))
  ref_y, ref_vjp = jax.vjp(
    lambda x, k: _grouped_conv(x, k, strides, padding), x, k
  )
  y, vjp = jax.vjp(
    lambda x, k: conv.conv_general_dilated(
      x,
      k,
      strides,
      padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=shape[-1],
    ),
    x,
    k,
  )
  assert y.shape == ref_y.shape
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  dy = jax.random.normal(kd, y.shape)
  for g, ref_g in zip(vjp(dy), ref_vjp(dy)):
    np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-5)


def test_depthwise_gradients_are_fused_adds_not_convs_or_reduce_windows():
  x = jnp.ones((2, 40, 40, 8))
  k = jnp.ones((3, 3, 1, 8))
  pads = ((1, 1), (1, 1))
  grads = jax.jit(
    lambda x, k, dy: jax.vjp(
      lambda a, b: conv.depthwise_taps(a, b, (2, 2), pads), x, k
    )[1](dy)
  )
  dy = jnp.ones((2, 20, 20, 8))
  hlo = grads.lower(x, k, dy).compile().as_text()
  # XLA:CPU's grouped conv and its tree-rewritten reduce are the slow forms.
  assert "convolution(" not in hlo
  assert "reduce-window" not in hlo
  dx, dk = grads(x, k, dy)
  assert dx.shape == x.shape and dk.shape == k.shape
  # Interior pixels of a 3x3 stride-2 conv get 1, 2 or 4 taps of ones.
  assert set(np.unique(np.asarray(dx[:, 1:-1, 1:-1]))) == {1.0, 2.0, 4.0}


def test_depthwise_taps_bf16_gradients_keep_their_dtypes():
  x = jax.random.normal(jax.random.PRNGKey(6), (1, 6, 6, 4), jnp.bfloat16)
  k = jax.random.normal(jax.random.PRNGKey(7), (3, 3, 1, 4), jnp.bfloat16)
  pads = ((1, 1), (1, 1))
  y, vjp = jax.vjp(lambda a, b: conv.depthwise_taps(a, b, (1, 1), pads), x, k)
  dx, dk = vjp(jnp.ones_like(y))
  assert (y.dtype, dx.dtype, dk.dtype) == (jnp.bfloat16,) * 3
  ref = jax.vjp(
    lambda a, b: _grouped_conv(a, b, (1, 1), pads),
    x.astype(jnp.float32),
    k.astype(jnp.float32),
  )[1](jnp.ones(y.shape))
  for g, ref_g in zip((dx, dk), ref):
    np.testing.assert_allclose(
      g.astype(jnp.float32), ref_g, rtol=3e-2, atol=3e-2 * np.abs(ref_g).max()
    )


def test_conv_general_dilated_takes_taps_only_for_cpu_depthwise():
  x = jnp.ones((1, 6, 6, 4))

  def hlo(k, groups):
    return (
      jax.jit(
        lambda x, k: conv.conv_general_dilated(
          x,
          k,
          (1, 1),
          "SAME",
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=groups,
        )
      )
      .lower(x, k)
      .as_text()
    )

  assert "convolution" not in hlo(jnp.ones((3, 3, 1, 4)), 4)  # Depthwise.
  # Depth multiplier 2, grouped (2 channels a group), dense: XLA's conv.
  assert "convolution" in hlo(jnp.ones((3, 3, 1, 8)), 4)
  assert "convolution" in hlo(jnp.ones((3, 3, 2, 4)), 2)
  assert "convolution" in hlo(jnp.ones((3, 3, 4, 4)), 1)


def test_flax_conv_with_depthwise_taps_keeps_its_params_and_bf16_output():
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 5, 5, 6))
  kwargs = {
    "features": 6,
    "kernel_size": (3, 3),
    "feature_group_count": 6,
    "use_bias": True,
  }
  ref = nn.Conv(**kwargs)
  variables = ref.init(jax.random.PRNGKey(5), x)
  ours = nn.Conv(**kwargs, conv_general_dilated=conv.conv_general_dilated)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(5), x)) == (
    jax.tree.map(jnp.shape, variables)
  )
  np.testing.assert_allclose(
    ours.apply(variables, x), ref.apply(variables, x), rtol=1e-5, atol=1e-5
  )
  bf16 = nn.Conv(
    **kwargs, dtype=jnp.bfloat16, conv_general_dilated=conv.conv_general_dilated
  )
  y = bf16.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    y.astype(jnp.float32), ref.apply(variables, x), rtol=2e-2, atol=2e-2
  )
