"""The tutorial's small CNN baseline, trained from pixels.

    python launch.py --config configs/mnist_cnn.py
    python launch.py --config configs/mnist_cnn.py:tiny  # seconds: engine tests

3 blocks of Conv(32, 5x5, relu) + 4x4 max-pool, Dense(64), dropout 0.5.
"""

from configs import base


def get_config(arg: str = ""):
  c = base.get_base()
  c.model.name = "cnn"  # flaxtl.models.baselines.SmallCNN.
  c.model.weights = "none"  # From scratch: no backbone to load.
  c.image_size = 64  # Resized on device from the 28x28 digits.
  c.preprocess = "unit"  # Pixels scaled to [0, 1].
  c.optim.name = "adam"
  c.optim.lr = 1e-3
  c.optim.schedule = "constant"
  c.batch_size = 32
  c.num_epochs = 3
  if arg == "tiny":
    c.image_size = 32
    c.data.max_examples = 200  # 160 train / 40 validation digits.
    c.batch_size = 8
    c.eval_batch_size = 16
    c.total_steps = 24
    c.log_every_steps = 4
    c.checkpoint_every_steps = 8
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; expected '' or 'tiny'")
  return c
