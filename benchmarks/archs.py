"""The architectures beyond VGG16 that forward.py and train_step.py compare.

    python benchmarks/forward.py --arch resnet50 --cases 224x8 --dtypes fp32
    python benchmarks/train_step.py --arch tv_mobilenet_v2 --size 224 --batch 8

One entry per flaxtl registry name, saying how PyTorch (torchvision) and
Keras 3 build the same network, and which middle stage the `freeze` train
step freezes in each framework:

- flaxtl: `config.freeze.until = FLAXTL_UNTIL` (every layer up to and
  including that stage, in forward order; its BN layers run in inference
  mode, `model.bn_mode='keras'`).
- Keras: `layer.trainable = False` on `model.layers[:k]`, k = 1 + the index
  of the stage's last layer (the same layers: flaxtl's layer list is Keras').
- PyTorch: `requires_grad_(False)` on the `torch_frozen` submodules, and
  their BatchNorm layers in `eval()` mode (Keras' rule, by hand).

VGG16 keeps its own plain-torch.nn copy and Keras-layer-count cases in
forward.py / train_step.py (`freeze8` etc.).
"""

from __future__ import annotations

import dataclasses
import sys
import types


@dataclasses.dataclass(frozen=True)
class Arch:
  """One architecture in the three frameworks."""

  name: str  # flaxtl registry name.
  torch: str  # torchvision.models builder.
  keras: str | None  # keras.applications class; None: no Keras-named model.
  until: str  # flaxtl freeze.until for the `freeze` case (and Keras' stage).
  torch_frozen: tuple[str, ...]  # torchvision submodules frozen there.
  frozen_desc: str  # The frozen part, in words, for the tables.


ARCHS = {
  a.name: a
  for a in (
    Arch(
      "resnet50",
      "resnet50",
      "ResNet50",
      "conv3",
      ("conv1", "bn1", "layer1", "layer2"),
      "stem + conv2_x + conv3_x (torch: conv1, bn1, layer1, layer2)",
    ),
    Arch(
      "mobilenetv2",
      "mobilenet_v2",
      "MobileNetV2",
      "block_5",
      tuple(f"features.{i}" for i in range(7)),
      "stem + expanded_conv + block_1..block_5 (torch: features.0-6)",
    ),
    Arch(
      "efficientnetb0",
      "efficientnet_b0",
      "EfficientNetB0",
      "block3b",
      tuple(f"features.{i}" for i in range(4)),
      "stem + stages 1-3 (block1a..block3b; torch: features.0-3)",
    ),
    Arch(
      "tv_resnet50",
      "resnet50",
      None,
      "layer2",
      ("conv1", "bn1", "layer1", "layer2"),
      "conv1, bn1, layer1, layer2",
    ),
    Arch(
      "tv_mobilenet_v2",
      "mobilenet_v2",
      None,
      "features/6",
      tuple(f"features.{i}" for i in range(7)),
      "features.0-6",
    ),
  )
}
# Train-step cases for these architectures (VGG16 has its own).
CASES = ("freeze", "full")
HIDDEN, CLASSES = 256, 10


def get(name: str) -> Arch:
  if name not in ARCHS:
    raise SystemExit(f"unknown --arch {name!r}: vgg16 or one of {list(ARCHS)}")
  return ARCHS[name]


def torchvision():
  """torchvision's model definitions, without its compiled ops.

  The torchvision 0.28 wheel's ops do not load against the CPU torch wheel
  (../shared/REFERENCE.md); the models need none of them.
  """
  sys.modules.setdefault(
    "torchvision._meta_registrations",
    types.ModuleType("torchvision._meta_registrations"),
  )
  import torchvision as tv  # Benchmark-only dependency, torch workers only.

  return tv


def torch_model(name: str, head: bool):
  """The torchvision model; its classifier replaced by Identity (pooled
  features, `head=False`) or by the train step's Dense(256, relu) ->
  Dense(10) head."""
  import torch  # Benchmark-only dependency, torch workers only.

  arch = get(name)
  model = getattr(torchvision().models, arch.torch)(weights=None)
  attr = "fc" if hasattr(model, "fc") else "classifier"
  old = getattr(model, attr)
  features = (old if isinstance(old, torch.nn.Linear) else old[-1]).in_features
  new = torch.nn.Identity()
  if head:
    new = torch.nn.Sequential(
      torch.nn.Linear(features, HIDDEN),
      torch.nn.ReLU(),
      torch.nn.Linear(HIDDEN, CLASSES),
    )
  setattr(model, attr, new)
  return model


def torch_freeze(model, name: str) -> list:
  """Freezes the `freeze` case's stage the Keras way; returns those modules.

  Call after `model.train()`: it puts their BatchNorm layers in eval mode.
  """
  import torch  # Benchmark-only dependency, torch workers only.

  frozen = [model.get_submodule(m) for m in get(name).torch_frozen]
  for m in frozen:
    m.requires_grad_(False)
    for sub in m.modules():
      if isinstance(sub, torch.nn.BatchNorm2d):
        sub.eval()
  return frozen


def keras_model(name: str, size: int):
  """keras.applications' model without top, global average pooled."""
  import keras  # Benchmark-only dependency, keras workers only.

  arch = get(name)
  if arch.keras is None:
    raise SystemExit(f"{name}: PyTorch names, no Keras model to compare")
  return getattr(keras.applications, arch.keras)(
    weights=None,
    include_top=False,
    pooling="avg",
    input_shape=(size, size, 3),
  )


def keras_frozen_count(model, name: str) -> int:
  """k such that `model.layers[:k]` ends with the freeze stage's last layer
  (flaxtl's `freeze.until` rule on Keras names)."""
  stage = get(name).until
  hits = [
    i
    for i, layer in enumerate(model.layers)
    if layer.name == stage or layer.name.startswith(stage + "_")
  ]
  if not hits:
    raise SystemExit(f"{name}: no Keras layer in stage {stage!r}")
  return hits[-1] + 1
