"""PEFT runs on disk: merged run directories, adapter-only checkpoints.

`merge` folds every low-rank update into its kernel and writes a normal run
directory (peft.method 'none'). `export` writes what the run trained (adapters,
head, trained biases / norms and the statistics of BN layers that ran in
training mode) plus peft.json, whose `base_sha256` hashes every other variable:
the base the adapters belong to. `apply` puts an export back onto a base run
directory and refuses a base whose hash differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from flaxtl import files, tree, weights
from flaxtl.errors import UserError
from flaxtl.peft import core
from flaxtl.predict import load_run
from flaxtl.train import checkpoint, setup

FORMAT = 1
MANIFEST = "peft.json"
ADAPTERS = "adapters"
RUN_FILES = ("class_names.json", "weights_provenance.json")


def _fresh_out(out: Path) -> None:
  if out.exists():
    raise UserError(f"--out {out}: already exists; give a new directory")


def _load_peft_run(workdir: Path):
  config, class_names, model, variables = load_run(workdir)
  if not core.methods(config):
    raise UserError(
      f"{workdir}: not a PEFT run (its config has peft.method 'none')"
    )
  return config, class_names, model, variables


def _write_run(
  tmp: Path, config, variables: dict, src: Path, extra: dict
) -> None:
  files.write_text(
    tmp / "config.json", config.to_json_best_effort(indent=2) + "\n"
  )
  for name in RUN_FILES:
    if (src / name).is_file():
      (tmp / name).write_bytes((src / name).read_bytes())
  files.write_json(tmp / "peft_record.json", extra)
  checkpoint.save_final(tmp, variables)


def merge(workdir: Path, out: Path) -> dict:
  """A normal run directory with the updates folded in and no adapters."""
  _fresh_out(out)
  config, _, model, variables = _load_peft_run(workdir)
  if "prompt" in model.spec.methods:
    raise UserError(
      f"{workdir}: prompt tokens (peft.method 'prompt') are inputs, not "
      "weight updates; they cannot be merged (use export)"
    )
  params = model.merged_params(variables["params"])
  merged = {**variables, "params": jax.device_get(params)}
  plain = config.copy_and_resolve_references()
  with plain.unlocked():
    plain.peft.method = "none"
  with files.atomic_dir(out) as tmp:
    _write_run(tmp, plain, merged, workdir, {"merged_from": str(workdir)})
  n = len(model.spec.lora)
  print(f"merged {n} low-rank updates of {workdir} into {out}")
  return {"merged": n, "out": str(out)}


def _split(config, variables: dict) -> tuple[dict, dict]:
  """({collection: {path: array}} trained, the same for the base)."""
  params = variables["params"]
  phases = [k for _, k in sorted(config.freeze.phases)]
  first = phases[-1] if phases else int(config.freeze.first_layers)
  plan = setup.freeze_plan(config, params, first, log_matches=False)
  trained = set(plan.trainable_paths())
  stats = variables.get("batch_stats", {})
  inference = setup.train_mode(config, plan, stats).bn_inference
  ours: dict = {"params": {}, "batch_stats": {}}
  base: dict = {"params": {}, "batch_stats": {}}
  for path, a in tree.flatten(params).items():
    (ours if path in trained else base)["params"][path] = np.asarray(a)
  for path, a in tree.flatten(stats).items():
    side = base if tree.layer_of(path) in inference else ours
    side["batch_stats"][path] = np.asarray(a)
  return ours, base


def base_hash(base: dict) -> str:
  """sha256 over every base variable's path, dtype, shape and bytes."""
  h = hashlib.sha256()
  for collection in sorted(base):
    for path in sorted(base[collection]):
      a = np.ascontiguousarray(base[collection][path])
      h.update(f"{collection}/{path}:{a.dtype.str}:{a.shape};".encode())
      h.update(a.tobytes())
  return h.hexdigest()


def export(workdir: Path, out: Path) -> dict:
  """An adapter-only orbax checkpoint bound to its base by sha256."""
  _fresh_out(out)
  config, class_names, _, variables = _load_peft_run(workdir)
  ours, base = _split(config, variables)
  provenance = {}
  if (workdir / "weights_provenance.json").is_file():
    provenance = json.loads((workdir / "weights_provenance.json").read_text())
  manifest = {
    "format": FORMAT,
    "arch": config.model.arch,
    "methods": list(core.methods(config)),
    "base_sha256": base_hash(base),
    "base_paths": {c: sorted(v) for c, v in base.items()},
    "base_workdir": str(workdir),
    "base_weights": (provenance or {}).get("source")
    or (provenance or {}).get("source_file"),
    "base_source_sha256": (provenance or {}).get("source_sha256"),
    "class_names": class_names,
    "config": json.loads(config.to_json_best_effort()),
  }
  saved = {c: tree.nested(v) for c, v in ours.items() if v}
  with files.atomic_dir(out) as tmp:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save((tmp / ADAPTERS).absolute(), saved)
    ckptr.wait_until_finished()
    files.write_json(tmp / MANIFEST, manifest)
  size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
  n = sum(int(np.size(a)) for v in ours.values() for a in v.values())
  print(
    f"exported {n:,} trained values ({size / 1e6:.2f} MB) of {workdir} to "
    f"{out}; base sha256 {manifest['base_sha256'][:12]}"
  )
  return {"values": n, "bytes": size, "base_sha256": manifest["base_sha256"]}


def apply(adapters: Path, base_dir: Path, out: Path) -> dict:
  """A run directory: base_dir's base variables plus the exported ones."""
  _fresh_out(out)
  manifest_file = adapters / MANIFEST
  if not manifest_file.is_file():
    raise UserError(f"{adapters}: no {MANIFEST}; not a flaxtl.peft export")
  manifest = json.loads(manifest_file.read_text())
  if manifest.get("format") != FORMAT:
    raise UserError(f"{manifest_file}: format {manifest.get('format')!r}")
  have = {
    c: tree.flatten(weights.restore_to_host(base_dir / c))
    for c in ("params", "batch_stats")
    if (base_dir / c).is_dir()
  }
  base = {
    c: {p: have.get(c, {}).get(p) for p in paths}
    for c, paths in manifest["base_paths"].items()
  }
  missing = [p for c in base for p, a in base[c].items() if a is None]
  got = "missing " + missing[0] if missing else base_hash(base)
  if got != manifest["base_sha256"]:
    raise UserError(
      f"{adapters} was trained on base sha256 {manifest['base_sha256']} "
      f"({manifest.get('base_workdir')}), but {base_dir} has base {got}; "
      "refusing to load adapters onto a different base"
    )
  ours = weights.restore_to_host((adapters / ADAPTERS).absolute())
  variables = {}
  for c in ("params", "batch_stats"):
    flat = {**base.get(c, {}), **tree.flatten(ours.get(c, {}))}
    if flat:
      variables[c] = tree.nested(flat)
  config = ml_collections.ConfigDict(manifest["config"])
  with files.atomic_dir(out) as tmp:
    _write_run(
      tmp, config, variables, base_dir, {"adapters_from": str(adapters)}
    )
    files.write_json(tmp / "class_names.json", manifest["class_names"])
  print(f"applied {adapters} onto {base_dir}: wrote {out}")
  return {"out": str(out)}
