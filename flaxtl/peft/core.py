"""PEFT methods as parameters under `params['peft']` plus freezing rules.

LoRA on a kernel W (any layout whose last axis is the output: Dense (in, out),
conv HWIO): W + (alpha / rank) * A B with A (*W.shape[:-1], rank) and B
(rank, out), B zero-initialised so the first forward is the base model's.
On a layer whose width is a field (`nn.Dense` / `nn.Conv` `features`, Keras
`filters`; one group) the update runs on activations, the module itself at
width `rank` and then x_r B (a kxk conv to rank r, then 1x1 to out: the
reshaped product, without a full-size weight gradient); on any other layer
(depthwise-style or grouped convs, DoRA) W + scale A B is formed first.
A fused `qkv` kernel (output axis q|k|v) gets one update per slice; `targets`
entries may end with `:q,v` to pick slices. DoRA: m * V / ||V|| with
V = W + scale A B, norms per output channel, m = ||W|| + `magnitude`
(zero-init, so the start is exact).
Adapters: y + up(gelu(down(y))) after a module, `up` zero-initialised.
BitFit trains every bias, `norm` every normalisation layer (whose BN layers
then use batch statistics under model.bn_mode='keras'), `prompt` the ViT's
prompt tokens (backbone option `prompt_tokens`). The new head always trains.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from flaxtl import tree
from flaxtl.errors import UserError
from flaxtl.models import common, registry

PEFT = "peft"  # The top-level params key holding every adapter.
METHODS = ("none", "lora", "dora", "bitfit", "norm", "prompt", "adapter")
SLICES = "qkv"
_FROZEN, _TRAINABLE = "frozen", "trainable"  # freeze.FROZEN / TRAINABLE.
_KERNEL = re.compile(r"(?:.+_)?kernel")  # kernel, pointwise_kernel, ...
_SUFFIX = re.compile(r"(.*):([qkv](?:,[qkv])*)")


# --- config --------------------------------------------------------------


def methods(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The PEFT methods a config asks for (() for none, or older configs)."""
  c = config.get(PEFT)
  if c is None:
    return ()
  raw = c.method
  # A str key (so --config.peft.method=lora+bitfit works on the command
  # line); lists from older JSON are read too.
  items = re.split(r"[+,]", raw) if isinstance(raw, str) else tuple(raw)
  items = [str(m).strip() for m in items]
  bad = [m for m in items if m not in METHODS]
  if bad or not items:
    raise UserError(
      f"peft.method={raw!r}: each method must be one of {list(METHODS)}"
    )
  if "lora" in items and "dora" in items:
    raise UserError("peft.method: 'lora' and 'dora' exclude each other")
  return tuple(dict.fromkeys(m for m in items if m != "none"))


def validate(config: ml_collections.ConfigDict) -> None:
  """The peft.* keys, before any work."""
  ms = methods(config)
  if config.get(PEFT) is None:
    return
  c = config.peft
  checks = [
    ("rank", c.rank, c.rank >= 1),
    ("alpha", c.alpha, c.alpha > 0),
    ("dropout", c.dropout, 0 <= c.dropout < 1),
    ("adapter_dim", c.adapter_dim, c.adapter_dim >= 1),
    ("prompt_tokens", c.prompt_tokens, c.prompt_tokens >= 0),
  ]
  for key, value, ok in checks:
    if not ok:
      raise UserError(f"peft.{key}={value!r} is out of range")
  for t in tuple(c.targets) + tuple(c.adapter_after):
    try:
      re.compile(_split_slices(t)[0])
    except re.error as e:
      raise UserError(f"peft.targets: bad regex {t!r} ({e})") from None
  if not ms:
    return
  if config.model.name != "transfer":
    raise UserError(
      f"peft.method={c.method!r} needs model.name='transfer', got "
      f"{config.model.name!r}"
    )
  if config.model.cache_features:
    raise UserError(
      "peft.method and model.cache_features exclude each other (cached "
      "features freeze the whole backbone)"
    )
  if "prompt" in ms:
    spec = registry.get(config.model.arch)
    if "prompt_tokens" not in spec.options:
      raise UserError(
        f"peft.method='prompt' needs a backbone with the prompt_tokens option "
        f"(the ViT family); model.arch={config.model.arch!r} has none"
      )
    if c.prompt_tokens < 1:
      raise UserError("peft.method='prompt' needs peft.prompt_tokens >= 1")


def backbone_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Backbone options PEFT sets: the ViT's prompt tokens for 'prompt'."""
  if "prompt" not in methods(config):
    return {}
  c = config.peft
  return {"prompt_tokens": int(c.prompt_tokens), "prompt_deep": c.prompt_deep}


def _split_slices(target: str) -> tuple[str, tuple[int, ...] | None]:
  """'blocks/.*/attn/qkv:q,v' -> ('blocks/.*/attn/qkv', (0, 2))."""
  m = _SUFFIX.fullmatch(target)
  if not m:
    return target, None
  return m.group(1), tuple(sorted({SLICES.index(s) for s in m.group(2)[::2]}))


def _matches(pattern: re.Pattern, path: str) -> bool:
  """A target names a kernel or its layer, with or without 'backbone/'."""
  layer = tree.layer_of(path)
  names = {path, layer, path.removeprefix("backbone/")}
  names.add(layer.removeprefix("backbone/"))
  return any(pattern.fullmatch(n) for n in names)


# --- what gets what ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Lora:
  """A low-rank update of the kernel `param` of module `layer`."""

  layer: str  # '/'-joined module path: 'backbone/layer1/0/conv1'.
  param: str  # 'kernel', 'pointwise_kernel', ...
  shape: tuple[int, ...]
  slices: tuple[int, ...] = ()  # Fused qkv: the slices updated.
  n_slices: int = 1
  on_activations: bool = False  # (x A) B at call time, not W + A B.
  dora: bool = False
  width: str = ""  # The module field set to r for x A ('features').
  zero_bias: bool = False  # x A through a layer whose bias is not optional.

  def key(self, name: str, s: int | None = None) -> str:
    prefix = self.param.removesuffix("kernel")  # '' or 'pointwise_'.
    return prefix + name + ("" if s is None else f"_{SLICES[s]}")

  def parts(self) -> tuple[int | None, ...]:
    return self.slices if self.n_slices > 1 else (None,)

  @property
  def path(self) -> str:
    return f"{self.layer}/{self.param}"


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A bottleneck adapter after the module `layer` (output width `dim`)."""

  layer: str
  dim: int


@dataclasses.dataclass(frozen=True)
class Spec:
  methods: tuple[str, ...]
  lora: tuple[Lora, ...] = ()
  adapters: tuple[Adapter, ...] = ()
  rank: int = 8
  alpha: float = 8.0
  dropout: float = 0.0
  adapter_dim: int = 16

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class _Call:
  width: str | None  # 'features' / 'filters': the module runs at rank r too.
  out_dim: int | None
  has_use_bias: bool = False


def trace(base: nn.Module, image_size: int) -> tuple[dict, dict[str, _Call]]:
  """(abstract variables, {module path: _Call}) of one shape-only forward.

  A module whose output width is a field (`features`, Keras `filters`) and
  that has one group can compute x A itself, at width r (strides, padding,
  conv_impl as the base layer's).
  """
  calls: dict[str, _Call] = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      m = context.module
      dim = out.shape[-1] if isinstance(out, jax.Array) else None
      width = None
      for attr in ("features", "filters"):
        value = getattr(m, attr, None)
        if isinstance(value, int) and value == dim:
          width = attr
      if getattr(m, "feature_group_count", 1) != 1:
        width = None
      if getattr(m, "groups", 1) != 1:
        width = None
      has_use_bias = isinstance(getattr(m, "use_bias", None), bool)
      calls.setdefault("/".join(m.path), _Call(width, dim, has_use_bias))
    return out

  x = jnp.zeros(common.dummy_input(image_size).shape, jnp.float32)
  with nn.intercept_methods(record):
    variables = jax.eval_shape(lambda: base.init(jax.random.PRNGKey(0), x))
  return variables, calls


def _kernels(params: dict, exclude: tuple[str, ...]) -> dict[str, tuple]:
  """Backbone kernels LoRA can update: {path: shape}."""
  out = {}
  for path, leaf in tree.flatten(params).items():
    name = path.rsplit("/", 1)[-1]
    if not path.startswith("backbone/") or path.startswith(exclude):
      continue
    if _KERNEL.fullmatch(name) and "depthwise" not in name and leaf.ndim >= 2:
      out[path] = tuple(leaf.shape)
  return out


def _default_lora(kernels: dict[str, tuple]) -> list[str]:
  """ViTs (a fused qkv layer): attention qkv + proj; else every dense, 3x3
  and pointwise kernel, depthwise ones (one input channel per group) left."""
  attn = [
    p for p in kernels if tree.layer_of(tree.layer_of(p)).endswith("attn")
  ]
  if any(tree.layer_of(p).endswith("/qkv") for p in kernels) and attn:
    return attn
  return [p for p, s in kernels.items() if not (len(s) == 4 and s[-2] == 1)]


def resolve(
  config: ml_collections.ConfigDict,
  params: dict,
  calls: dict[str, _Call],
) -> Spec:
  """Which kernel gets which update and where adapters go, from shapes."""
  ms = methods(config)
  c = config.peft
  exclude = head_prefixes(config)  # The new classifier trains in full.
  lora: list[Lora] = []
  if "lora" in ms or "dora" in ms:
    kernels = _kernels(params, exclude)
    chosen: dict[str, tuple[int, ...] | None] = {}
    if c.targets:
      for target in c.targets:
        regex, slices = _split_slices(target)
        pattern = re.compile(regex)
        hits = [p for p in kernels if _matches(pattern, p)]
        if not hits:
          example = next(iter(kernels), "?")
          raise UserError(
            f"peft.targets: {target!r} matches no kernel of "
            f"{config.model.arch} (kernels look like {example!r}; regexes "
            "fullmatch the kernel or its layer, 'backbone/' optional)"
          )
        for p in hits:
          chosen.setdefault(p, slices)
    else:
      chosen = dict.fromkeys(_default_lora(kernels))
    owned: dict[str, list[str]] = {}
    for p in tree.paths(params):
      owned.setdefault(tree.layer_of(p), []).append(p.rsplit("/", 1)[-1])
    for path, slices in chosen.items():
      shape = kernels[path]
      lora.append(_lora(path, shape, slices, calls, owned, "dora" in ms))
  adapters: list[Adapter] = []
  if "adapter" in ms:
    adapters = _adapters(c, calls, config.model.arch)
  return Spec(
    methods=ms,
    lora=tuple(lora),
    adapters=tuple(adapters),
    rank=int(c.rank),
    alpha=float(c.alpha),
    dropout=float(c.dropout),
    adapter_dim=int(c.adapter_dim),
  )


def _lora(path, shape, slices, calls, owned, dora: bool) -> Lora:
  layer, param = path.rsplit("/", 1)
  fused = layer.endswith("qkv") and shape[-1] % 3 == 0
  if slices is not None and not fused:
    raise UserError(
      f"peft.targets: {path} is not a fused qkv kernel (output "
      f"{shape[-1]}), so it takes no ':q,k,v' slices"
    )
  call = calls.get(layer, _Call(None, None))
  on_acts = (
    not dora
    and param == "kernel"
    and call.width is not None
    and set(owned[layer]) <= {"kernel", "bias"}
  )
  return Lora(
    layer=layer,
    param=param,
    shape=shape,
    slices=(slices or (0, 1, 2)) if fused else (),
    n_slices=3 if fused else 1,
    on_activations=on_acts,
    dora=dora,
    width=call.width or "" if on_acts else "",
    zero_bias=on_acts and not call.has_use_bias and "bias" in owned[layer],
  )


def _adapters(c, calls: dict[str, _Call], arch: str) -> list[Adapter]:
  paths = [p for p, k in calls.items() if p.startswith("backbone/")]
  if c.adapter_after:
    chosen = []
    for regex in c.adapter_after:
      pattern = re.compile(regex)
      hits = [
        p
        for p in paths
        if pattern.fullmatch(p) or pattern.fullmatch(p[len("backbone/") :])
      ]
      if not hits:
        raise UserError(
          f"peft.adapter_after: {regex!r} matches no module of {arch} "
          f"(modules look like {paths[1:3]})"
        )
      chosen += hits
  else:
    # ViT MLP outputs, else block outputs: modules numbered within a stage
    # ('layer1/0', 'features/3': Sequential items, PyTorch naming).
    chosen = [p for p in paths if re.fullmatch(r".*/blocks/\d+/mlp", p)]
    chosen = chosen or [
      p for p in paths if re.fullmatch(r"backbone/[^/]+/\d+", p)
    ]
    if not chosen:
      raise UserError(
        f"peft.method='adapter': {arch} has no numbered blocks; name the "
        "modules to follow with peft.adapter_after (regexes over module "
        f"paths such as {paths[1:3]})"
      )
  out = []
  for p in tree.unique(chosen):
    if calls[p].out_dim is None:
      raise UserError(f"peft.adapter_after: {p} does not return one array")
    out.append(Adapter(p, int(calls[p].out_dim)))
  return out


# --- parameters ----------------------------------------------------------


def _node(t: dict, layer: str, create: bool = False) -> dict:
  for part in layer.split("/"):
    t = t.setdefault(part, {}) if create else t[part]
  return t


def init_adapters(spec: Spec, rng: jax.Array) -> dict:
  """params['peft']: A ~ U(+-1/sqrt(fan_in)) (PyTorch's Linear init, as
  peft's LoRA), B, adapter `up` and DoRA magnitudes zero."""
  out: dict = {}
  r = spec.rank
  for i, t in enumerate(spec.lora):
    node = _node(out, t.layer, create=True)
    fan_in = math.prod(t.shape[:-1])
    bound = 1.0 / math.sqrt(fan_in)
    width = t.shape[-1] // t.n_slices
    for s in t.parts():
      key = jax.random.fold_in(rng, 8 * i + (s or 0))
      node[t.key("lora_a", s)] = jax.random.uniform(
        key, (*t.shape[:-1], r), jnp.float32, -bound, bound
      )
      node[t.key("lora_b", s)] = jnp.zeros((r, width), jnp.float32)
    if t.dora:
      node[t.key("magnitude")] = jnp.zeros((t.shape[-1],), jnp.float32)
  for i, a in enumerate(spec.adapters):
    node = _node(out, a.layer, create=True)
    key = jax.random.fold_in(rng, 10_000 + i)
    bound = 1.0 / math.sqrt(a.dim)
    node["adapter"] = {
      "down": jax.random.uniform(
        key, (a.dim, spec.adapter_dim), jnp.float32, -bound, bound
      ),
      "down_bias": jnp.zeros((spec.adapter_dim,), jnp.float32),
      "up": jnp.zeros((spec.adapter_dim, a.dim), jnp.float32),
      "up_bias": jnp.zeros((a.dim,), jnp.float32),
    }
  return out


def delta(t: Lora, node: dict, scale: float) -> jax.Array:
  """scale * A B as a kernel of t.shape (zeros on slices not updated)."""
  width = t.shape[-1] // t.n_slices
  parts = []
  for s in range(t.n_slices) if t.n_slices > 1 else (None,):
    if s is not None and s not in t.slices:
      parts.append(jnp.zeros((*t.shape[:-1], width), jnp.float32))
      continue
    a, b = node[t.key("lora_a", s)], node[t.key("lora_b", s)]
    parts.append(jnp.tensordot(a, b, axes=1))
  return scale * (parts[0] if len(parts) == 1 else jnp.concatenate(parts, -1))


def effective_kernel(
  t: Lora, w: jax.Array, node: dict, scale: float
) -> jax.Array:
  """W + scale A B, or DoRA's m * V / ||V|| (exactly W at the start)."""
  v = w + delta(t, node, scale)
  if not t.dora:
    return v
  axes = tuple(range(w.ndim - 1))
  v_norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=axes))
  w_norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes))
  m = w_norm + node[t.key("magnitude")]
  ratio = jnp.where(v_norm > 0, m / jnp.where(v_norm > 0, v_norm, 1.0), 1.0)
  return v * ratio


def fold(spec: Spec, params: dict, adapters: dict, everything: bool) -> dict:
  """Base params with the updates formed into their kernels: the ones that
  cannot run on activations, or `everything` (merging)."""
  todo = [t for t in spec.lora if everything or not t.on_activations]
  if not todo:
    return params
  flat = tree.flatten(params)
  for t in todo:
    node = _node(adapters, t.layer)
    flat[t.path] = effective_kernel(t, flat[t.path], node, spec.scale)
  return tree.nested(flat)


# --- the model -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PeftModel:
  """A run's model plus its adapters; `init` / `apply` as a Flax module's.

  Base parameters keep their paths; adapters live under params['peft'], so
  the base model's own code, BatchNorm rule and checkpoints are unchanged.
  """

  base: nn.Module
  spec: Spec

  def init(self, rng: jax.Array, x: jax.Array, *args, **kwargs) -> dict:
    variables = dict(self.base.init(rng, x, *args, **kwargs))
    adapters = init_adapters(self.spec, jax.random.fold_in(rng, 0x9EF7))
    if adapters:
      variables["params"] = {**variables["params"], PEFT: adapters}
    return variables

  def apply(
    self,
    variables: dict,
    x: jax.Array,
    *args,
    rngs: dict | None = None,
    **kwargs,
  ):
    params = dict(variables["params"])
    adapters = params.pop(PEFT, {})
    params = fold(self.spec, params, adapters, everything=False)
    train = kwargs.get("train", False)
    drop_rng = (rngs or {}).get("dropout") if train else None
    hook = _interceptor(self.spec, adapters, drop_rng)
    with nn.intercept_methods(hook):
      return self.base.apply(
        {**variables, "params": params}, x, *args, rngs=rngs, **kwargs
      )

  def merged_params(self, params: dict) -> dict:
    """Base params with every low-rank update folded in, no adapters."""
    if self.spec.adapters:
      raise UserError(
        "peft merge: bottleneck adapters (peft.method 'adapter') are not "
        "linear and cannot be folded into the base weights; use export"
      )
    params = dict(params)
    adapters = params.pop(PEFT, {})
    return fold(self.spec, params, adapters, everything=True)


def _interceptor(spec: Spec, adapters: dict, drop_rng) -> Callable:
  on_acts = {t.layer: (i, t) for i, t in enumerate(spec.lora)}
  on_acts = {k: v for k, v in on_acts.items() if v[1].on_activations}
  after = {a.layer: a for a in spec.adapters}

  def hook(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    layer = "/".join(context.module.path)
    if layer not in on_acts and layer not in after:
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    node = _node(adapters, layer)
    if layer in on_acts:
      i, t = on_acts[layer]
      x = args[0]
      if drop_rng is not None and spec.dropout > 0:
        keep = jax.random.bernoulli(
          jax.random.fold_in(drop_rng, i), 1.0 - spec.dropout, x.shape
        )
        x = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(x.dtype)
      y = y + _low_rank(context.module, x, t, node, spec).astype(y.dtype)
    if layer in after:
      p = node["adapter"]
      h = nn.gelu(y @ p["down"].astype(y.dtype) + p["down_bias"])
      y = y + (h @ p["up"].astype(y.dtype) + p["up_bias"]).astype(y.dtype)
    return y

  return hook


def _low_rank(module, x, t: Lora, node: dict, spec: Spec) -> jax.Array:
  """scale * (x A) B with the module's own op (strides, padding) for x A."""
  updates: dict[str, Any] = {t.width: spec.rank}
  if not t.zero_bias and hasattr(module, "use_bias"):
    updates["use_bias"] = False
  lower = module.clone(parent=None, **updates)
  extra = {"bias": jnp.zeros((spec.rank,), jnp.float32)} if t.zero_bias else {}
  width = t.shape[-1] // t.n_slices
  parts = []
  for s in range(t.n_slices) if t.n_slices > 1 else (None,):
    if s is not None and s not in t.slices:
      parts.append(None)
      continue
    kernel = node[t.key("lora_a", s)]
    xr = lower.apply({"params": {"kernel": kernel, **extra}}, x)
    parts.append(xr @ node[t.key("lora_b", s)].astype(xr.dtype))
  like = next(p for p in parts if p is not None)
  parts = [
    jnp.zeros((*like.shape[:-1], width), like.dtype) if p is None else p
    for p in parts
  ]
  out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, -1)
  return spec.scale * out


def wrap(base: nn.Module, config: ml_collections.ConfigDict) -> Any:
  """The run's model with the config's PEFT adapters (or `base` as is)."""
  if not methods(config):
    return base
  variables, calls = trace(base, int(config.image_size))
  spec = resolve(config, variables["params"], calls)
  return PeftModel(base, spec)


# --- freezing ------------------------------------------------------------


def norm_layers(params: dict) -> list[str]:
  """Layers whose params are 1-D scale/bias only: normalisation layers."""
  by_layer: dict[str, list] = {}
  for path, leaf in tree.flatten(params).items():
    by_layer.setdefault(tree.layer_of(path), []).append(
      (path.rsplit("/", 1)[-1], leaf.ndim)
    )
  return [
    layer
    for layer, ps in by_layer.items()
    if not layer.startswith(PEFT + "/")
    and {n for n, _ in ps} <= {"scale", "bias"}
    and any(n == "scale" for n, _ in ps)
    and all(d == 1 for _, d in ps)
  ]


def head_prefixes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  if config.model.head == "keras_top":
    return (f"backbone/{registry.get(config.model.arch).classifier}/",)
  return ("head/",)


def freeze_rules(
  config: ml_collections.ConfigDict,
  params: dict,
  base_rules: list[tuple[str, str]],
) -> list[tuple[str, str]]:
  """Rules after the run's own: head, adapters and the method's parameters
  train, the rest is frozen. Adapters of layers the run's own rules freeze
  (freeze.first_layers / until / rules) are frozen with them."""
  ms = methods(config)
  if not ms:
    return []
  paths = tree.paths(params)
  rules: list[tuple[str, str]] = []

  def add(regex: str, label: str) -> None:
    pattern = re.compile(regex)
    if any(pattern.fullmatch(p) for p in paths):
      rules.append((regex, label))

  for regex, label in base_rules:
    if label == _FROZEN:
      add(f"{PEFT}/{regex}", _FROZEN)
  for prefix in head_prefixes(config):
    add(re.escape(prefix) + ".*", _TRAINABLE)
  add(f"{PEFT}/.*", _TRAINABLE)
  if "bitfit" in ms:
    add(r"backbone/(?:.*/)?bias", _TRAINABLE)
  if "norm" in ms:
    layers = norm_layers(params)
    if layers:
      add("(?:" + "|".join(map(re.escape, layers)) + ")/[^/]+", _TRAINABLE)
  if "prompt" in ms:
    add(r"backbone/(?:.*/)?prompt/.*", _TRAINABLE)
  add(".*", _FROZEN)
  return rules


def roles(config: ml_collections.ConfigDict, params: dict) -> dict[str, str]:
  """{path: 'adapter' | 'head' | 'base'} for the parameter table."""
  heads = head_prefixes(config)
  out = {}
  for p in tree.paths(params):
    if p.startswith(PEFT + "/"):
      out[p] = "adapter"
    elif p.startswith(heads):
      out[p] = "head"
    else:
      out[p] = "base"
  return out
