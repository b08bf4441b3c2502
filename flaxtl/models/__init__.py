"""Model families."""

from flaxtl.models.vgg import VGG, VGG16, VGG19, keras_layer_names, param_layer_names

__all__ = ["VGG", "VGG16", "VGG19", "keras_layer_names", "param_layer_names"]
