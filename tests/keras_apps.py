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
from tests import keras_layouts

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
  "nasnet_mobile": "NASNetMobile",
}
PREPROCESS = {  # Keras' preprocess_input module per family.
  "xception": "xception",
  "inception": "inception_v3",
  "convnext": "convnext",
  "nasnet": "nasnet",
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
  """Moves every non-kernel weight off its default (zeros, ones, 1e-6).

  Unlike tests/keras_layouts.perturb it also sets ConvNeXt's LayerScale
  gammas (Keras names them `variable`) to O(1): at their 1e-6 init a block
  adds almost nothing and a wrong block would go unnoticed.
  """
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


# --- Parity through files: Keras writes, flaxtl converts, both run. ---

LAYOUTS = keras_layouts.KERAS3_LAYOUTS  # What write_keras3 writes.
OFFICIAL = ("official_keras1", "official_keras2")  # The ImageNet files' form.


class Case:
  """A perturbed Keras model, its output on `x`, its files in every layout."""

  def __init__(
    self, keras, arch, include_top, size, tmp, seed=1, official=False
  ):
    self.arch, self.include_top, self.size = arch, include_top, size
    self.model = build(keras, arch, include_top, size, seed=seed)
    self.x = images(keras, arch, size)
    self.want = np.asarray(self.model(self.x))
    self.arrays = keras_arrays(keras, self.model)
    tmp.mkdir(parents=True, exist_ok=True)
    self.files = keras_layouts.write_keras3(self.model, tmp)
    if official:
      for layout in OFFICIAL:
        self.files[layout] = keras_layouts.write_official(
          self.model, tmp / f"{layout}.h5", layout.split("_")[1]
        )
    self.apply = apply_fn(arch, include_top)
    self.tmp = tmp


def check_conversion(case, src, out, record_property=None, arch=None):
  """Converts `src` (arch inferred unless given) and checks it all.

  The checkpoint holds the file's arrays bit for bit, and the model run on
  them gives Keras' output. Returns the provenance.
  """
  from flaxtl import weights

  weights.convert_file(src, out, arch)
  prov = weights.read_provenance(out)
  assert (prov["arch"], prov["include_top"]) == (case.arch, case.include_top)
  variables = weights.restore_variables(out)
  flat = {c: tree.flatten(v) for c, v in variables.items()}
  shapes = {c: {p: a.shape for p, a in f.items()} for c, f in flat.items()}
  slots = keras_names.layer_slots(shapes)
  assert set(slots) == set(case.arrays)
  for layer, entries in slots.items():
    for (collection, var, _), a in zip(entries, case.arrays[layer]):
      np.testing.assert_array_equal(flat[collection][f"{layer}/{var}"], a)
  rel = rel_diff(case.apply(variables, case.x), case.want)
  if record_property is not None:
    record_property("max_rel_diff", rel)
  assert rel <= TOL
  return prov


def strip_names(src, dst):
  """A Keras 3 weights file as Keras <= 3.3 wrote it: no layer names."""
  import shutil

  import h5py

  shutil.copy(src, dst)
  with h5py.File(dst, "r+") as f:
    f.visititems(
      lambda n, o: o.attrs.__delitem__("name") if "name" in o.attrs else None
    )
  return dst
