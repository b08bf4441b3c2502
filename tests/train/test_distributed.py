"""Many devices and many processes (JAX's own machinery) against one."""

import json
import os
from pathlib import Path
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from flaxtl import weights

ROOT = Path(__file__).resolve().parents[2]
RUN = [
  "launch.py",
  "--config",
  "configs/mnist_cnn.py:tiny",
  "--config.progress=False",
  "--config.total_steps=16",
  "--config.log_every_steps=1",
]


def _env(devices: int = 1):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _run(workdir, *extra, devices=1):
  r = subprocess.run(
    [sys.executable, *RUN, "--workdir", str(workdir), *extra],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=_env(devices),
    timeout=600,
  )
  assert r.returncode == 0, r.stdout + r.stderr
  return r


def _losses(workdir):
  return [
    line["loss"]
    for line in map(
      json.loads, (workdir / "metrics.jsonl").read_text().splitlines()
    )
    if line["split"] == "train"
  ]


def _params(workdir):
  return weights.restore_to_host(workdir / "params")


@pytest.fixture(scope="module")
def one_device(module_tmp):
  workdir = module_tmp("one")
  _run(workdir)
  return workdir


@pytest.mark.slow
def test_eight_virtual_devices_match_one(one_device, tmp_path):
  _run(tmp_path, devices=8)
  assert len(_losses(tmp_path)) == 16
  np.testing.assert_allclose(
    _losses(tmp_path), _losses(one_device), rtol=2e-4, atol=1e-5
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
    _params(tmp_path),
    _params(one_device),
  )


def test_batch_that_does_not_divide_across_devices_is_a_config_error(tmp_path):
  r = subprocess.run(
    [
      sys.executable,
      *RUN,
      "--workdir",
      str(tmp_path),
      "--config.batch_size=12",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=_env(8),
    timeout=300,
  )
  assert r.returncode == 2
  assert (
    r.stderr.strip().splitlines()[-1]
    == "error: batch_size=12 does not divide across 8 devices"
  )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_over_loopback_train_to_the_same_params(
  one_device, tmp_path
):
  """Each process holds half of every parameter and its Adam moments (FSDP
  over the 2-device mesh the processes make together)."""
  port = _free_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        *RUN,
        "--workdir",
        str(tmp_path),
        "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={i}",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.sharding.min_kib=0",  # Shard even the biases.
      ],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=_env(1),
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
  assert "process 0 of 2" in outs[0] and "process 1 of 2" in outs[1]
  # Process 0 prints the run's tables.
  assert "(0.500; 10 of 10 arrays sharded; mesh data=2, model=1)" in outs[0]
  np.testing.assert_allclose(
    _losses(tmp_path), _losses(one_device), rtol=0, atol=1e-5
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
    _params(tmp_path),
    _params(one_device),
  )
