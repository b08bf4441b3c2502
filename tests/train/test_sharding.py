"""FSDP-style sharding rules, sharded runs against unsharded, other meshes.

The rules are checked on abstract meshes (no devices needed); the runs go
through launch.py on 8 virtual CPU devices in subprocesses, so this process
keeps its single device.
"""

import re
import shutil

import jax
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from configs import base
from flaxtl import tree
from flaxtl.errors import UserError
from flaxtl.train import checkpoint, optim, setup, sharding
from flaxtl.train import config as config_lib
from tests.train.test_distributed import _losses, _params, _run

MESH8 = AbstractMesh((8, 1), sharding.AXES)
SHARDED = ["--config.sharding.min_kib=0", "--config.checkpoint_every_steps=10"]
STEPS = ["--config.total_steps=20"]


def _spec(shape, rules=((".*", "fsdp"),), min_bytes=0, mesh=MESH8):
  return sharding.spec_for(
    "a/kernel", shape, 4 * np.prod(shape), mesh, rules, min_bytes
  )


def test_fsdp_shards_the_largest_axis_the_data_axis_divides():
  assert _spec((5, 5, 32, 64)) == P(None, None, None, "data")
  assert _spec((1024, 500)) == P("data")  # 500 does not split 8 ways.
  assert _spec((5, 5, 32, 32)) == P(None, None, None, "data")  # Tie: last.
  assert _spec((500, 500)) == P()  # Nothing divides: replicated.
  assert _spec((10,)) == P()
  assert _spec(()) == P()
  assert _spec((1024, 512), min_bytes=4 * 1024 * 512 + 1) == P()  # Small.
  one = AbstractMesh((1, 1), sharding.AXES)
  assert _spec((1024, 512), mesh=one) == P()


def test_explicit_rules_first_match_wins_and_bad_ones_name_the_rule():
  mesh = AbstractMesh((4, 2), sharding.AXES)
  rules = ((".*/bias", "replicate"), (".*", (None, "model")))
  assert _spec((64, 32), rules, mesh=mesh) == P(None, "model")
  assert sharding.spec_for("a/bias", (64,), 256, mesh, rules, 0) == P()
  assert _spec((64, 32), (("b/.*", "fsdp"),), mesh=mesh) == P()  # No match.
  with pytest.raises(UserError, match=r"sharding.rules\[1\].*shape \(64, 3\)"):
    _spec((64, 3), rules, mesh=mesh)
  with pytest.raises(UserError, match=r"has 2 axes but a/kernel"):
    _spec((64,), rules, mesh=mesh)


@pytest.fixture(scope="module")
def vgg16():
  """VGG16's abstract params (138M) and an Adam state with a frozen prefix."""
  c = base.get_base()
  c.model.weights = "none"
  c.optim.name = "adam"
  model = setup.build_model(c, 10)
  params = setup.abstract_variables(model, 224, jax.random.key(0))["params"]
  c.freeze.rules = (("backbone/block[12]_.*", "frozen"),)
  plan = setup.freeze_plan(c, params, 0, log_matches=False)
  tx, _ = optim.make_optimizer(c.optim, plan, 100)
  return c, params, jax.eval_shape(tx.init, params), plan


def _placed(abstract, shardings):
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abstract,
    shardings,
  )


def test_default_rules_put_an_eighth_of_vgg16_on_each_of_8_devices(vgg16):
  c, params, opt_state, _ = vgg16
  shardings = sharding.from_config(params, MESH8, c.sharding)
  per_device, whole = sharding.bytes_per_device(_placed(params, shardings))
  assert whole > 500 * 2**20
  assert 1 / 8 <= per_device / whole < 1 / 8 + 0.001, per_device / whole
  opt = sharding.like_params(opt_state, params, shardings, MESH8)
  per_device, whole = sharding.bytes_per_device(_placed(opt_state, opt))
  assert 1 / 8 <= per_device / whole < 1 / 8 + 0.001, per_device / whole


def test_optimiser_state_is_sharded_like_its_params(vgg16):
  c, params, opt_state, plan = vgg16
  shardings = tree.flatten(sharding.from_config(params, MESH8, c.sharding))
  opt = tree.flatten(
    sharding.like_params(opt_state, params, tree.nested(shardings), MESH8)
  )
  moments = [p for p in opt if re.search(r"/(mu|nu)/", p)]
  # Adam's moments for the trainable params only (frozen ones: MaskedNode).
  assert 0 < len(plan.trainable_paths()) < len(shardings)
  assert len(moments) == 2 * len(plan.trainable_paths())
  for path in moments:
    param = re.split(r"/(?:mu|nu)/", path)[1]
    assert opt[path] == shardings[param], path
  assert any(not s.is_fully_replicated for s in opt.values())
  counts = [s for p, s in opt.items() if p.endswith("count")]
  assert counts and all(s.spec == P() for s in counts)


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("mesh.shape", (8,), "mesh.shape=(8,) must be (data, model)"),
    ("mesh.shape", (-1, -1), "or one of them -1"),
    ("mesh.shape", (0, 1), "each >= 1"),
    ("sharding.rules", (("(", "fsdp"),), "bad regex"),
    ("sharding.rules", ((".*", "data"),), "spec must be"),
    ("sharding.rules", ((".*", ("data", "data")),), "each axis at most once"),
    ("sharding.rules", ((".*",),), "must be a (regex, spec) pair"),
    ("sharding.min_kib", -1.0, "sharding.min_kib=-1.0 is out of range"),
  ],
)
def test_bad_mesh_and_sharding_keys_are_config_errors(key, value, message):
  c = base.get_base()
  group, name = key.split(".")
  c[group][name] = value
  with pytest.raises(UserError, match=re.escape(message)):
    config_lib.validate(c)


def test_mesh_shape_must_use_every_device():
  assert sharding.mesh_shape((-1, 2), 8) == (4, 2)
  assert sharding.mesh_shape((2, -1), 8) == (2, 4)
  with pytest.raises(UserError, match=r"mesh.shape=\(3, 1\) needs 3 devices"):
    sharding.mesh_shape((3, 1), 8)
  with pytest.raises(UserError, match="3 does not divide the 8 devices"):
    sharding.mesh_shape((-1, 3), 8)


@pytest.fixture(scope="module")
def unsharded(module_tmp):
  workdir = module_tmp("unsharded")
  _run(workdir, *STEPS, "--config.checkpoint_every_steps=10")
  return workdir


@pytest.fixture(scope="module")
def fsdp8(module_tmp):
  workdir = module_tmp("fsdp8")
  r = _run(workdir, *STEPS, *SHARDED, devices=8)
  return workdir, r.stdout


def _per_device_fraction(stdout: str) -> float:
  found = re.search(r"params: .* MiB per device of .* MiB \(([0-9.]+);", stdout)
  assert found, stdout
  return float(found.group(1))


@pytest.mark.slow
def test_fsdp_on_8_devices_trains_like_one_device(unsharded, fsdp8):
  workdir, stdout = fsdp8
  assert "mesh data=8, model=1" in stdout
  # Every array but the 10-wide logits bias splits 8 ways.
  assert 0.125 <= _per_device_fraction(stdout) < 0.126
  assert len(_losses(workdir)) == 20
  np.testing.assert_allclose(
    _losses(workdir), _losses(unsharded), rtol=0, atol=1e-5
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
    _params(workdir),
    _params(unsharded),
  )


@pytest.mark.slow
def test_checkpoint_of_8_devices_restores_onto_one_and_onto_two(
  unsharded, fsdp8, tmp_path
):
  workdir, _ = fsdp8
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  mngr = checkpoint.manager(workdir, 2)
  state = checkpoint.restore_state_onto(mngr, 20, one)
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(state["params"]),
    _params(workdir),
  )
  # The loop itself resumes step 10 of the 8-way run on a 2-device mesh.
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir / "checkpoints", resumed / "checkpoints")
  shutil.rmtree(resumed / "checkpoints" / "20")
  r = _run(resumed, *STEPS, *SHARDED, devices=2)
  assert "resumed from step 10" in r.stdout + r.stderr
  assert "mesh data=2, model=1" in r.stdout
  assert _per_device_fraction(r.stdout) == 0.5
  np.testing.assert_allclose(
    _losses(resumed), _losses(unsharded)[10:], rtol=0, atol=1e-5
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
    _params(resumed),
    _params(unsharded),
  )


def test_a_mesh_that_does_not_fit_the_devices_is_a_config_error():
  mesh = sharding.make_mesh((-1, 1))
  assert dict(mesh.shape) == {"data": len(jax.devices()), "model": 1}
  with pytest.raises(UserError, match="needs 2 devices, the job has 1"):
    sharding.make_mesh((2, 1), devices=jax.devices()[:1])
