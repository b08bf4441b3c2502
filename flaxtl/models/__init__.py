"""Backbones, heads and the registry that ties them to the rest of flaxtl.

    model = flaxtl.models.create("vgg16", include_top=False, pooling="avg")
    y = model.apply(variables, x, train=False)
    flaxtl.models.keras_layer_names("vgg16")  # Keras' model.layers names

Adding a family: a module here that registers each of its architectures
(`registry.register`, or `keras_model.register` for a Keras family) and its
pretrained checkpoints (`checkpoints.register`), imported below; a weight
mapping in `flaxtl.weights.mappings`; tests (the contract tests run over every
registered arch by themselves).

    flaxtl.models.pretrained("tv_mobilenet_v2")  # ['imagenet']
    flaxtl.models.get("resnet50").stages()  # (name, stride, channels) each
"""

from flaxtl.models import (  # noqa: F401 (they register their architectures)
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
from flaxtl.models.checkpoints import Pretrained
from flaxtl.models.checkpoints import tags as pretrained
from flaxtl.models.common import TrainMode, init_variables, variable_shapes
from flaxtl.models.registry import (
  Backbone,
  Stage,
  create,
  get,
  keras_layer_names,
  names,
)
from flaxtl.models.vgg import VGG, VGG16, VGG19

__all__ = [
  "VGG",
  "VGG16",
  "VGG19",
  "Backbone",
  "Pretrained",
  "Stage",
  "TrainMode",
  "create",
  "get",
  "init_variables",
  "keras_layer_names",
  "names",
  "pretrained",
  "variable_shapes",
]
