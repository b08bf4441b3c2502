"""Pooled backbone features for probes: extracted once, cached as npz.

A cache entry is keyed by (arch, options, weights fingerprint, layer, data
fingerprint, image size, preprocessing, pooling). The weights fingerprint is
the sha256 of a converted checkpoint's provenance.json (which lists the
sha256 of every file orbax wrote) or of a weight file, so a changed file
recomputes; 'random' is keyed by its seed. Nothing is loaded on a cache hit.

Pooling: NHWC maps (rank 4) -> mean over H, W; token sequences (B, T, D) ->
the class token (token 0, `token_pool='cls'`) or the mean over tokens
('mean'); (B, D) passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from flaxtl import data, files, weights
from flaxtl.errors import UserError
from flaxtl.models import common, registry
from flaxtl.preprocess import prepare_images
from flaxtl.weights import convert, store

log = logging.getLogger(__name__)

CACHE_VERSION = 1
BATCH_SIZE = 32  # As flaxtl.train.features: best CPU throughput at 64x64.
PIXELS = "pixels"  # The raw-pixel baseline's arch (and its only layer).
PIXEL_SIZE = 32  # Pixels are read at 32x32 RGB (3,072 values), in [0, 1].
RANDOM = "random"  # A randomly initialised copy of the arch (seeded).
TOKEN_POOLS = ("cls", "mean")

# How many forward passes over a data set ran (tests check cache reuse).
STATS = {"extractions": 0, "batches": 0}
# Compiled forwards by (backbone, layers, size, pooling): a train and a test
# set (and every data set of the suite) reuse one compilation per shape.
_FORWARDS: dict[tuple, list] = {}


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A backbone ready to extract: its fingerprint, and a loader run only on
  a cache miss."""

  arch: str
  weights: str
  fingerprint: str
  options: dict
  load: Callable[[], dict | None]  # Pretrained variables (None: fresh init).
  seed: int = 0

  @property
  def preprocess(self) -> str:
    return "unit" if self.arch == PIXELS else registry.get(self.arch).preprocess


def resolve(
  arch: str,
  spec: str,
  *,
  options: dict | None = None,
  seed: int = 0,
  weights_dir: str | Path | None = None,
  cache_dir: str | Path | None = None,
) -> Backbone:
  """--arch/--weights -> a Backbone, resolving weights as training does
  (`flaxtl.weights.resolve`: 'hed', 'imagenet', a checkpoint, a file)."""
  options = dict(options or {})
  if arch == PIXELS:
    return Backbone(PIXELS, "none", "pixels", {}, lambda: None)
  spec_obj = registry.get(arch)
  if spec.lower() in (RANDOM, "none"):
    return Backbone(arch, RANDOM, f"random-seed{seed}", options, lambda: None)
  if spec in weights.NAMED:
    path = weights.fetch(
      spec,
      arch,
      False,
      weights_dir=weights_dir,
      cache_dir=cache_dir,
      options=options or None,
    )
  else:
    path = Path(spec)
  if path.is_dir():
    prov = store.read_provenance(path)
    if prov.get("arch") != arch:
      raise UserError(
        f"--weights {spec}: holds {prov.get('arch')}, not --arch {arch}"
      )
    digest = files.file_hash(path / store.PROVENANCE)
    merged = {**prov.get("options", {}), **options}
    spec_obj.check_options(merged)
    return Backbone(
      arch,
      spec,
      digest,
      merged,
      lambda: store.restore_variables(path),
      seed,
    )
  if not path.is_file():
    raise UserError(
      f"--weights {spec!r}: neither 'random', {weights.NAMED}, a converted "
      "checkpoint directory nor a weight file"
    )

  def load_file() -> dict:
    converted, _ = convert.load_file(path, arch, include_top=None)
    return converted.variables

  return Backbone(arch, spec, files.file_hash(path), options, load_file, seed)


def layers_of(backbone: Backbone) -> list[str]:
  """Every layer a probe may read, in forward order."""
  if backbone.arch == PIXELS:
    return [PIXELS]
  return registry.get(backbone.arch).outputs(
    include_top=False, **backbone.options
  )


def default_layer(backbone: Backbone) -> str:
  if backbone.arch == PIXELS:
    return PIXELS
  return registry.get(backbone.arch).feature_layer


def check_layers(backbone: Backbone, layers: Sequence[str]) -> list[str]:
  known = layers_of(backbone)
  for layer in layers:
    if layer not in known:
      shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
      raise UserError(
        f"--layers: {backbone.arch} has no layer {layer!r} (it has {shown}; "
        f"{len(known)} in all)"
      )
  return sorted(set(layers), key=known.index)


def pool(x: jax.Array, token_pool: str = "cls") -> jax.Array:
  """(B, H, W, C) -> mean over H, W; (B, T, D) -> token 0 or mean; (B, D)."""
  if x.ndim == 4:
    return jnp.mean(x, axis=(1, 2))
  if x.ndim == 3:
    return x[:, 0] if token_pool == "cls" else jnp.mean(x, axis=1)
  if x.ndim == 2:
    return x
  return x.reshape(x.shape[0], -1)


def pooling_note(arch: str, token_pool: str = "cls") -> str:
  """What `pool` does for `arch`, for the report."""
  if arch == PIXELS:
    return f"raw pixels at {PIXEL_SIZE}x{PIXEL_SIZE} RGB, scaled to [0, 1]"
  what = "class token" if token_pool == "cls" else "mean over tokens"
  return f"NHWC maps: global average; token sequences: {what}"


def cache_key(
  backbone: Backbone,
  layer: str,
  ds: data.Dataset,
  image_size: int,
  token_pool: str,
) -> str:
  meta = {
    "version": CACHE_VERSION,
    "arch": backbone.arch,
    "options": backbone.options,
    "weights": backbone.fingerprint,
    "layer": layer,
    "data": ds.fingerprint(),
    "examples": len(ds),
    "size": PIXEL_SIZE if backbone.arch == PIXELS else image_size,
    "preprocess": backbone.preprocess,
    "pool": token_pool,
  }
  blob = json.dumps(meta, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:24]


def _safe(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def extract(
  backbone: Backbone,
  layers: Sequence[str],
  ds: data.Dataset,
  *,
  image_size: int,
  cache_dir: str | Path,
  split: str = "data",
  token_pool: str = "cls",
  progress: bool = True,
) -> dict[str, np.ndarray]:
  """{layer: (N, D) float32} pooled features, from the cache when present."""
  cache_dir = Path(cache_dir)
  out, todo = {}, []
  paths = {}
  for layer in layers:
    key = cache_key(backbone, layer, ds, image_size, token_pool)
    tag = _safe(f"{backbone.arch}-{layer}")
    paths[layer] = cache_dir / f"{split}-{tag}-{key}.npz"
    if paths[layer].exists():
      with np.load(paths[layer]) as z:
        out[layer] = z["features"]
      log.info("features: cache hit %s", paths[layer])
    else:
      todo.append(layer)
  if not todo:
    return out
  if backbone.arch == PIXELS:
    size, forwards = PIXEL_SIZE, [lambda x: {PIXELS: _pixels(x)}]
  else:
    size = image_size
    key = (
      backbone.arch,
      backbone.fingerprint,
      json.dumps(backbone.options, sort_keys=True, default=str),
      tuple(todo),
      image_size,
      token_pool,
    )
    if key not in _FORWARDS:
      _FORWARDS.clear()  # One backbone's variables held at a time.
      _FORWARDS[key] = _forwards(backbone, todo, image_size, token_pool)
    forwards = _FORWARDS[key]
  STATS["extractions"] += 1
  got = {layer: [] for layer in todo}
  bar = tqdm(
    total=len(ds),
    desc=f"{backbone.arch}:{backbone.weights} {split}",
    unit="img",
    disable=not progress,
    file=sys.stderr,
    leave=False,
  )
  opts = data.Options(model_size=size)
  with bar:
    for batch in data.eval_batches(ds, BATCH_SIZE, options=opts):
      STATS["batches"] += 1
      mask = batch["mask"]
      for fn in forwards:
        for name, feats in fn(batch["image"]).items():
          got[name].append(np.asarray(feats, np.float32)[mask])
      bar.update(int(mask.sum()))
  cache_dir.mkdir(parents=True, exist_ok=True)
  for layer in todo:
    feats = np.concatenate(got[layer])
    with files.atomic_path(paths[layer], suffix=".npz") as tmp:
      np.savez(tmp, features=feats)
    out[layer] = feats
  return out


@jax.jit
def _pixels(x: jax.Array) -> jax.Array:
  x = prepare_images(x, PIXEL_SIZE, "unit")
  return x.reshape(x.shape[0], -1)


def _forwards(
  backbone: Backbone, layers: list[str], image_size: int, token_pool: str
) -> list[Callable[[np.ndarray], dict[str, jax.Array]]]:
  """One jitted forward per group of layers: a single pass returning all of
  them where the family has `return_layers`, else one pass per layer."""
  spec = registry.get(backbone.arch)
  pretrained = backbone.load()
  opts = dict(include_top=False, **backbone.options)
  if "return_layers" in spec.options and len(layers) > 1:
    groups = [layers]  # Forward order: stop at the last one.
  else:
    groups = [[layer] for layer in layers]
  forwards = []
  for names in groups:
    extra = {"return_layers": tuple(names)} if len(names) > 1 else {}
    model = spec.create(output_layer=names[-1], **opts, **extra)
    variables = _variables(model, image_size, pretrained, backbone.seed)
    forwards.append(
      _forward(model, variables, names, image_size, spec.preprocess, token_pool)
    )
  return forwards


def _variables(
  model, image_size: int, pretrained: dict | None, seed: int
) -> dict:
  """A fresh init (seeded) with the pretrained variables merged in strictly."""
  fresh = common.init_variables(model, image_size, jax.random.PRNGKey(seed))
  if pretrained is None:
    return fresh
  merged, _ = weights.merge_pretrained(
    {c: {"backbone": v} for c, v in fresh.items()},
    pretrained,
    into="backbone",
  )
  return {c: v["backbone"] for c, v in merged.items()}


def _forward(
  model,
  variables: dict,
  names: list[str],
  image_size: int,
  mode: str,
  token_pool: str,
) -> Callable[[np.ndarray], dict[str, jax.Array]]:
  @jax.jit
  def fn(v: dict, x: jax.Array) -> dict[str, jax.Array]:
    y = model.apply(v, prepare_images(x, image_size, mode), train=False)
    if isinstance(y, tuple):  # (output, {name: activation}).
      return {n: pool(a, token_pool) for n, a in y[1].items()}
    return {names[0]: pool(y, token_pool)}

  return lambda x: fn(variables, x)
