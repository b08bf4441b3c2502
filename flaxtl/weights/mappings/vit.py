"""timm-named ViT state dicts -> the variables of `flaxtl.models.vit`.

The model's parameter paths are timm's module paths, so the map is by name,
driven by the model: every variable is taken from its tensor, converted and
shape-checked. Conversions:

    patch_embed.proj.weight (D, 3, p, p)  -> kernel (p, p, 3, D)
    Linear weight (out, in)               -> kernel (in, out)
    LayerNorm weight, bias                -> scale, bias
    blocks.N.ls{1,2}.gamma, cls_token, reg_token, dist_token, pos_embed,
    attn_pool.latent                      -> as they are

The position embedding stays at the file's grid: its size gives the
`img_size` option when it is not the arch's, and fewer blocks than the arch
has give `depth`; both, and the interpolation used at other input sizes
(timm's antialiased bicubic, `posemb_interp`), are recorded in the options
(and so in the checkpoint's provenance). Readers of other layouts (Hugging
Face, torchvision, big_vision, ONNX) rename to these keys first:
`read_source` (directories, .npz, .onnx) and `adopt` (a PyTorch file of
another naming) give the renamed weights, their reader's `info` in
`metadata['vit_source']`, from which `detect` takes the arch and
`from_torch` the options (`model_config`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from flaxtl import tree
from flaxtl.errors import UserError
from flaxtl.models import vit
from flaxtl.weights import vit_arch, vit_sources
from flaxtl.weights.converted import Converted
from flaxtl.weights.mappings import tv_common
from flaxtl.weights.torch_file import TorchWeights

CLASSIFIER = "head.weight"
_PATCH = "patch_embed.proj.weight"
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def torch_key(path: str) -> str:
  """'blocks/0/attn/qkv/kernel' -> 'blocks.0.attn.qkv.weight'."""
  if "/" not in path:
    return path  # cls_token, pos_embed, ...
  layer, leaf = path.rsplit("/", 1)
  return layer.replace("/", ".") + "." + _LEAF.get(leaf, leaf)


def structure(weights: TorchWeights) -> dict | None:
  """What the file's keys and shapes say about its ViT, if it is one."""
  t = weights.tensors
  need = (_PATCH, "pos_embed", "blocks.0.attn.qkv.weight")
  if not all(k in t for k in need) or t[_PATCH].ndim != 4:
    return None
  dim, _, p, _ = t[_PATCH].shape
  regs = t["reg_token"].shape[1] if "reg_token" in t else 0
  return {
    "patch_size": int(p),
    "embed_dim": int(dim),
    "depth": tv_common.count(weights, "blocks"),
    "class_token": "cls_token" in t,
    "reg_tokens": int(regs),
    "distilled": "dist_token" in t,
    "layer_scale": "blocks.0.ls1.gamma" in t,
    "pre_norm": "norm_pre.weight" in t,
    "map": "attn_pool.latent" in t,
    "fc_norm": "fc_norm.weight" in t,
    "mlp_dim": int(t["blocks.0.mlp.fc1.weight"].shape[0])
    if "blocks.0.mlp.fc1.weight" in t
    else None,
  }


def _matches(cfg: vit.ViTConfig, s: dict) -> bool:
  return (
    cfg.patch_size == s["patch_size"]
    and cfg.embed_dim == s["embed_dim"]
    and cfg.class_token == s["class_token"]
    and cfg.reg_tokens == s["reg_tokens"]
    and cfg.distilled == s["distilled"]
    and (cfg.init_values is not None) == s["layer_scale"]
    and cfg.pre_norm == s["pre_norm"]
    and (cfg.global_pool == "map") == s["map"]
    and cfg.fc_norm == s["fc_norm"]
    and cfg.mlp_dim == s["mlp_dim"]
  )


def candidates(weights: TorchWeights) -> list[str]:
  """The registered archs whose structure the file has (any depth)."""
  s = structure(weights)
  if s is None:
    return []
  return [a for a, cfg in vit.ARCHS.items() if _matches(cfg, s)]


def detect(weights: TorchWeights) -> str | None:
  """The one arch the file fits; None when several do (a translated source:
  the registered timm name its reader gives, if any, first).

  Some archs share weights and differ in preprocessing or activation only
  (vit_small_patch16_224 / deit_small_patch16_224, CLIP GELU / quick-GELU):
  their files need --arch.
  """
  info = weights.metadata.get(SOURCE_INFO)
  if info is not None and info["arch"].get("timm_name") in vit.ARCHS:
    return info["arch"]["timm_name"]
  found = candidates(weights)
  return found[0] if len(found) == 1 else None


def file_options(weights: TorchWeights, arch: str) -> dict:
  """depth and img_size where the file differs from the arch; posemb_interp."""
  cfg = vit.ARCHS[arch]
  options: dict = {"posemb_interp": "bicubic_aa"}
  depth = tv_common.count(weights, "blocks")
  if depth and depth != cfg.depth:
    if depth > cfg.depth:
      raise UserError(
        f"{weights.path}: has {depth} blocks, {arch} has {cfg.depth}"
      )
    options["depth"] = depth
  pos = weights.tensors.get("pos_embed")
  if pos is not None and pos.ndim == 3:
    n = pos.shape[1] - (0 if cfg.no_embed_class else cfg.num_prefix)
    grid = math.isqrt(max(n, 0))
    if grid * grid != n or grid == 0:
      raise UserError(
        f"{weights.path}: pos_embed has {pos.shape[1]} entries, not a square "
        f"grid for {arch} ({cfg.num_prefix} prefix tokens)"
      )
    if grid != cfg.grid:
      options["img_size"] = grid * cfg.patch_size
  return options


def convert(
  weights: TorchWeights,
  arch: str,
  include_top: bool,
  num_classes: int | None,
  options: dict,
) -> Converted:
  """The model's variables from `weights`, every tensor checked."""
  # SigLIP's attention pool belongs to timm's features too (num_classes=0).
  pool = {}
  if not include_top and "attn_pool.latent" in weights.tensors:
    pool = {"pooling": "map"}
  want = tv_common.expected_shapes(
    arch, include_top, num_classes, {**options, **pool}
  )
  tensors, used = weights.tensors, set()
  flat, missing, problems = {}, [], []
  for path, spec in want["params"].items():
    key = torch_key(path)
    if key not in tensors:
      missing.append(key)
      continue
    used.add(key)
    array, shape = tensors[key], tuple(spec.shape)
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.kind != "V":
      problems.append(f"{key} holds {array.dtype}, expected floats")
      continue
    leaf = path.rsplit("/", 1)[-1]
    converted = tv_common.to_flax(array, leaf, len(shape))
    if tuple(converted.shape) != shape:
      problems.append(
        f"{key} has shape {tuple(array.shape)}, expected "
        f"{tv_common.to_torch_shape(shape, leaf)}"
      )
      continue
    flat[path] = np.ascontiguousarray(converted, dtype=spec.dtype)
  if missing:
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise UserError(
      f"{weights.path}: missing tensor(s) {', '.join(missing[:5])}{more} for "
      f"{arch}" + ("" if include_top else " without its top")
    )
  if problems:
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    raise UserError(
      f"{weights.path}: tensors do not fit {arch}: {'; '.join(problems[:3])}"
      f"{more}"
    )
  return Converted(
    {"params": tree.nested(flat)},
    arch,
    include_top,
    num_classes if include_top else None,
    "by_name",
    [k for k in tensors if k not in used],
    options,
  )


def from_torch(
  weights: TorchWeights,
  arch: str,
  include_top: bool | None = None,
  options: dict | None = None,
) -> Converted:
  """A timm-named state dict onto `arch`; the top kept if the file has it.

  options: family options of the source over the file's own (a Hugging
  Face or ONNX reader passes {'posemb_interp': 'bicubic'}, SigLIP's
  {'act': 'gelu_tanh'}); recorded with the rest.
  """
  if arch not in vit.ARCHS:
    raise UserError(f"{weights.path}: {arch} is not a ViT")
  s = structure(weights)
  if s is None:
    raise UserError(
      f"{weights.path}: not a timm ViT state dict (needs {_PATCH}, pos_embed, "
      "blocks.0.attn.qkv.weight)"
    )
  if not _matches(vit.ARCHS[arch], s):
    fits = candidates(weights)
    hint = f"; it fits {fits}" if fits else ""
    raise UserError(f"{weights.path}: does not hold a {arch} model{hint}")
  n = tv_common.num_classes_of(weights, CLASSIFIER)
  if include_top is None:
    include_top = n is not None
  if include_top and n is None:
    raise UserError(
      f"{weights.path}: has no classifier ({CLASSIFIER}); convert it without "
      "the top (--notop)"
    )
  info = weights.metadata.get(SOURCE_INFO)
  own = source_options(info, arch, weights.path) if info else {}
  options = {**file_options(weights, arch), **own, **(options or {})}
  return convert(weights, arch, include_top, n, options)


# --- Other sources ------------------------------------------------------------

SOURCE_INFO = "vit_source"  # The metadata key of a translated source's info.
# Config fields the model takes as options when the source's differ.
_AS_OPTIONS = ("act", "norm_eps")
# Fields a source may differ in without changing the weights' meaning:
# the options file_options derives, the arch's preprocessing.
_FREE = ("depth", "img_size", "preprocess")


def _weights(path: Path, sd: dict, info: dict) -> TorchWeights:
  return TorchWeights(
    path=path, layout=info["format"], tensors=sd, metadata={SOURCE_INFO: info}
  )


def read_source(path: Path) -> TorchWeights | None:
  """A ViT layout no other family has (a Hugging Face directory, a
  big_vision .npz, an .onnx graph) as timm-named weights; None otherwise."""
  path = Path(path)
  model_dir = path.is_dir() and (path / "config.json").is_file()
  if not (model_dir or path.suffix in (".npz", ".onnx")):
    return None  # A bare directory: the Keras reader says what it is.
  sd, info = vit_sources.read(path)
  return _weights(path, sd, info)


def adopt(weights: TorchWeights) -> TorchWeights | None:
  """A torchvision- or Hugging Face-named ViT state dict renamed to timm's
  keys; None for timm's own names and for other models."""
  t = weights.tensors
  if vit_sources.is_timm(t) or not vit_sources.is_vit_state_dict(t):
    return None
  sd, arch, dropped, fmt = vit_sources.from_state_dict(t, str(weights.path))
  notes = []
  if arch.heads_inferred:
    notes.append(f"num_heads={arch.num_heads} assumed (not stored)")
  info = {
    "format": fmt,
    "source": str(weights.path),
    "arch": arch.to_dict(),
    "dropped": dropped,
    "posemb_resize": arch.posemb_resize,
    "notes": notes,
  }
  sd = {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}
  return dataclasses.replace(
    weights,
    layout=f"{weights.layout}/{fmt}",
    tensors=sd,
    metadata={**weights.metadata, SOURCE_INFO: info},
  )


def source_options(info: dict[str, Any], arch: str, src: Any) -> dict:
  """The options that run a reader's arch as the registered `arch`:
  posemb_interp, and act / norm_eps where they differ from the arch's."""
  fields = {f.name for f in dataclasses.fields(vit_arch.VitArch)}
  cfg, options = model_config(
    vit_arch.VitArch(**{k: v for k, v in info["arch"].items() if k in fields})
  )
  want = vit.ARCHS[arch]
  for f in dataclasses.fields(vit.ViTConfig):
    have, need = getattr(cfg, f.name), getattr(want, f.name)
    if f.name in _FREE or have == need:
      continue
    if f.name in _AS_OPTIONS:
      options[f.name] = have
    elif f.name == "mlp_ratio" and math.isclose(have, need):
      continue
    else:
      raise UserError(
        f"{src}: holds a ViT with {f.name}={have!r}, {arch} has {need!r}"
      )
  return options


# How a source's VitArch.posemb_resize maps onto the model's posemb_interp.
_INTERP = {
  vit_arch.BICUBIC_TORCH: "bicubic",
  vit_arch.BICUBIC_TORCH_AA: "bicubic_aa",
  vit_arch.LINEAR_ZOOM: "linear",
}


def model_config(arch: vit_arch.VitArch) -> tuple[vit.ViTConfig, dict]:
  """A reader's VitArch as the model's ViTConfig and its options.

  `vit.ViT(config=cfg, **options)` (or the registered `arch.timm_name` with
  the options) runs the reader's timm-named state dict.
  """
  if not arch.qkv_bias or arch.patch_bias == arch.pre_norm:
    raise UserError(
      f"{arch.family} ViT without qkv biases or with a patch bias beside "
      "pre_norm: not a timm ViT this model has"
    )
  cfg = vit.ViTConfig(
    patch_size=arch.patch_size,
    embed_dim=arch.embed_dim,
    depth=arch.depth,
    num_heads=arch.num_heads,
    mlp_ratio=arch.mlp_dim / arch.embed_dim,
    img_size=arch.img_size,
    class_token=arch.class_token or arch.dist_token,
    reg_tokens=arch.reg_tokens,
    distilled=arch.dist_token,
    no_embed_class=arch.no_embed_class,
    init_values=1e-5 if arch.layer_scale else None,
    pre_norm=arch.pre_norm,
    fc_norm=arch.fc_norm,
    global_pool=arch.global_pool,
    act=arch.act,
    norm_eps=arch.norm_eps,
  )
  return cfg, {"posemb_interp": _INTERP.get(arch.posemb_resize, "bicubic")}
