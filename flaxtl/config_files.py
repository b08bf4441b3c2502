"""Loads `path/to/config.py[:variant]` outside absl flags (study, predict)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
import sys

import ml_collections

from flaxtl.errors import UserError, did_you_mean


def load(spec: str) -> ml_collections.ConfigDict:
  path, _, variant = spec.partition(":")
  file = Path(path)
  if not file.is_file():
    raise UserError(f"{path}: no such config file")
  root = str(file.resolve().parents[1])
  if (
    root not in sys.path
  ):  # Config files import `configs.base` like launch.py does.
    sys.path.insert(0, root)
  module_spec = importlib.util.spec_from_file_location(
    f"_flaxtl_config_{file.stem}", file
  )
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
  except (ValueError, TypeError) as e:
    raise UserError(f"{spec}: {e}") from None
  return config


def leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every settable key of `config`, dotted ('optim.lr', 'model.hidden')."""
  keys = []
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys += leaf_keys(value, f"{prefix}{name}.")
    else:
      keys.append(prefix + name)
  return keys


def unknown_key_message(spec: str | None, overrides: list[str]) -> str:
  """'unknown config key 'optim.lrr'; did you mean 'optim.lr'?' for the
  first `--config.KEY=VALUE` of `overrides` that `spec`'s config lacks."""
  try:
    keys = leaf_keys(load(spec)) if spec else []
  except (UserError, TypeError, AttributeError, SyntaxError):
    keys = []
  for arg in overrides:
    key = arg.removeprefix("--config.").partition("=")[0]
    if keys and key not in keys:
      return f"unknown config key {key!r}{did_you_mean(key, keys)}"
  return f"unknown config key in {' '.join(overrides)}"


def run_name(spec: str) -> str:
  """'configs/mnist_freeze8.py:hed_quick' -> 'mnist_freeze8-hed_quick'."""
  path, _, variant = spec.partition(":")
  return Path(path).stem + (f"-{variant}" if variant else "")


def override(config: ml_collections.ConfigDict, assignment: str) -> None:
  """Applies 'a.b=value' (value parsed as a Python literal when it is one)."""
  key, sep, raw = assignment.partition("=")
  if not sep:
    raise UserError(f"override {assignment!r} is not KEY=VALUE")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  node = config
  *parents, leaf = key.split(".")
  try:
    for p in parents:
      node = node[p]
    current = node[leaf]
  except KeyError:
    hint = did_you_mean(key, leaf_keys(config))
    raise UserError(
      f"override {assignment!r}: unknown config key {key!r}{hint}"
    ) from None
  if (
    isinstance(current, float)
    and isinstance(value, int)
    and not isinstance(value, bool)
  ):
    value = float(value)
  try:
    node[leaf] = value
  except TypeError as e:
    raise UserError(f"override {assignment!r}: {e}") from None
