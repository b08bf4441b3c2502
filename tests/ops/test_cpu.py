"""CPU settings: glibc malloc tuning and the per-phase XLA:CPU options."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from flaxtl import models
from flaxtl.errors import UserError
from flaxtl.models import common
from flaxtl.ops import cpu
from flaxtl.train import config as config_lib
from flaxtl.train import freeze

YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}
STEM = models.get("vgg16").stem_layers


def _trainable(first_layers: int) -> list[str]:
  backbone = common.variable_shapes(
    models.create("vgg16", include_top=False), 32
  )["params"]
  params = {"backbone": backbone, "head": {"dense1": {"kernel": 0}}}
  rules = freeze.first_layers_rules(
    first_layers, params, models.get("vgg16"), include_top=False
  )
  plan = freeze.plan(params, rules, log_matches=False)
  return plan.trainable_paths()


@pytest.mark.parametrize(
  "first_layers,size,expected",
  [
    (0, 64, YNN_OFF),
    (2, 64, YNN_OFF),
    (3, 64, None),
    (8, 64, None),
    (19, 64, None),
    (8, 128, YNN_OFF),
    (8, 224, YNN_OFF),
    (19, 224, YNN_OFF),
  ],
)
def test_auto_turns_ynnpack_off_for_large_images_or_while_block1_trains(
  first_layers, size, expected
):
  # first_layers=2 freezes block1_conv1 only, 3 both block1 convs, 19 every
  # conv (head only).
  assert (
    cpu.compiler_options(
      "auto", size, _trainable(first_layers), stem_layers=STEM, platform="cpu"
    )
    == expected
  )


def test_forward_passes_follow_the_image_size():
  assert cpu.compiler_options("auto", 64, platform="cpu") is None
  assert cpu.compiler_options("auto", 224, platform="cpu") == YNN_OFF
  assert (
    cpu.compiler_options("auto", 224, dtype="bfloat16", platform="cpu") is None
  )


def test_explicit_settings_and_other_platforms():
  full, freeze8 = _trainable(0), _trainable(8)
  assert (
    cpu.compiler_options("off", 64, freeze8, stem_layers=STEM, platform="cpu")
    == YNN_OFF
  )
  assert cpu.compiler_options("on", 224, full, platform="cpu") is None
  assert cpu.compiler_options("auto", 224, full, platform="gpu") is None
  assert cpu.compiler_options("off", 64, full, platform="tpu") is None
  with pytest.raises(ValueError, match="ynn must be one of"):
    cpu.compiler_options("fast", 64, full, platform="cpu")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option")
def test_the_option_takes_ynnpack_out_and_results_match():
  # Fails loudly if a jax upgrade renames the option or changes what it does.
  model = models.create("vgg16", include_top=False, pooling="avg")
  params = common.init_variables(model, 32)["params"]
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3)) * 255

  def loss(p):
    return jnp.sum(model.apply({"params": p}, x) ** 2)

  default = jax.jit(jax.grad(loss)).lower(params).compile()
  no_ynn = (
    jax.jit(jax.grad(loss), compiler_options=YNN_OFF).lower(params).compile()
  )
  assert (
    "__ynn_fusion" in default.as_text()
    and "__ynn_fusion" not in no_ynn.as_text()
  )
  ref, off = default(params), no_ynn(params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(
      a, b, rtol=2e-4, atol=1e-6 * float(np.abs(a).max())
    ),
    ref,
    off,
  )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tune_malloc_applies_on_glibc():
  assert cpu.tune_malloc() is True
  assert cpu.malloc_trim() in (True, False)  # Callable: glibc has it.


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_malloc_trim_returns_fragmented_free_memory():
  assert cpu.tune_malloc() is True  # 1 MB blocks: from the one heap.
  blocks = [b"x" * (1 << 20) for _ in range(256)]  # Written: resident.
  cpu.malloc_trim()
  before = cpu.rss_bytes()
  assert before > 256 << 20
  del blocks[::2]  # 128 MB of holes below live blocks: no top-of-heap trim.
  assert cpu.malloc_trim() is True
  assert before - cpu.rss_bytes() > 64 << 20
  del blocks


@pytest.mark.parametrize(
  "key,value,msg",
  [
    ("xla_cpu_ynn", "fastest", "xla_cpu_ynn must be one of"),
    ("model.conv_impl", "fft", "model.conv_impl must be one of"),
  ],
)
def test_bad_speed_settings_are_config_errors(key, value, msg):
  config = base.get_base()
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(UserError, match=msg):
    config_lib.validate(config)


def test_stem_layers_match_whole_module_paths():
  stem = ("features/0/0",)  # A PyTorch-named family's first conv.

  def opts(path):
    return cpu.compiler_options(
      "auto", 64, [path], stem_layers=stem, platform="cpu"
    )

  assert opts("backbone/features/0/0/kernel") == YNN_OFF
  assert opts("backbone/features/10/0/kernel") is None
  assert opts("backbone/features/0/0/bias") is None
