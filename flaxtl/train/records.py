"""A run's records in its workdir: the files that describe it, and what a
finished run recorded (so rerunning it reports instead of training again)."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from flaxtl import files


def recorded_summary(workdir: Path, start_step: int, total_steps: int):
  """The recorded results of a run already finished in `workdir`, if any."""
  path = workdir / "summary.json"
  if start_step < total_steps or not path.is_file():
    return None
  try:
    recorded = json.loads(path.read_text())
  except ValueError:
    return None  # Damaged: evaluate again and rewrite it.
  done = recorded.get("step") == start_step and not recorded.get("interrupted")
  return recorded if done else None


def last_record(workdir: Path, split: str) -> dict:
  """The last `split` line of metrics.jsonl ({} if none)."""
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    return {}
  records = [json.loads(line) for line in path.read_text().splitlines() if line]
  found = [r for r in records if r.get("split") == split]
  return found[-1] if found else {}


def write_run_files(
  workdir: Path, config, provenance: dict | None, class_names: list[str]
) -> None:
  if jax.process_index() != 0:
    return
  files.write_text(
    workdir / "config.json", config.to_json_best_effort(indent=2) + "\n"
  )
  files.write_json(workdir / "weights_provenance.json", provenance)
  files.write_json(workdir / "class_names.json", list(class_names))
