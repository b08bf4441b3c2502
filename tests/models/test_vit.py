"""The ViT family against timm's own VisionTransformer.

Real timm models (pretrained=False, depth 2, dynamic_img_size=True, biases,
norms, LayerScales and tokens perturbed), written by torch to .pth /
.safetensors and converted by `python -m flaxtl.convert`; outputs at the
native and at another input size (timm resamples pos_embed with its
antialiased bicubic). Every registered arch's variable names and shapes
against timm's module on the meta device; layer order, cuts, return_layers,
pooling, bf16, drop path and VPT prompts on small models through
`jax.eval_shape` or tiny inputs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtl import convert, models, tree, weights
from flaxtl.errors import UserError
from flaxtl.models import common, heads, vit
from flaxtl.preprocess import preprocess_input
from flaxtl.train import freeze
from flaxtl.weights import convert as weights_convert
from flaxtl.weights.mappings import tv_common
from flaxtl.weights.mappings import vit as mapping
from tests import torch_oracle

PARITY = 1e-5
# arch -> (timm kwargs, file layout, input sizes: native first).
CASES = {
  "vit_small_patch16_224": ({}, "torch_zip", (224, 96)),
  "deit_small_distilled_patch16_224": ({}, "safetensors", (224, 160)),
  "vit_small_patch14_reg4_dinov2": ({}, "torch_zip", (224, 98)),
  "vit_base_patch16_clip_224": (
    {"num_classes": 512},
    "safetensors",
    (224, 160),
  ),
  "vit_base_patch16_siglip_224": ({"num_classes": 10}, "torch_zip", (224, 128)),
}


def perturb(torch, net, seed: int = 0) -> None:
  """Biases, LayerScales and tokens random; LayerNorm weights around 1."""
  g = torch.Generator().manual_seed(seed)
  tokens = ("cls_token", "reg_token", "dist_token", "attn_pool.latent")
  with torch.no_grad():
    for name, p in net.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if leaf == "gamma":
        p.copy_(torch.rand(p.shape, generator=g) * 0.7 + 0.3)
      elif leaf == "bias" or name in tokens:
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
      elif p.ndim == 1:
        p.copy_(torch.rand(p.shape, generator=g) + 0.5)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, torch, timm, module_tmp):
  """(arch, timm net, restored variables, provenance)."""
  arch = request.param
  kwargs, layout, _ = CASES[arch]
  torch.manual_seed(0)
  net = timm.create_model(
    arch, pretrained=False, depth=2, dynamic_img_size=True, **kwargs
  ).eval()
  perturb(torch, net)
  tmp = module_tmp(arch)
  ext = "safetensors" if layout == "safetensors" else "pth"
  src = torch_oracle.save(torch, net.state_dict(), tmp / f"m.{ext}", layout)
  out = convert.main([str(src), "--out", str(tmp / "ckpt"), "--arch", arch])
  return arch, net, weights.restore_variables(out), weights.read_provenance(out)


def _timm(torch, net, x, features=False):
  with torch.no_grad():
    t = torch_oracle.nchw(torch, x)
    return (net.forward_features(t) if features else net(t)).numpy()


def test_converted_files_match_timm(torch, case):
  """Logits (or timm's pooled output without a head) at two input sizes."""
  arch, net, variables, prov = case
  assert prov["arch"] == arch and prov["options"]["depth"] == 2
  assert prov["options"]["posemb_interp"] == "bicubic_aa"
  assert prov["skipped_file_layers"] == []
  top = prov["include_top"]
  model = models.create(
    arch,
    include_top=top,
    num_classes=prov["num_classes"] or 1000,
    pooling=None if top else net.global_pool,
    depth=2,
  )
  forward = jax.jit(model.apply)
  for size in CASES[arch][2]:
    x = torch_oracle.images(2, size, seed=size)
    want = _timm(torch, net, x)
    err = torch_oracle.max_rel_err(forward(variables, x), want)
    assert err <= PARITY, (arch, size, err)


def test_features_match_timm_forward_features(torch, case):
  """include_top=False: timm's forward_features tokens (B, T, D)."""
  arch, net, variables, _ = case
  if arch not in ("vit_small_patch16_224", "vit_small_patch14_reg4_dinov2"):
    pytest.skip("tokens checked on two archs; logits cover the rest")
  forward = jax.jit(models.create(arch, include_top=False, depth=2).apply)
  for size in CASES[arch][2]:
    x = torch_oracle.images(1, size, seed=size + 1)
    want = _timm(torch, net, x, features=True)
    got = forward(variables, x)
    assert got.shape == want.shape
    assert torch_oracle.max_rel_err(got, want) <= PARITY


def test_return_layers_match_timm_hooks(torch, case):
  """Per-block outputs equal timm's forward hooks; the dict stops early."""
  arch, net, variables, _ = case
  if arch != "vit_small_patch16_224":
    pytest.skip("one arch")
  seen = {}
  hooks = [
    getattr(net, n).register_forward_hook(
      lambda _m, _i, out, n=n: seen.__setitem__(n, out.numpy())
    )
    for n in ("patch_embed", "norm")
  ] + [
    net.blocks[0].register_forward_hook(
      lambda _m, _i, out: seen.__setitem__("blocks/0", out.numpy())
    ),
    net.blocks[1].mlp.fc1.register_forward_hook(
      lambda _m, _i, out: seen.__setitem__("fc1", out.numpy())
    ),
  ]
  x = torch_oracle.images(1, 64, seed=3)
  _timm(torch, net, x)
  for h in hooks:
    h.remove()
  model = models.create(
    arch,
    include_top=False,
    depth=2,
    return_layers=("blocks/0", "patch_embed/proj", "blocks/1/mlp/fc1", "norm"),
  )
  got = model.apply(variables, x)
  assert list(got) == [
    "blocks/0",
    "patch_embed/proj",
    "blocks/1/mlp/fc1",
    "norm",
  ]
  np.testing.assert_allclose(got["blocks/1/mlp/fc1"], seen["fc1"], atol=1e-5)
  np.testing.assert_allclose(got["blocks/0"], seen["blocks/0"], atol=1e-5)
  np.testing.assert_allclose(got["norm"], seen["norm"], atol=1e-5)
  # timm's dynamic patch_embed gives NHWC, as our conv does.
  np.testing.assert_allclose(
    got["patch_embed/proj"], seen["patch_embed"], atol=1e-5
  )
  cut = models.create(arch, include_top=False, depth=2, output_layer="blocks/0")
  np.testing.assert_array_equal(cut.apply(variables, x), got["blocks/0"])
  early = models.create(
    arch, include_top=False, depth=2, return_layers=("patch_embed",)
  )
  shapes = common.variable_shapes(early, 16)["params"]
  assert sorted(shapes) == ["patch_embed"]  # Stops after the deepest.


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("n,out", [(14, 4), (14, 20), (37, 16), (7, 9), (5, 5)])
def test_resize_matches_torch_interpolate(torch, n, out, antialias):
  x = np.random.default_rng(n * out).normal(size=(1, 3, n, n + 2))
  x = x.astype(np.float32)
  want = torch.nn.functional.interpolate(
    torch.from_numpy(x),
    size=(out, out + 1),
    mode="bicubic",
    align_corners=False,
    antialias=antialias,
  ).numpy()
  method = "bicubic_aa" if antialias else "bicubic"
  got = vit.resample_grid(
    jnp.asarray(x.transpose(0, 2, 3, 1)), (out, out + 1), method
  )
  got = np.asarray(got).transpose(0, 3, 1, 2)
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_linear_zoom_matches_scipy():
  """big_vision's resample_posemb: scipy.ndimage.zoom(order=1)."""
  scipy_ndimage = pytest.importorskip("scipy.ndimage")
  for n, out in ((7, 12), (24, 14)):
    grid = np.random.default_rng(n).normal(size=(n, n, 5))
    want = scipy_ndimage.zoom(grid, (out / n, out / n, 1), order=1)
    got = vit.resample_grid(jnp.asarray(grid[None]), (out, out), "linear")
    np.testing.assert_allclose(np.asarray(got)[0], want, atol=1e-5)


@pytest.mark.parametrize("arch", models.names("vit"))
def test_every_arch_has_timms_names_and_shapes(torch, timm, arch):
  """Variables (paths, shapes) equal timm's state dict, layer order too."""
  net = torch_oracle.meta_model(
    torch,
    lambda: timm.create_model(
      arch, pretrained=False, num_classes=1000, depth=2
    ),
  )
  want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
  spec = models.get(arch)
  shapes = common.variable_shapes(spec.create(depth=2), spec.min_size)
  shapes = shapes["params"]
  flat = tree.flatten(shapes)
  got = {}
  for path, s in flat.items():
    leaf = path.rsplit("/", 1)[-1]
    got[mapping.torch_key(path)] = tv_common.to_torch_shape(s.shape, leaf)
  assert got == want
  owners = {p.rsplit("/", 1)[0] if "/" in p else p for p in flat}
  layers = spec.layers(depth=2)
  assert len(spec.layers()) > len(layers)  # The arch's own depth otherwise.
  assert set(layers) == owners and len(layers) == len(owners)
  assert layers[0] == "patch_embed/proj"
  blocks = [n.split("/")[1] for n in layers if n.startswith("blocks/")]
  assert blocks == sorted(blocks, key=int)  # Forward order, block by block.
  tail = [n for n in layers if not n.startswith(("blocks/", "attn_pool"))]
  assert tail[-2:] == (
    ["head", "head_dist"] if "distilled" in arch else ["norm", "head"]
  )


@pytest.mark.parametrize(
  "arch,options",
  [
    ("deit_tiny_distilled_patch16_224", {}),
    ("vit_small_patch14_reg4_dinov2", {"prompt_tokens": 2}),
    ("vit_base_patch16_siglip_224", {"prompt_tokens": 2, "prompt_deep": True}),
    ("vit_base_patch16_clip_224", {}),
  ],
)
def test_a_cut_at_any_layer_has_only_earlier_parameters(arch, options):
  """outputs() is the forward order: a cut keeps the layers up to it."""
  spec = models.get(arch)
  outputs = spec.outputs(include_top=True, depth=1, **options)
  layers = spec.layers(include_top=True, depth=1, **options)
  for name in outputs:
    model = spec.create(include_top=True, depth=1, output_layer=name, **options)
    params = common.variable_shapes(model, spec.min_size).get("params", {})
    owners = {
      p.rsplit("/", 1)[0] if "/" in p else p for p in tree.paths(params)
    }
    upto = outputs[: outputs.index(name) + 1]
    if any(n.startswith("attn_pool/") for n in upto):
      upto.append("attn_pool")  # Its latent query comes before its children.
    assert owners == {n for n in layers if n in upto}, name


def test_token_counts_pooling_and_non_native_sizes():
  p = models.get("vit_small_patch14_reg4_dinov2")
  variables = common.variable_shapes(p.create(depth=1), 14)
  x = jax.ShapeDtypeStruct((2, 42, 70, 3), jnp.float32)

  def shape(**kw):
    model = p.create(include_top=False, depth=1, **kw)
    return jax.eval_shape(model.apply, variables, x).shape

  assert shape() == (2, 1 + 4 + 3 * 5, 384)
  for pooling in ("token", "avg", "max"):
    assert shape(pooling=pooling) == (2, 384)
  with pytest.raises(UserError, match="multiples of its patch"):
    jax.eval_shape(
      p.create(depth=1).apply,
      variables,
      jax.ShapeDtypeStruct((1, 30, 28, 3), jnp.float32),
    )
  with pytest.raises(UserError, match="needs a class token"):
    models.create(
      "vit_base_patch16_siglip_224", include_top=False, pooling="token", depth=1
    ).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))


def test_pooling_modes_reduce_the_final_tokens():
  arch = "vit_tiny_patch16_224"
  tokens = models.create(arch, include_top=False, depth=1)
  variables = tokens.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  x = jnp.asarray(torch_oracle.images(2, 48))
  t = tokens.apply(variables, x)
  assert t.shape == (2, 1 + 9, 192)

  @jax.jit
  def pooled(variables, x):
    return {
      p: models.create(arch, include_top=False, depth=1, pooling=p).apply(
        variables, x
      )
      for p in ("token", "avg", "max")
    }

  got = pooled(variables, x)
  np.testing.assert_allclose(got["token"], t[:, 0], atol=1e-6)
  np.testing.assert_allclose(got["avg"], t[:, 1:].mean(1), atol=1e-6)
  np.testing.assert_allclose(got["max"], t[:, 1:].max(1), atol=1e-6)
  # A MAP head on an arch without one: new attn_pool parameters.
  mapped = models.create(arch, include_top=False, depth=1, pooling="map")
  v = mapped.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))
  assert set(v["params"]) - set(variables["params"]) == {"attn_pool"}
  assert mapped.apply(v, x).shape == (2, 192)


def test_bf16_compute_keeps_fp32_params(case):
  arch, _, variables, _ = case
  if arch != "vit_small_patch16_224":
    pytest.skip("one arch")
  x = torch_oracle.images(1, 64, seed=5)
  ref = models.create(arch, depth=2).apply(variables, x)
  model = models.create(arch, depth=2, dtype=jnp.bfloat16)
  got = model.apply(variables, x)
  assert got.dtype == jnp.float32  # Logits in fp32.
  assert torch_oracle.max_rel_err(got, ref) < 5e-2
  feats = models.create(arch, include_top=False, depth=2, dtype=jnp.bfloat16)
  assert feats.apply(variables, x).dtype == jnp.bfloat16
  fresh = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  )
  assert {v.dtype for v in jax.tree.leaves(fresh)} == {jnp.dtype("float32")}


def test_drop_path_only_while_training():
  arch = "vit_tiny_patch16_224"
  model = models.create(arch, depth=2, drop_path_rate=0.5)
  x = jnp.asarray(torch_oracle.images(4, 32))
  variables = model.init(jax.random.PRNGKey(0), x)
  infer = models.create(arch, depth=2).apply(variables, x)
  np.testing.assert_array_equal(model.apply(variables, x), infer)
  rngs = lambda s: {"dropout": jax.random.PRNGKey(s)}  # noqa: E731
  a = model.apply(variables, x, train=True, rngs=rngs(1))
  b = model.apply(variables, x, train=True, rngs=rngs(2))
  assert not np.allclose(a, infer) and not np.allclose(a, b)
  zero = models.create(arch, depth=2, drop_path_rate=0.0)
  np.testing.assert_array_equal(
    zero.apply(variables, x, train=True, rngs=rngs(1)), infer
  )


@pytest.mark.parametrize("deep", [False, True])
def test_prompts_are_inserted_and_removed(deep):
  arch = "deit_tiny_distilled_patch16_224"
  model = models.create(
    arch, include_top=False, depth=2, prompt_tokens=3, prompt_deep=deep
  )
  x = jnp.asarray(torch_oracle.images(2, 32))
  variables = model.init(jax.random.PRNGKey(0), x)
  prompts = variables["params"]["prompt"]["tokens"]
  assert prompts.shape == ((2 if deep else 1), 3, 192)
  assert 0.01 < float(jnp.std(prompts)) < 0.04  # N(0, 0.02).
  out = model.apply(variables, x)
  assert out.shape == (2, 2 + 4, 192)  # Prompts gone before the norm.
  base = {k: v for k, v in variables["params"].items() if k != "prompt"}
  plain = models.create(arch, include_top=False, depth=2).apply(
    {"params": base}, x
  )
  assert not np.allclose(out, plain, atol=1e-4)
  moved = jax.tree.map(lambda a: a, variables)
  moved["params"]["prompt"]["tokens"] = prompts.at[-1].add(1.0)
  assert not np.allclose(model.apply(moved, x), out)
  assert models.get(arch).layers(prompt_tokens=3)[4] == "prompt"


def test_freeze_until_a_block_freezes_the_embeddings():
  arch = "vit_small_patch14_reg4_dinov2"
  spec = models.get(arch)
  params = common.variable_shapes(spec.create(depth=2), 14)["params"]
  params = {"backbone": params}
  rules = freeze.until_rules(
    "blocks/0", params, spec, include_top=True, options={"depth": 2}
  )
  plan = freeze.plan(params, rules, log_matches=False)
  frozen = {p for p, s, _ in plan.rows if s == freeze.FROZEN}
  for name in (
    "cls_token",
    "reg_token",
    "pos_embed",
    "patch_embed/proj/kernel",
  ):
    assert f"backbone/{name}" in frozen
  assert any(p.startswith("backbone/blocks/0/") for p in frozen)
  assert not any(p.startswith("backbone/blocks/1/") for p in frozen)
  assert "backbone/norm/scale" not in frozen
  rules = freeze.first_layers_rules(
    2, params, spec, include_top=True, options={"depth": 2}
  )
  plan = freeze.plan(params, rules, log_matches=False)
  frozen = {p for p, s, _ in plan.rows if s == freeze.FROZEN}
  assert frozen == {
    "backbone/patch_embed/proj/kernel",
    "backbone/patch_embed/proj/bias",
    "backbone/pos_embed",
  }


def test_detection_and_bad_files(torch, timm, tmp_path, case):
  arch, net, _, _ = case
  sd = torch_oracle.state_dict(net)
  w = torch_oracle.in_memory(sd)
  if arch == "vit_small_patch16_224":
    # The same weights as deit_small_patch16_224: the file needs --arch.
    assert mapping.candidates(w) == [
      "vit_small_patch16_224",
      "deit_small_patch16_224",
    ]
    assert weights_convert.detect(w) is None
    converted = weights_convert.to_variables(w, "deit_small_patch16_224")
    assert converted.arch == "deit_small_patch16_224"
    with pytest.raises(UserError, match="does not hold a vit_base"):
      weights_convert.to_variables(w, "vit_base_patch16_224")
    broken = dict(
      sd, **{"blocks.1.mlp.fc2.weight": sd["blocks.1.mlp.fc2.weight"][:5]}
    )
    with pytest.raises(
      UserError, match=r"blocks\.1\.mlp\.fc2\.weight has shape"
    ):
      mapping.from_torch(torch_oracle.in_memory(broken), arch)
    src = torch_oracle.save(
      torch, net.state_dict(), tmp_path / "v.pth", "torch_zip"
    )
    with pytest.raises(SystemExit) as e:
      convert.main([str(src), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and not (tmp_path / "o").exists()
  elif arch == "deit_small_distilled_patch16_224":
    assert weights_convert.detect(w) == arch
    notop = mapping.from_torch(
      w, arch, include_top=False, options={"posemb_interp": "bicubic"}
    )
    assert notop.num_classes is None and "head.weight" in notop.skipped
    assert notop.options == {"posemb_interp": "bicubic", "depth": 2}
  elif arch == "vit_small_patch14_reg4_dinov2":
    assert weights_convert.detect(w) == arch
    assert mapping.from_torch(w, arch).include_top is False  # timm: no head.
  else:
    pytest.skip("covered")


def test_clip_preprocessing():
  x = np.full((1, 2, 2, 3), 255.0, np.float32)
  want = (1.0 - np.asarray((0.48145466, 0.4578275, 0.40821073))) / np.asarray(
    (0.26862954, 0.26130258, 0.27577711)
  )
  np.testing.assert_allclose(
    preprocess_input(x, "clip")[0, 0, 0], want, rtol=1e-6
  )
  assert models.get("vit_base_patch16_clip_224").preprocess == "clip"
  assert models.get("vit_small_patch16_224").preprocess == "tf"
  assert models.get("vit_small_patch14_dinov2").preprocess == "torch"


@pytest.mark.parametrize("pooling", ["avg", "token", None])
def test_transfer_model_reads_the_tokens(pooling):
  """The training model: tokens of feature_layer 'norm' into a new head."""
  model = heads.TransferModel(
    arch="vit_tiny_patch16_224",
    head="linear",
    num_classes=3,
    pooling=pooling,
    backbone_options=(("depth", 1),),
  )
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert jax.eval_shape(model.apply, variables, x).shape == (2, 3)
  kernel = variables["params"]["head"]["logits"]["kernel"]
  assert kernel.shape == ((192 if pooling else 5 * 192), 3)


def test_a_readers_vit_arch_is_the_registered_config():
  """flaxtl.weights.vit_arch.VitArch (the readers' arch) -> ViTConfig."""
  from flaxtl.weights import vit_arch

  arch = vit_arch.VitArch(
    family="dinov2",
    patch_size=14,
    embed_dim=384,
    depth=12,
    num_heads=6,
    mlp_dim=1536,
    img_size=518,
    reg_tokens=4,
    no_embed_class=True,
    layer_scale=True,
  )
  cfg, options = mapping.model_config(arch)
  name = arch.timm_name
  assert name == "vit_small_patch14_reg4_dinov2"
  # The same structure; preprocessing is the registry's, not the file's.
  assert cfg == dataclasses.replace(vit.ARCHS[name], preprocess=cfg.preprocess)
  assert options == {"posemb_interp": "bicubic"}
  model = vit.ViT(arch=name, config=cfg, include_top=False, **options)
  shapes = common.variable_shapes(model, 14)["params"]
  assert shapes["pos_embed"].shape == (1, 37 * 37, 384)
