"""Reads a Hugging Face model directory: config.json and its weight files.

Weights: `model.safetensors`, `pytorch_model.bin` (torch.save zip or legacy
pickle), or their sharded forms listed in `*.index.json`; every file is read
by `torch_file` (no torch, no pickle code run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from flaxtl.errors import UserError
from flaxtl.weights import torch_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
MAX_CONFIG_BYTES = 16 << 20  # A config.json is a few kB; refuse a huge one.


def read_config(path: Path) -> dict[str, Any]:
  cfg = path / "config.json"
  if not cfg.is_file():
    raise UserError(f"{path}: no config.json (not a Hugging Face model dir)")
  if cfg.stat().st_size > MAX_CONFIG_BYTES:
    raise UserError(f"{cfg}: {cfg.stat().st_size} bytes: not a config file")
  try:
    config = json.loads(cfg.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{cfg}: not valid JSON ({e})") from None
  if not isinstance(config, dict):
    raise UserError(f"{cfg}: expected a JSON object")
  return config


def weight_files(path: Path) -> list[Path]:
  """The directory's weight files, shards in their index's order."""
  for name in WEIGHT_FILES:
    index = path / f"{name}.index.json"
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
      except (KeyError, TypeError, json.JSONDecodeError, AttributeError):
        raise UserError(
          f"{index}: not a weight index (no weight_map)"
        ) from None
      for shard in shards:
        if Path(shard).name != shard:  # No '../' escapes from the directory.
          raise UserError(f"{index}: shard name {shard!r} is not a file name")
      return [path / s for s in shards]
    if (path / name).is_file():
      return [path / name]
  raise UserError(
    f"{path}: no model.safetensors or pytorch_model.bin (nor a sharded index)"
  )


def read(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(every tensor by its key, config.json) of a Hugging Face model dir."""
  path = Path(path)
  config = read_config(path)
  tensors: dict[str, np.ndarray] = {}
  for f in weight_files(path):
    tensors.update(torch_file.read(f).tensors)
  return tensors, config
