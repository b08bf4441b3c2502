"""Keras file -> flaxtl variables -> orbax checkpoint.

The family is taken from `arch` when given, otherwise detected: each family's
mapping (`flaxtl.weights.mappings`) says whether the file holds one of its
architectures. A file of another family than the one asked for is an error
that names what it holds.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flaxtl import files
from flaxtl.errors import UserError
from flaxtl.models import registry
from flaxtl.weights import keras_file, mappings, store
from flaxtl.weights.converted import Converted

log = logging.getLogger(__name__)


def detect(weights: keras_file.KerasWeights) -> str | None:
  """The architecture the file holds, if exactly one family recognises it."""
  found = [a for m in mappings.KERAS.values() if (a := m.detect(weights))]
  return found[0] if len(found) == 1 else None


def to_variables(
  weights: keras_file.KerasWeights,
  arch: str | None = None,
  include_top: bool | None = None,
) -> Converted:
  """Maps the file's layers onto `arch` (detected when None)."""
  found = detect(weights)
  if arch is None:
    if found is None:
      raise UserError(
        f"{weights.path}: cannot tell which architecture it holds; "
        f"pass --arch (one of {registry.names()})"
      )
    arch = found
  family = registry.get(arch).family
  if found is not None and registry.get(found).family != family:
    raise UserError(
      f"{weights.path}: holds a {found} model, not {arch}; use --arch {found}"
    )
  if family not in mappings.KERAS:
    raise UserError(f"{arch}: no Keras weight mapping for the {family} family")
  return mappings.KERAS[family].from_keras(weights, arch, include_top)


def load_file(
  path: str | Path, arch: str | None = None, include_top: bool | None = None
) -> tuple[Converted, dict]:
  """Reads and maps a Keras file; returns the variables and their provenance."""
  weights = keras_file.read(path)
  converted = to_variables(weights, arch, include_top)
  for s in converted.skipped:
    log.info("skipped file layer %s", s)
  provenance = {
    "source_file": str(Path(path).resolve()),
    "source_sha256": files.file_hash(path, "sha256"),
    "layout": weights.layout,
    "mapping": converted.mapping,
    "arch": converted.arch,
    "include_top": converted.include_top,
    "num_classes": converted.num_classes,
    "options": converted.options,
    "keras_version": weights.keras_version,
    "keras_backend": weights.backend,
    "skipped_file_layers": converted.skipped,
  }
  return converted, provenance


def convert_file(
  src: str | Path,
  out: str | Path,
  arch: str | None = None,
  include_top: bool | None = None,
  force: bool = False,
  extra_provenance: dict | None = None,
) -> Path:
  """Converts a Keras file into a checkpoint directory at `out`."""
  converted, provenance = load_file(src, arch, include_top)
  provenance.update(extra_provenance or {})
  return store.save(converted.variables, out, provenance, force=force)
