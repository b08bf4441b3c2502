"""The tutorial's first baseline: an MLP on raw pixels.

    python launch.py --config configs/mnist_mlp.py

Flattened pixels -> 3 x Dense(500, relu) -> 10 logits.
"""

from configs import base


def get_config(arg: str = ""):
  c = base.get_base()
  c.model.name = "mlp"  # flaxtl.models.baselines.PixelMLP.
  c.model.weights = "none"
  c.image_size = 28  # The digits' own size: upsampling adds nothing to an MLP.
  c.preprocess = "unit"
  c.optim.name = "adam"
  c.optim.lr = 1e-3
  c.optim.schedule = "constant"
  c.batch_size = 32
  c.num_epochs = 5
  if arg:
    raise ValueError(f"unknown variant {arg!r}; expected none")
  return c
