"""Reads a NumPy .npz archive (big_vision / AugReg checkpoints) safely.

`np.load(allow_pickle=False)`: object arrays are refused, so nothing in the
file runs. Each member's .npy header is checked against the size the zip
says it has before the data is read, so a damaged or hostile archive cannot
make the reader allocate more than the file holds.
"""

from __future__ import annotations

from pathlib import Path
import zipfile

import numpy as np

from flaxtl.errors import UserError

# A compressed member may legitimately inflate (zeros); beyond this it is a
# zip bomb.
MAX_INFLATION = 1000


def read(path: str | Path) -> dict[str, np.ndarray]:
  """{'Transformer/encoder_norm/scale': array, ...} of an .npz file."""
  path = Path(path)
  if not path.is_file():
    raise UserError(f"{path}: no such file")
  size = path.stat().st_size
  if size == 0:
    raise UserError(f"{path}: file is empty")
  try:
    with zipfile.ZipFile(path) as z:
      infos = z.infolist()
      for info in infos:
        if info.file_size > MAX_INFLATION * max(info.compress_size, 1):
          raise UserError(
            f"{path}: member {info.filename} inflates {info.compress_size} "
            f"-> {info.file_size} bytes; refused"
          )
        with z.open(info) as f:
          version = np.lib.format.read_magic(f)
          if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
          else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
          need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
          if dtype.hasobject:
            raise UserError(
              f"{path}: {info.filename} holds Python objects; refused"
            )
          if need > info.file_size:
            raise UserError(
              f"{path}: {info.filename} declares {shape} {dtype} but holds "
              f"{info.file_size} bytes"
            )
    with np.load(path, allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  except UserError:
    raise
  except (
    zipfile.BadZipFile,
    ValueError,
    EOFError,
    OSError,
    KeyError,
    zipfile.LargeZipFile,
  ) as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise UserError(
      f"{path}: truncated or corrupt .npz ({reason or type(e).__name__})"
    ) from None
