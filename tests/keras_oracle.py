"""Keras itself as the oracle every Keras family's tests are held to.

Keras builds the model (weights=None, in a fresh session so unnamed layers
get the names flaxtl lists), every non-kernel array is moved off its default
(`perturb`), Keras writes it in the layouts it has used, flaxtl converts, and
both run the same input.

    host_initializers(keras), jax_initializers(keras)    whose random init
    keras_model(keras, builder, include_top, size, ...)  a Keras application
    build(keras, arch, include_top, size, ...)           ... perturbed
    check_architecture / check_layer_names               layer lists, shapes
    Case(keras, arch, tmp, include_top=...)              a perturbed model,
                                                         its output, its files
    Reference(keras, model, feature_layer, x, tmp)       a model and its
                                                         feature sub-model
    check_parity / check_conversion                      file -> flaxtl ->
                                                         same arrays, outputs
    run_cli_error(capsys, *argv)                         one line, exit 2
"""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
from pathlib import Path
import shutil

import h5py
import jax
import numpy as np
import pytest

from flaxtl import convert, models, tree, weights
from flaxtl.models import common
from flaxtl.weights.mappings import keras_names
from tests import keras_layouts

TOL = 1e-4  # Largest |difference| relative to the largest |Keras output|.
LAYOUTS = keras_layouts.KERAS3_LAYOUTS  # What Keras 3 writes itself.
OFFICIAL = ("official_keras1", "official_keras2")  # The ImageNet files' form.
# What keras_file.read reports for each layout the writers produce.
READ_AS = {
  **{layout: layout for layout in LAYOUTS},
  "official_keras1": "legacy_weights_h5",
  "official_keras2": "legacy_weights_h5",
  "nested_weights_h5": "keras3_weights_h5",
  "nested_legacy_h5": "legacy_weights_h5",
  "nested_archive": "keras_archive",
}
ALL_LAYOUTS = tuple(READ_AS)

# arch -> the keras.applications builder.
KERAS_BUILDERS = {
  "resnet50": "ResNet50",
  "resnet101": "ResNet101",
  "resnet152": "ResNet152",
  "resnet50v2": "ResNet50V2",
  "resnet101v2": "ResNet101V2",
  "resnet152v2": "ResNet152V2",
  "densenet121": "DenseNet121",
  "densenet169": "DenseNet169",
  "densenet201": "DenseNet201",
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
# arch -> the keras.applications module whose preprocess_input it takes.
PREPROCESS = {
  "xception": "xception",
  "inception_v3": "inception_v3",
  "inception_resnet_v2": "inception_resnet_v2",
  "nasnet_mobile": "nasnet",
  **{
    a: "resnet_v2" if a.endswith("v2") else a.split("_")[0].rstrip("0123456789")
    for a in KERAS_BUILDERS
    if a.startswith(("resnet", "densenet", "convnext"))
  },
}


_DRAWS = ("normal", "uniform", "truncated_normal")
_JAX_DRAWS = {}  # Keras' own, kept by host_initializers.


def host_initializers(keras) -> None:
  """Keras' initial weights drawn by NumPy, from the same seeds and laws.

  Under the JAX backend each initializer call compiles an XLA kernel for its
  weight's shape: ~15 s of the first build of an EfficientNet, 0.3 s of the
  second. The oracle needs fixed random weights, not JAX's bits: Keras still
  builds, runs and writes every model itself. Called once per session.
  """
  backend = keras.src.backend.jax.random
  if _JAX_DRAWS:
    return
  _JAX_DRAWS.update({n: getattr(backend, n) for n in _DRAWS})
  draw_seed = backend.jax_draw_seed

  def rng(seed):
    return np.random.default_rng(np.asarray(draw_seed(seed)).tolist())

  def cast(x, dtype):
    return jax.numpy.asarray(x, dtype or keras.config.floatx())

  def normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
    return cast(rng(seed).normal(mean, stddev, shape), dtype)

  def uniform(shape, minval=0.0, maxval=1.0, dtype=None, seed=None):
    return cast(rng(seed).uniform(minval, maxval, shape), dtype)

  def truncated_normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
    gen = rng(seed)
    x = gen.standard_normal(shape)
    while (out := np.abs(x) > 2.0).any():  # Keras truncates at 2 stddev.
      x[out] = gen.standard_normal(out.sum())
    return cast(x * stddev + mean, dtype)

  backend.normal, backend.uniform = normal, uniform
  backend.truncated_normal = truncated_normal


@contextlib.contextmanager
def jax_initializers(keras):
  """Keras' own JAX draws inside the block, where a test needs their bits."""
  backend = keras.src.backend.jax.random
  host = {n: getattr(backend, n) for n in _DRAWS}
  for n, draw in (_JAX_DRAWS or host).items():
    setattr(backend, n, draw)
  try:
    yield
  finally:
    for n, draw in host.items():
      setattr(backend, n, draw)


def keras_model(
  keras, builder, include_top: bool, size: int, seed: int = 0, **kwargs
):
  """`builder(weights=None, ...)` built first in a fresh Keras session.

  A fresh session gives unnamed layers the names flaxtl lists
  ('zero_padding2d', 'conv2d_7', ...); the seed, set after clearing it, the
  same initial weights on every run. With the top: logits.
  """
  keras.utils.clear_session()
  keras.utils.set_random_seed(seed)
  if include_top:
    kwargs.setdefault("classifier_activation", None)
  return builder(
    weights=None, include_top=include_top, input_shape=(size, size, 3), **kwargs
  )


def build(keras, arch, include_top, size, pooling=None, seed=1, **kwargs):
  """`arch`'s Keras model (fresh session), every array perturbed."""
  if not include_top:
    kwargs["pooling"] = pooling
  builder = getattr(keras.applications, KERAS_BUILDERS[arch])
  model = keras_model(keras, builder, include_top, size, seed, **kwargs)
  perturb(model, seed)
  return model


def _leaf_layers(model):
  """model.layers with a Sequential's layers in its place."""
  for layer in model.layers:
    if type(layer).__name__ == "Sequential":
      yield from layer.layers
    else:
      yield layer


def perturb(model, seed: int = 0) -> None:
  """Moves every non-kernel array off its default (zeros, ones, 1e-6).

  BN gamma/beta/moving statistics, biases, Normalization's statistics,
  LayerNormalization's gamma/beta and ConvNeXt's LayerScale gammas (at their
  1e-6 init a block adds almost nothing, and a wrong block would go
  unnoticed). Kernels keep their random init.
  """
  rng = np.random.default_rng(seed)
  for layer in _leaf_layers(model):
    arrays = layer.get_weights()
    if not arrays:
      continue
    kind = type(layer).__name__
    shapes = [a.shape for a in arrays]
    if kind == "BatchNormalization":
      *params, mean, var = shapes
      new = [
        rng.uniform(0.5, 1.5, params[0]) if len(params) == 2 else None,
        rng.normal(0.0, 0.2, params[-1]),
        rng.normal(0.0, 0.2, mean),
        rng.uniform(0.5, 2.0, var),
      ]
      new = [a for a in new if a is not None]
    elif kind == "Normalization":
      c = shapes[0]
      new = [rng.uniform(0.3, 0.6, c), rng.uniform(0.03, 0.09, c), 1234]
    elif kind in ("LayerNormalization", "LayerScale"):
      new = [rng.uniform(0.5, 1.5, shapes[0])]
      new += [rng.normal(0.0, 0.2, s) for s in shapes[1:]]
    else:  # Conv2D / DepthwiseConv2D / SeparableConv2D / Dense: biases move.
      new = [a if a.ndim > 1 else rng.normal(0.0, 0.2, a.shape) for a in arrays]
    layer.set_weights(
      [np.asarray(n, a.dtype).reshape(a.shape) for n, a in zip(new, arrays)]
    )
    if kind == "Normalization":
      layer.finalize_state()  # Keras computes with copies made at build time.


def images(size: int, n: int = 2, seed: int = 0) -> np.ndarray:
  """n random 0..255 RGB images, float32."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, size, size, 3)).astype(np.float32)


def keras_images(keras, arch: str, size: int, n: int = 2, seed: int = 0):
  """`images`, preprocessed by Keras' `preprocess_input` for `arch`."""
  module = getattr(keras.applications, PREPROCESS[arch])
  return np.asarray(module.preprocess_input(images(size, n, seed)))


def keras_arrays(model) -> dict[str, list[np.ndarray]]:
  """{layer: its weights in Keras' order} for every weighted layer, by
  flaxtl path (a Sequential's layers as 'sequential/layer')."""
  out = {}
  for layer in model.layers:
    nested = type(layer).__name__ == "Sequential"
    for sub in layer.layers if nested else [layer]:
      if sub.weights:
        path = f"{layer.name}/{sub.name}" if nested else sub.name
        out[path] = [np.asarray(w) for w in sub.weights]
  return out


def flaxtl_arrays(variables: dict) -> dict[str, list]:
  """{layer: arrays in Keras' stored order} of flaxtl variables."""
  flat = {c: tree.flatten(v) for c, v in variables.items()}
  shapes = {c: {p: a.shape for p, a in f.items()} for c, f in flat.items()}
  return {
    layer: [flat[c][f"{layer}/{var}"] for c, var, _ in entries]
    for layer, entries in keras_names.layer_slots(shapes).items()
  }


def variables_from(model, arch: str, include_top: bool) -> dict:
  """The Keras model's arrays as flaxtl variables, every shape checked."""
  num_classes = model.output_shape[-1] if include_top else None
  shapes = keras_names.model_shapes(arch, include_top, num_classes, {})
  slots = keras_names.layer_slots(shapes)
  arrays = keras_arrays(model)
  assert set(slots) == set(arrays), sorted(set(slots) ^ set(arrays))[:10]
  flat = {}
  for layer, entries in slots.items():
    assert len(entries) == len(arrays[layer]), layer
    for (collection, var, shape), a in zip(entries, arrays[layer]):
      assert a.shape == shape, (layer, var, a.shape, shape)
      flat.setdefault(collection, {})[f"{layer}/{var}"] = a
  return {c: tree.nested(v) for c, v in flat.items()}


def rel_diff(got, want) -> float:
  """Largest |got - want| relative to the largest |want|."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


def check_layer_names(keras_model, arch, include_top, pooling=None) -> None:
  """flaxtl's layer list is Keras' `model.layers`."""
  names = [layer.name for layer in keras_model.layers]
  ours = models.keras_layer_names(arch, include_top, pooling)
  assert len(ours) == len(names)
  assert names[0].startswith(ours[0])  # Keras may suffix input_layer_N.
  assert ours[1:] == names[1:]


def check_architecture(
  keras, builder, arch: str, pooling_variants: bool = False
) -> None:
  """Layer names == Keras' model.layers; variable shapes == Keras' weights."""
  model = keras_model(keras, builder, True, 32, classes=7)
  check_layer_names(model, arch, True)
  want = {k: [a.shape for a in v] for k, v in keras_arrays(model).items()}
  shapes = common.variable_shapes(models.create(arch, num_classes=7), 32)
  got = {k: [a.shape for a in v] for k, v in flaxtl_arrays(shapes).items()}
  assert got == want
  if pooling_variants:
    model = keras_model(keras, builder, False, 32, pooling="max")
    names = [layer.name for layer in model.layers]
    assert models.keras_layer_names(arch, False, "max")[1:] == names[1:]
    assert models.keras_layer_names(arch, False)[1:] == names[1:-1]
    avg = models.keras_layer_names(arch, False, "avg")
    assert avg[1:] == [*names[1:-1], "avg_pool"]


_APPLY: dict = {}


def apply_fn(arch: str, include_top: bool = True, **options):
  """One jitted inference forward per model: every file reuses it."""
  key = (arch, include_top, tuple(sorted(options.items())))
  if key not in _APPLY:
    model = models.create(arch, include_top=include_top, **options)
    _APPLY[key] = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return _APPLY[key]


class Case:
  """A perturbed Keras model, its output on `x`, its files.

  layouts: any of ALL_LAYOUTS; rename: layer names an older Keras used, for
  the official layouts (DenseNet's 'conv1/conv').
  """

  def __init__(
    self,
    keras,
    arch: str,
    tmp: Path,
    *,
    include_top: bool,
    size: int = 32,
    layouts: Sequence[str] = LAYOUTS,
    rename: dict[str, str] | None = None,
    seed: int = 0,
  ):
    self.arch, self.include_top, self.size = arch, include_top, size
    classes = {"classes": 10} if include_top else {}
    self.model = build(keras, arch, include_top, size, seed=seed, **classes)
    self.x = keras_images(keras, arch, size, seed=seed)
    self.want = np.asarray(self.model(self.x, training=False))
    self.arrays = keras_arrays(self.model)
    kwargs = {"num_classes": 10} if include_top else {}
    self.apply = apply_fn(arch, include_top, **kwargs)
    self.files: dict[str, Path] = {}
    tmp.mkdir(parents=True, exist_ok=True)
    if set(layouts) & set(LAYOUTS):
      self.files.update(keras_layouts.write_keras3(self.model, tmp))
    for layout in OFFICIAL:
      if layout in layouts:
        self.files[layout] = keras_layouts.write_official(
          self.model, tmp / f"{layout}.h5", layout.split("_")[1], rename
        )
    if set(layouts) & set(keras_layouts.NESTED_LAYOUTS):
      self.files.update(keras_layouts.write_nested(keras, self.model, tmp))
    for layout in list(self.files):
      if layout not in layouts:
        self.files.pop(layout).unlink()


def top_and_notop(keras, arch: str, root: Path, size: int, **kwargs) -> dict:
  """{True: Case with the top, False: without}, seed 1, under `root`."""
  return {
    top: Case(
      keras, arch, root / str(top), include_top=top, size=size, seed=1, **kwargs
    )
    for top in (True, False)
  }


class Reference:
  """A perturbed Keras model, its outputs and its files, with and without
  the top (the no-top model is Keras' own sub-model ending at the feature
  layer, the layers Keras' include_top=False model has)."""

  def __init__(self, keras, model, feature_layer: str, x: np.ndarray, tmp):
    self.model = model
    self.x = x
    notop = keras.Model(model.inputs, model.get_layer(feature_layer).output)
    self.want = {True: np.asarray(model(x)), False: np.asarray(notop(x))}
    self.files: dict[tuple[bool, str], Path] = {}
    for top, m in ((True, model), (False, notop)):
      out = tmp / ("top" if top else "notop")
      out.mkdir(parents=True, exist_ok=True)
      for layout, path in keras_layouts.write_keras3(m, out).items():
        self.files[(top, layout)] = path

  def arrays(self, name: str) -> list[np.ndarray]:
    return [np.asarray(w) for w in self.model.get_layer(name).get_weights()]


def _check_arrays_and_output(case, variables, record_property) -> float:
  """Every array as Keras holds it, bit for bit; Keras' output."""
  got = flaxtl_arrays(variables)
  assert set(got) == set(case.arrays)
  for name, arrays in case.arrays.items():
    for a, b in zip(got[name], arrays):
      np.testing.assert_array_equal(a, b)
  out = np.asarray(case.apply(variables, case.x))
  assert out.shape == case.want.shape
  assert np.ptp(case.want) > 0  # Not a degenerate (constant) output.
  rel = rel_diff(out, case.want)
  if record_property is not None:
    record_property("max_rel_diff", float(rel))
  assert rel <= TOL, rel
  return rel


def check_parity(case: Case, arch: str, layout: str, record_property) -> float:
  """Converts the layout's file in memory (arch and top inferred), runs it."""
  converted, prov = weights.load_file(case.files[layout])
  assert (prov["arch"], prov["include_top"]) == (arch, case.include_top)
  assert prov["layout"] == READ_AS[layout]
  assert set(converted.variables) == {"params", "batch_stats"}
  return _check_arrays_and_output(case, converted.variables, record_property)


def check_conversion(case, src, out, record_property=None, arch=None) -> dict:
  """Converts `src` to a checkpoint (arch inferred unless given), restores
  it and checks it all. Returns the provenance."""
  weights.convert_file(src, out, arch)
  prov = weights.read_provenance(out)
  assert (prov["arch"], prov["include_top"]) == (case.arch, case.include_top)
  variables = weights.restore_variables(out)
  _check_arrays_and_output(case, variables, record_property)
  return prov


def strip_names(src, dst):
  """A Keras 3 weights file as Keras <= 3.3 wrote it: no layer names."""
  shutil.copy(src, dst)
  with h5py.File(dst, "r+") as f:
    f.visititems(
      lambda n, o: o.attrs.__delitem__("name") if "name" in o.attrs else None
    )
  return dst


def run_cli_error(capsys, *argv) -> str:
  """Runs the convert CLI; asserts exit 2 and one `error:` line; returns it."""
  with pytest.raises(SystemExit) as e:
    convert.main([str(a) for a in argv])
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert e.value.code == 2
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]
