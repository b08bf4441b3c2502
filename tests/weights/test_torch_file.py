"""Reading PyTorch files without torch: every layout torch writes, safely.

torch writes the files; flaxtl.weights.torch_file reads them back and must
give torch's own tensors. A pickle that would run code is refused by name,
and the code does not run.
"""

import collections
import os
from pathlib import Path
import pickle
import subprocess
import sys

import numpy as np
import pytest

from flaxtl.errors import UserError
from flaxtl.weights import torch_file
from tests import torch_oracle


@pytest.fixture(scope="module")
def tensors(torch):
  """Tensors that exercise the storage paths: views, dtypes, shared storage."""
  torch.manual_seed(0)
  base = torch.randn(4, 6)
  return collections.OrderedDict(
    conv=torch.randn(8, 3, 3, 3),
    transposed=base.t(),  # Non-contiguous view.
    window=base[1:3, 2:],  # Offset view of the same storage.
    half=torch.randn(5).half(),
    bf16=torch.randn(5).bfloat16(),
    long=torch.arange(7),
    flags=torch.tensor([True, False, True]),
    scalar=torch.tensor(3),
    empty=torch.zeros(0, 3),
  )


def _numpy(torch, t):
  return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _same(torch, ours: dict, theirs: dict) -> None:
  assert list(ours) == list(theirs)
  for k, t in theirs.items():
    got = ours[k]
    if t.dtype == torch.bfloat16:
      got = got.astype(np.float32)
    want = _numpy(torch, t)
    assert got.dtype == want.dtype and got.shape == want.shape, k
    np.testing.assert_array_equal(got, want, err_msg=k)


@pytest.mark.parametrize("layout", ["torch_zip", "torch_legacy"])
def test_torch_save_both_formats_give_torchs_tensors(
  torch, tensors, tmp_path, layout
):
  path = torch_oracle.save(torch, dict(tensors), tmp_path / "w.pth", layout)
  w = torch_file.read(path)
  assert w.layout == layout and w.wrapper is None and w.prefix == ""
  _same(torch, w.tensors, tensors)
  # torch's own reader agrees on what the file holds.
  _same(torch, w.tensors, torch.load(path, weights_only=True))


def test_safetensors(torch, tensors, tmp_path):
  path = torch_oracle.save(
    torch, dict(tensors), tmp_path / "w.safetensors", "safetensors"
  )
  w = torch_file.read(path)
  assert w.layout == "safetensors"
  assert set(w.tensors) == set(tensors)
  _same(torch, {k: w.tensors[k] for k in tensors}, tensors)


@pytest.mark.parametrize("layout", ["torch_zip", "torch_legacy"])
def test_training_checkpoint_wrappers_and_data_parallel_prefix(
  torch, tmp_path, layout
):
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  dp = {f"module.{k}": v for k, v in model.state_dict().items()}
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
  ckpt = {"epoch": 7, "state_dict": dp, "optimizer": opt.state_dict()}
  path = torch_oracle.save(torch, ckpt, tmp_path / "ckpt.pth", layout)
  w = torch_file.read(path)
  assert w.wrapper == "state_dict" and w.prefix == "module."
  assert set(w.tensors) == set(model.state_dict())
  assert "epoch" in w.skipped and "optimizer" in w.skipped
  np.testing.assert_array_equal(
    w.tensors["0.weight"], model.state_dict()["0.weight"].numpy()
  )
  # `model` wrapper, parameters saved as nn.Parameter (not detached).
  torch.save({"model": dict(model.named_parameters())}, tmp_path / "p.pt")
  w = torch_file.read(tmp_path / "p.pt")
  assert w.wrapper == "model" and set(w.tensors) == {
    "0.weight",
    "0.bias",
    "1.weight",
    "1.bias",
  }


class _RunsACommand:
  """Unpickling this runs `touch <marker>` (the classic pickle exploit)."""

  def __init__(self, marker: Path):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def malicious(torch, tmp_path):
  """Checkpoints whose loading would create `marker`, in every pickle form."""
  marker = tmp_path / "PWNED"
  evil = {"state_dict": {"w": torch.zeros(2)}, "hook": _RunsACommand(marker)}
  files = {
    layout: torch_oracle.save(torch, evil, tmp_path / f"{layout}.pth", layout)
    for layout in ("torch_zip", "torch_legacy")
  }
  files["plain_pickle"] = tmp_path / "plain.pth"
  files["plain_pickle"].write_bytes(pickle.dumps(_RunsACommand(marker)))
  # The unsafe loader really would run it (the test's own control).
  control = tmp_path / "control"
  pickle.loads(pickle.dumps(_RunsACommand(control)))
  assert control.exists()
  return marker, files


def test_malicious_pickle_is_refused_and_does_not_run(malicious):
  marker, files = malicious
  system = f"{os.system.__module__}.system"  # 'posix.system' on Linux.
  for path in files.values():
    with pytest.raises(UserError, match=rf"{path}: refused.*'{system}'"):
      torch_file.read(path)
  assert not marker.exists()


def test_convert_cli_refuses_malicious_file_with_exit_2(malicious, tmp_path):
  marker, files = malicious
  out = tmp_path / "out"
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "flaxtl.convert",
      str(files["torch_zip"]),
      "--out",
      str(out),
    ],
    capture_output=True,
    text=True,
  )
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and "system" in lines[-1]
  assert "Traceback" not in r.stderr
  assert not marker.exists() and not out.exists()
  assert not list(tmp_path.glob(".out*"))  # No half-written output.


def test_bad_inputs_are_one_line_errors(torch, tensors, tmp_path):
  good_zip = torch_oracle.save(
    torch, dict(tensors), tmp_path / "z.pth", "torch_zip"
  ).read_bytes()
  good_legacy = torch_oracle.save(
    torch, dict(tensors), tmp_path / "l.pth", "torch_legacy"
  ).read_bytes()
  good_st = torch_oracle.save(
    torch, dict(tensors), tmp_path / "s.safetensors", "safetensors"
  ).read_bytes()
  cases = {
    b"": "file is empty",
    b"not weights at all": "not a PyTorch checkpoint",
    pickle.dumps({"a": 1}, protocol=2): "not a torch.save file",
    good_zip[: len(good_zip) // 2]: "truncated or corrupt torch_zip",
    good_legacy[:-10]: "truncated or corrupt torch_legacy",
    good_legacy[:200]: "truncated or corrupt torch_legacy",
    good_st[:-4]: "truncated or corrupt safetensors",
    good_st[:8]
    + b"{not json"
    + good_st[17:]: "truncated or corrupt safetensors",
  }
  for i, (blob, message) in enumerate(cases.items()):
    path = tmp_path / f"bad{i}.pth"
    path.write_bytes(blob)
    with pytest.raises(UserError, match=message) as e:
      torch_file.read(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
  with pytest.raises(UserError, match="no such file"):
    torch_file.read(tmp_path / "missing.pth")
  with pytest.raises(UserError, match="is a directory"):
    torch_file.read(tmp_path)
  torch.save([torch.zeros(2)], tmp_path / "list.pth")
  with pytest.raises(UserError, match="holds a list, not a state dict"):
    torch_file.read(tmp_path / "list.pth")
  torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "notensors.pth")
  with pytest.raises(UserError, match=r"holds no tensors.*'epoch'"):
    torch_file.read(tmp_path / "notensors.pth")
