"""Shared fixtures. Keras 3 (JAX backend) is the oracle the port is held to."""

import atexit
import functools
import http.server
import os
from pathlib import Path
import shutil
import sys
import tempfile
import threading
import types

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Converted weights go to a scratch dir, never the checkout's weights/; the
# download cache (~/.cache/flaxtl) is shared like any cache. Subprocesses
# inherit both.
os.environ["FLAXTL_WEIGHTS_DIR"] = tempfile.mkdtemp(
  prefix="flaxtl-test-weights-"
)
# A refused local port, not the unreachable ImageNet URLs: fails at once.
os.environ["FLAXTL_KERAS_BASE_URL"] = "http://127.0.0.1:9/"

import numpy as np
import pytest

atexit.register(shutil.rmtree, os.environ["FLAXTL_WEIGHTS_DIR"], True)


@pytest.fixture(scope="session")
def keras():
  import keras as k

  assert k.backend.backend() == "jax", "tests need KERAS_BACKEND=jax"
  from tests import keras_oracle

  keras_oracle.host_initializers(k)
  return k


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
  """`tmp_path_factory.mktemp` for module fixtures, freed with the module.

  The reference models' Keras files and checkpoints take up to 1 GB per
  module; pytest would keep them all (~14 GB) until the session ends. Kept,
  like a failed test's tmp_path, when one of the module's tests failed.
  """
  failed_before = request.session.testsfailed
  made = []

  def mktemp(name: str):
    made.append(tmp_path_factory.mktemp(name))
    return made[-1]

  yield mktemp
  if request.session.testsfailed == failed_before:
    for path in made:
      shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def images64():
  """Two real-looking uint8 RGB images (smooth gradients + noise), 64x64."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:64, 0:64]
  base = np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1)
  imgs = np.stack([base, base[::-1]]) + rng.integers(0, 30, (2, 64, 64, 3))
  return np.clip(imgs, 0, 255).astype(np.uint8)


# PyTorch oracles (test-only dependencies, see tests/torch_oracle.py). A test
# that needs them skips only where torch itself is not installed.
@pytest.fixture(scope="session")
def torch():
  return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def torchvision(torch):
  # The CPU torch cannot load torchvision 0.28's compiled ops, which only its
  # detection ops need; model definitions import without them.
  sys.modules.setdefault(
    "torchvision._meta_registrations",
    types.ModuleType("torchvision._meta_registrations"),
  )
  import torchvision as tv

  return tv


@pytest.fixture(scope="session")
def timm(torchvision):
  import timm as t

  return t


@pytest.fixture
def serve(tmp_path):
  """Serves a directory over HTTP on 127.0.0.1; yields dir -> base URL."""
  servers = []

  def start(root: Path) -> str:
    handler = functools.partial(
      http.server.SimpleHTTPRequestHandler, directory=str(root)
    )
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    servers.append(server)
    return f"http://127.0.0.1:{server.server_address[1]}/"

  yield start
  for s in servers:
    s.shutdown()
    s.server_close()
