"""The tutorial's first baseline: an MLP on raw pixels (3 x Dense(500, relu)).

    python launch.py --config configs/mnist_mlp.py
"""

from configs import base


def get_config(arg: str = ""):
  c = base.get_base()
  c.model.name = "mlp"  # flaxtl.models.baselines.PixelMLP.
  c.model.weights = "none"
  c.image_size = 28  # The digits' native size: nothing to gain from upsampling pixels for an MLP.
  c.preprocess = "unit"
  c.optim.name = "adam"
  c.optim.lr = 1e-3
  c.optim.schedule = "constant"
  c.batch_size = 32
  c.num_epochs = 5
  if arg:
    raise ValueError(f"unknown variant {arg!r}; expected none")
  return c
