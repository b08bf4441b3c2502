"""Reads a ViT's weights out of an ONNX file, without running it.

The `onnx` package parses the protobuf (a runtime dependency only for ONNX
files; onnxruntime is never needed). PyTorch's exporter leaves the named
parameters as initialisers, but
- linear weights become anonymous `onnx::MatMul_NNNN` initialisers, already
  transposed to [in, out]: each is named by following its MatMul node to the
  Add whose other input is the layer's named bias (`...query.bias` ->
  `...query.weight`, transposed back to PyTorch's (out, in));
- the position embedding is constant-folded into the graph's interpolation:
  an anonymous [1, 1, D] class part (into a Concat) and a [1, N, D] patch
  part (into a Reshape, N a square), rejoined here as HF's
  `embeddings.position_embeddings` [1, 1 + N, D].
Graph-level de-duplication of equal initialisers (several layers sharing
one bias) makes names ambiguous: refused with one line.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from flaxtl.errors import UserError

MAX_BYTES = 2 << 30  # The protobuf format's own limit for a single file.


def _load(path: Path):
  try:
    import onnx
  except ImportError:
    raise UserError(
      f"{path}: reading ONNX files needs the `onnx` package (pip install onnx)"
    ) from None
  if not path.is_file():
    raise UserError(f"{path}: no such file")
  size = path.stat().st_size
  if size == 0:
    raise UserError(f"{path}: file is empty")
  if size > MAX_BYTES:
    raise UserError(
      f"{path}: {size} bytes, over ONNX's 2 GiB single-file limit"
    )
  try:
    # External data is never followed: weights must be inside the file.
    model = onnx.load(str(path), load_external_data=False)
  except Exception as e:  # protobuf's DecodeError and friends.
    reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise UserError(
      f"{path}: not a readable ONNX model ({reason or type(e).__name__})"
    ) from None
  return model


def _array(path: Path, init) -> np.ndarray:
  from onnx import TensorProto, numpy_helper

  if init.data_location == TensorProto.EXTERNAL:
    raise UserError(
      f"{path}: initialiser {init.name} is stored in an external data file; "
      "save the model with its weights inside"
    )
  n = int(np.prod(list(init.dims), dtype=np.int64))
  if n * 8 > MAX_BYTES:
    raise UserError(f"{path}: initialiser {init.name} declares {n} elements")
  try:
    a = numpy_helper.to_array(init)
  except Exception as e:
    raise UserError(
      f"{path}: initialiser {init.name} is corrupt ({e})"
    ) from None
  if a.size != n:
    raise UserError(f"{path}: initialiser {init.name} holds {a.size} of {n}")
  return a


def read_vit_tensors(
  path: str | Path,
) -> tuple[dict[str, np.ndarray], list[str], int | None]:
  """(PyTorch-named state dict of the ViT inside the graph, notes, the head
  count the graph's attention reshape gives or None)."""
  path = Path(path)
  model = _load(path)
  graph = model.graph
  inits = {i.name: i for i in graph.initializer}
  consumers: dict[str, list] = {}
  for node in graph.node:
    for name in node.input:
      consumers.setdefault(name, []).append(node)
  tensors: dict[str, np.ndarray] = {
    name: _array(path, init)
    for name, init in inits.items()
    if not _anonymous(name)
  }
  notes: list[str] = []
  named = _name_matmul_weights(path, graph, inits, tensors, consumers)
  if named:
    notes.append(f"{named} anonymous MatMul weights named from their biases")
  pos = _folded_pos_embed(path, graph, inits, consumers, _anonymous)
  if pos is not None and not any(
    k.endswith("position_embeddings") for k in tensors
  ):
    key = _embeddings_prefix(tensors) + "embeddings.position_embeddings"
    tensors[key] = pos
    notes.append(
      f"position embedding recovered from the graph's folded constants "
      f"(1 + {pos.shape[1] - 1} tokens)"
    )
  heads = _num_heads(graph, tensors, consumers)
  if heads:
    notes.append(f"num_heads={heads} read from the attention's reshape")
  return tensors, notes, heads


def _anonymous(name: str) -> bool:
  """An initialiser the exporter named itself (no parameter name)."""
  return name.startswith(("onnx::", "_v_")) or "/" in name


def _embeddings_prefix(tensors: dict[str, np.ndarray]) -> str:
  """What precedes `embeddings.cls_token` (HF's module path), or ''."""
  return next(
    (
      k[: -len("embeddings.cls_token")]
      for k in tensors
      if k.endswith("embeddings.cls_token")
    ),
    "",
  )


def _shared_biases(tensors, consumers) -> list[str]:
  """Biases several Adds read (the exporter merged equal initialisers)."""
  return sorted(
    n
    for n in tensors
    if n.endswith(".bias")
    and len({c.op_type for c in consumers.get(n, [])}) == 1
    and sum(c.op_type == "Add" for c in consumers.get(n, [])) > 1
  )


def _name_matmul_weights(path, graph, inits, tensors, consumers) -> int:
  """Linear weights: MatMul(x, W) -> Add(., named bias). Adds each W to
  `tensors` under its bias's name (transposed to (out, in)); returns how
  many."""
  shared = _shared_biases(tensors, consumers)
  named = 0
  for node in graph.node:
    if node.op_type != "MatMul":
      continue
    w = next((i for i in node.input if i in inits and _anonymous(i)), None)
    if w is None:
      continue
    bias = _added_bias(node, tensors, consumers)
    if bias is None:
      continue
    if bias in shared:
      raise UserError(
        f"{path}: bias {bias} is shared by several layers (the exporter "
        "merged equal initialisers), so weights cannot be named; re-export it"
      )
    key = bias[: -len("bias")] + "weight"
    a = _array(path, inits[w])
    if a.ndim != 2:
      raise UserError(f"{path}: {w} (for {key}) has shape {a.shape}")
    tensors[key] = a.T
    named += 1
  return named


def _added_bias(matmul, tensors, consumers) -> str | None:
  """The named bias the first Add after `matmul` reads, or None."""
  for add in consumers.get(matmul.output[0], []):
    if add.op_type == "Add":
      bias = next(
        (i for i in add.input if i in tensors and i.endswith(".bias")), None
      )
      if bias:
        return bias
  return None


# Query biases: HF (legacy and transformers 5 names), timm's fused qkv.
QUERY_BIASES = ("query.bias", "q_proj.bias", "qkv.bias")


def _num_heads(graph, tensors, consumers) -> int | None:
  """Heads = width / head_dim, the last entry of the shape the first query
  projection is reshaped to ([B, T, H or -1, head_dim])."""
  constants = _Constants(graph)
  for node in graph.node:
    if node.op_type != "Add":
      continue
    bias = next((i for i in node.input if i.endswith(QUERY_BIASES)), None)
    if bias is None or bias not in tensors:
      continue
    width = tensors[bias].shape[0] // (3 if bias.endswith("qkv.bias") else 1)
    for c in consumers.get(node.output[0], []):
      head_dim = _reshape_head_dim(c, constants)
      if head_dim is not None and head_dim > 0 and width % head_dim == 0:
        return width // head_dim
    return None
  return None


class _Constants:
  """A graph's constant values: initialisers and Constant nodes' outputs."""

  def __init__(self, graph):
    self.producer = {o: n for n in graph.node for o in n.output}
    self.inits = {i.name: i for i in graph.initializer}

  def __call__(self, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    if name in self.inits:
      return numpy_helper.to_array(self.inits[name])
    node = self.producer.get(name)
    if (
      node is not None
      and node.op_type == "Constant"
      and node.attribute
      and node.attribute[0].name == "value"
    ):
      return numpy_helper.to_array(node.attribute[0].t)
    return None


def _reshape_head_dim(node, constants: _Constants) -> int | None:
  """The last entry of the constant shape a Reshape node is given (directly
  or as a Concat's last part), or None."""
  if node.op_type != "Reshape" or len(node.input) < 2:
    return None
  shape = constants(node.input[1])
  if shape is None:
    src = constants.producer.get(node.input[1])
    if src is None or src.op_type != "Concat" or not src.input:
      return None
    shape = constants(src.input[-1])
  if shape is None or shape.size < 1:
    return None
  return int(np.asarray(shape).reshape(-1)[-1])


def _folded_pos_embed(path, graph, inits, consumers, anonymous):
  """HF's [1, 1 + N, D] position table from its two folded parts, or None."""
  cls_part, patch_part = [], []
  for name, init in inits.items():
    dims = list(init.dims)
    if not anonymous(name) or len(dims) != 3 or dims[0] != 1:
      continue
    ops = {c.op_type for c in consumers.get(name, [])}
    n = dims[1]
    if n == 1 and "Concat" in ops:
      cls_part.append(name)
    elif n > 1 and math.isqrt(n) ** 2 == n and ops & {"Reshape", "Resize"}:
      patch_part.append(name)
  if not cls_part and not patch_part:
    return None
  if len(cls_part) != 1 or len(patch_part) != 1:
    raise UserError(
      f"{path}: cannot tell the folded position embedding apart (class "
      f"candidates {cls_part}, patch candidates {patch_part})"
    )
  c, p = _array(path, inits[cls_part[0]]), _array(path, inits[patch_part[0]])
  if c.shape[-1] != p.shape[-1]:
    raise UserError(
      f"{path}: folded position parts {c.shape} and {p.shape} differ in width"
    )
  return np.concatenate([c, p], axis=1)
