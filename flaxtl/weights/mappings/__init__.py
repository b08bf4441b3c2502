"""Per-family maps from a weight file onto a flaxtl model's variables.

Keras families (layers of a Keras file, `flaxtl.weights.keras_file`):
    detect(weights) -> arch | None     which of its architectures the file holds
    from_keras(weights, arch, include_top) -> Converted  (UserError if unfit)
listed in KERAS under the family name its models register with.

PyTorch-named families (a state dict, `flaxtl.weights.torch_file`):
    detect(weights) -> arch | None
    from_torch(weights, arch, include_top) -> Converted
listed in TORCH likewise.
"""

from flaxtl.weights.mappings import (
  convnext,
  densenet,
  efficientnet,
  efficientnet_lite,
  inception,
  mobilenet,
  nasnet,
  resnet,
  tv_convnext,
  tv_efficientnet,
  tv_mobilenet_v2,
  tv_resnet,
  tv_vgg,
  vgg,
  vit,
  xception,
)

KERAS = {
  "vgg": vgg,
  "resnet": resnet,
  "densenet": densenet,
  "mobilenet": mobilenet,
  "efficientnet": efficientnet,
  "xception": xception,
  "inception": inception,
  "convnext": convnext,
  "nasnet": nasnet,
}
TORCH = {
  "tv_vgg": tv_vgg,
  "tv_resnet": tv_resnet,
  "tv_mobilenet_v2": tv_mobilenet_v2,
  "efficientnet_lite": efficientnet_lite,
  "tv_efficientnet": tv_efficientnet,
  "tv_convnext": tv_convnext,
  "vit": vit,
}
