"""Reading PyTorch files without torch: every layout torch writes, safely.

torch writes the files; flaxtl.weights.torch_file reads them back and must
give torch's own tensors. A pickle that would run code is refused by name,
and the code does not run.
"""

import collections
import io
import json
import os
from pathlib import Path
import pickle
import subprocess
import sys
import zipfile
import zlib

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


# --- hostile files: tiny on disk, gigabytes declared ---


class _StorageRef:
  """Pickled as a torch storage persistent id (see `_hostile_pickle`)."""


def _hostile_pickle(torch, numel: int) -> bytes:
  """data.pkl as torch.save writes it: {'w': a float tensor of `numel`}."""

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, _StorageRef):
        return ("storage", torch.FloatStorage, "0", "cpu", numel)
      return None

  class Tensor:
    def __reduce__(self):
      args = (
        _StorageRef(),
        0,
        (numel,),
        (1,),
        False,
        collections.OrderedDict(),
      )
      return (torch._utils._rebuild_tensor_v2, args)

  buf = io.BytesIO()
  Pickler(buf, protocol=2).dump({"w": Tensor()})
  return buf.getvalue()


class _ZeroSegments:
  """A deflate compressor for 16 MiB zero blocks: after a full flush every
  block compresses to the same bytes, so a 1 GiB bomb is written in ~1 s."""

  def __init__(self):
    co = zlib.compressobj(6, zlib.DEFLATED, -15)
    block = bytes(16 << 20)
    self.segments = [co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)]
    self.segments.append(co.compress(block) + co.flush(zlib.Z_FULL_FLUSH))
    self.tail = co.flush()
    self.calls = 0

  def compress(self, data: bytes) -> bytes:
    assert len(data) == 16 << 20
    self.calls += 1
    return self.segments[min(self.calls, 2) - 1]

  def flush(self) -> bytes:
    return self.tail


def _torch_zip(path: Path, pkl: bytes, storage: bytes | int) -> Path:
  """A torch.save zip archive; `storage` an int: that many deflated zeros."""
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/byteorder", "little")
    z.writestr("archive/version", "3\n")
    if isinstance(storage, bytes):
      z.writestr("archive/data/0", storage)
      return path
    info = zipfile.ZipInfo("archive/data/0")
    info.compress_type = zipfile.ZIP_DEFLATED
    with z.open(info, "w", force_zip64=True) as f:
      f._compressor = _ZeroSegments()  # zipfile's own; see _ZeroSegments.
      block = bytes(16 << 20)
      for _ in range(storage // len(block)):
        f.write(block)
  return path


@pytest.fixture(scope="module")
def hostile(torch, module_tmp):
  """The issue's files: a stride-0 tensor over 2 GB, 1 GiB zip bombs."""
  d = module_tmp("hostile")
  torch.save({"w": torch.zeros(1).expand(512 << 20)}, d / "stride0.pth")
  base = torch.randn(64, 1024)  # 256 KiB, viewed 2,000 times: 512 MiB.
  torch.save({f"v{i}": base.view(-1) for i in range(2000)}, d / "views.pth")
  gib = 1 << 30
  bomb = _torch_zip(d / "bomb.pth", _hostile_pickle(torch, gib // 4), gib)
  # Inflates within the ratio allowed, to far more than its record declares.
  small = _torch_zip(d / "understated.pth", _hostile_pickle(torch, 4), 16 << 20)
  control = _torch_zip(
    d / "control.pth",
    _hostile_pickle(torch, 4),
    np.arange(4, dtype=np.float32).tobytes(),
  )
  files = {
    "stride0": d / "stride0.pth",
    "views": d / "views.pth",
    "bomb": bomb,
    "understated": small,
  }
  assert all(p.stat().st_size < 1_100_000 for p in files.values())
  return files, control


HOSTILE_MESSAGES = {
  "stride0": "declares 2,147,483,648 bytes over a storage of 4 bytes",
  "views": "far more bytes than the file holds",
  "bomb": "inflates 1,04",
  "understated": "holds 16,777,216 bytes, more than the 16 expected",
}


def test_hostile_files_are_refused_before_allocating(torch, hostile):
  files, control = hostile
  # The hand-built archive is one torch itself reads, and so do we.
  want = torch.load(control, weights_only=True)["w"].numpy()
  np.testing.assert_array_equal(torch_file.read(control).tensors["w"], want)
  for name, path in files.items():
    with pytest.raises(UserError, match=HOSTILE_MESSAGES[name]) as e:
      torch_file.read(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


_DRIVER = """
import contextlib, io, json, sys
from flaxtl import convert
out = {}
for path, dest in json.loads(sys.argv[1]):
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    try:
      convert.main([path, "--out", dest, "--arch", "tv_resnet18"])
      code = 0
    except SystemExit as e:
      code = e.code
  out[path] = (code, err.getvalue())
for line in open("/proc/self/status"):
  if line.startswith("VmHWM:"):
    out["peak_kib"] = int(line.split()[1])
print(json.dumps(out))
"""


def test_convert_cli_on_hostile_files_stays_under_300_mb(hostile, tmp_path):
  """Peak RSS of the real converter (VmHWM of the process), not RLIMIT_AS:
  importing JAX reserves far more address space than a few hundred MB."""
  files, _ = hostile
  kept = tmp_path / "kept"
  kept.mkdir()
  (kept / "marker").write_text("an existing checkpoint")
  jobs = [(str(p), str(tmp_path / n)) for n, p in files.items()]
  jobs.append((str(files["bomb"]), str(kept)))
  r = subprocess.run(
    [sys.executable, "-c", _DRIVER, json.dumps(jobs)],
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  print(f"converter peak RSS {out['peak_kib'] / 1024:.0f} MB")
  assert out["peak_kib"] < 300 * 1024, out["peak_kib"]
  for name, path in files.items():
    code, err = out[str(path)]
    assert code == 2 and "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: "), err
    assert HOSTILE_MESSAGES[name] in err
    assert not (tmp_path / name).exists()
  assert [p.name for p in kept.iterdir()] == ["marker"]
  assert not list(tmp_path.glob(".*"))  # No half-written output.


def test_nan_weights_whole_modules_other_archs_and_bad_headers(
  torch, torchvision, tmp_path
):
  from flaxtl import weights
  from flaxtl.weights import convert

  model = torchvision.models.mobilenet_v2(weights=None)
  state = model.state_dict()
  state["features.3.conv.1.0.weight"][0, 0, 0, 0] = float("nan")
  state["classifier.1.bias"][3] = float("inf")
  path = torch_oracle.save(torch, state, tmp_path / "nan.pth", "torch_zip")
  out = tmp_path / "out"
  with pytest.raises(UserError, match=r"holds 1 NaN/Inf of .*1 more arrays"):
    weights.convert_file(path, out, "tv_mobilenet_v2")
  assert not out.exists() and not list(tmp_path.glob(".out*"))
  weights.convert_file(path, out, "tv_mobilenet_v2", allow_nonfinite=True)
  assert weights.read_provenance(out)["arch"] == "tv_mobilenet_v2"
  with pytest.raises(UserError, match="holds a tv_mobilenet_v2 model, not tv_"):
    convert.load_file(path, "tv_resnet18")
  whole = tmp_path / "model.pth"
  torch.save(model, whole)
  with pytest.raises(UserError, match=r"torch.save\(model.state_dict\(\)"):
    convert.read(whole)
  for head in (b"\xff" * 8 + b"{}", (1 << 40).to_bytes(8, "little") + b"{"):
    bad = tmp_path / "absurd.safetensors"
    bad.write_bytes(head + b"x" * 100)
    with pytest.raises(UserError, match=r"corrupt safetensors file.*absurd"):
      convert.read(bad)
