"""What every Keras family's tests check against Keras itself.

check_architecture(keras, builder, arch)  layer names and variable shapes
Case(keras, builder, ...)                  a perturbed Keras model, its
                                           outputs and its files
check_parity(case, layout, ...)            file -> flaxtl -> same outputs
run_cli_error(capsys, *argv)               one line, exit status 2
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
import pytest

from flaxtl import convert, models, tree, weights
from flaxtl.models import common
from flaxtl.weights.mappings import keras_names
from tests import keras_layouts

TOL = 1e-4  # Largest |difference| relative to the largest |Keras output|.
# What keras_file.read reports for each layout the writers produce.
READ_AS = {
  "keras3_weights_h5": "keras3_weights_h5",
  "keras_archive": "keras_archive",
  "legacy_model_h5": "legacy_model_h5",
  "legacy_weights_h5": "legacy_weights_h5",
  "official_keras1": "legacy_weights_h5",
  "official_keras2": "legacy_weights_h5",
  "nested_weights_h5": "keras3_weights_h5",
  "nested_legacy_h5": "legacy_weights_h5",
  "nested_archive": "keras_archive",
}
ALL_LAYOUTS = tuple(READ_AS)


def keras_model(
  keras, builder, include_top: bool, size: int, seed: int = 0, **kwargs
):
  """`builder(weights=None, ...)` built first in a fresh Keras session.

  A fresh session gives unnamed layers the names flaxtl lists
  ('zero_padding2d', 'max_pooling2d', ...); the seed, set after clearing it,
  the same initial weights on every run.
  """
  keras.utils.clear_session()
  keras.utils.set_random_seed(seed)
  if include_top:
    kwargs.setdefault("classifier_activation", None)
  return builder(
    weights=None, include_top=include_top, input_shape=(size, size, 3), **kwargs
  )


def keras_arrays(model) -> dict[str, list[np.ndarray]]:
  """{layer name: its weights} for every weighted layer, Keras' order."""
  return {
    layer.name: [np.asarray(w) for w in layer.weights]
    for layer in model.layers
    if layer.weights
  }


def flaxtl_arrays(variables: dict) -> dict[str, list]:
  """{layer: arrays in Keras' stored order} of flaxtl variables."""
  flat = {c: tree.flatten(v) for c, v in variables.items()}
  shapes = {c: {p: a.shape for p, a in f.items()} for c, f in flat.items()}
  return {
    layer: [flat[c][f"{layer}/{var}"] for c, var, _ in entries]
    for layer, entries in keras_names.layer_slots(shapes).items()
  }


def check_architecture(
  keras, builder: Callable, arch: str, pooling_variants: bool = False
) -> None:
  """Layer names == Keras' model.layers; variable shapes == Keras' weights."""
  model = keras_model(keras, builder, True, 32, classes=7)
  names = [layer.name for layer in model.layers]
  ours = models.keras_layer_names(arch, include_top=True)
  assert names[0].startswith(ours[0])  # Keras may uniquify input_layer_N.
  assert ours[1:] == names[1:]
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


class Case:
  """A Keras model with perturbed weights, its outputs, and its files."""

  def __init__(
    self,
    keras,
    builder: Callable,
    preprocess: Callable,
    tmp: Path,
    *,
    include_top: bool,
    size: int = 32,
    layouts: Sequence[str] = ALL_LAYOUTS,
    rename: dict[str, str] | None = None,
    seed: int = 0,
  ):
    self.include_top = include_top
    kwargs = {"classes": 10} if include_top else {}
    model = keras_model(keras, builder, include_top, size, seed, **kwargs)
    keras_layouts.perturb(model, seed)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (2, size, size, 3)).astype(np.float32)
    self.x = np.asarray(preprocess(images))
    self.want = np.asarray(model(self.x, training=False))
    self.arrays = keras_arrays(model)
    self.model = model
    self.files: dict[str, Path] = {}
    tmp.mkdir(parents=True, exist_ok=True)
    if set(layouts) & set(keras_layouts.KERAS3_LAYOUTS):
      self.files.update(keras_layouts.write_keras3(model, tmp))
    for style in ("keras1", "keras2"):
      if f"official_{style}" in layouts:
        self.files[f"official_{style}"] = keras_layouts.write_official(
          model, tmp / f"official_{style}.h5", style, rename=rename
        )
    if set(layouts) & set(keras_layouts.NESTED_LAYOUTS):
      self.files.update(keras_layouts.write_nested(keras, model, tmp))
    for layout in list(self.files):
      if layout not in layouts:
        self.files.pop(layout).unlink()

  def cleanup(self) -> None:
    for f in self.files.values():
      f.unlink(missing_ok=True)


_APPLY: dict = {}


def apply_fn(arch: str, include_top: bool, num_classes: int | None):
  """One jitted forward per model: every layout reuses its compilation."""
  key = (arch, include_top, num_classes)
  if key not in _APPLY:
    model = models.create(
      arch, include_top=include_top, num_classes=num_classes or 1000
    )
    _APPLY[key] = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return _APPLY[key]


def check_parity(case: Case, arch: str, layout: str, record_property) -> float:
  """Converts the layout's file (arch and top inferred) and runs it."""
  src = case.files[layout]
  converted, prov = weights.load_file(src)
  assert (prov["arch"], prov["include_top"]) == (arch, case.include_top)
  assert prov["layout"] == READ_AS[layout]
  assert set(converted.variables) == {"params", "batch_stats"}
  # Every array, BN moving statistics included, bit for bit.
  got = flaxtl_arrays(converted.variables)
  assert set(got) == set(case.arrays)
  for name, arrays in case.arrays.items():
    for a, b in zip(got[name], arrays):
      np.testing.assert_array_equal(a, b)
  out = apply_fn(arch, case.include_top, converted.num_classes)(
    converted.variables, case.x
  )
  out = np.asarray(out)
  assert out.shape == case.want.shape
  assert np.ptp(case.want) > 0  # Not a degenerate (constant) output.
  rel = float(np.abs(out - case.want).max() / np.abs(case.want).max())
  record_property("max_rel_diff", rel)
  assert rel <= TOL, rel
  return rel


def run_cli_error(capsys, *argv) -> str:
  """Runs the convert CLI; asserts exit 2 and one `error:` line; returns it."""
  with pytest.raises(SystemExit) as e:
    convert.main([str(a) for a in argv])
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert e.value.code == 2
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]
