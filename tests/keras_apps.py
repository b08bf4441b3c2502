"""Keras applications as the oracle for the `keras_model` families.

Keras builds the model (weights=None, then every bias, BN statistic, gamma
and LayerScale moved off its default), its arrays are placed into flaxtl
variables by layer name and Keras' weight order, and both run the same
input. Used by tests/models and tests/weights.
"""

import jax
import numpy as np

from flaxtl import models, tree
from flaxtl.weights.mappings import keras_names

TOL = 1e-4  # Largest |difference| relative to the largest |Keras output|.

KERAS_BUILDERS = {
  "xception": "Xception",
  "inception_v3": "InceptionV3",
  "inception_resnet_v2": "InceptionResNetV2",
  "convnext_tiny": "ConvNeXtTiny",
  "convnext_small": "ConvNeXtSmall",
  "convnext_base": "ConvNeXtBase",
  "convnext_large": "ConvNeXtLarge",
  "convnext_xlarge": "ConvNeXtXLarge",
}
PREPROCESS = {  # Keras' preprocess_input module per family.
  "xception": "xception",
  "inception": "inception_v3",
  "convnext": "convnext",
}


def build(keras, arch, include_top, size, pooling=None, seed=1):
  """The Keras model, named as in a fresh session, weights perturbed."""
  keras.backend.clear_session()  # Auto names (conv2d_N) start at 0.
  keras.utils.set_random_seed(seed)
  builder = getattr(keras.applications, KERAS_BUILDERS[arch])
  kwargs = (
    {"classifier_activation": None} if include_top else {"pooling": pooling}
  )
  model = builder(
    weights=None, include_top=include_top, input_shape=(size, size, 3), **kwargs
  )
  perturb(model, seed)
  return model


def perturb(model, seed=0):
  """Moves every non-kernel weight off its default (zeros, ones, 1e-6)."""
  rng = np.random.default_rng(seed)
  for w in model.weights:
    shape = tuple(w.shape)
    if w.name in ("gamma", "moving_variance") or w.name.startswith("variable"):
      w.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
    elif w.name in ("beta", "bias", "moving_mean"):
      w.assign(rng.normal(0.0, 0.2, shape).astype("float32"))


def images(keras, arch, size, n=2, seed=0):
  """n random 0..255 images, preprocessed as Keras' family expects."""
  family = models.get(arch).family
  x = np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3))
  module = getattr(keras.applications, PREPROCESS[family])
  return np.asarray(module.preprocess_input(x.astype("float32")))


def keras_arrays(keras, model) -> dict[str, list[np.ndarray]]:
  """Weighted layers by flaxtl path (a Sequential's as 'outer/inner')."""
  out = {}
  for layer in model.layers:
    inner = layer.layers if isinstance(layer, keras.Sequential) else [layer]
    for sub in inner:
      if sub.weights:
        path = sub.name if sub is layer else f"{layer.name}/{sub.name}"
        out[path] = [np.asarray(w.value) for w in sub.weights]
  return out


def variables_from(keras, model, arch, include_top):
  """The Keras model's arrays as flaxtl variables, every shape checked."""
  num_classes = model.output_shape[-1] if include_top else None
  shapes = keras_names.model_shapes(arch, include_top, num_classes, {})
  slots = keras_names.layer_slots(shapes)
  arrays = keras_arrays(keras, model)
  assert set(slots) == set(arrays), sorted(set(slots) ^ set(arrays))[:10]
  flat = {}
  for layer, entries in slots.items():
    assert len(entries) == len(arrays[layer]), layer
    for (collection, var, shape), a in zip(entries, arrays[layer]):
      assert a.shape == shape, (layer, var, a.shape, shape)
      flat.setdefault(collection, {})[f"{layer}/{var}"] = a
  return {c: tree.nested(v) for c, v in flat.items()}


def rel_diff(got, want) -> float:
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


def check_layer_names(keras_model, arch, include_top, pooling=None):
  names = [layer.name for layer in keras_model.layers]
  ours = models.keras_layer_names(arch, include_top, pooling)
  assert len(ours) == len(names)
  assert names[0].startswith(ours[0])  # Keras may suffix input_layer_N.
  assert ours[1:] == names[1:]


def apply_fn(arch, include_top, **options):
  model = models.create(arch, include_top=include_top, **options)
  return jax.jit(lambda v, x: model.apply(v, x, train=False))
