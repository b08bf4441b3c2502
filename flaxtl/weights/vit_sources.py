"""Every ViT source, translated into one timm-named state dict.

    state_dict, info = read(path)

`path` may be a Hugging Face model directory (config.json + weights), a
torchvision / timm / Hugging Face .pth, .bin or .safetensors file, a
big_vision / AugReg .npz or an .onnx file. The state dict uses timm's keys and
layouts (`patch_embed.proj.weight` OIHW, `blocks.N.attn.qkv.weight` (3D, D)
fused q|k|v, linear weights (out, in)), so it loads with `strict=True` into
`timm.create_model(info['arch']['template'], **arch.timm_kwargs())`; the
flaxtl ViT mapping reads the same names. `info` records the format, the
`VitArch`, what was dropped (poolers, mask tokens), how the source resamples
its position embedding and any notes.

Translators (one per source, each checks every shape):
  from_hf           Hugging Face ViT / DeiT / Dinov2 (+ registers) /
                    CLIPVision (+ projection) / SiglipVision; config optional
  from_torchvision  torchvision's VisionTransformer (vit_b_16 ...)
  from_big_vision   big_vision / AugReg .npz arrays (old and new layouts,
                    scanned blocks, MAP head)
  from_timm         a timm state dict (validated, arch inferred)
"""

from __future__ import annotations

import math
from pathlib import Path
import re
from typing import Any

import numpy as np

from flaxtl.errors import UserError
from flaxtl.weights.vit_arch import (
  BICUBIC_TORCH,
  BICUBIC_TORCH_AA,
  LINEAR_ZOOM,
  VitArch,
)

State = dict[str, np.ndarray]

# --- Hugging Face -------------------------------------------------------------

# Module-path prefixes HF puts before the vision tower's keys.
HF_PREFIXES = (
  "",
  "vit.",
  "deit.",
  "dinov2.",
  "vision_model.",
  "backbone.",
  "model.",
  "model.vision_model.",
)
# A block key's tail (after `layer.N.` / `layers.N.`) -> timm's tail. Both
# the names HF writes to disk and transformers 5's module names.
HF_BLOCK = {
  "layernorm_before": "norm1",
  "norm1": "norm1",
  "layer_norm1": "norm1",
  "layernorm_after": "norm2",
  "norm2": "norm2",
  "layer_norm2": "norm2",
  "attention.attention.query": "q",
  "attention.attention.key": "k",
  "attention.attention.value": "v",
  "attention.q_proj": "q",
  "attention.k_proj": "k",
  "attention.v_proj": "v",
  "self_attn.q_proj": "q",
  "self_attn.k_proj": "k",
  "self_attn.v_proj": "v",
  "attention.output.dense": "attn.proj",
  "attention.o_proj": "attn.proj",
  "self_attn.out_proj": "attn.proj",
  "intermediate.dense": "mlp.fc1",
  "output.dense": "mlp.fc2",
  "mlp.fc1": "mlp.fc1",
  "mlp.fc2": "mlp.fc2",
  "layer_scale1": "ls1",
  "layer_scale2": "ls2",
}
HF_BLOCK_RE = re.compile(
  r"^encoder\.layers?\.(\d+)\.(.+)\.(weight|bias|lambda1)$"
)
HF_V5_BLOCK_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
# Keys with no timm counterpart: dropped, and recorded.
HF_DROPPED = re.compile(
  r"^(embeddings\.mask_token|pooler\..*|embeddings\.position_ids|"
  r"text_model\..*|text_projection\..*|logit_scale|logit_bias)$"
)
HF_FAMILIES = {
  "vit": "vit",
  "deit": "deit",
  "dinov2": "dinov2",
  "dinov2_with_registers": "dinov2",
  "clip_vision_model": "clip",
  "clip": "clip",
  "siglip_vision_model": "siglip",
  "siglip": "siglip",
}
# HF activation names -> timm's.
HF_ACTS = {
  "gelu": "gelu",
  "quick_gelu": "quick_gelu",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu_new": "gelu_tanh",
}


def _hf_prefix(tensors: State) -> str:
  for p in sorted(HF_PREFIXES, key=len, reverse=True):
    if any(
      f"{p}embeddings.{k}" in tensors
      for k in ("patch_embeddings.projection.weight", "patch_embedding.weight")
    ):
      return p
  raise UserError(
    "no ViT patch embedding (embeddings.patch_embeddings.projection.weight "
    "or embeddings.patch_embedding.weight) among the keys"
  )


def _vision_config(config: dict) -> dict:
  """The vision tower's config of a ViT or of a CLIP / SigLIP model."""
  if config.get("model_type") not in ("clip", "siglip"):
    return config
  vision = dict(config.get("vision_config") or {})
  vision["model_type"] = config["model_type"]
  # The projection belongs to the whole model (vision_config's is a default).
  vision["projection_dim"] = config.get("projection_dim")
  return vision


def _hf_family(config: dict | None, keys: set[str], src: str) -> str:
  if config is not None:
    mt = config.get("model_type")
    if mt not in HF_FAMILIES:
      raise UserError(
        f"{src}: config.json model_type {mt!r} is not a ViT this reader "
        f"knows ({sorted(HF_FAMILIES)})"
      )
    return HF_FAMILIES[mt]
  if any(k.endswith("layer_scale1.lambda1") for k in keys):
    return "dinov2"
  if "embeddings.distillation_token" in keys:
    return "deit"
  if "embeddings.class_embedding" in keys:
    return "clip"
  if "embeddings.patch_embedding.weight" in keys:
    return "siglip"
  return "vit"


def from_hf(
  tensors: State, config: dict | None = None, src: str = "weights"
) -> tuple[State, VitArch, list[str]]:
  """A Hugging Face ViT-family state dict -> (timm state dict, arch, dropped).

  config: the parsed config.json (checked against the weights), or None
  (arch inferred from names and shapes: num_heads then assumes head dim 64).
  """
  t, origin, dropped = _hf_tower(tensors, _hf_prefix(tensors))
  cfg = _vision_config(config) if config is not None else None
  family = _hf_family(cfg, set(t), src)
  out, blocks = _hf_rename(t, origin, family, src, dropped)
  _drop_deit_class_head(out, dropped)
  _fix_hf_embeddings(out, family)
  depth = _fuse_blocks(blocks, out, src)
  arch = _infer_arch(out, family, depth, src)
  if family == "dinov2" and arch.reg_tokens:
    _fold_register_class_pos(out, arch)
  if cfg is not None:
    _check_hf_config(cfg, arch, family, src)
    _apply_hf_config(cfg, arch, src)
  else:
    _hf_defaults(arch, family)
  return out, arch, dropped


def _hf_tower(
  tensors: State, prefix: str
) -> tuple[State, dict[str, str], list[str]]:
  """(the vision tower's keys without `prefix`, their original keys, the
  keys dropped)."""
  # Heads (classifier, visual_projection) sit outside the tower's prefix;
  # anything else there (a decoder, a text tower) is dropped and recorded.
  t, origin, dropped = {}, {}, []
  for k, v in tensors.items():
    if k.startswith(prefix):
      t[k[len(prefix) :]], origin[k[len(prefix) :]] = v, k
    elif _hf_top_key(k, "") is not None and k.split(".")[0] != "embeddings":
      t[k], origin[k] = v, k
    else:
      dropped.append(k)
  return t, origin, dropped


def _hf_rename(
  t: State, origin: dict[str, str], family: str, src: str, dropped: list[str]
) -> tuple[State, dict[int, dict[str, np.ndarray]]]:
  """HF names -> timm's top-level keys and per-block (unfused) params;
  appends the keys with no timm counterpart to `dropped`."""
  out: State = {}
  blocks: dict[int, dict[str, np.ndarray]] = {}
  for key, value in t.items():
    m = HF_BLOCK_RE.match(key) or HF_V5_BLOCK_RE.match(key)
    if m:
      n, name = _hf_block_param(m, origin[key], src)
      blocks.setdefault(n, {})[name] = value
      continue
    if HF_DROPPED.match(key):
      dropped.append(origin[key])
      continue
    out_key = _hf_top_key(key, family)
    if out_key is None:
      raise UserError(f"{src}: unexpected key {origin[key]} for HF {family}")
    if out_key in out:
      raise UserError(f"{src}: {origin[key]} repeats {out_key}")
    out[out_key] = value
  return out, blocks


def _hf_block_param(m: re.Match, key: str, src: str) -> tuple[int, str]:
  """(block index, timm's `name.param`) of a matched HF block key."""
  n, tail, param = int(m.group(1)), m.group(2), m.group(3)
  if tail not in HF_BLOCK:
    raise UserError(f"{src}: unexpected block key {key}")
  if param == "lambda1":
    param = "gamma"
  return n, f"{HF_BLOCK[tail]}.{param}"


def _drop_deit_class_head(out: State, dropped: list[str]) -> None:
  """DeiTForImageClassification reads the class token alone; timm's
  distilled model averages two heads: keep the backbone only."""
  if (
    "dist_token" in out
    and "head.weight" in out
    and "head_dist.weight" not in out
  ):
    for k in ("head.weight", "head.bias"):
      out.pop(k, None)
    dropped += ["classifier.weight", "classifier.bias"]


def _fold_register_class_pos(out: State, arch: VitArch) -> None:
  """timm's DINOv2-with-registers has no position for prefix tokens: the
  class token's position is folded into the token (exact at any size)."""
  pos = out["pos_embed"]
  out["cls_token"] = out["cls_token"] + pos[:, :1]
  out["pos_embed"] = pos[:, 1:]
  arch.no_embed_class = True
  arch.posemb_resize = BICUBIC_TORCH_AA


def _apply_hf_config(cfg: dict, arch: VitArch, src: str) -> None:
  """Activation, norm eps and qkv bias from config.json."""
  act = cfg.get("hidden_act", "gelu")
  if act not in HF_ACTS:
    raise UserError(
      f"{src}: config.json hidden_act={act!r} is not one of {sorted(HF_ACTS)}"
    )
  arch.act = HF_ACTS[act]
  arch.norm_eps = float(cfg.get("layer_norm_eps", arch.norm_eps))
  if "qkv_bias" in cfg and bool(cfg["qkv_bias"]) != arch.qkv_bias:
    raise UserError(
      f"{src}: config.json says qkv_bias={cfg['qkv_bias']} but the weights "
      f"{'have' if arch.qkv_bias else 'lack'} q/k/v biases"
    )


def _hf_defaults(arch: VitArch, family: str) -> None:
  """Each family's activation and norm eps when there is no config.json."""
  arch.act = {"clip": "quick_gelu", "siglip": "gelu_tanh"}.get(family, "gelu")
  arch.norm_eps = {"vit": 1e-12, "deit": 1e-12, "clip": 1e-5}.get(family, 1e-6)


def _hf_top_key(key: str, family: str) -> str | None:
  fixed = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.class_embedding": "cls_token",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "embeddings.position_embedding.weight": "pos_embed",
    "pre_layrnorm.weight": "norm_pre.weight",
    "pre_layrnorm.bias": "norm_pre.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
    "cls_classifier.weight": "head.weight",
    "cls_classifier.bias": "head.bias",
    "distillation_classifier.weight": "head_dist.weight",
    "distillation_classifier.bias": "head_dist.bias",
    "visual_projection.weight": "head.weight",
    "head.probe": "attn_pool.latent",
    "head.attention.in_proj_weight": "attn_pool.in_proj.weight",
    "head.attention.in_proj_bias": "attn_pool.in_proj.bias",
    "head.attention.out_proj.weight": "attn_pool.proj.weight",
    "head.attention.out_proj.bias": "attn_pool.proj.bias",
    "head.layernorm.weight": "attn_pool.norm.weight",
    "head.layernorm.bias": "attn_pool.norm.bias",
    "head.mlp.fc1.weight": "attn_pool.mlp.fc1.weight",
    "head.mlp.fc1.bias": "attn_pool.mlp.fc1.bias",
    "head.mlp.fc2.weight": "attn_pool.mlp.fc2.weight",
    "head.mlp.fc2.bias": "attn_pool.mlp.fc2.bias",
  }
  if family == "dinov2" and key.startswith("classifier."):
    return None  # Dinov2ForImageClassification's head reads cls + mean.
  return fixed.get(key)


def _fix_hf_embeddings(out: State, family: str) -> None:
  """HF's shapes of tokens, positions and heads -> timm's."""
  if "cls_token" in out and out["cls_token"].ndim == 1:  # CLIP: (D,).
    out["cls_token"] = out["cls_token"].reshape(1, 1, -1)
  if "pos_embed" in out and out["pos_embed"].ndim == 2:  # CLIP/SigLIP: (T, D).
    out["pos_embed"] = out["pos_embed"][None]
  if "head.weight" in out and "head.bias" not in out:  # CLIP projection.
    out["head.bias"] = np.zeros(out["head.weight"].shape[0], np.float32)
  if "attn_pool.in_proj.weight" in out:  # SigLIP MAP head: q | kv.
    w, b = (
      out.pop("attn_pool.in_proj.weight"),
      out.pop("attn_pool.in_proj.bias"),
    )
    d = w.shape[1]
    if w.shape != (3 * d, d) or b.shape != (3 * d,):
      raise UserError(
        f"head.attention.in_proj_weight has shape {w.shape}, expected "
        f"{(3 * d, d)}"
      )
    out["attn_pool.q.weight"], out["attn_pool.kv.weight"] = w[:d], w[d:]
    out["attn_pool.q.bias"], out["attn_pool.kv.bias"] = b[:d], b[d:]


def _fuse_blocks(
  blocks: dict[int, dict[str, np.ndarray]], out: State, src: str
) -> int:
  """Split q / k / v -> timm's fused qkv; renames into blocks.N.*."""
  if not blocks:
    raise UserError(f"{src}: no transformer blocks among the keys")
  depth = max(blocks) + 1
  if sorted(blocks) != list(range(depth)):
    missing = sorted(set(range(depth)) - set(blocks))
    raise UserError(f"{src}: transformer block(s) {missing} missing")
  for n in range(depth):
    b = blocks[n]
    for param in ("weight", "bias"):
      parts = [b.pop(f"{x}.{param}", None) for x in "qkv"]
      if all(p is None for p in parts):
        continue
      if any(p is None for p in parts):
        raise UserError(f"{src}: block {n} lacks one of q/k/v {param}")
      shapes = {p.shape for p in parts}
      if len(shapes) != 1:
        raise UserError(
          f"{src}: block {n} q/k/v {param} shapes differ: {sorted(shapes)}"
        )
      b[f"attn.qkv.{param}"] = np.concatenate(parts, 0)
    for name, value in b.items():
      out[f"blocks.{n}.{name}"] = value
  return depth


def _check_hf_config(cfg: dict, arch: VitArch, family: str, src: str) -> None:
  """config.json against the weights: any disagreement is the user's file."""
  _check_hf_sizes(cfg, arch, family, src)
  if family == "dinov2":
    _check_dinov2_mlp(cfg, arch, src)
  _check_hf_head_rows(cfg, arch, family, src)
  _apply_hf_heads(cfg, arch, src)
  _check_hf_image_size(cfg, arch, family, src)


def _check_hf_sizes(cfg: dict, arch: VitArch, family: str, src: str) -> None:
  """Widths, depth, patch and register counts config.json states."""
  want = {
    "hidden_size": arch.embed_dim,
    "num_hidden_layers": arch.depth,
    "patch_size": arch.patch_size,
    "num_channels": 3,
    "num_register_tokens": arch.reg_tokens,
  }
  if "intermediate_size" in cfg and family != "dinov2":
    want["intermediate_size"] = arch.mlp_dim
  for key, got in want.items():
    if key in cfg and cfg[key] != got:
      raise UserError(
        f"{src}: config.json says {key}={cfg[key]} but the weights have {got}"
      )


def _check_dinov2_mlp(cfg: dict, arch: VitArch, src: str) -> None:
  """Dinov2 states its MLP as a ratio (and may ask for SwiGLU)."""
  if "mlp_ratio" not in cfg:
    return
  if round(cfg["mlp_ratio"] * arch.embed_dim) != arch.mlp_dim:
    raise UserError(
      f"{src}: config.json says mlp_ratio={cfg['mlp_ratio']} but the "
      f"weights' MLP is {arch.mlp_dim} wide for {arch.embed_dim}"
    )
  if cfg.get("use_swiglu_ffn"):
    raise UserError(f"{src}: Dinov2 with use_swiglu_ffn is not supported")


def _check_hf_head_rows(
  cfg: dict, arch: VitArch, family: str, src: str
) -> None:
  """CLIP's projection_dim or the id2label count against the head's rows."""
  rows = arch.num_classes
  if not rows:
    return
  if family == "clip":
    if cfg.get("projection_dim") not in (None, rows):
      raise UserError(
        f"{src}: config.json says projection_dim={cfg['projection_dim']} but "
        f"visual_projection has {rows} rows"
      )
    return
  labels = cfg.get("id2label")
  if isinstance(labels, dict) and len(labels) != rows:
    raise UserError(
      f"{src}: config.json's id2label has {len(labels)} labels but the "
      f"classifier has {rows} rows"
    )


def _apply_hf_heads(cfg: dict, arch: VitArch, src: str) -> None:
  """num_attention_heads, when stated, replaces the inferred head count."""
  heads = cfg.get("num_attention_heads")
  if heads is None:
    return
  if arch.embed_dim % heads:
    raise UserError(
      f"{src}: config.json num_attention_heads={heads} does not divide "
      f"hidden_size {arch.embed_dim}"
    )
  arch.num_heads, arch.heads_inferred = int(heads), False


def _check_hf_image_size(
  cfg: dict, arch: VitArch, family: str, src: str
) -> None:
  """image_size against the stored position grid."""
  size = cfg.get("image_size")
  # HF's Dinov2 always resamples its table, whatever config.json says: the
  # stored grid is the native size there.
  if family != "dinov2" and size is not None and size != arch.img_size:
    raise UserError(
      f"{src}: config.json says image_size={size} but the position "
      f"embedding holds a {arch.img_size // arch.patch_size}-patch grid "
      f"({arch.img_size} px)"
    )


# --- torchvision --------------------------------------------------------------

TV_BLOCK_RE = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)$")
TV_BLOCK = {
  "ln_1": "norm1",
  "ln_2": "norm2",
  "self_attention.in_proj_weight": "attn.qkv.weight",
  "self_attention.in_proj_bias": "attn.qkv.bias",
  "self_attention.out_proj": "attn.proj",
  "mlp.0": "mlp.fc1",
  "mlp.3": "mlp.fc2",
  "mlp.linear_1": "mlp.fc1",  # torchvision before 0.13.
  "mlp.linear_2": "mlp.fc2",
}
TV_TOP = {
  "class_token": "cls_token",
  "conv_proj.weight": "patch_embed.proj.weight",
  "conv_proj.bias": "patch_embed.proj.bias",
  "encoder.pos_embedding": "pos_embed",
  "encoder.ln.weight": "norm.weight",
  "encoder.ln.bias": "norm.bias",
  "heads.head.weight": "head.weight",
  "heads.head.bias": "head.bias",
  "heads.weight": "head.weight",
  "heads.bias": "head.bias",
}


def is_torchvision(tensors: State) -> bool:
  return "conv_proj.weight" in tensors and "encoder.pos_embedding" in tensors


def from_torchvision(
  tensors: State, src: str = "weights", num_heads: int | None = None
) -> tuple[State, VitArch]:
  """torchvision's VisionTransformer state dict -> (timm state dict, arch).

  The file holds no head count: `num_heads`, else timm's for its sizes,
  else head dim 64 (every published ViT), recorded as inferred.
  """
  out: State = {}
  for key, value in tensors.items():
    m = TV_BLOCK_RE.match(key)
    if m:
      n, tail = m.group(1), m.group(2)
      for old, new in TV_BLOCK.items():
        if tail == old or tail.startswith(old + "."):
          out[f"blocks.{n}.{new}{tail[len(old) :]}"] = value
          break
      else:
        raise UserError(f"{src}: unexpected torchvision key {key}")
    elif key in TV_TOP:
      out[TV_TOP[key]] = value
    elif key.startswith("heads.pre_logits"):
      raise UserError(
        f"{src}: {key}: torchvision's representation layer (pre_logits) "
        "has no timm counterpart"
      )
    else:
      raise UserError(f"{src}: unexpected torchvision key {key}")
  depth = 1 + max(
    (int(k.split(".")[1]) for k in out if k.startswith("blocks.")), default=-1
  )
  arch = _infer_arch(out, "vit", depth, src, num_heads=num_heads)
  arch.norm_eps = 1e-6
  return out, arch


# --- big_vision / AugReg .npz -------------------------------------------------

NPZ_PREFIXES = ("params/img/", "params/", "opt/target/", "")


def is_big_vision(arrays: dict[str, Any]) -> bool:
  return any(f"{p}embedding/kernel" in arrays for p in NPZ_PREFIXES)


def from_big_vision(
  arrays: dict[str, np.ndarray], src: str = "weights"
) -> tuple[State, VitArch]:
  """big_vision / AugReg arrays -> (timm state dict, arch).

  Layouts (as timm's `_load_weights` reads them): AugReg's
  `Transformer/encoderblock_N/{LayerNorm_0, MultiHeadDotProductAttention_1,
  LayerNorm_2, MlpBlock_3}` with `Transformer/posembed_input/pos_embedding`;
  big_vision's `{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
  MlpBlock_0}` with a top-level `pos_embedding`; scanned blocks
  (`Transformer/encoderblock/...` stacked on a leading axis); an optional
  MAP head (`MAPHead_0`). Kernels are (in, out), attention kernels
  (D, heads, head_dim) / (heads, head_dim, D), the patch kernel HWIO.
  """
  prefix = next(
    (p for p in NPZ_PREFIXES if f"{p}embedding/kernel" in arrays), None
  )
  if prefix is None:
    raise UserError(f"{src}: no embedding/kernel: not a big_vision ViT .npz")
  r = _NpzReader(arrays, prefix, src)
  scanned = r.has("Transformer/encoderblock/LayerNorm_0/scale")
  big_vision = prefix.startswith("params/") or r.has("pos_embedding") or scanned
  out = _bv_embeddings(r, big_vision)
  depth = _bv_depth(r, scanned)
  heads = None
  for i in range(depth):
    heads = _bv_block(r, out, i, scanned, big_vision)
  if r.has("MAPHead_0/probe"):
    _bv_map_head(r, out)
  family = "siglip" if "attn_pool.latent" in out else "vit"
  arch = _infer_arch(out, family, depth, src, num_heads=heads)
  arch.posemb_resize = LINEAR_ZOOM
  # timm's choice: AugReg ViTs run exact GELU, big_vision SigLIPs tanh GELU
  # (big_vision's own code uses flax's tanh-approximate nn.gelu throughout).
  arch.act = "gelu_tanh" if family == "siglip" else "gelu"
  arch.norm_eps = 1e-6
  # An empty head (head/kernel of size 0) is the only array left unread.
  unused = [k for k in r.unused() if k not in ("head/kernel", "head/bias")]
  if unused:
    raise UserError(f"{src}: unexpected array(s) {unused[:3]}")
  return out, arch


class _NpzReader:
  """The arrays under one prefix of a .npz, recording which were read."""

  def __init__(self, arrays: dict[str, Any], prefix: str, src: str):
    self.arrays, self.prefix, self.src = arrays, prefix, src
    self.used: set[str] = set()

  def has(self, name: str) -> bool:
    return self.prefix + name in self.arrays

  def get(self, name: str, idx: int | None = None) -> np.ndarray:
    key = self.prefix + name
    if key not in self.arrays:
      raise UserError(f"{self.src}: missing array {key}")
    self.used.add(key)
    a = np.asarray(self.arrays[key])
    return a[idx] if idx is not None else a

  def unused(self) -> list[str]:
    """The names under the prefix never read, sorted."""
    p = self.prefix
    return sorted(
      k[len(p) :] for k in self.arrays if k.startswith(p) and k not in self.used
    )


def _bv_embeddings(r: _NpzReader, big_vision: bool) -> State:
  """Patch embedding, class token, positions, final norm and head."""
  out: State = {}
  k = r.get("embedding/kernel")
  if k.ndim != 4:
    raise UserError(f"{r.src}: embedding/kernel has shape {k.shape}, want HWIO")
  out["patch_embed.proj.weight"] = k.transpose(3, 2, 0, 1)
  out["patch_embed.proj.bias"] = r.get("embedding/bias")
  if r.has("cls"):
    out["cls_token"] = r.get("cls")
  pos = r.get(
    "pos_embedding"
    if big_vision
    else "Transformer/posembed_input/pos_embedding"
  )
  out["pos_embed"] = pos if pos.ndim == 3 else pos[None]
  _bv_norm(r, out, "norm", "Transformer/encoder_norm/")
  if r.has("head/kernel") and r.get("head/kernel").size:
    out["head.weight"] = r.get("head/kernel").T
    out["head.bias"] = r.get("head/bias")
  if r.has("pre_logits/kernel"):
    raise UserError(
      f"{r.src}: pre_logits (a representation layer) has no timm counterpart"
    )
  return out


def _bv_depth(r: _NpzReader, scanned: bool) -> int:
  """Stacked blocks' leading axis, else the count of encoderblock_N."""
  if scanned:
    depth = r.get("Transformer/encoderblock/LayerNorm_0/scale").shape[0]
  else:
    depth = 0
    while r.has(f"Transformer/encoderblock_{depth}/LayerNorm_0/scale"):
      depth += 1
  if not depth:
    raise UserError(f"{r.src}: no Transformer/encoderblock_N arrays")
  return depth


def _bv_block(
  r: _NpzReader, out: State, i: int, scanned: bool, big_vision: bool
) -> int:
  """Block i -> timm's blocks.i.*; returns its head count."""
  mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
  bp, idx = (
    ("Transformer/encoderblock/", i)
    if scanned
    else (f"Transformer/encoderblock_{i}/", None)
  )
  ap = f"{bp}MultiHeadDotProductAttention_{mha}/"
  o = f"blocks.{i}."
  _bv_norm(r, out, o + "norm1", bp + "LayerNorm_0/", idx)
  qkv = [r.get(f"{ap}{n}/kernel", idx) for n in ("query", "key", "value")]
  if qkv[0].ndim != 3:
    raise UserError(
      f"{r.src}: {ap}query/kernel has shape {qkv[0].shape}, expected "
      "(D, heads, head_dim)"
    )
  out[o + "attn.qkv.weight"] = np.concatenate([_heads_in(w) for w in qkv])
  out[o + "attn.qkv.bias"] = np.concatenate(
    [r.get(f"{ap}{n}/bias", idx).reshape(-1) for n in ("query", "key", "value")]
  )
  _bv_out_proj(r, out, o + "attn.proj", ap, idx)
  _bv_norm(r, out, o + "norm2", f"{bp}LayerNorm_{ln2}/", idx)
  _bv_mlp(r, out, o + "mlp", f"{bp}MlpBlock_{mlp}/", idx)
  return qkv[0].shape[1]


def _bv_map_head(r: _NpzReader, out: State) -> None:
  """SigLIP's MAP head (MAPHead_0) -> timm's attn_pool.*."""
  hp = "MAPHead_0/"
  ap = hp + "MultiHeadDotProductAttention_0/"
  out["attn_pool.latent"] = r.get(hp + "probe")
  out["attn_pool.q.weight"] = _heads_in(r.get(ap + "query/kernel"))
  out["attn_pool.q.bias"] = r.get(ap + "query/bias").reshape(-1)
  kv = [r.get(f"{ap}{n}/kernel") for n in ("key", "value")]
  out["attn_pool.kv.weight"] = np.concatenate([_heads_in(w) for w in kv])
  out["attn_pool.kv.bias"] = np.concatenate(
    [r.get(f"{ap}{n}/bias").reshape(-1) for n in ("key", "value")]
  )
  _bv_out_proj(r, out, "attn_pool.proj", ap)
  _bv_norm(r, out, "attn_pool.norm", hp + "LayerNorm_0/")
  _bv_mlp(r, out, "attn_pool.mlp", hp + "MlpBlock_0/")


def _heads_in(w: np.ndarray) -> np.ndarray:
  """An attention input kernel (D, heads, head_dim) -> (out, in)."""
  return w.reshape(w.shape[0], -1).T


def _bv_norm(
  r: _NpzReader, out: State, to: str, ln: str, idx: int | None = None
) -> None:
  out[to + ".weight"] = r.get(ln + "scale", idx)
  out[to + ".bias"] = r.get(ln + "bias", idx)


def _bv_out_proj(
  r: _NpzReader, out: State, to: str, ap: str, idx: int | None = None
) -> None:
  w = r.get(f"{ap}out/kernel", idx)  # (heads, head_dim, D).
  out[to + ".weight"] = w.reshape(-1, w.shape[-1]).T
  out[to + ".bias"] = r.get(f"{ap}out/bias", idx)


def _bv_mlp(
  r: _NpzReader, out: State, to: str, mp: str, idx: int | None = None
) -> None:
  for n in range(2):
    out[f"{to}.fc{n + 1}.weight"] = r.get(f"{mp}Dense_{n}/kernel", idx).T
    out[f"{to}.fc{n + 1}.bias"] = r.get(f"{mp}Dense_{n}/bias", idx)


# --- timm ---------------------------------------------------------------------


def is_timm(tensors: State) -> bool:
  return "patch_embed.proj.weight" in tensors and any(
    k.startswith("blocks.0.") for k in tensors
  )


def from_timm(
  tensors: State, src: str = "weights", num_heads: int | None = None
) -> tuple[State, VitArch]:
  """A timm ViT state dict: kept as is, its arch inferred and checked."""
  out = dict(tensors)
  depth = 1 + max(
    (int(k.split(".")[1]) for k in out if k.startswith("blocks.")), default=-1
  )
  keys = set(out)
  if "dist_token" in keys:
    family = "deit"
  elif "blocks.0.ls1.gamma" in keys:
    family = "dinov2"
  elif "norm_pre.weight" in keys:
    family = "clip"
  elif "attn_pool.latent" in keys:
    family = "siglip"
  else:
    family = "vit"
  arch = _infer_arch(out, family, depth, src, num_heads=num_heads)
  if family == "clip":
    arch.norm_eps = 1e-5
  return out, arch


# --- Shared: the arch from shapes ---------------------------------------------

# timm's head counts of its named widths (the files do not store them).
TIMM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def _infer_arch(
  sd: State,
  family: str,
  depth: int,
  src: str,
  num_heads: int | None = None,
) -> VitArch:
  """The arch from a timm-named state dict's shapes; checks every shape."""
  need = ["patch_embed.proj.weight", "pos_embed", "norm.weight"]
  for key in need:
    if key not in sd:
      raise UserError(f"{src}: no {key} (after translation): not a ViT")
  pw = sd["patch_embed.proj.weight"]
  if pw.ndim != 4 or pw.shape[2] != pw.shape[3] or pw.shape[1] != 3:
    raise UserError(
      f"{src}: patch embedding has shape {pw.shape}, expected (D, 3, p, p)"
    )
  d, p = pw.shape[0], pw.shape[2]
  cls = "cls_token" in sd
  dist = "dist_token" in sd
  reg = sd["reg_token"].shape[1] if "reg_token" in sd else 0
  pos = sd["pos_embed"]
  if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != d:
    raise UserError(
      f"{src}: position embedding has shape {pos.shape}, expected (1, T, {d})"
    )
  fc1 = sd.get("blocks.0.mlp.fc1.weight")
  if fc1 is None:
    raise UserError(f"{src}: block 0 has no MLP")
  mlp = fc1.shape[0]
  with_prefix = pos.shape[1] - int(cls) - int(dist)
  grid = math.isqrt(max(with_prefix, 0))
  no_embed_class = False
  if grid * grid != with_prefix or with_prefix <= 0:
    grid = math.isqrt(pos.shape[1])
    if grid * grid != pos.shape[1]:
      raise UserError(
        f"{src}: position embedding holds {pos.shape[1]} tokens: no square "
        "patch grid"
      )
    no_embed_class = cls or dist
  if num_heads is not None:
    heads, inferred = num_heads, False
  else:
    heads, inferred = TIMM_HEADS.get(d, max(d // 64, 1)), True
  if d % heads:
    raise UserError(f"{src}: {heads} heads do not divide width {d}")
  arch = VitArch(
    family=family,
    patch_size=p,
    embed_dim=d,
    depth=depth,
    num_heads=heads,
    mlp_dim=mlp,
    img_size=grid * p,
    num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
    class_token=cls,
    dist_token=dist,
    reg_tokens=reg,
    no_embed_class=no_embed_class,
    layer_scale="blocks.0.ls1.gamma" in sd,
    pre_norm="norm_pre.weight" in sd,
    fc_norm="fc_norm.weight" in sd,
    global_pool="map"
    if "attn_pool.latent" in sd
    else ("token" if cls else "avg"),
    qkv_bias="blocks.0.attn.qkv.bias" in sd,
    patch_bias="patch_embed.proj.bias" in sd,
    heads_inferred=inferred,
  )
  _check_shapes(sd, arch, src)
  return arch


def expected_shapes(arch: VitArch) -> dict[str, tuple]:
  """timm's shape of every key a state dict of `arch` may hold."""
  d, m, p = arch.embed_dim, arch.mlp_dim, arch.patch_size
  grid = (arch.img_size // p) ** 2
  prefix = int(arch.class_token) + int(arch.dist_token)
  shapes: dict[str, tuple] = {
    "patch_embed.proj.weight": (d, 3, p, p),
    "patch_embed.proj.bias": (d,),
    "cls_token": (1, 1, d),
    "dist_token": (1, 1, d),
    "reg_token": (1, arch.reg_tokens, d),
    "pos_embed": (1, grid + (0 if arch.no_embed_class else prefix), d),
    "norm_pre.weight": (d,),
    "norm_pre.bias": (d,),
    "norm.weight": (d,),
    "norm.bias": (d,),
    "fc_norm.weight": (d,),
    "fc_norm.bias": (d,),
    "head.weight": (arch.num_classes, d),
    "head.bias": (arch.num_classes,),
    "head_dist.weight": (arch.num_classes, d),
    "head_dist.bias": (arch.num_classes,),
    "attn_pool.latent": (1, 1, d),
    "attn_pool.q.weight": (d, d),
    "attn_pool.q.bias": (d,),
    "attn_pool.kv.weight": (2 * d, d),
    "attn_pool.kv.bias": (2 * d,),
    "attn_pool.proj.weight": (d, d),
    "attn_pool.proj.bias": (d,),
    "attn_pool.norm.weight": (d,),
    "attn_pool.norm.bias": (d,),
    "attn_pool.mlp.fc1.weight": (m, d),
    "attn_pool.mlp.fc1.bias": (m,),
    "attn_pool.mlp.fc2.weight": (d, m),
    "attn_pool.mlp.fc2.bias": (d,),
  }
  block = {
    "norm1.weight": (d,),
    "norm1.bias": (d,),
    "attn.qkv.weight": (3 * d, d),
    "attn.qkv.bias": (3 * d,),
    "attn.proj.weight": (d, d),
    "attn.proj.bias": (d,),
    "ls1.gamma": (d,),
    "norm2.weight": (d,),
    "norm2.bias": (d,),
    "mlp.fc1.weight": (m, d),
    "mlp.fc1.bias": (m,),
    "mlp.fc2.weight": (d, m),
    "mlp.fc2.bias": (d,),
    "ls2.gamma": (d,),
  }
  for n in range(arch.depth):
    for k, s in block.items():
      shapes[f"blocks.{n}.{k}"] = s
  return shapes


def _check_shapes(sd: State, arch: VitArch, src: str) -> None:
  shapes = expected_shapes(arch)
  for key, value in sd.items():
    if key not in shapes:
      raise UserError(f"{src}: unexpected key {key} for a ViT")
    if tuple(value.shape) != shapes[key]:
      raise UserError(
        f"{src}: {key} has shape {tuple(value.shape)}, expected "
        f"{shapes[key]} for a {arch.embed_dim}-wide, {arch.mlp_dim}-MLP ViT"
      )
  for n in range(arch.depth):
    for k in ("norm1.weight", "attn.qkv.weight", "attn.proj.weight"):
      if f"blocks.{n}.{k}" not in sd:
        raise UserError(f"{src}: blocks.{n}.{k} missing")


# --- One entry point ----------------------------------------------------------


def read(
  path: str | Path, *, num_heads: int | None = None
) -> tuple[State, dict[str, Any]]:
  """Any ViT source -> (timm-named state dict, info).

  info: {'format', 'arch' (VitArch.to_dict()), 'dropped' (keys with no timm
  counterpart), 'posemb_resize', 'source'}.
  """
  from flaxtl.weights import hf_dir, npz_file, onnx_file, torch_file

  path = Path(path)
  dropped: list[str] = []
  notes: list[str] = []
  if path.is_dir():
    tensors, config = hf_dir.read(path)
    sd, arch, dropped = from_hf(tensors, config, str(path))
    fmt = "huggingface"
  elif path.suffix == ".npz":
    sd, arch = from_big_vision(npz_file.read(path), str(path))
    fmt = "big_vision_npz"
  elif path.suffix == ".onnx":
    tensors, notes, heads = onnx_file.read_vit_tensors(path)
    sd, arch, dropped, fmt = from_state_dict(
      tensors, str(path), num_heads or heads
    )
    fmt = "onnx_" + fmt
  elif path.suffix in (".pth", ".pt", ".bin", ".safetensors", ".ckpt"):
    tensors = torch_file.read(path).tensors
    sd, arch, dropped, fmt = from_state_dict(tensors, str(path), num_heads)
  elif not path.exists():
    raise UserError(f"{path}: no such file or directory")
  else:
    raise UserError(
      f"{path}: unknown ViT source (expected a Hugging Face directory, "
      ".pth/.pt/.bin/.safetensors, .npz or .onnx)"
    )
  if arch.heads_inferred:
    notes.append(
      f"num_heads={arch.num_heads} assumed (the file does not store it)"
    )
  sd = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}
  info = {
    "format": fmt,
    "source": str(path),
    "arch": arch.to_dict(),
    "dropped": dropped,
    "posemb_resize": arch.posemb_resize,
    "notes": notes,
  }
  return sd, info


def is_vit_state_dict(tensors: State) -> bool:
  """Whether a PyTorch state dict is a ViT this module translates."""
  if is_torchvision(tensors) or is_timm(tensors):
    return True
  try:
    _hf_prefix(tensors)
  except UserError:
    return False
  return True


def from_state_dict(
  tensors: State, src: str = "weights", num_heads: int | None = None
) -> tuple[State, VitArch, list[str], str]:
  """A flat state dict of any PyTorch naming (torchvision, timm, Hugging
  Face without its config) -> (timm sd, arch, dropped keys, format)."""
  if is_torchvision(tensors):
    sd, arch = from_torchvision(tensors, src, num_heads)
    return sd, arch, [], "torchvision"
  if is_timm(tensors):
    sd, arch = from_timm(tensors, src, num_heads)
    return sd, arch, [], "timm"
  try:
    _hf_prefix(tensors)
  except UserError:
    raise UserError(
      f"{src}: not a ViT (no timm, torchvision or Hugging Face patch "
      "embedding among its keys)"
    ) from None
  sd, arch, dropped = from_hf(tensors, None, src)
  if num_heads is not None:
    if arch.embed_dim % num_heads:
      raise UserError(
        f"{src}: {num_heads} heads do not divide width {arch.embed_dim}"
      )
    arch.num_heads, arch.heads_inferred = num_heads, False
  return sd, arch, dropped, "huggingface"


__all__ = [
  "BICUBIC_TORCH",
  "BICUBIC_TORCH_AA",
  "LINEAR_ZOOM",
  "VitArch",
  "from_big_vision",
  "from_hf",
  "from_state_dict",
  "from_timm",
  "from_torchvision",
  "is_vit_state_dict",
  "read",
]
