"""The backbone contract, over every registered arch (shapes only: seconds).

What the rest of flaxtl relies on: the layer list is the parameter owners in
forward order (freezing counts it), the taps see every listed output, a cut
model has no parameters past its cut, the stages are where the registry
says, and no other family's mapping claims this family's variables.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from flaxtl import models, tree
from flaxtl.models import checkpoints, registry
from flaxtl.weights import mappings
from flaxtl.weights.torch_file import TorchWeights

ARCHS = models.names()


def _x(size: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)


def _params(model, size: int) -> dict:
  init = functools.partial(model.init, jax.random.PRNGKey(0))
  return jax.eval_shape(init, _x(size))["params"]


def _owners(params: dict) -> list[str]:
  """The layers holding parameters, in the order the model created them."""
  return tree.layers("/".join(k) for k, _ in tree.items(params))


@functools.cache
def _build(arch: str):
  spec = models.get(arch)
  size = spec.input_size(include_top=False)
  return spec, size, _params(spec.create(include_top=False), size)


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_are_the_parameter_owners_in_forward_order(arch):
  spec, _, params = _build(arch)
  listed = spec.layers(include_top=False)

  def owner(path: str) -> str | None:  # A Keras Sequential owns its layers.
    parts = path.split("/")
    for i in range(len(parts), 0, -1):
      if "/".join(parts[:i]) in listed:
        return "/".join(parts[:i])
    return None

  owners = [owner(p) for p in _owners(params)]
  assert None not in owners
  assert tree.unique(owners) == [n for n in listed if n in set(owners)]


@pytest.mark.parametrize("arch", ARCHS)
def test_taps_see_every_output_and_a_cut_has_no_later_parameters(arch):
  spec, size, params = _build(arch)
  outputs = spec.outputs(include_top=False)
  model = spec.create(include_top=False, return_layers=tuple(outputs))
  got = jax.eval_shape(
    lambda v, x: model.apply(v, x), {"params": params}, _x(size)
  )
  assert list(got) == outputs
  owners = _owners(params)
  weighted = [o for o in outputs if o in owners]
  for cut in {weighted[0], weighted[len(weighted) // 2]}:
    cut_params = _params(spec.create(include_top=False, output_layer=cut), size)
    kept = _owners(cut_params)
    assert kept[-1] == cut
    assert kept == owners[: owners.index(cut) + 1]


@pytest.mark.parametrize("arch", ARCHS)
def test_stages_have_their_stride_and_channels(arch):
  spec = models.get(arch)
  stages = spec.stages()
  assert [s.stride for s in stages] == sorted({s.stride for s in stages})
  assert stages[-1].stride >= 8
  names = tuple(s.name for s in stages)
  model = spec.create(include_top=False, return_layers=names)
  size = registry.STAGE_SIZE
  params = _params(model, size)
  got = jax.eval_shape(
    lambda v, x: model.apply(v, x), {"params": params}, _x(size)
  )
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
  spec, _, params = _build(arch)
  weights = TorchWeights(
    path=None, layout="torch_zip", tensors=_torch_keys(params), wrapper=None
  )
  claims = {
    family: m.detect(weights)
    for family, m in mappings.TORCH.items()
    if family != spec.family
  }
  assert not any(claims.values()), claims


def test_every_pretrained_record_names_a_registered_arch_and_its_options():
  for r in checkpoints.records():
    spec = models.get(r.arch)
    assert set(r.options) <= set(spec.options), r
    assert checkpoints.find(r.arch, r.tag, dict(r.options)) is r
    assert r.has_top(True) == r.include_top
