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

# Official ImageNet files: (arch, include_top) -> (path under
# https://storage.googleapis.com/tensorflow/keras-applications/, digest),
# for alpha 1.0 at 224 px. Keras' mobilenet_v3.py checks MD5 digests;
# mobilenet_v2.py passes no hash at all (None: nothing to verify against).
# keras/src/applications/mobilenet_v3.py: model name -> (top, no top).
_V3_MD5 = {
  "large_224_0.75_float": (
    "765b44a33ad4005b3ac83185abf1d0eb",
    "40af19a13ebea4e2ee0c676887f69a2e",
  ),
  "large_224_1.0_float": (
    "59e551e166be033d707958cf9e29a6a7",
    "07fb09a5933dd0c8eaafa16978110389",
  ),
  "large_minimalistic_224_1.0_float": (
    "675e7b876c45c57e9e63e6d90a36599c",
    "ec5221f64a2f6d1ef965a614bdae7973",
  ),
  "small_224_0.75_float": (
    "cb65d4e5be93758266aa0a7f2c6708b7",
    "ebdb5cc8e0b497cd13a7c275d475c819",
  ),
  "small_224_1.0_float": (
    "8768d4c2e7dee89b9d02b2d03d65d862",
    "d3e8ec802a04aa4fc771ee12a9a9b836",
  ),
  "small_minimalistic_224_1.0_float": (
    "99cd97fb2fcdad2bf028eb838de69e37",
    "cde8136e733e811080d9fcd8a252f7e4",
  ),
}
HASH_ALGORITHM = {"mobilenetv2": None, "mobilenetv3": "md5"}


def _v2_file(include_top: bool, alpha: float, rows: int = 224):
  suffix = "" if include_top else "_no_top"
  name = (
    "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_"
    f"{float(alpha)}_{rows}{suffix}.h5"
  )
  return f"mobilenet_v2/{name}", None


def _v3_file(arch: str, include_top: bool, alpha: float):
  size = "small" if arch.startswith("mobilenetv3small") else "large"
  minimal = "_minimalistic" if arch.endswith("_minimalistic") else ""
  model = f"{size}{minimal}_224_{alpha}_float"
  top, notop = _V3_MD5[model]
  if include_top:
    return f"mobilenet_v3/weights_mobilenet_v3_{model}.h5", top
  return f"mobilenet_v3/weights_mobilenet_v3_{model}_no_top_v2.h5", notop


# Every (arch, include_top, alpha) Keras has a file for (V2 at 224 px; Keras
# also has V2 files for 96, 128, 160 and 192 px, same names with the size).
IMAGENET_ALPHA_FILES = {
  **{
    ("mobilenetv2", top, a): _v2_file(top, a)
    for a in mobilenet.V2_ALPHAS
    for top in (True, False)
  },
  **{
    (arch, top, a): _v3_file(arch, top, a)
    for arch in ("mobilenetv3small", "mobilenetv3large")
    for a in mobilenet.V3_ALPHAS
    for top in (True, False)
  },
  **{
    (arch, top, 1.0): _v3_file(arch, top, 1.0)
    for arch in (
      "mobilenetv3small_minimalistic",
      "mobilenetv3large_minimalistic",
    )
    for top in (True, False)
  },
}
IMAGENET_FILES = {
  (arch, top): entry
  for (arch, top, alpha), entry in IMAGENET_ALPHA_FILES.items()
  if alpha == 1.0
}

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
