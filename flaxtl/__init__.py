"""flaxtl: transfer learning from pretrained Keras weights, in JAX/Flax."""

__version__ = "0.1.0"
