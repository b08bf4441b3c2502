"""The package's layering, read from the source: no cycles, nothing runs
upward, and only `models/` and `weights/` know families and archs."""

from __future__ import annotations

import ast
from pathlib import Path

from flaxtl import models

ROOT = Path(__file__).resolve().parents[1] / "flaxtl"
# Lower layers first; a module may import only its own layer and lower ones.
LAYERS = ("ops", "models", "weights", "data", "peft", "train", "probe")
# Command-line modules inside a package sit above every layer, like the CLIs
# at the top level (flaxtl/predict.py).
CLIS = ("flaxtl.peft.runs", "flaxtl.peft.__main__")
FAMILIES = {models.get(a).family for a in models.names()} | {
  "keras_model",
  "tv_common",
}


def _modules() -> dict[str, ast.Module]:
  out = {}
  for path in ROOT.rglob("*.py"):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    name = ".".join(rel.parts).removesuffix(".__init__")
    out[name] = ast.parse(path.read_text(), str(path))
  return out


def _imports(module: ast.Module, known: set[str]) -> set[str]:
  """Every flaxtl module it imports, at any depth (function-level too):
  `from pkg import mod` is `pkg.mod` where that is a module."""
  out = set()
  for node in ast.walk(module):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      subs = {f"{node.module}.{a.name}" for a in node.names}
      out |= (subs & known) or {node.module}
  return {m for m in out if m.startswith("flaxtl")}


def _layer(name: str) -> int | None:
  if name in CLIS or name.endswith(".__main__"):
    return None
  parts = name.split(".")
  return (
    LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None
  )


def test_no_module_imports_a_higher_layer():
  mods = _modules()
  bad = []
  for name, tree in mods.items():
    mine = _layer(name)
    for dep in _imports(tree, set(mods)):
      theirs = _layer(dep)
      if mine is not None and theirs is not None and theirs > mine:
        bad.append(f"{name} -> {dep}")
  assert not bad


def test_no_import_cycles():
  mods = _modules()
  known = set(mods)
  graph = {
    n: {d for d in _imports(t, known) if d in mods and not n.startswith(d)}
    for n, t in mods.items()
  }
  state: dict[str, int] = {}

  def visit(n, stack):
    state[n] = 1
    for d in graph[n]:
      if state.get(d) == 1:
        raise AssertionError(" -> ".join([*stack, n, d]))
      if d not in state:
        visit(d, [*stack, n])
    state[n] = 2

  for n in graph:
    if n not in state:
      visit(n, [])


def _code_strings(tree: ast.Module) -> set[str]:
  """String constants that are not docstrings."""
  docs = {
    id(n.body[0].value)
    for n in ast.walk(tree)
    if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef)
    and n.body
    and isinstance(n.body[0], ast.Expr)
    and isinstance(n.body[0].value, ast.Constant)
  }
  return {
    n.value
    for n in ast.walk(tree)
    if isinstance(n, ast.Constant)
    and isinstance(n.value, str)
    and id(n) not in docs
  }


def test_only_models_and_weights_name_families_and_archs():
  archs = set(models.names())
  mods = _modules()
  bad = []
  for name, tree in mods.items():
    if name.split(".")[1:2] in (["models"], ["weights"]):
      continue
    for dep in _imports(tree, set(mods)):
      if dep.split(".")[-1] in FAMILIES and ".models." in dep + ".":
        bad.append(f"{name} imports {dep}")
    bad += [f"{name} names {s!r}" for s in _code_strings(tree) & archs]
  assert not bad
