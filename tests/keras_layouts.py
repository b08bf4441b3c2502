"""Writes any Keras model's weights in every layout Keras has used.

    perturb(model, seed)                 weights away from Keras' defaults
    write_keras3(model, out)             the four layouts Keras 3 writes itself
    write_official(model, path, style)   the official ImageNet files' layout
    write_nested(keras, model, out)      the model as a backbone in a bigger one

The Keras 3 layouts (`.weights.h5`, `.keras`, `model.save('x.h5')`, legacy
`save_weights` to `.h5`, which drops the ':0' suffix) are written by Keras
itself. Keras 3 can no longer write the Keras-1/Keras-2 name styles of the
official ImageNet files, so those are written with h5py following the
official files' structure: root attribute `layer_names`, one group per layer
with `weight_names`, datasets `block1_conv1_W_1:0` (Keras 1) or
`conv1_bn/moving_mean:0` (Keras 2 / TF). `rename` gives layers the names an
older Keras used (DenseNet's 'conv1/conv'; a '/' nests the h5 group, as it
did in those files).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

KERAS3_LAYOUTS = (
  "keras3_weights_h5",
  "keras_archive",
  "legacy_model_h5",
  "legacy_weights_h5",
)
NESTED_LAYOUTS = ("nested_weights_h5", "nested_legacy_h5", "nested_archive")
# Keras-1 dataset name parts (`<layer>_W_1:0`); other variables keep theirs.
_KERAS1_SHORT = {"kernel": "W", "bias": "b"}


def perturb(model, seed: int = 0, scale: float = 0.1) -> None:
  """Moves every bias, BN gamma/beta and moving statistic off its default.

  Kernels keep their random init; moving variances stay positive.
  """
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    arrays = []
    for w in layer.weights:
      a = np.asarray(w)
      name = w.name
      if name == "moving_variance":
        a = rng.uniform(0.5, 1.5, a.shape)
      elif name in ("gamma", "moving_mean", "beta", "bias"):
        a = a + scale * rng.standard_normal(a.shape)
      arrays.append(a.astype(np.asarray(w).dtype))
    if arrays:
      layer.set_weights(arrays)


def write_keras3(model, out: Path) -> dict[str, Path]:
  from keras.src.legacy.saving import legacy_h5_format

  paths = {
    "keras3_weights_h5": out / "model.weights.h5",
    "keras_archive": out / "model.keras",
    "legacy_model_h5": out / "model.h5",
    "legacy_weights_h5": out / "legacy.h5",
  }
  model.save_weights(paths["keras3_weights_h5"])
  model.save(paths["keras_archive"])
  model.save(paths["legacy_model_h5"])
  with h5py.File(paths["legacy_weights_h5"], "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)
  return paths


def write_official(
  model,
  path: Path,
  style: str = "keras1",
  rename: Mapping[str, str] | None = None,
) -> Path:
  """The official-file layout: `layer_names` as the only root attribute.

  style: 'keras1' (`<layer>_W_1:0`) or 'keras2' (`<layer>/kernel:0`, plus
  the `keras_version` and `backend` root attributes Keras 2 added).
  """
  rename = rename or {}
  names = [rename.get(layer.name, layer.name) for layer in model.layers]
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = np.array([n.encode() for n in names])
    if style == "keras2":
      f.attrs["keras_version"] = b"2.2.4"
      f.attrs["backend"] = b"tensorflow"
    for layer, name in zip(model.layers, names):
      g = f.create_group(name)
      weight_names = []
      for w in layer.weights:
        if style == "keras1":
          weight_names.append(f"{name}_{_KERAS1_SHORT.get(w.name, w.name)}_1:0")
        else:
          weight_names.append(f"{name}/{w.name}:0")
      g.attrs["weight_names"] = np.array([n.encode() for n in weight_names])
      for weight_name, w in zip(weight_names, layer.weights):
        g.create_dataset(weight_name, data=np.asarray(w))
  return path


def nest(keras, inner):
  """`inner` as a layer of a bigger model with its own head, like HED."""
  inp = keras.Input(inner.input_shape[1:])
  x = inner(inp)
  if len(x.shape) == 4:
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
  return keras.Model(inp, keras.layers.Dense(10, name="head")(x))


def write_nested(keras, model, out: Path) -> dict[str, Path]:
  """`nest(model)` as `.weights.h5`, Keras-3 legacy `.h5` and `.keras`."""
  from keras.src.legacy.saving import legacy_h5_format

  outer = nest(keras, model)
  paths = {
    "nested_weights_h5": out / "nested.weights.h5",
    "nested_legacy_h5": out / "nested_legacy.h5",
    "nested_archive": out / "nested.keras",
  }
  outer.save_weights(paths["nested_weights_h5"])
  with h5py.File(paths["nested_legacy_h5"], "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, outer)
  outer.save(paths["nested_archive"])
  return paths


# DenseNet121's Keras 2 layer names where Keras 3 renamed them.
DENSENET_KERAS2_NAMES = {
  "conv1_conv": "conv1/conv",
  "conv1_bn": "conv1/bn",
  "conv1_relu": "conv1/relu",
  "predictions": "fc1000",
}
