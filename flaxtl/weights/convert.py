"""Keras or PyTorch weight file -> flaxtl variables -> orbax checkpoint.

PyTorch files (.pth/.pt zip or legacy pickle, .safetensors) are told from
Keras files by their first bytes and go to the TORCH mappings; the rest to
the KERAS ones. A TORCH mapping may also read layouts of its own
(`read_source(path)`: directories, .npz, .onnx) and rename state dicts of
other namings to its own (`adopt(weights)`); both give TorchWeights.
The family is taken from `arch` when given, otherwise detected: each
family's mapping (`flaxtl.weights.mappings`) says whether the file holds
one of its architectures. A file of another family than the one asked for
is an error that names what it holds.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from flaxtl import files, tree
from flaxtl.errors import UserError
from flaxtl.models import registry
from flaxtl.weights import keras_file, mappings, store, torch_file
from flaxtl.weights.converted import Converted

log = logging.getLogger(__name__)


Weights = keras_file.KerasWeights | torch_file.TorchWeights


def _family_mappings(weights: Weights) -> dict:
  if isinstance(weights, torch_file.TorchWeights):
    return mappings.TORCH
  return mappings.KERAS


def detect(weights: Weights) -> str | None:
  """The architecture the file holds, if exactly one family recognises it."""
  found = [
    a for m in _family_mappings(weights).values() if (a := m.detect(weights))
  ]
  return found[0] if len(found) == 1 else None


def to_variables(
  weights: Weights,
  arch: str | None = None,
  include_top: bool | None = None,
) -> Converted:
  """Maps the file's tensors onto `arch` (detected when None)."""
  found = detect(weights)
  if arch is None:
    if found is None:
      raise UserError(
        f"{weights.path}: cannot tell which architecture it holds; "
        f"pass --arch (one of {registry.names()})"
      )
    arch = found
  family = registry.get(arch).family
  # Named both ways, not as the missing layers of the one asked for (Keras
  # families' own mappings name a sibling arch: 'holds a VGG19 conv stack').
  other = found is not None and found != arch
  if other and (
    isinstance(weights, torch_file.TorchWeights)
    or registry.get(found).family != family
  ):
    raise UserError(
      f"{weights.path}: holds a {found} model, not {arch}; use --arch {found}"
    )
  if isinstance(weights, torch_file.TorchWeights):
    if family not in mappings.TORCH:
      raise UserError(
        f"{weights.path}: a PyTorch file, but {arch} has no PyTorch weight "
        f"mapping; PyTorch-named architectures: {torch_archs()}"
      )
    return mappings.TORCH[family].from_torch(weights, arch, include_top)
  if family not in mappings.KERAS:
    raise UserError(
      f"{weights.path}: a Keras file, but {arch} has no Keras weight mapping "
      f"(its weights come from PyTorch files)"
    )
  return mappings.KERAS[family].from_keras(weights, arch, include_top)


def torch_archs() -> list[str]:
  return [a for f in mappings.TORCH for a in registry.names(f)]


def read(path: str | Path) -> Weights:
  """A Keras or PyTorch file's weights, told apart by their first bytes (or
  a layout a mapping reads itself)."""
  path = Path(path)
  for m in mappings.TORCH.values():
    own = getattr(m, "read_source", None)
    if own is not None and (weights := own(path)) is not None:
      return weights
  if path.is_file() and path.stat().st_size:
    try:
      is_torch = torch_file.sniff(path) is not None
    except OSError as e:
      raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    if is_torch:
      return _adopt(torch_file.read(path))
  return keras_file.read(path)


def _adopt(weights: torch_file.TorchWeights) -> torch_file.TorchWeights:
  """The state dict in the naming of the mapping that recognises it."""
  for m in mappings.TORCH.values():
    adopt = getattr(m, "adopt", None)
    if adopt is not None and (renamed := adopt(weights)) is not None:
      return renamed
  return weights


def check_finite(path: str | Path, variables: dict) -> None:
  """Refuses NaN/Inf weights, naming the first array that holds them.

  They would pass silently otherwise: every prediction NaN, training stopped
  at its first step with advice about the learning rate.
  """
  bad = []
  for name, leaf in tree.flatten(variables).items():
    a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.inexact):
      count = a.size - int(np.count_nonzero(np.isfinite(a)))
      if count:
        bad.append((name, count, a.size))
  if bad:
    name, count, size = bad[0]
    more = f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else ""
    raise UserError(
      f"{path}: array {name!r} holds {count} NaN/Inf of {size} values{more}; "
      "the file is damaged or was saved after training diverged (pass "
      "--allow-nonfinite to python -m flaxtl.convert to keep them)"
    )


def load_file(
  path: str | Path,
  arch: str | None = None,
  include_top: bool | None = None,
  allow_nonfinite: bool = False,
) -> tuple[Converted, dict]:
  """Reads and maps a weight file; returns the variables and provenance."""
  weights = read(path)
  converted = to_variables(weights, arch, include_top)
  if not allow_nonfinite:
    check_finite(path, converted.variables)
  if isinstance(weights, torch_file.TorchWeights):
    if converted.skipped:
      log.info(
        "skipped %d file tensors the model does not use (%s ...)",
        len(converted.skipped),
        ", ".join(converted.skipped[:3]),
      )
    return converted, {
      **_provenance(path, weights.layout, converted),
      "torch_wrapper": weights.wrapper,
      "torch_prefix": weights.prefix,
      "torch_metadata": weights.metadata,
    }
  return converted, {
    **_provenance(path, weights.layout, converted),
    "keras_version": weights.keras_version,
    "keras_backend": weights.backend,
  }


def _provenance(path: str | Path, layout: str, converted: Converted) -> dict:
  return {
    "source_file": str(Path(path).resolve()),
    "source_sha256": _source_hash(Path(path)),
    "layout": layout,
    "mapping": converted.mapping,
    "arch": converted.arch,
    "include_top": converted.include_top,
    "num_classes": converted.num_classes,
    "options": converted.options,
    "skipped_file_layers": converted.skipped,
  }


def _source_hash(path: Path) -> str:
  """A file's sha256; a directory's: of its files' names and sha256s."""
  if not path.is_dir():
    return files.file_hash(path, "sha256")
  h = hashlib.sha256()
  for f in sorted(p for p in path.rglob("*") if p.is_file()):
    h.update(f"{f.relative_to(path)} {files.file_hash(f)}\n".encode())
  return h.hexdigest()


def convert_file(
  src: str | Path,
  out: str | Path,
  arch: str | None = None,
  include_top: bool | None = None,
  force: bool = False,
  extra_provenance: dict | None = None,
  allow_nonfinite: bool = False,
) -> Path:
  """Converts a Keras or PyTorch file into a checkpoint directory at `out`."""
  converted, provenance = load_file(src, arch, include_top, allow_nonfinite)
  provenance.update(extra_provenance or {})
  return store.save(converted.variables, out, provenance, force=force)
