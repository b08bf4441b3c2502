"""Runtime settings: glibc malloc tuning and the per-phase XLA:CPU options of the train step."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from flaxtl import freeze, runtime, train
from flaxtl.errors import UserError
from flaxtl.models import vgg

YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _trainable(first_layers: int) -> list[str]:
  params = {"backbone": vgg.param_shapes(vgg.VGG16(include_top=False), 32), "head": {"dense1": {"kernel": 0}}}
  plan = freeze.plan(params, freeze.first_layers_rules(first_layers, params, arch="vgg16", include_top=False),
                     log_matches=False)
  return plan.trainable_paths()


@pytest.mark.parametrize("first_layers,size,expected", [
    (0, 64, YNN_OFF), (2, 64, YNN_OFF), (3, 64, None), (8, 64, None), (19, 64, None),
    (8, 128, YNN_OFF), (8, 224, YNN_OFF), (19, 224, YNN_OFF),
])
def test_auto_turns_ynnpack_off_for_large_images_or_while_block1_trains(first_layers, size, expected):
  # first_layers=2 freezes block1_conv1 only, 3 both block1 convs, 19 every conv (head only).
  assert runtime.compiler_options("auto", size, _trainable(first_layers), platform="cpu") == expected


def test_forward_passes_follow_the_image_size():
  assert runtime.compiler_options("auto", 64, platform="cpu") is None
  assert runtime.compiler_options("auto", 224, platform="cpu") == YNN_OFF
  assert runtime.compiler_options("auto", 224, dtype="bfloat16", platform="cpu") is None


def test_explicit_settings_and_other_platforms():
  full, freeze8 = _trainable(0), _trainable(8)
  assert runtime.compiler_options("off", 64, freeze8, platform="cpu") == YNN_OFF
  assert runtime.compiler_options("on", 224, full, platform="cpu") is None
  assert runtime.compiler_options("auto", 224, full, platform="gpu") is None
  assert runtime.compiler_options("off", 64, full, platform="tpu") is None
  with pytest.raises(ValueError, match="ynn must be one of"):
    runtime.compiler_options("fast", 64, full, platform="cpu")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option")
def test_the_option_takes_ynnpack_out_and_results_match():
  # Fails loudly if a jax upgrade renames the option or changes what it does.
  model = vgg.VGG16(include_top=False, pooling="avg")
  params = vgg.init_params(model, 32)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3)) * 255
  loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
  default = jax.jit(jax.grad(loss)).lower(params).compile()
  no_ynn = jax.jit(jax.grad(loss), compiler_options=YNN_OFF).lower(params).compile()
  assert "__ynn_fusion" in default.as_text() and "__ynn_fusion" not in no_ynn.as_text()
  ref, off = default(params), no_ynn(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * float(np.abs(a).max())),
               ref, off)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tune_malloc_applies_on_glibc():
  assert runtime.tune_malloc() is True


@pytest.mark.parametrize("key,value,msg", [("xla_cpu_ynn", "fastest", "xla_cpu_ynn must be one of"),
                                           ("model.conv_impl", "fft", "model.conv_impl must be one of")])
def test_bad_speed_settings_are_config_errors(key, value, msg):
  config = base.get_base()
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(UserError, match=msg):
    train.validate(config, devices=False)
