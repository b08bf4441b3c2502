"""Fixes to a file's layer list before it is mapped by name.

Keras 3 `.weights.h5` without names: Keras stores each layer of
`model.layers` under `layers/<snake_case class name>[_N]/vars`, N counting
the earlier layers of the same class in that model (keras/src/saving/
saving_lib.py `_save_container_state`); newer versions also write the layer
name as an attribute, older ones do not. A family that knows its layers'
classes rebuilds those keys and so names every group, whatever order the
groups come in (text order puts every `conv2d_N` before the first
`depthwise_conv2d`, so position alone cannot tell a MobileNet's
convolutions apart).

Layers split in two: a legacy h5 stores a nested model's weights in one group
listing its trainable weights before its non-trainable ones, so a fine-tuned
BN layer's gamma and beta come far before its moving statistics; the reader
then yields the layer twice. `merged` joins the parts in file order.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

from flaxtl.models.mobile_layers import snake_case
from flaxtl.weights import keras_file


def keys(layers: Sequence[tuple[str, str]]) -> dict[str, str]:
  """{group key: layer name} for model.layers given as (name, class)."""
  used: dict[str, int] = {}
  out = {}
  for name, cls in layers:
    key = snake_case(cls)
    n = used.get(key, -1) + 1
    used[key] = n
    out[key if n == 0 else f"{key}_{n}"] = name
  return out


def named(
  weights: keras_file.KerasWeights, layers: Sequence[tuple[str, str]]
) -> keras_file.KerasWeights:
  """`weights` with unnamed Keras 3 groups named after `layers`' keys.

  Groups sit under `.../layers/<key>/vars`; a backbone nested in a bigger
  model has its own `layers/` level. The level whose keys match the most
  layers is the backbone's; only unnamed layers there are renamed.
  """
  unnamed = [
    layer
    for layer in weights.layers
    if layer.name is None and weights.layout == "keras3_weights_h5"
  ]
  if not unnamed:
    return weights
  table = keys(layers)

  def split(layer):
    parts = layer.where.strip("/").split("/")
    if len(parts) >= 3 and parts[-1] == "vars" and parts[-3] == "layers":
      return "/".join(parts[:-3]), parts[-2]
    return None, None

  hits: dict[str, int] = {}
  for layer in unnamed:
    parent, key = split(layer)
    if key in table:
      hits[parent] = hits.get(parent, 0) + 1
  if not hits:
    return weights
  best = max(hits, key=hits.get)
  renamed = []
  for layer in weights.layers:
    parent, key = split(layer)
    if layer.name is None and parent == best and key in table:
      layer = dataclasses.replace(layer, name=table[key])
    renamed.append(layer)
  return dataclasses.replace(weights, layers=renamed)


def merged(weights: keras_file.KerasWeights) -> keras_file.KerasWeights:
  """`weights` with the parts of a split layer joined, in file order."""
  seen: dict[tuple[str, str], keras_file.LayerWeights] = {}
  layers = []
  for layer in weights.layers:
    key = (layer.name, layer.where)
    if layer.name is None or key not in seen:
      layer = dataclasses.replace(layer, arrays=list(layer.arrays))
      if layer.name is not None:
        seen[key] = layer
      layers.append(layer)
    else:
      seen[key].arrays.extend(layer.arrays)
  if len(layers) == len(weights.layers):
    return weights
  return dataclasses.replace(weights, layers=layers)
