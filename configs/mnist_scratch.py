"""Scenario 3 of the tutorial: the same architecture trained from scratch.

    python launch.py --config configs/mnist_scratch.py        # 224x224
    python launch.py --config configs/mnist_scratch.py:quick  # 64x64, minutes

Random (Glorot, like Keras) init everywhere, nothing frozen: what the pretrained
strategies are measured against.
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
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; expected '' or 'quick'")
  return c
