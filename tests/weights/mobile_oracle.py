"""Keras as the oracle for MobileNet / EfficientNet: models, files, outputs.

A `Reference` is one Keras model (random weights; biases, BN statistics and
Normalization statistics perturbed away from their defaults so a swapped or
missed array shows), its outputs with and without the top on the same images,
and its weights written by Keras in every Keras 3 layout, with and without
the top (the no-top model is Keras' own sub-model ending at the feature
layer, the layers Keras' include_top=False model has).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.keras_layouts import write_keras3

LAYOUTS = (
  "keras3_weights_h5",
  "keras_archive",
  "legacy_model_h5",
  "legacy_weights_h5",
)
TOL = 1e-4  # Largest |difference| relative to the largest |Keras output|.


def build(keras, builder, size: int, seed: int = 1, **kwargs):
  """A Keras application in a fresh session (auto names from zero)."""
  keras.backend.clear_session()
  keras.utils.set_random_seed(seed)
  return builder(weights=None, input_shape=(size, size, 3), **kwargs)


def perturb(model, seed: int = 0) -> None:
  """Moves every non-kernel array away from its initial value."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    arrays = layer.get_weights()
    if not arrays:
      continue
    kind = type(layer).__name__
    if kind == "BatchNormalization":
      g, b, m, v = (a.shape for a in arrays)
      new = [
        rng.uniform(0.5, 1.5, g),
        rng.normal(0.0, 0.2, b),
        rng.normal(0.0, 0.2, m),
        rng.uniform(0.5, 2.0, v),
      ]
    elif kind == "Normalization":
      c = arrays[0].shape
      new = [rng.uniform(0.3, 0.6, c), rng.uniform(0.03, 0.09, c), 1234]
    else:  # Conv2D / DepthwiseConv2D / Dense: kernels stay, biases move.
      new = [a if a.ndim > 1 else rng.normal(0.0, 0.2, a.shape) for a in arrays]
    layer.set_weights(
      [np.asarray(n, a.dtype).reshape(a.shape) for n, a in zip(new, arrays)]
    )
    if kind == "Normalization":
      layer.finalize_state()  # Keras computes with copies made at build time.


def images(size: int, n: int = 2, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, size, size, 3)).astype(np.float32)


class Reference:
  """A perturbed Keras model, its outputs and its files (top and no top)."""

  def __init__(
    self, keras, model, feature_layer: str, x: np.ndarray, tmp: Path
  ):
    self.model = model
    self.x = x
    notop = keras.Model(model.inputs, model.get_layer(feature_layer).output)
    self.want = {True: np.asarray(model(x)), False: np.asarray(notop(x))}
    self.files: dict[tuple[bool, str], Path] = {}
    for top, m in ((True, model), (False, notop)):
      out = tmp / ("top" if top else "notop")
      out.mkdir(parents=True, exist_ok=True)
      for layout, path in write_keras3(m, out).items():
        self.files[(top, layout)] = path

  def arrays(self, name: str) -> list[np.ndarray]:
    return [np.asarray(w) for w in self.model.get_layer(name).get_weights()]


def max_rel_diff(got, want) -> float:
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())
