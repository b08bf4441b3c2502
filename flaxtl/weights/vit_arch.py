"""What a ViT weight file describes: its architecture, in timm's terms.

Every ViT source (timm, torchvision, Hugging Face, big_vision .npz, ONNX) is
translated into a timm-named state dict plus a `VitArch`; the arch says which
timm model (and so which flaxtl model) the state dict loads into.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Position-embedding resampling each source's own framework does when the
# input grid differs from the stored one.
BICUBIC_TORCH = (
  "bicubic (PyTorch F.interpolate, align_corners=False, antialias=False)"
)
# Hugging Face's Dinov2WithRegisters (and DINOv2's own register models).
BICUBIC_TORCH_AA = (
  "bicubic (PyTorch F.interpolate, align_corners=False, antialias=True)"
)
LINEAR_ZOOM = "linear zoom (big_vision/AugReg: scipy.ndimage.zoom order=1)"

# timm's named sizes: (embed_dim, depth, num_heads) -> size.
SIZES = {
  (192, 12, 3): "tiny",
  (384, 12, 6): "small",
  (768, 12, 12): "base",
  (1024, 24, 16): "large",
}
# Each family's timm model function, which accepts the arch as kwargs.
TEMPLATES = {
  "vit": "vit_small_patch16_224",
  "deit": "deit_small_patch16_224",
  "deit_distilled": "deit_small_distilled_patch16_224",
  "dinov2": "vit_small_patch14_dinov2",
  "dinov2_reg": "vit_small_patch14_reg4_dinov2",
  "clip": "vit_base_patch16_clip_224",
  "siglip": "vit_base_patch16_siglip_224",
}


@dataclasses.dataclass
class VitArch:
  """A ViT's hyper-parameters, as the weights and config give them."""

  family: str  # vit, deit, dinov2, clip or siglip.
  patch_size: int
  embed_dim: int
  depth: int
  num_heads: int
  mlp_dim: int
  img_size: int  # Native input size: the stored grid times the patch.
  num_classes: int = 0  # 0: no classifier head in the file.
  class_token: bool = True
  dist_token: bool = False
  reg_tokens: int = 0
  no_embed_class: bool = False  # Prefix tokens get no position embedding.
  layer_scale: bool = False
  pre_norm: bool = False  # CLIP: a LayerNorm before the blocks.
  fc_norm: bool = False  # A LayerNorm after pooling (timm's fc_norm).
  global_pool: str = "token"  # token, avg or map.
  act: str = "gelu"  # gelu, quick_gelu or gelu_tanh (timm's act names).
  norm_eps: float = 1e-6
  qkv_bias: bool = True
  patch_bias: bool = True
  posemb_resize: str = BICUBIC_TORCH
  heads_inferred: bool = False  # num_heads assumed (head dim 64), not read.

  @property
  def template(self) -> str:
    """The timm model function whose kwargs express this arch."""
    if self.family == "deit" and self.dist_token:
      return TEMPLATES["deit_distilled"]
    if self.family == "dinov2" and self.reg_tokens:
      return TEMPLATES["dinov2_reg"]
    return TEMPLATES[self.family]

  @property
  def timm_name(self) -> str | None:
    """timm's registered name when the arch is exactly a named one."""
    size = SIZES.get((self.embed_dim, self.depth, self.num_heads))
    if size is None or self.mlp_dim != 4 * self.embed_dim:
      return None
    p, img = self.patch_size, self.img_size
    if self.family == "vit" and img in (224, 384):
      return f"vit_{size}_patch{p}_{img}"
    if self.family == "deit" and p == 16 and img == 224:
      return f"deit_{size}_{'distilled_' if self.dist_token else ''}patch16_224"
    if self.family == "dinov2" and p == 14 and self.reg_tokens in (0, 4):
      return f"vit_{size}_patch14_{'reg4_' if self.reg_tokens else ''}dinov2"
    if self.family == "clip" and img == 224:
      quick = "_quickgelu" if self.act == "quick_gelu" else ""
      return f"vit_{size}_patch{p}_clip{quick}_224"
    if self.family == "siglip" and img in (224, 256, 384, 512):
      return f"vit_{size}_patch{p}_siglip_{img}"
    return None

  def timm_kwargs(self) -> dict[str, Any]:
    """kwargs for `timm.create_model(self.template, **kwargs)`.

    The LayerNorm eps is not among them (timm takes a norm_layer callable):
    pass `norm_layer=partial(torch.nn.LayerNorm, eps=self.norm_eps)`.
    """
    kw: dict[str, Any] = {
      "patch_size": self.patch_size,
      "embed_dim": self.embed_dim,
      "depth": self.depth,
      "num_heads": self.num_heads,
      "mlp_ratio": self.mlp_dim / self.embed_dim,
      "img_size": self.img_size,
      "num_classes": self.num_classes,
      "class_token": self.class_token,
      "reg_tokens": self.reg_tokens,
      "no_embed_class": self.no_embed_class,
      "init_values": 1e-5 if self.layer_scale else None,
      "pre_norm": self.pre_norm,
      "fc_norm": self.fc_norm,
      "global_pool": self.global_pool,
      "act_layer": self.act,
      "qkv_bias": self.qkv_bias,
    }
    if self.dist_token:  # VisionTransformerDistilled takes no class_token.
      del kw["class_token"]
    return kw

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["timm_name"] = self.timm_name
    d["template"] = self.template
    return d
