"""Writes a Keras model's weights in every layout Keras has used for VGG files.

The Keras 3 layouts (`.weights.h5`, `.keras`, `model.save('x.h5')`, legacy
`save_weights` to `.h5`) are written by Keras itself. Keras 3 can no longer
write the Keras-1/Keras-2 name styles of the official ImageNet files, so those
two are written with h5py following the official files' structure: root
attribute `layer_names`, per-layer `weight_names`, datasets named
`block1_conv1_W_1:0` (Keras 1) or `block1_conv1/kernel:0` (Keras 2 / TF).
"""

from pathlib import Path

import h5py
import numpy as np


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


def write_official(model, path: Path, style: str = "keras1") -> Path:
  """The official-file layout: `layer_names` as the only root attribute."""
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = np.array(
      [layer.name.encode() for layer in model.layers]
    )
    if style == "keras2":
      f.attrs["keras_version"] = b"2.2.4"
      f.attrs["backend"] = b"tensorflow"
    for layer in model.layers:
      g = f.create_group(layer.name)
      arrays = [np.asarray(w) for w in layer.get_weights()]
      if style == "keras1":
        names = [f"{layer.name}_{s}_1:0" for s in ("W", "b")][: len(arrays)]
      else:
        names = [f"{layer.name}/{s}:0" for s in ("kernel", "bias")][
          : len(arrays)
        ]
      g.attrs["weight_names"] = np.array([n.encode() for n in names])
      for name, a in zip(names, arrays):
        g.create_dataset(name, data=a)
  return path
