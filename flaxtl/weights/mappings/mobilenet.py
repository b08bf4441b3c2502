"""Keras files -> MobileNetV2 / MobileNetV3 variables.

The models are named and shaped like Keras' (flaxtl.models.mobilenet), so
this is `keras_names` plus what it cannot know: the width multiplier
`alpha`, found from the file's shapes (candidates whose pure-Python shapes
disagree with a named layer of the file are not even tried) and recorded in
the provenance, and which architecture an unnamed Keras 3 file holds (its
groups named by each architecture's class keys in turn).
"""

from __future__ import annotations

from flaxtl.models import keras_model, mobilenet, registry
from flaxtl.weights import keras_file
from flaxtl.weights.converted import Converted
from flaxtl.weights.mappings import keras_names, name_repairs

FAMILY = "mobilenet"


ALPHAS = {
  "mobilenetv2": mobilenet.V2_ALPHAS,
  # Keras has files for 0.75 and 1.0; other widths build and train too.
  **dict.fromkeys(
    mobilenet.V3_ARCHS, (*mobilenet.V3_ALPHAS, 0.35, 0.5, 1.25, 1.5)
  ),
}


def _size(arch: str) -> int:
  return len(keras_model.layer_names(arch))


def detect(weights: keras_file.KerasWeights) -> str | None:
  """The MobileNet architecture the file holds, from its layer names.

  A Keras 3 file without names is named after each architecture's layer
  classes in turn; the first whose shapes then agree is the one.
  """
  if not any(layer.name is None for layer in weights.layers):
    return keras_names.detect(weights, FAMILY)
  for arch in sorted(registry.names(FAMILY), key=_size):
    renamed = name_repairs.by_class_keys(weights, arch)
    if renamed is not None and _fitting_alphas(renamed, arch, False):
      return arch
  return None


def _fitting_alphas(
  weights: keras_file.KerasWeights, arch: str, include_top: bool
) -> list[float]:
  """Alphas whose shapes agree with every named layer (stem included)."""
  by_name = {layer.name: layer for layer in weights.layers if layer.name}
  if not all(s in by_name for s in registry.get(arch).stem_layers):
    return []
  fits = []
  for alpha in ALPHAS[arch]:
    want = mobilenet.keras_weight_shapes(arch, include_top, alpha)
    if include_top:
      want.pop(registry.get(arch).classifier, None)  # Any number of classes.
    if all(
      sorted(tuple(a.shape) for a in by_name[n].arrays) == sorted(shapes)
      for n, shapes in want.items()
      if n in by_name
    ):
      fits.append(alpha)
  return fits


def alpha_candidates(
  weights: keras_file.KerasWeights, arch: str, include_top: bool
) -> list[float]:
  """The alphas whose layer shapes agree with the file's named layers.

  All of them, in the usual order, when none does (the full shape check then
  says what is wrong).
  """
  return _fitting_alphas(weights, arch, include_top) or list(ALPHAS[arch])


def from_keras(
  weights: keras_file.KerasWeights,
  arch: str,
  include_top: bool | None = None,
) -> Converted:
  """Maps the file onto `arch`, inferring and recording alpha."""
  named, top, _ = name_repairs.repaired(weights, arch, include_top)
  alphas = alpha_candidates(named, arch, bool(top))
  candidates = [{"alpha": a} for a in alphas]
  return keras_names.from_keras(weights, arch, include_top, candidates)
