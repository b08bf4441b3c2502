"""Per-family maps from a Keras file's layers onto a flaxtl model's variables.

Each family module provides
    detect(weights) -> arch | None     which of its architectures the file holds
    from_keras(weights, arch, include_top) -> Converted  (UserError if unfit)
and is listed in KERAS under the family name its models register with.
"""

from flaxtl.weights.mappings import efficientnet, mobilenet, vgg

KERAS = {"efficientnet": efficientnet, "mobilenet": mobilenet, "vgg": vgg}
