"""The backbone contract, over every registered arch (shapes only: seconds).

What the rest of flaxtl relies on: the layer list is the parameter owners in
forward order (freezing counts it), the taps see every listed output, a cut
model has no parameters past its cut, the stages are where the registry
says, and no other family's mapping claims this family's variables.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from flaxtl import models, tree
from flaxtl.models import checkpoints, keras_model, registry
from flaxtl.weights import mappings
from flaxtl.weights.keras_file import KerasWeights, LayerWeights
from flaxtl.weights.torch_file import TorchWeights

ARCHS = models.names()


def _smallest_per_family() -> list[str]:
  """Each family's arch with the fewest layers: the tracing tests' subjects
  (the layer order and the records are checked on every arch)."""
  best: dict[str, str] = {}
  for a in ARCHS:
    f, n = models.get(a).family, len(models.get(a).outputs(include_top=False))
    if f not in best or n < len(models.get(best[f]).outputs(include_top=False)):
      best[f] = a
  return sorted(best.values())


FAMILY_REPS = _smallest_per_family()


def _x(size: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)


def _variables(model, size: int) -> dict:
  init = functools.partial(model.init, jax.random.PRNGKey(0))
  return jax.eval_shape(init, _x(size))


def _owners(model, size: int) -> tuple[dict, list[str]]:
  """(variables, the layers holding them in the order the forward calls them).

  jax.eval_shape returns dicts in sorted order, so the order is read off the
  module calls themselves.
  """
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":  # Post-order: outputs as they come.
      calls.append("/".join(context.module.path))
    return out

  with nn.intercept_methods(record):
    variables = _variables(model, size)
  owners = set(tree.layers(tree.paths(variables["params"])))
  return variables, tree.unique(c for c in calls if c in owners)


@functools.cache
def _build(arch: str):
  spec = models.get(arch)
  size = spec.input_size(include_top=False)
  return spec, size, *_owners(spec.create(include_top=False), size)


def _owner(path: str, listed: list[str]) -> str | None:
  """The listed layer owning a parameter layer (a Keras Sequential owns the
  layers nested under it)."""
  parts = path.split("/")
  for i in range(len(parts), 0, -1):
    if "/".join(parts[:i]) in listed:
      return "/".join(parts[:i])
  return None


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_are_the_parameter_owners_in_forward_order(arch):
  spec, _, _, owned = _build(arch)
  listed = spec.layers(include_top=False)
  owners = [_owner(p, listed) for p in owned]
  assert None not in owners
  weighted = [n for n in listed if n in set(owners)]
  if spec.naming == "keras":  # Keras lists layers by graph depth (map_graph).
    assert sorted(tree.unique(owners)) == sorted(weighted)
  else:
    assert tree.unique(owners) == weighted


@pytest.mark.parametrize("arch", FAMILY_REPS)
def test_taps_see_every_output_and_a_cut_has_no_later_parameters(arch):
  spec, size, variables, owned = _build(arch)
  outputs = spec.outputs(include_top=False)
  model = spec.create(include_top=False, return_layers=tuple(outputs))
  got = jax.eval_shape(model.apply, variables, _x(size))
  assert set(got) == set(outputs)  # eval_shape sorts the dict.
  owners = tree.unique(_owner(p, outputs) for p in owned)
  for cut in {owners[0], owners[len(owners) // 2]}:
    cut_model = spec.create(include_top=False, output_layer=cut)
    kept = {_owner(p, outputs) for p in _owners(cut_model, size)[1]}
    assert cut in kept
    assert kept <= set(outputs[: outputs.index(cut) + 1])


@pytest.mark.parametrize("arch", FAMILY_REPS)
def test_stages_have_their_stride_and_channels(arch):
  spec = models.get(arch)
  stages = spec.stages()
  assert [s.stride for s in stages] == sorted({s.stride for s in stages})
  assert stages[-1].stride >= 8
  names = tuple(s.name for s in stages)
  model = spec.create(include_top=False, return_layers=names)
  size = registry.STAGE_SIZE
  got = jax.eval_shape(model.apply, _variables(model, size), _x(size))
  for s in stages:
    h, _, c = got[s.name].shape[1:]
    assert c == s.channels and 0.85 * size / s.stride <= h <= -(
      -size // s.stride
    )


def _torch_keys(params: dict) -> dict:
  """A state dict's keys and shapes as this arch's torch file has them."""
  rename = {"kernel": "weight", "scale": "weight"}
  out = {}
  for keys, leaf in tree.items(params):
    *mod, leaf_name = keys
    shape = leaf.shape[::-1] if len(leaf.shape) == 2 else leaf.shape
    if len(leaf.shape) == 4:  # HWIO -> OIHW.
      shape = (leaf.shape[3], leaf.shape[2], *leaf.shape[:2])
    out[".".join([*mod, rename.get(leaf_name, leaf_name)])] = jnp.zeros(
      shape, jnp.float32
    )
  return out


@pytest.mark.parametrize(
  "arch", [a for a in ARCHS if models.get(a).naming == "torch"]
)
def test_other_torch_families_refuse_this_familys_names(arch):
  spec, _, variables, _ = _build(arch)
  tensors = _torch_keys(variables["params"])
  weights = TorchWeights(
    path=None, layout="torch_zip", tensors=tensors, wrapper=None
  )
  claims = {
    family: m.detect(weights)
    for family, m in mappings.TORCH.items()
    if family != spec.family
  }
  assert not any(claims.values()), claims


# One arch per Keras family: every family's detect runs on each.
ONE_PER_KERAS_FAMILY = sorted(
  {models.get(a).family: a for a in reversed(ARCHS)}[f] for f in mappings.KERAS
)


@pytest.mark.parametrize("arch", ONE_PER_KERAS_FAMILY)
def test_other_keras_families_refuse_this_familys_layers(arch):
  """A Keras file of this arch (its layer names and weight shapes, as Keras
  stores them) is claimed by its own family's mapping only."""
  spec = models.get(arch)
  if spec.family == "vgg":
    names = spec.layers(include_top=False)[1:]
    shapes = {n: [(3, 3, 3, 64), (64,)] for n in names if "conv" in n}
  else:
    rec = keras_model.recorded(arch, include_top=False)
    shapes = {n: rec.weights[n] for n in rec.weighted}
  layers = [
    LayerWeights(n, n, [jnp.zeros(sh) for sh in ws]) for n, ws in shapes.items()
  ]
  weights = KerasWeights(path=None, layout="weights_h5", layers=layers)
  claims = {
    family: m.detect(weights)
    for family, m in mappings.KERAS.items()
    if family != spec.family
  }
  assert not any(claims.values()), claims


def test_every_pretrained_record_names_a_registered_arch_and_its_options():
  for r in checkpoints.records():
    spec = models.get(r.arch)
    assert set(r.options) <= set(spec.options), r
    assert checkpoints.find(r.arch, r.tag, dict(r.options)) is r
    assert r.has_top(True) == r.include_top
