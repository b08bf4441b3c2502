"""Reads PyTorch weight files without torch, and without running their code.

Layouts:
- "torch_zip": `torch.save` since 1.6: a zip archive `<name>/data.pkl` (the
  pickled object) + `<name>/data/<key>` (one raw storage per key) +
  `<name>/byteorder`.
- "torch_legacy": `torch.save(..., _use_new_zipfile_serialization=False)`
  and files written before torch 1.6: pickles in a row (magic number,
  protocol, system info, the object, the storage keys), then each storage as
  an int64 element count and its raw bytes.
- "safetensors": an 8-byte header length, a JSON header {name: dtype, shape,
  data_offsets}, then the tensor bytes.

A pickle can run any code while it loads. The unpickler here resolves only an
allow-list of globals (tensor rebuild functions, storage types, dtypes,
OrderedDict and plain containers), each to a stand-in defined in this module:
nothing from torch is imported and nothing named by the file is called. Any
other global is refused with a `UserError` naming it, before it is looked up.
This is the policy of torch's `torch.load(weights_only=True)`.

The object may be a state dict or hold one under 'state_dict', 'model_state_
dict' or 'model' (training checkpoints); a 'module.' prefix on every key
(DataParallel, timm's EMA copies) is dropped.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import io
import json
import math
from pathlib import Path
import pickle
import struct
import sys
from typing import Any, BinaryIO
import zipfile

import ml_dtypes
import numpy as np

from flaxtl.errors import UserError

LAYOUTS = ("torch_zip", "torch_legacy", "safetensors")
# Keys a training checkpoint keeps its model's state dict under, in the order
# they are tried.
WRAPPERS = ("state_dict", "model_state_dict", "model")
DATA_PARALLEL_PREFIX = "module."
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_SAFETENSORS_HEADER = 100 << 20  # The safetensors crate's own limit.
# torch.save stores zip members uncompressed; a member compressed at more
# than this ratio (beyond a small allowance) is a decompression bomb.
MAX_INFLATE_RATIO = 64
INFLATE_ALLOWANCE = 16 << 20
MAX_PICKLE_BYTES = 64 << 20  # A state dict's data.pkl is kilobytes.
# The bytes all tensors of one file may take, as a multiple of its size plus
# an allowance (views of one storage are each copied out).
TENSOR_BUDGET_RATIO = 4
TENSOR_BUDGET_ALLOWANCE = 16 << 20

# Legacy storage classes (`torch.FloatStorage`) and their element types.
STORAGE_DTYPES = {
  "DoubleStorage": np.dtype(np.float64),
  "FloatStorage": np.dtype(np.float32),
  "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
  "LongStorage": np.dtype(np.int64),
  "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16),
  "CharStorage": np.dtype(np.int8),
  "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_),
  "ComplexFloatStorage": np.dtype(np.complex64),
  "ComplexDoubleStorage": np.dtype(np.complex128),
  "UntypedStorage": np.dtype(np.uint8),
}
# torch dtypes as pickled (`torch.float32`), for `_rebuild_tensor_v3`.
TORCH_DTYPES = {
  "float64": np.float64,
  "double": np.float64,
  "float32": np.float32,
  "float": np.float32,
  "float16": np.float16,
  "half": np.float16,
  "bfloat16": ml_dtypes.bfloat16,
  "int64": np.int64,
  "long": np.int64,
  "int32": np.int32,
  "int": np.int32,
  "int16": np.int16,
  "short": np.int16,
  "int8": np.int8,
  "uint8": np.uint8,
  "uint16": np.uint16,
  "uint32": np.uint32,
  "uint64": np.uint64,
  "bool": np.bool_,
  "complex64": np.complex64,
  "complex128": np.complex128,
}
SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U64": np.uint64,
  "U32": np.uint32,
  "U16": np.uint16,
  "U8": np.uint8,
  "BOOL": np.bool_,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
}


@dataclasses.dataclass
class TorchWeights:
  """The tensors of a PyTorch weight file, keyed like `model.state_dict()`.

  Attributes:
    path: the file.
    layout: one of LAYOUTS.
    tensors: {'layer1.0.conv1.weight': array} in the file's order, as torch
      stores them (conv weights OIHW, linear weights (out, in)), wrapper and
      'module.' prefix removed.
    wrapper: the checkpoint key the state dict was under ('state_dict',
      'model', ...), or None for a bare state dict.
    prefix: the prefix dropped from every key ('module.' or '').
    skipped: entries that are not tensors (an optimiser state, 'epoch',
      ...), by key, for the log.
    metadata: what the file says about itself (safetensors' __metadata__, the
      legacy format's system info, the zip format's version).
  """

  path: Path
  layout: str
  tensors: dict[str, np.ndarray]
  wrapper: str | None = None
  prefix: str = ""
  skipped: list[str] = dataclasses.field(default_factory=list)
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


class _Corrupt(Exception):
  """The file's structure is wrong; becomes a one-line UserError."""


# Bytes left for the tensors of the file being read (None: unbounded).
_BUDGET: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
  "torch_file_budget", default=None
)


@contextlib.contextmanager
def _tensor_budget(path: Path):
  size = path.stat().st_size
  token = _BUDGET.set([size * TENSOR_BUDGET_RATIO + TENSOR_BUDGET_ALLOWANCE])
  try:
    yield
  finally:
    _BUDGET.reset(token)


def read(path: str | Path) -> TorchWeights:
  """Reads every tensor of a .pth/.pt/.safetensors file, without torch."""
  path = Path(path)
  _check_file(path)
  try:
    layout = sniff(path)
  except OSError as e:
    raise UserError(f"{path}: cannot read it ({e.strerror})") from None
  if layout is None:
    raise UserError(
      f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive, "
      "a legacy torch.save pickle nor a safetensors file)"
    )
  try:
    with _tensor_budget(path):
      if layout == "safetensors":
        tensors, metadata = _read_safetensors(path)
        obj: Any = tensors
      elif layout == "torch_zip":
        obj, metadata = _read_zip(path)
      else:
        obj, metadata = _read_legacy(path)
  except UserError:
    raise
  except PermissionError as e:
    raise UserError(f"{path}: cannot read it ({e.strerror})") from None
  except (
    _Corrupt,
    EOFError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    pickle.UnpicklingError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    struct.error,
    OverflowError,
    RecursionError,
    MemoryError,
    UnicodeDecodeError,
    OSError,
  ) as e:
    # Whatever a damaged file makes the parsers raise.
    reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise UserError(
      f"{path}: truncated or corrupt {layout} file "
      f"({reason or type(e).__name__})"
    ) from None
  return _state_dict(path, layout, obj, metadata)


def sniff(path: str | Path) -> str | None:
  """The file's layout (one of LAYOUTS) from its first bytes, or None."""
  with open(path, "rb") as f:
    head = f.read(16)
  if head.startswith(b"PK\x03\x04"):
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except zipfile.BadZipFile:
      return "torch_zip"  # A damaged archive; reading it says so.
    return "torch_zip" if _zip_prefix(names) is not None else None
  if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
    # A pickle: torch.save's legacy stream starts with protocol 2 and its
    # magic number. Any other pickle is refused by the same allow-list.
    return "torch_legacy"
  if len(head) >= 9 and head[8:9] == b"{":
    (n,) = struct.unpack("<Q", head[:8])
    if 0 < n <= MAX_SAFETENSORS_HEADER:
      return "safetensors"
  if Path(path).suffix.lower() == ".safetensors":
    return "safetensors"  # Named so: reading it says what is wrong.
  return None


def _check_file(path: Path) -> None:
  if not path.exists():
    raise UserError(f"{path}: no such file")
  if path.is_dir():
    raise UserError(f"{path}: is a directory, expected a PyTorch weight file")
  if path.stat().st_size == 0:
    raise UserError(f"{path}: file is empty")


# --- The allow-list unpickler -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """What `torch.FloatStorage` (etc.) stands for: an element type."""

  name: str
  dtype: np.dtype


@dataclasses.dataclass
class _Storage:
  """A storage's bytes, viewed as its element type."""

  data: np.ndarray  # 1-D.


def _rebuild_tensor(
  storage: _Storage,
  offset: int,
  size: tuple,
  stride: tuple,
  *_ignored: Any,
  dtype: np.dtype | None = None,
) -> np.ndarray:
  """torch._utils._rebuild_tensor(_v2): a strided view, copied out."""
  if not isinstance(storage, _Storage):
    raise _Corrupt("a tensor without a storage")
  data = storage.data
  if dtype is not None and data.dtype != dtype:
    data = data.view(dtype)
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  offset = int(offset)
  if len(size) != len(stride) or min((*size, *stride, offset, 0)) < 0:
    raise _Corrupt(f"bad tensor geometry size={size} stride={stride}")
  if math.prod(size):
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= data.size:
      raise _Corrupt(
        f"tensor of size {size} reads past its storage of {data.size} elements"
      )
  else:
    return np.zeros(size, data.dtype)
  numel = math.prod(size)
  if numel > data.size:
    # Stride 0 / overlapping strides: a few bytes declared as gigabytes.
    raise _Corrupt(
      f"tensor of size {size} stride {stride} declares "
      f"{numel * data.itemsize:,} bytes over a storage of {data.nbytes:,} "
      "bytes (overlapping strides); refused before expanding it"
    )
  budget = _BUDGET.get()
  if budget is not None:
    budget[0] -= numel * data.itemsize
    if budget[0] < 0:
      raise _Corrupt(
        "its tensors take far more bytes than the file holds (many copies "
        "of views of the same storage); refused before copying them"
      )
  view = np.lib.stride_tricks.as_strided(
    data[offset:],
    shape=size,
    strides=tuple(s * data.itemsize for s in stride),
    writeable=False,
  )
  return np.array(view)  # Contiguous and writeable.


def _rebuild_tensor_v3(
  storage, offset, size, stride, requires_grad, hooks, dtype, *_ignored
):
  """torch._utils._rebuild_tensor_v3: an untyped storage and a dtype."""
  if not isinstance(dtype, np.dtype):
    raise _Corrupt("a tensor with an unknown dtype")
  return _rebuild_tensor(storage, offset, size, stride, dtype=dtype)


def _rebuild_parameter(data, *_ignored):
  """torch._utils._rebuild_parameter(_with_state): the data alone."""
  if not isinstance(data, np.ndarray):
    raise _Corrupt("a parameter without a tensor")
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  """torch._tensor._rebuild_from_type_v2 (a Tensor or Parameter subclass)."""
  del new_type, state
  if func not in REBUILDS[:3]:
    raise _Corrupt("a tensor rebuilt by an unknown function")
  return func(*args)


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
  """_codecs.encode: how protocol-2 pickles store bytes."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise _Corrupt("unexpected _codecs.encode call")
  return text.encode("latin1")


class _TensorMarker:
  """torch.Tensor / torch.nn.Parameter, only as `_rebuild_from_type_v2`'s
  argument: it cannot be called or instantiated."""

  def __init__(self, name: str):
    self.name = name


def _allowed_globals() -> dict[tuple[str, str], Any]:
  allowed: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): _codecs_encode,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): tuple,
    ("torch", "Tensor"): _TensorMarker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorMarker("Parameter"),
  }
  for name, dtype in STORAGE_DTYPES.items():
    allowed[("torch", name)] = _StorageType(name, dtype)
  for name, dtype in TORCH_DTYPES.items():
    allowed[("torch", name)] = np.dtype(dtype)
  return allowed


ALLOWED_GLOBALS = _allowed_globals()
REBUILDS = (
  _rebuild_tensor,
  _rebuild_tensor_v3,
  _rebuild_parameter,
  _rebuild_from_type_v2,
)


class _Unpickler(pickle.Unpickler):
  """Resolves only ALLOWED_GLOBALS; storages through `load_storage`."""

  def __init__(
    self,
    file: BinaryIO,
    path: Path,
    load_storage=None,
    defer_rebuilds: bool = False,
  ):
    super().__init__(file, encoding="utf-8")
    self.path = path
    self.load_storage = load_storage
    self.defer_rebuilds = defer_rebuilds

  def find_class(self, module: str, name: str) -> Any:
    try:
      target = ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      hint = ""
      if module.startswith("torch.nn") or (
        name[:1].isupper() and not module.startswith(("builtins", "posix"))
      ):
        hint = (
          "; if it is a whole model saved with torch.save(model), save its "
          "weights instead: torch.save(model.state_dict(), path)"
        )
      raise UserError(
        f"{self.path}: refused to load: the pickle asks for the global "
        f"'{module}.{name}', which is not a tensor, a storage or a plain "
        "container (only weights are loaded; nothing in the file was run)"
        + hint
      ) from None
    if self.defer_rebuilds and target in REBUILDS:
      return _DeferredCall(target)
    return target

  def persistent_load(self, pid: Any) -> Any:
    if (
      not isinstance(pid, tuple)
      or len(pid) < 5
      or pid[0] != "storage"
      or self.load_storage is None
    ):
      raise _Corrupt(f"unexpected persistent id {str(pid)[:80]}")
    storage_type, key, _, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise _Corrupt(f"unknown storage type {storage_type!r}")
    if len(pid) > 5 and pid[5] is not None:
      raise UserError(
        f"{self.path}: uses storage views (a torch < 0.4 file): load it "
        "with torch and save it again"
      )
    return self.load_storage(storage_type, str(key), int(numel))


# --- torch.save zip archives --------------------------------------------------


def _zip_prefix(names: list[str]) -> str | None:
  """'archive/' when the zip holds archive/data.pkl (one torch record)."""
  found = [n[: -len("data.pkl")] for n in names if n.endswith("/data.pkl")]
  found = [p for p in found if p.count("/") == 1]
  return found[0] if len(found) == 1 else None


def _read_zip(path: Path) -> tuple[Any, dict]:
  with zipfile.ZipFile(path) as z:
    names = set(z.namelist())
    prefix = _zip_prefix(list(names))
    if prefix is None:
      raise _Corrupt("no <name>/data.pkl record")
    order = "little"
    if prefix + "byteorder" in names:
      order = _read_member(z, prefix + "byteorder", 64).decode(
        "ascii", "replace"
      )
      order = order.strip()
    if order not in ("little", "big"):
      raise _Corrupt(f"unknown byte order {order!r}")
    storages: dict[str, _Storage] = {}

    def load_storage(kind: _StorageType, key: str, numel: int) -> _Storage:
      if key not in storages:
        member = f"{prefix}data/{key}"
        if member not in names:
          raise _Corrupt(f"storage {member} is missing")
        expected = numel * kind.dtype.itemsize
        raw = _read_member(z, member, expected)
        storages[key] = _storage(raw, kind.dtype, numel, order, member)
      return storages[key]

    pkl = _read_member(z, prefix + "data.pkl", MAX_PICKLE_BYTES)
    obj = _Unpickler(io.BytesIO(pkl), path, load_storage).load()
    version = None
    if prefix + "version" in names:
      version = _read_member(z, prefix + "version", 64).decode(
        "ascii", "replace"
      )
      version = version.strip()
  return obj, {"format_version": version, "byteorder": order}


def _check_member(info: zipfile.ZipInfo, most: int) -> None:
  """Refuses a member that declares more than `most` bytes or is a bomb."""
  if info.compress_type != zipfile.ZIP_STORED and info.file_size > (
    info.compress_size * MAX_INFLATE_RATIO + INFLATE_ALLOWANCE
  ):
    raise _Corrupt(
      f"member {info.filename} inflates {info.compress_size:,} bytes to "
      f"{info.file_size:,} (a decompression bomb; torch.save stores its "
      "members uncompressed); refused before inflating it"
    )
  if info.file_size > most:
    raise _Corrupt(
      f"member {info.filename} holds {info.file_size:,} bytes, more than "
      f"the {most:,} expected"
    )


def _read_member(z: zipfile.ZipFile, name: str, most: int) -> bytes:
  """At most `most` bytes of a member, its declared sizes checked first.

  The stream is read with a cap, so a member whose header understates what
  it inflates to still costs no more than `most` bytes.
  """
  info = z.getinfo(name)
  _check_member(info, max(most, 0))
  with z.open(info) as f:
    raw = f.read(most)
    if f.read(1):
      raise _Corrupt(f"member {name} holds more than the {most:,} bytes read")
  return raw


def _storage(
  raw: bytes, dtype: np.dtype, numel: int, order: str, where: str
) -> _Storage:
  if numel * dtype.itemsize > len(raw):
    raise _Corrupt(
      f"storage {where} holds {len(raw)} bytes, expected "
      f"{numel * dtype.itemsize}"
    )
  data = np.frombuffer(raw, dtype=dtype, count=numel)
  if order != sys.byteorder and dtype.itemsize > 1:
    data = data.byteswap()
  return _Storage(data)


# --- Legacy torch.save pickles ------------------------------------------------


@dataclasses.dataclass
class _Deferred:
  """A tensor rebuild whose storage bytes come later in a legacy file."""

  func: Any
  args: tuple


class _DeferredCall:
  """A rebuild function that records its call instead of making the call."""

  def __init__(self, func):
    self.func = func

  def __call__(self, *args):
    return _Deferred(self.func, args)


def _read_legacy(path: Path) -> tuple[Any, dict]:
  with open(path, "rb") as f:
    blob = f.read()
  f = io.BytesIO(blob)
  magic = _Unpickler(f, path).load()
  if magic != LEGACY_MAGIC:
    raise UserError(f"{path}: a pickle, but not a torch.save file")
  protocol = _Unpickler(f, path).load()
  if protocol != LEGACY_PROTOCOL:
    raise _Corrupt(f"unsupported legacy protocol {protocol!r}")
  info = _Unpickler(f, path).load()
  if not isinstance(info, dict):
    raise _Corrupt("no system info record")
  order = "little" if info.get("little_endian", True) else "big"
  # The storages' bytes follow the object: tensors are rebuilt once read.
  storages: dict[str, tuple[_StorageType, _Storage]] = {}

  def placeholder(kind: _StorageType, key: str, numel: int) -> _Storage:
    if key not in storages:
      storages[key] = (kind, _Storage(np.empty(0, kind.dtype)))
    return storages[key][1]

  unpickler = _Unpickler(f, path, placeholder, defer_rebuilds=True)
  obj = unpickler.load()
  keys = _Unpickler(f, path).load()
  if not isinstance(keys, list):
    raise _Corrupt("no storage key list")
  for key in map(str, keys):
    if key not in storages:
      raise _Corrupt(f"storage {key} is listed but not used")
    kind, storage = storages[key]
    (count,) = struct.unpack("<q" if order == "little" else ">q", f.read(8))
    nbytes = count * kind.dtype.itemsize
    raw = f.read(nbytes)
    if count < 0 or len(raw) != nbytes:
      raise EOFError(f"storage {key} ends after {len(raw)} of {nbytes} bytes")
    storage.data = _storage(raw, kind.dtype, count, order, key).data
  missing = sorted(set(storages) - set(map(str, keys)))
  if missing:
    raise _Corrupt(f"storages {missing[:3]} have no data")
  return _resolve(obj), {
    "protocol_version": protocol,
    "little_endian": order == "little",
    "type_sizes": info.get("type_sizes"),
  }


def _resolve(obj: Any) -> Any:
  """Makes the deferred rebuilds (nested in containers) into arrays."""
  if isinstance(obj, _Deferred):
    return obj.func(*(_resolve(a) for a in obj.args))
  if isinstance(obj, _DeferredCall):  # `_rebuild_from_type_v2`'s argument.
    return obj.func
  if isinstance(obj, dict):
    items = ((k, _resolve(v)) for k, v in obj.items())
    return type(obj)(items) if type(obj) is not dict else dict(items)
  if isinstance(obj, list):
    return [_resolve(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_resolve(v) for v in obj)
  return obj


# --- safetensors --------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict, dict]:
  with open(path, "rb") as f:
    blob = bytearray(f.read())
  if len(blob) < 8:
    raise EOFError("shorter than its header length")
  (n,) = struct.unpack("<Q", blob[:8])
  if n > MAX_SAFETENSORS_HEADER:
    raise _Corrupt(
      f"its header length {n:,} is absurd (the format allows "
      f"{MAX_SAFETENSORS_HEADER:,}; the file is {len(blob):,} bytes)"
    )
  if 8 + n > len(blob):
    raise EOFError(f"header of {n} bytes runs past the end of the file")
  try:
    header = json.loads(blob[8 : 8 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _Corrupt(f"header is not JSON: {e}") from None
  if not isinstance(header, dict):
    raise _Corrupt("header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  data = memoryview(blob)[8 + n :]
  tensors: dict[str, np.ndarray] = {}
  for name, info in sorted(header.items(), key=_offset):
    try:
      dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
      shape = tuple(int(s) for s in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise _Corrupt(f"tensor {name!r}: bad header entry {info!r}") from None
    if min((*shape, 0)) < 0 or not 0 <= begin <= end:
      raise _Corrupt(f"tensor {name!r}: bad shape or offsets")
    if end > len(data):
      raise EOFError(f"tensor {name!r} runs past the end of the file")
    if end - begin != math.prod(shape) * dtype.itemsize:
      raise _Corrupt(
        f"tensor {name!r}: {end - begin} bytes for shape {shape} {dtype}"
      )
    tensors[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape)
  return tensors, {"metadata": metadata}


def _offset(item: tuple[str, Any]) -> Any:
  """Header entries in the order their bytes appear (the file's order)."""
  try:
    return int(item[1]["data_offsets"][0])
  except (KeyError, TypeError, ValueError, IndexError):
    return -1  # Rejected with its name below.


# --- The state dict inside the object -----------------------------------------


def _state_dict(
  path: Path, layout: str, obj: Any, metadata: dict
) -> TorchWeights:
  if not isinstance(obj, dict):
    raise UserError(
      f"{path}: holds a {type(obj).__name__}, not a state dict "
      "(a dict of tensors)"
    )
  wrapper = None
  if not _tensors_of(obj):
    for key in WRAPPERS:
      if isinstance(obj.get(key), dict) and _tensors_of(obj[key]):
        wrapper = key
        break
  inner = obj[wrapper] if wrapper else obj
  tensors = _tensors_of(inner)
  if not tensors:
    keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
    raise UserError(
      f"{path}: holds no tensors (top-level keys: {keys}); expected a state "
      f"dict, bare or under one of {WRAPPERS}"
    )
  skipped = [str(k) for k in inner if str(k) not in tensors]
  if wrapper:
    skipped += [str(k) for k in obj if k != wrapper]
  prefix = ""
  if all(k.startswith(DATA_PARALLEL_PREFIX) for k in tensors):
    prefix = DATA_PARALLEL_PREFIX
    tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
  return TorchWeights(path, layout, tensors, wrapper, prefix, skipped, metadata)


def _tensors_of(d: dict) -> dict[str, np.ndarray]:
  return {
    str(k): v
    for k, v in d.items()
    if isinstance(k, str) and isinstance(v, np.ndarray)
  }
