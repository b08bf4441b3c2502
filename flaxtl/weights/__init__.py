"""Pretrained weights: read any file layout, map it onto a model, store it.

keras_file   Keras files (every layout Keras has written) -> ordered layers
torch_file   PyTorch files (.pth/.pt zip or legacy, .safetensors) -> a state
             dict of numpy arrays, without torch and without running pickles
vit_sources  every ViT source (Hugging Face dirs, torchvision, big_vision
             .npz, ONNX, timm) -> one timm-named state dict + its arch
             (vit_arch); readers hf_dir, npz_file, onnx_file; posemb
             resamples position tables as each source does
mappings/    per family: those layers -> flaxtl variables, every shape checked
convert      the two together (`python -m flaxtl.convert` is its CLI)
store        converted checkpoints on disk: save, restore, provenance
sources      named sources ('imagenet', 'hed') and `model.weights` values
download     verified downloads
merge        strict merge of pretrained variables into a fresh init
"""

from flaxtl.weights.convert import convert_file, load_file
from flaxtl.weights.merge import merge_pretrained
from flaxtl.weights.sources import NAMED, fetch, resolve
from flaxtl.weights.store import (
  is_checkpoint,
  read_provenance,
  restore,
  restore_to_host,
  restore_variables,
  save,
)

__all__ = [
  "NAMED",
  "convert_file",
  "fetch",
  "is_checkpoint",
  "load_file",
  "merge_pretrained",
  "read_provenance",
  "resolve",
  "restore",
  "restore_to_host",
  "restore_variables",
  "save",
]
