"""freeze.layer_decay: lr multipliers from the registry's layer order.

timm's `param_groups_layer_decay`: the stem (ViT's patch_embed, cls_token,
pos_embed) is layer 0, block i layer i + 1, the final norm and the new head
the top at 1.0; layer id g of depth n trains at decay ** (n - g), times
`freeze.lr_mults`. CNNs: their blocks (PyTorch naming) or their stages
(Keras naming) in forward order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from flaxtl import tree
from flaxtl.errors import UserError
from flaxtl.train import config as config_lib
from flaxtl.train import optim, setup


def _plan(arch, options="", image_size=32, decay=0.5, lr_mults=()):
  c = base.get_base()
  c.model.name = "transfer"
  c.model.arch = arch
  c.model.weights = None
  c.model.head = "mlp"
  c.model.hidden = ()
  c.model.activations = ()
  c.model.dropout = ()
  c.model.options = options
  c.image_size = image_size
  c.freeze.layer_decay = decay
  c.freeze.lr_mults = lr_mults
  model = setup.build_model(c, num_classes=3)
  params = setup.abstract_variables(model, image_size, jax.random.key(0))
  plan = setup.freeze_plan(c, params["params"], 0)
  return c, plan, {p: m for p, _, m in plan.rows}, params["params"]


def test_vit_blocks_decay_like_timm():
  # vit_tiny at depth 2: stem = layer 0, blocks 1 and 2, norm the top.
  *_, mult, _ = _plan(
    "vit_tiny_patch16_224",
    "depth=2",
    lr_mults=(("head/.*", 10.0), ("backbone/blocks/0/.*", 2.0)),
  )
  want = {
    "backbone/cls_token": 0.5**3,
    "backbone/pos_embed": 0.5**3,
    "backbone/patch_embed/proj/kernel": 0.5**3,
    "backbone/blocks/0/attn/qkv/kernel": 2.0 * 0.5**2,
    "backbone/blocks/0/mlp/fc2/bias": 2.0 * 0.5**2,
    "backbone/blocks/1/norm1/scale": 0.5,
    "backbone/blocks/1/mlp/fc1/kernel": 0.5,
    "backbone/norm/scale": 1.0,
  }
  for path, m in want.items():
    assert mult[path] == pytest.approx(m), path
  heads = [p for p in mult if p.startswith("head/")]
  assert heads and all(mult[p] == 10.0 for p in heads)


def test_cnns_decay_by_block_or_stage():
  # torchvision ResNet-18: stem, then its 8 BasicBlocks (layerN/M).
  *_, mult, _ = _plan("tv_resnet18", image_size=32, decay=0.8)
  assert mult["backbone/conv1/kernel"] == pytest.approx(0.8**9)
  assert mult["backbone/bn1/scale"] == pytest.approx(0.8**9)
  assert mult["backbone/layer1/0/conv1/kernel"] == pytest.approx(0.8**8)
  assert mult["backbone/layer2/0/downsample/0/kernel"] == pytest.approx(0.8**6)
  assert mult["backbone/layer4/1/bn2/bias"] == pytest.approx(0.8)
  # Keras VGG16: its 5 conv stages (`Backbone.stages`).
  *_, mult, _ = _plan("vgg16", decay=0.5)
  for stage, power in (("block1", 5), ("block3", 3), ("block5", 1)):
    got = [m for p, m in mult.items() if p.startswith(f"backbone/{stage}_")]
    assert got and all(m == pytest.approx(0.5**power) for m in got), stage
  assert all(m == 1.0 for p, m in mult.items() if p.startswith("head/"))


def test_multipliers_scale_the_updates():
  """Through the optimiser's labels: plain SGD moves each param by
  lr * multiplier."""
  c, plan, mult, shapes = _plan("vit_tiny_patch16_224", "depth=2")
  c.optim.name, c.optim.lr, c.optim.schedule = "sgd", 0.1, "constant"
  c.optim.momentum = 0.0
  tx, _ = optim.make_optimizer(c.optim, plan, 10)
  grads = jax.tree.map(lambda s: jnp.ones(s.shape), shapes)
  params = jax.tree.map(jnp.zeros_like, grads)
  updates, _ = tx.update(grads, tx.init(params), params)
  for path, u in tree.flatten(updates).items():
    np.testing.assert_allclose(
      np.asarray(u), -0.1 * mult[path], rtol=1e-6, err_msg=path
    )


def test_layer_decay_out_of_range_is_one_line():
  c = base.get_base()
  c.freeze.layer_decay = 1.5
  with pytest.raises(UserError, match=r"freeze.layer_decay=1.5 is out of"):
    config_lib.check_ranges(c)
