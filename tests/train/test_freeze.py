"""Freezing as data, the optimiser split, strict merges, what XLA compiles."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from flaxtl import models, tree
from flaxtl.errors import UserError
from flaxtl.models.heads import TransferModel
from flaxtl.preprocess import prepare_images
from flaxtl.train import freeze, optim, steps
from flaxtl.weights import merge_pretrained

VGG16 = models.get("vgg16")


def _shapes(head="keras_top", size=224, num_classes=10):
  model = TransferModel(
    arch="vgg16",
    head=head,
    num_classes=num_classes,
    hidden=(32,),
    activations=("relu",),
    dropout=(0.0,),
  )
  x = jnp.zeros((1, size, size, 3))
  return model, jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))[
    "params"
  ]


def test_first_8_layers_freeze_the_five_convs_like_keras():
  _, params = _shapes()
  rules = freeze.first_layers_rules(8, params, VGG16, include_top=True)
  plan = freeze.plan(params, rules)
  frozen = sorted(
    {p.rsplit("/", 1)[0] for p, s, _ in plan.rows if s == "frozen"}
  )
  assert frozen == [
    "backbone/block1_conv1",
    "backbone/block1_conv2",
    "backbone/block2_conv1",
    "backbone/block2_conv2",
    "backbone/block3_conv1",
  ]
  n_frozen = sum(
    int(np.prod(leaf.shape))
    for leaf, lab in zip(jax.tree.leaves(params), jax.tree.leaves(plan.labels))
    if lab == "frozen"
  )
  assert n_frozen == 555_328


def test_rules_first_match_wins_and_multipliers():
  _, params = _shapes()
  plan = freeze.plan(
    params,
    [
      (r"backbone/block5_conv3/.*", "trainable"),
      (r"backbone/block[1-5]_.*", "frozen"),
    ],
    [(r"backbone/fc.*", 0.1)],
  )
  labels = dict(zip(tree.paths(params), jax.tree.leaves(plan.labels)))
  assert labels["backbone/block5_conv3/kernel"] == "trainable"
  assert labels["backbone/block5_conv2/kernel"] == "frozen"
  assert labels["backbone/fc1/kernel"] == "trainable*0.1"
  assert labels["backbone/predictions/bias"] == "trainable"


@pytest.mark.parametrize(
  "rules,msg",
  [
    (
      [("block1_conv1/.*", "frozen")],
      "match no parameter",
    ),  # Not fullmatch: the path has a prefix.
    ([("backbone/(", "frozen")], "not a valid regex"),
    ([("backbone/.*", "freeze")], "label must be"),
  ],
)
def test_bad_rules_are_clear_errors(rules, msg):
  _, params = _shapes()
  with pytest.raises(UserError, match=msg):
    freeze.plan(params, rules)


def test_first_layers_beyond_the_model_is_an_error():
  _, params = _shapes()
  with pytest.raises(UserError, match="only 23 layers"):
    freeze.first_layers_rules(30, params, VGG16, include_top=True)


def _optim_cfg(**kw):
  cfg = base.get_base().optim
  cfg.update(kw)
  return cfg


def test_frozen_params_get_no_optimizer_state_and_do_not_move():
  model, _ = _shapes(head="mlp", size=32)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))[
    "params"
  ]
  plan = freeze.plan(
    params, freeze.first_layers_rules(8, params, VGG16, include_top=False)
  )
  tx, _ = optim.make_optimizer(
    _optim_cfg(name="sgd", momentum=0.9, clip_norm=1.0), plan, 100
  )
  state = tx.init(params)
  # Momentum buffers exist for trainable params only.
  n_state = sum(
    x.size for x in jax.tree.leaves(state) if hasattr(x, "size") and x.ndim > 0
  )
  n_train = sum(
    int(np.prod(leaf.shape))
    for leaf, lab in zip(jax.tree.leaves(params), jax.tree.leaves(plan.labels))
    if lab != "frozen"
  )
  assert n_state == n_train
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  for path, u, lab in zip(
    tree.paths(params), jax.tree.leaves(updates), jax.tree.leaves(plan.labels)
  ):
    assert bool(jnp.all(u == 0)) == (lab == "frozen"), path


def test_keras_decay_schedule_and_warmup():
  s = optim.make_schedule(
    _optim_cfg(lr=1e-3, decay=1e-2, schedule="keras_decay", warmup_steps=0), 100
  )
  assert float(s(100)) == pytest.approx(1e-3 / 2)
  s = optim.make_schedule(
    _optim_cfg(lr=1.0, schedule="cosine", warmup_steps=10), 110
  )
  assert (
    float(s(5)) == pytest.approx(0.5)
    and float(s(10)) == pytest.approx(1.0)
    and float(s(110)) < 1e-6
  )


def test_strict_merge():
  _, shapes = _shapes(head="mlp", size=32)
  fresh = {"params": jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)}
  pre = {
    k: {n: np.ones(a.shape, np.float32) for n, a in v.items()}
    for k, v in fresh["params"]["backbone"].items()
  }
  pre["fc1"] = {
    "kernel": np.ones((2, 2), np.float32),
    "bias": np.ones(2, np.float32),
  }  # Unused: skipped.
  merged, report = merge_pretrained(fresh, {"params": pre})
  assert (
    float(merged["params"]["backbone"]["block5_conv3"]["kernel"].mean()) == 1.0
  )
  assert (
    float(np.abs(merged["params"]["head"]["logits"]["kernel"]).sum()) == 0.0
  )  # Head stays fresh.
  assert sorted(report["skipped"]) == ["fc1/bias", "fc1/kernel"]
  del pre["block2_conv1"]
  pre["block3_conv1"]["kernel"] = np.ones((3, 3, 128, 7), np.float32)
  with pytest.raises(
    UserError,
    match=r"missing.*block2_conv1.*shape mismatch.*block3_conv1/kernel",
  ):
    merge_pretrained(fresh, {"params": pre})


def test_strict_merge_covers_batch_stats():
  fresh = {
    "params": {"backbone": {"bn": {"scale": np.zeros(4)}}},
    "batch_stats": {
      "backbone": {"bn": {"mean": np.zeros(4), "var": np.zeros(4)}}
    },
  }
  pre = {
    "params": {"bn": {"scale": np.ones(4)}},
    "batch_stats": {"bn": {"mean": np.ones(4), "var": np.ones(4)}},
  }
  merged, _ = merge_pretrained(fresh, pre)
  np.testing.assert_array_equal(
    merged["batch_stats"]["backbone"]["bn"]["var"], np.ones(4)
  )
  del pre["batch_stats"]["bn"]["var"]
  with pytest.raises(
    UserError, match=r"missing from the pretrained weights: backbone/bn"
  ):
    merge_pretrained(fresh, pre)
  pre["batch_stats"]["bn"]["var"] = np.ones(5)
  with pytest.raises(
    UserError, match=r"shape mismatch: backbone/bn/var \(5,\)"
  ):
    merge_pretrained(fresh, pre)


def _count_convs(first_layers: int, clip: float, size: int = 64) -> int:
  model, _ = _shapes(head="mlp", size=size)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))[
    "params"
  ]
  plan = freeze.plan(
    params,
    freeze.first_layers_rules(first_layers, params, VGG16, include_top=False),
  )
  tx, schedule = optim.make_optimizer(_optim_cfg(clip_norm=clip), plan, 10)
  step = steps.make_train_step(
    model,
    tx,
    plan.trainable_mask(),
    schedule,
    prepare=lambda x: prepare_images(x, size, "caffe"),
    log_grad_norm=True,
  )
  state = steps.TrainState(
    jnp.zeros((), jnp.int32), params, {}, tx.init(params), jax.random.PRNGKey(1)
  )
  batch = {
    "image": jnp.zeros((2, 28, 28, 1), jnp.uint8),
    "label": jnp.zeros((2,), jnp.int32),
  }
  hlo = jax.jit(step).lower(state, batch).compile().as_text()
  return len(re.findall(r"= \S+ convolution\(", hlo)) + len(
    re.findall(r"custom_call_target=\"__onednn\$convolution", hlo)
  )


def test_compiled_step_skips_backward_through_the_frozen_prefix():
  """Clipping and grad-norm logging are on: they must not read frozen grads."""
  full = _count_convs(0, clip=1.0)
  frozen = _count_convs(8, clip=1.0)
  # Freeze-8 drops 5 kernel gradients and 5 input gradients (block1_conv2
  # ... block3_conv2).
  assert full - frozen == 10, (full, frozen)
