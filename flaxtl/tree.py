"""Parameter trees as '/'-joined paths: what rules, merges and tables read."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import jax


def path_str(path: tuple) -> str:
  """A jax key path as 'backbone/block1_conv1/kernel'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def flatten(tree: Any) -> dict[str, Any]:
  """{path: leaf} in the tree's (sorted-key) leaf order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(p): leaf for p, leaf in leaves}


def paths(tree: Any) -> list[str]:
  return list(flatten(tree))


def layer_of(path: str) -> str:
  """'backbone/block1_conv1/kernel' -> 'backbone/block1_conv1'."""
  return path.rsplit("/", 1)[0]


def unique(items: Iterable[str]) -> list[str]:
  """`items` without repeats, in first-seen order."""
  return list(dict.fromkeys(items))


def layers(paths_: Iterable[str]) -> list[str]:
  """The layers of these parameter paths, in first-seen order."""
  return unique(layer_of(p) for p in paths_)


def nested(flat: dict[str, Any]) -> dict[str, Any]:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  out: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = out
    *parents, name = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return out


def items(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
  """(key tuple, leaf) pairs of a nested dict, depth first."""
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from items(v, (*prefix, k))
    else:
      yield (*prefix, k), v
