"""PEFT: LoRA / DoRA / BitFit / norm / adapters as params under 'peft' plus
freezing rules; a real run, merge, export and the base-hash refusal."""

from __future__ import annotations

import json
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base as base_config
from flaxtl import tree
from flaxtl.errors import UserError
from flaxtl.models import common
from flaxtl.models.keras_model import Conv as KerasConv
from flaxtl.peft import core, runs
from flaxtl.train import config as config_lib
from flaxtl.train import optim, setup, steps
from flaxtl.train.summary import counts, param_table
from tests.quick_configs import quick

SIZE = 8


class _Attn(nn.Module):
  dim: int

  @nn.compact
  def __call__(self, x):
    q, k, v = jnp.split(nn.Dense(3 * self.dim, name="qkv")(x), 3, axis=-1)
    a = jax.nn.softmax(q @ k.swapaxes(1, 2) / math.sqrt(self.dim))
    return nn.Dense(self.dim, name="proj")(a @ v)


class _Block(nn.Module):
  dim: int

  @nn.compact
  def __call__(self, x):
    x = x + _Attn(self.dim, name="attn")(nn.LayerNorm(name="norm1")(x))
    h = nn.Dense(2 * self.dim, name="fc1")(x)
    return x + nn.Dense(self.dim, name="fc2")(nn.gelu(h))


class _Mlp(nn.Module):
  dim: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.dim, name="fc2")(nn.gelu(nn.Dense(16, name="fc1")(x)))


class TinyViT(nn.Module):
  """A ViT stand-in with timm's paths: blocks/N/attn/qkv (fused), proj."""

  @nn.compact
  def __call__(self, x, train=False):
    t = nn.Dense(12, name="patch_embed")(x.reshape(x.shape[0], -1, 3))
    for i in range(2):
      t = _Block(12, name=f"blocks_{i}")(t)
    return t.mean(1)


class TinyCNN(nn.Module):
  """3x3 conv + BN, a depthwise-separable block, a Keras conv, a dense."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), name="conv1")(x)
    x = nn.relu(common.BatchNorm(name="bn1")(x, train=train))
    x = nn.Conv(8, (3, 3), feature_group_count=8, name="dw")(x)
    x = nn.Conv(16, (1, 1), name="pw")(x)
    x = KerasConv(16, (3, 3), padding="same", name="kconv")(x)
    # 20 wide: no activation of this net has the fc kernel's 320 elements.
    return nn.Dense(20, name="fc")(x.mean((1, 2)))


class Net(nn.Module):
  backbone: nn.Module

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3, name="head")(self.backbone(x, train=train))


def _net(kind: str) -> Net:
  return Net(
    TinyViT(name="backbone") if kind == "vit" else TinyCNN(name="backbone")
  )


def _config(**peft):
  c = base_config.get_base()
  c.model.head = "linear"
  c.image_size = SIZE
  for k, v in peft.items():
    c.peft[k] = v
  return c


def _peft_model(kind: str, **peft) -> core.PeftModel:
  net = _net(kind)
  shapes, calls = core.trace(net, SIZE)
  return core.PeftModel(
    net, core.resolve(_config(**peft), shapes["params"], calls)
  )


def _vit_paths(model):
  # Flax names blocks_0; timm's blocks/0 is what the targets read.
  return {t.layer for t in model.spec.lora}


X = jax.random.normal(jax.random.PRNGKey(1), (2, SIZE, SIZE, 3))


def _init(model):
  return jax.jit(setup.init_fn(model, SIZE))(jax.random.PRNGKey(0))


def _base_vars(v):
  return {**v, "params": {k: x for k, x in v["params"].items() if k != "peft"}}


def _perturb(v, seed=3):
  """Random B / magnitudes / adapter ups: the model no longer starts exact."""
  leaves, treedef = jax.tree.flatten(v["params"]["peft"])
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  leaves = [
    x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)
  ]
  return {
    **v,
    "params": {**v["params"], "peft": jax.tree.unflatten(treedef, leaves)},
  }


@pytest.mark.parametrize(
  "kind, method, targets, expect",
  [
    # Dense, 3x3 conv, depthwise-separable (pointwise), Keras conv: default.
    ("cnn", "lora", (), {"conv1", "pw", "kconv", "fc"}),
    ("cnn", "lora", ("dw", "pw"), {"dw", "pw"}),  # Depthwise when asked.
    ("vit", "lora", (), {"blocks_0/attn/qkv", "blocks_0/attn/proj"}),
    ("vit", "lora", ("blocks_./attn/qkv:q,v",), {"blocks_0/attn/qkv"}),
    ("cnn", "dora", (), {"conv1", "pw", "kconv", "fc"}),
  ],
)
def test_lora_starts_at_the_base_function_and_merges(
  kind, method, targets, expect
):
  model = _peft_model(kind, method=method, rank=2, alpha=4.0, targets=targets)
  layers = {t.layer.removeprefix("backbone/") for t in model.spec.lora}
  assert expect <= layers, layers
  v = _init(model)
  base_out = jax.jit(model.base.apply)(_base_vars(v), X)
  out = jax.jit(model.apply)(v, X)
  # B = 0 (DoRA: magnitude offset 0, ratio exactly 1): the base function,
  # up to XLA fusing the zero update differently (measured <= 6e-8).
  np.testing.assert_allclose(out, base_out, rtol=0, atol=1e-6)
  # Trained adapters: the unmerged model equals the base with W' folded in.
  v = _perturb(v)
  out = jax.jit(model.apply)(v, X)
  merged = model.merged_params(v["params"])
  assert "peft" not in merged
  merged_out = jax.jit(model.base.apply)({**v, "params": merged}, X)
  assert float(jnp.abs(out - base_out).max()) > 1e-3  # Updates do act.
  np.testing.assert_allclose(out, merged_out, rtol=1e-5, atol=1e-5)
  flat, base_flat = tree.flatten(merged), tree.flatten(v["params"])
  for t in model.spec.lora:
    w, w2 = base_flat[t.path], flat[t.path]
    if method == "dora":  # ||W'|| per output channel = ||W|| + magnitude.
      node = v["params"]["peft"]
      for part in t.layer.split("/"):
        node = node[part]
      axes = tuple(range(w.ndim - 1))
      np.testing.assert_allclose(
        jnp.linalg.norm(w2.reshape(-1, w.shape[-1]), axis=0),
        jnp.sqrt(jnp.sum(w**2, axes)) + node["magnitude"],
        rtol=1e-5,
      )
    elif targets and targets[0].endswith(":q,v"):  # k's slice untouched.
      d = w.shape[-1] // 3
      np.testing.assert_array_equal(w2[:, d : 2 * d], w[:, d : 2 * d])
      assert not np.allclose(w2[:, :d], w[:, :d])
      assert not np.allclose(w2[:, 2 * d :], w[:, 2 * d :])
    else:  # W + (alpha / r) A B, by hand.
      node = v["params"]["peft"]
      for part in t.layer.split("/"):
        node = node[part]
      parts = t.parts()
      if parts == (None,):
        want = w + 2.0 * np.tensordot(node["lora_a"], node["lora_b"], 1)
        np.testing.assert_allclose(w2, want, rtol=1e-5, atol=1e-6)


def test_activation_path_and_kernel_path():
  """nn.Dense / nn.Conv / Keras Conv take (x A) B; depthwise W + A B."""
  model = _peft_model(
    "cnn", method="lora", targets=("conv1", "dw", "kconv", "fc")
  )
  by = {
    t.layer.removeprefix("backbone/"): t.on_activations for t in model.spec.lora
  }
  assert by == {"conv1": True, "dw": False, "kconv": True, "fc": True}


def test_adapters_start_exact_and_train_only_themselves():
  # Default placement: ViT MLP outputs (blocks/N/mlp) or numbered blocks;
  # this stand-in's blocks_N are neither, so it needs adapter_after.
  with pytest.raises(UserError, match=r"peft\.adapter_after"):
    _peft_model("vit", method="adapter", adapter_dim=4)
  model = _peft_model(
    "vit", method="adapter", adapter_dim=4, adapter_after=("blocks_.",)
  )
  assert [a.layer for a in model.spec.adapters] == [
    "backbone/blocks_0",
    "backbone/blocks_1",
  ]
  v = _init(model)
  np.testing.assert_allclose(
    jax.jit(model.apply)(v, X),
    jax.jit(model.base.apply)(_base_vars(v), X),
    rtol=0,
    atol=1e-6,
  )
  v = _perturb(v)
  assert (
    float(
      jnp.abs(
        jax.jit(model.apply)(v, X) - model.base.apply(_base_vars(v), X)
      ).max()
    )
    > 1e-4
  )
  with pytest.raises(UserError, match="not linear"):
    model.merged_params(v["params"])


def _trainable(config, params) -> int:
  plan = setup.freeze_plan(config, params, 0, log_matches=False)
  return counts(params, plan)["trainable"]


def _resnet18(**peft):
  c = base_config.get_base()
  c.model.arch, c.model.weights, c.model.head = "tv_resnet18", "none", "linear"
  c.model.pooling, c.image_size = "avg", 32
  for k, v in peft.items():
    c.peft[k] = v
  config_lib.validate(c)
  model = setup.build_model(c, 10)
  shapes = setup.abstract_variables(model, 32, jax.random.PRNGKey(0))
  return c, model, shapes["params"]


HEAD = 512 * 10 + 10
# ResNet-18 BN layers: bn1 64; per stage 4 (+1 downsample) of 64/128/256/512.
BN = 64 + 4 * 64 + 5 * 128 + 5 * 256 + 5 * 512


def _lora_by_hand(r: int) -> int:
  """ResNet-18 convs (in as kh*kw*cin, out), LoRA r*(in + out) each."""
  convs = [(7 * 7 * 3, 64)] + [(9 * 64, 64)] * 4
  for cin, c in ((64, 128), (128, 256), (256, 512)):
    convs += [(9 * cin, c), (9 * c, c), (9 * c, c), (9 * c, c), (cin, c)]
  return sum(r * (i + o) for i, o in convs)


@pytest.mark.parametrize(
  "peft, expect",
  [
    ({"method": "lora", "rank": 4}, _lora_by_hand(4) + HEAD),
    # Plus a magnitude per output channel: the 20 convs' outputs, 4,800.
    ({"method": "dora", "rank": 4}, _lora_by_hand(4) + 4800 + HEAD),
    ({"method": "bitfit"}, BN + HEAD),
    ({"method": "norm"}, 2 * BN + HEAD),
    (
      {"method": "adapter", "adapter_dim": 8},
      sum(2 * d * 8 + 8 + d for d in (64, 64, 128, 128, 256, 256, 512, 512))
      + HEAD,
    ),
    ({"method": "lora+bitfit", "rank": 4}, _lora_by_hand(4) + BN + HEAD),
  ],
)
def test_trainable_counts_match_a_hand_count_resnet18(peft, expect):
  c, _, params = _resnet18(**peft)
  assert _trainable(c, params) == expect
  table = param_table(
    params, setup.freeze_plan(c, params, 0, False), core.roles(c, params)
  )
  assert re.search(r"peft/\S+ .* trainable .* adapter", table) or peft[
    "method"
  ] in ("bitfit", "norm")
  assert re.search(r"backbone/layer1/0/conv1/kernel .* frozen .* base", table)


def test_vit_counts_qkv_and_proj_by_default():
  model = _peft_model("vit", method="lora", rank=2)
  v = jax.eval_shape(lambda: setup.init_fn(model, SIZE)(jax.random.PRNGKey(0)))
  c = _config(method="lora", rank=2)
  # 2 blocks: qkv 12 -> 3x12 as 3 slices of 2*(12+12); proj 2*(12+12).
  assert _trainable(c, v["params"]) == 2 * (3 * 48 + 48) + 12 * 3 + 3


def test_bad_targets_and_methods_are_one_line_errors():
  with pytest.raises(
    UserError, match=r"peft.targets: 'nope.*' matches no kernel"
  ):
    _peft_model("cnn", method="lora", targets=("nope.*",))
  with pytest.raises(UserError, match="not a fused qkv kernel"):
    _peft_model("cnn", method="lora", targets=("fc:q",))
  with pytest.raises(UserError, match="exclude each other"):
    core.validate(_config(method="lora+dora"))
  with pytest.raises(UserError, match="prompt_tokens option"):
    core.validate(_config(method="prompt", prompt_tokens=4))
  with pytest.raises(UserError, match="each method must be one of"):
    core.validate(_config(method="lorax"))
  with pytest.raises(UserError, match=r"peft.rank=0 is out of range"):
    core.validate(_config(method="lora", rank=0))


def _weight_grads(method: str) -> tuple[list, int, int]:
  """(weight gradients of base kernels, optimiser-state values, trainable
  values) of the compiled step. A backward op (metadata 'transpose(') whose
  result has as many elements as a base kernel is that kernel's gradient
  (XLA may lay it out transposed); no activation here has those sizes."""
  model = (
    _peft_model("cnn", method=method, rank=2)
    if method != "full"
    else _net("cnn")
  )
  v = _init(model)
  c = _config(method="none" if method == "full" else method, rank=2)
  plan = setup.freeze_plan(c, v["params"], 0, log_matches=False)
  opt = c.optim
  opt.name = "adam"
  tx, schedule = optim.make_optimizer(opt, plan, 10)
  step = steps.make_train_step(
    model,
    tx,
    plan.trainable_mask(),
    schedule,
    prepare=lambda x: x.astype(jnp.float32),
    train_mode=setup.train_mode(c, plan, v["batch_stats"]),
  )
  state = steps.TrainState(
    jnp.zeros((), jnp.int32),
    v["params"],
    v["batch_stats"],
    tx.init(v["params"]),
    jax.random.PRNGKey(1),
  )
  batch = {"image": X, "label": jnp.zeros((2,), jnp.int32)}
  hlo = jax.jit(step).lower(state, batch).compile().as_text()
  sizes = {
    int(np.size(a)): p
    for p, a in tree.flatten(v["params"]).items()
    if p.startswith("backbone/") and p.endswith("kernel")
  }
  hits = []
  for line in hlo.splitlines():
    m = re.search(r"= f32\[([\d,]*)\]\S* (convolution|dot|custom-call)\(", line)
    if m and "transpose(" in line:
      n = math.prod(int(d) for d in m.group(1).split(",") if d)
      if n in sizes:
        hits.append(sizes[n])
  opt_values = sum(int(np.size(a)) for a in jax.tree.leaves(state.opt_state))
  return hits, opt_values, counts(v["params"], plan)["trainable"]


def test_compiled_lora_step_has_no_base_weight_gradient():
  full, _, full_n = _weight_grads("full")
  lora, lora_opt, lora_n = _weight_grads("lora")
  # conv1, kconv, fc (dw and pw gradients may fuse into other ops).
  assert len(set(full)) >= 3, full
  assert lora == [], lora
  # Adam: mu and nu for trainable values only (+ step counts).
  assert lora_opt - 2 * lora_n < 8 and lora_n < full_n / 4


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
  """One real training run: LoRA r=2 + BitFit on ResNet-18 at 32x32."""
  from flaxtl import train

  tmp = tmp_path_factory.mktemp("peft_run")
  c = quick(
    "configs/mnist_scratch.py:quick",
    tmp,
    **{
      "model.arch": "tv_resnet18",
      "model.head": "linear",
      "model.pooling": "avg",
      "peft.method": "lora+bitfit",
      "peft.rank": 2,
    },
  )
  result = train.train_and_evaluate(c, tmp / "w")
  return c, tmp, result


def test_training_leaves_base_params_bitwise_and_merge_predicts_the_same(
  peft_run,
):
  from flaxtl import predict, weights

  c, tmp, _ = peft_run
  w = tmp / "w"
  final = tree.flatten(weights.restore_to_host(w / "params"))
  model = setup.build_model(c, 10)
  init_rng = jax.random.split(jax.random.PRNGKey(c.seed))[0]
  start = tree.flatten(
    jax.jit(setup.init_fn(model, c.image_size))(init_rng)["params"]
  )
  moved = [p for p in final if not np.array_equal(final[p], start[p])]
  kernels = [
    p for p in final if p.startswith("backbone/") and p.endswith("kernel")
  ]
  assert kernels and not set(kernels) & set(moved)  # Frozen: bitwise.
  assert any(p.startswith("peft/") for p in moved)  # LoRA B moved.
  assert any(p.endswith("/bias") and p.startswith("backbone/") for p in moved)

  runs.merge(w, tmp / "merged")
  merged = weights.restore_to_host(tmp / "merged" / "params")
  assert "peft" not in merged
  assert (
    json.loads((tmp / "merged" / "config.json").read_text())["peft"]["method"]
    == "none"
  )
  _, _, p1 = predict.predict_probs(w, "mnist_sample", 500)
  _, _, p2 = predict.predict_probs(tmp / "merged", "mnist_sample", 500)
  np.testing.assert_allclose(p1, p2, atol=1e-5)

  out = runs.export(w, tmp / "export")
  base_bytes = sum(np.asarray(a).nbytes for a in final.values())
  assert out["bytes"] < base_bytes / 10, (out["bytes"], base_bytes)
  manifest = json.loads((tmp / "export" / "peft.json").read_text())
  assert re.fullmatch(r"[0-9a-f]{64}", manifest["base_sha256"])

  runs.apply(tmp / "export", w, tmp / "applied")  # Back onto its own base.
  applied = tree.flatten(weights.restore_to_host(tmp / "applied" / "params"))
  assert applied.keys() == final.keys()
  for p, a in final.items():
    np.testing.assert_array_equal(applied[p], a)
  with pytest.raises(UserError) as e:  # The merged kernels are another base.
    runs.apply(tmp / "export", tmp / "merged", tmp / "refused")
  msg = str(e.value)
  assert (
    "\n" not in msg
    and manifest["base_sha256"] in msg
    and str(tmp / "merged") in msg
  )
  assert not (tmp / "refused").exists()


def test_study_rows_vgg16_lora_and_adapter_counts_by_hand():
  """configs/mnist_peft.py (Keras-named VGG16, 64x64, mlp head 256)."""
  from flaxtl import config_files
  from tests.quick_configs import ROOT

  head = 2 * 2 * 512 * 256 + 256 + 256 * 10 + 10
  convs = [(27, 64), (576, 64), (576, 128), (1152, 128), (1152, 256)]
  convs += [(2304, 256)] * 2 + [(2304, 512)] + [(4608, 512)] * 5
  want = {
    "lora4": sum(4 * (i + o) for i, o in convs) + head,
    # After block1_conv2 (64), block2_conv2 (128), block3..5_conv3.
    "adapter": sum(2 * d * 16 + 16 + d for d in (64, 128, 256, 512, 512))
    + head,
  }
  for variant, expect in want.items():
    c = config_files.load(f"{ROOT}/configs/mnist_peft.py:{variant}")
    config_lib.validate(c)
    model = setup.build_model(c, 10)
    params = setup.abstract_variables(model, 64, jax.random.PRNGKey(0))
    assert _trainable(c, params["params"]) == expect, variant
