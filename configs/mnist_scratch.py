"""Scenario 3 of the tutorial: the same architecture trained from scratch.

    python launch.py --config configs/mnist_scratch.py        # 224x224
    python launch.py --config configs/mnist_scratch.py:quick  # 64x64, minutes
    python launch.py --config configs/mnist_scratch.py:mobilenet_v2
    python launch.py --config configs/mnist_scratch.py:lite0

Random (Glorot, like Keras) init everywhere, nothing frozen: what the pretrained
strategies are measured against.

`:mobilenet_v2` / `:lite0`: MobileNetV2 / EfficientNet-Lite0 from random init
with :quick's head, optimiser and budget, 96x96: the ImageNet variants'
architecture without the ImageNet weights.
"""

from configs import base


def get_config(arg: str = ""):
  c = base.get_base()
  c.model.weights = "none"  # Scratch.
  c.model.head = "keras_top"
  c.image_size = 224
  c.optim.name = (
    "adam"  # SGD on a deep plain net from scratch barely moves in a few epochs.
  )
  c.optim.lr = 1e-4
  c.optim.schedule = "constant"
  c.batch_size = 16
  c.num_epochs = 10
  if arg == "quick":
    base.offline_small(c)
    c.num_epochs = 1
  elif arg in base.IMAGENET_VARIANTS:
    base.offline_small(c)
    base.offline_imagenet(c, arg)
    c.model.weights = "none"  # The architecture alone.
    c.num_epochs = 1
  elif arg:
    raise ValueError(
      f"unknown variant {arg!r}; expected '', 'quick' or one of "
      f"{list(base.IMAGENET_VARIANTS)}"
    )
  return c
