"""VGG16 / VGG19 in Flax, with the parameter tree named like the Keras layers.

Parameter paths are `block{b}_conv{i}/{kernel,bias}`, `fc1`, `fc2` and
`predictions`, exactly the Keras layer names, so weights map one to one and
freeze rules can target the same names a Keras user already knows. Kernels are
HWIO (conv) and (in, out) (dense), channels-last, as Keras stores them; the
flatten before `fc1` is a plain NHWC reshape, which is Keras' (h, w, c) order.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtl.errors import UserError

# Convolutions per block; every conv is 3x3, 'same' padding, ReLU.
BLOCKS: dict[str, tuple[int, ...]] = {
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}
WIDTHS = (64, 128, 256, 512, 512)
TOP_UNITS = 4096
MIN_SIZE = 32
TOP_SIZE = 224

# Keras' default initialisers (glorot_uniform kernels, zero biases), so a model
# trained from scratch starts where the Keras one does.
kernel_init = nn.initializers.glorot_uniform()
bias_init = nn.initializers.zeros_init()

# How each 3x3 conv is computed on CPU ("auto"; GPU/TPU always use XLA's convolution,
# whose libraries pick their own algorithms). Measured per layer in
# benchmarks/conv_forms.py:
# - maps of at most 16 pixels (4x4, 2x2): one matmul over im2col patches. XLA:CPU's
#   convolution runs 2x2 maps at ~2 GFLOP/s; a matmul of the same FLOPs does not.
# - float32 maps of 28x28 and up with >= 128 input channels (56x56 and up at 128): Winograd
#   F(2x2, 3x3), 2.25x fewer multiplies, 1.2-1.7x faster than XLA:CPU's convolution on
#   these shapes (VGG16 forward at 224x224: 13.6 -> 17.1 img/s); its results differ from
#   the direct convolution at the 1e-6 relative level.
# - everything else: XLA's convolution.
_IM2COL_MAX_PIXELS = 16
CONV_IMPLS = ("auto", "direct", "im2col", "winograd")


def conv_impl_for(h: int, w: int, cin: int, platform: Optional[str] = None, dtype: Any = jnp.float32) -> str:
  """The "auto" choice for a 3x3 conv on an (h, w, cin) map computed in `dtype`."""
  if (platform or jax.default_backend()) != "cpu":
    return "direct"
  if h * w <= _IM2COL_MAX_PIXELS:
    return "im2col"
  # float32 only: XLA:CPU runs Winograd's bfloat16 matmuls and transforms at half the speed.
  if jnp.dtype(dtype) == jnp.float32 and min(h, w) >= 28 and cin >= 128 and (cin >= 256 or min(h, w) >= 56):
    return "winograd"
  return "direct"


def _direct_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _im2col_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  n, h, w, cin = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # (kh, kw, cin) order matches the HWIO kernel reshaped to (9*cin, cout).
  patches = jnp.concatenate([xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-1)
  y = patches.reshape(n * h * w, 9 * cin) @ kernel.reshape(9 * cin, -1)
  return y.reshape(n, h, w, -1)


# Winograd F(2x2, 3x3) (Lavin & Gray, 2015): a 4x4 input tile d and the 3x3 kernel g give
# the 2x2 output tile A^T [(G g G^T) * (B^T d B)] A. Every coefficient is 0, +-1 or 1/2.
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def _combine(terms: Sequence[jax.Array], coeffs: Sequence[float]) -> jax.Array:
  """sum_i coeffs[i] * terms[i], skipping zeros (XLA fuses it into one elementwise pass)."""
  return sum(c * t if c != 1 else t for c, t in zip(coeffs, terms) if c)


def _winograd_f23(x: jax.Array, kernel: jax.Array) -> jax.Array:
  n, h, w, cin = x.shape
  th, tw = -(-h // 2), -(-w // 2)  # Output tiles; an odd edge is padded and cropped.
  xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
  # V = B^T d B for all tiles at once, separably: tile rows are stride-2 row slices.
  rows = [xp[:, i : i + 2 * th : 2] for i in range(4)]
  v_rows = [_combine(rows, _BT[p]) for p in range(4)]
  v = jnp.stack([_combine([r[:, :, j : j + 2 * tw : 2] for j in range(4)], _BT[q])
                 for r in v_rows for q in range(4)])  # (16, n, th, tw, cin)
  g = jnp.asarray(_G, kernel.dtype)
  u = jnp.einsum("pi,ijco,qj->pqco", g, kernel, g).reshape(16, cin, -1)  # U = G g G^T.
  m = jnp.einsum("tpc,tco->tpo", v.reshape(16, n * th * tw, cin), u)  # 16 matmuls.
  m = m.reshape(4, 4, n, th, tw, -1)
  y_rows = [_combine(list(m), _AT[r]) for r in range(2)]  # Y = A^T M A.
  y = jnp.stack([jnp.stack([_combine(list(yr), _AT[s]) for s in range(2)]) for yr in y_rows])
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, 2 * th, 2 * tw, -1)  # (n, th, 2, tw, 2, cout)
  return y[:, :h, :w]


@jax.custom_vjp
def winograd_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 'same' conv by Winograd F(2x2, 3x3), forward and input gradient.

  The input gradient is itself a 3x3 'same' conv (of dy with the kernel flipped and
  its channel axes swapped), so it runs as Winograd too. The kernel gradient is XLA's
  convolution: autodiff through the tile transforms is slower.
  """
  return _winograd_f23(x, kernel)


def _winograd_fwd(x, kernel):
  return _winograd_f23(x, kernel), (x, kernel)


def _winograd_bwd(residuals, dy):
  x, kernel = residuals
  dx = _winograd_f23(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
  dkernel = jax.vjp(lambda k: _direct_conv(x, k), kernel)[1](dy)[0]
  return dx, dkernel


winograd_conv.defvjp(_winograd_fwd, _winograd_bwd)
_CONVS = {"direct": _direct_conv, "im2col": _im2col_conv, "winograd": winograd_conv}


def conv_layer_names(arch: str) -> list[str]:
  """The conv layers of `arch`, in order: block1_conv1 ... block5_conv3."""
  _check_arch(arch)
  return [
      f"block{b}_conv{i}"
      for b, n in enumerate(BLOCKS[arch], start=1)
      for i in range(1, n + 1)
  ]


def keras_layer_names(
    arch: str, include_top: bool = True, pooling: Optional[str] = None
) -> list[str]:
  """`[l.name for l in keras.applications.VGGxx(...).layers]`, input included.

  This is what "the first k layers" means in Keras (`model.layers[:k]`): index
  0 is the input layer, pooling and flatten layers count.
  """
  _check_arch(arch)
  names = ["input_layer"]
  for b, n in enumerate(BLOCKS[arch], start=1):
    names += [f"block{b}_conv{i}" for i in range(1, n + 1)]
    names.append(f"block{b}_pool")
  if include_top:
    names += ["flatten", "fc1", "fc2", "predictions"]
  elif pooling == "avg":
    names.append("global_average_pooling2d")
  elif pooling == "max":
    names.append("global_max_pooling2d")
  return names


def param_layer_names(arch: str, include_top: bool = True) -> list[str]:
  """The layers that hold parameters, in order."""
  top = ["fc1", "fc2", "predictions"] if include_top else []
  return conv_layer_names(arch) + top


def _check_arch(arch: str) -> None:
  if arch not in BLOCKS:
    raise UserError(f"unknown architecture {arch!r}; expected one of {sorted(BLOCKS)}")


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """Keras' MaxPooling2D(2, 2) ('valid': an odd last row/column is dropped).

  Written as reshape + max rather than `nn.max_pool`: same values, but its
  gradient is a compare-and-select that fuses, where reduce_window's gradient is
  XLA:CPU's select-and-scatter, ~10% of a full fine-tune step at 64x64.
  """
  n, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Conv3x3(nn.Module):
  """3x3 'same' convolution with Keras' parameter names (`kernel`, `bias`)."""

  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  impl: str = "auto"  # One of CONV_IMPLS; "auto" decides from the map shape and platform.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    kernel = self.param("kernel", kernel_init, (3, 3, cin, self.features), self.param_dtype)
    bias = self.param("bias", bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    _, h, w, _ = x.shape
    impl = conv_impl_for(h, w, cin, dtype=self.dtype) if self.impl == "auto" else self.impl
    return _CONVS[impl](x, kernel) + bias


class VGG(nn.Module):
  """VGG16/VGG19 as in `keras.applications`, returning logits by default.

  Attributes:
    arch: "vgg16" or "vgg19".
    include_top: keep flatten + fc1 + fc2 + predictions (needs 224x224 input).
    num_classes: size of `predictions`.
    pooling: without the top, None (4D features), "avg" or "max" (global).
    classifier_activation: None for logits (what losses want), or "softmax".
    output_layer: stop at this layer and return its activation, e.g.
      "block3_pool" or "fc2": any layer can serve as a feature extractor.
    return_layers: also return {name: activation} for these layers, as
      `(output, activations)`.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
    conv_impl: how the 3x3 convs are computed: "auto" (per layer, see
      `conv_impl_for`), or "direct", "im2col", "winograd" for all of them.
  """

  arch: str = "vgg16"
  include_top: bool = True
  num_classes: int = 1000
  pooling: Optional[str] = None
  classifier_activation: Optional[str] = None
  output_layer: Optional[str] = None
  return_layers: tuple[str, ...] = ()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # VGG has no dropout or batch norm; kept for a uniform API.
    self._check_config(x.shape)
    acts: dict[str, jax.Array] = {}  # The requested return_layers.
    x = x.astype(self.dtype)
    for b, (n, width) in enumerate(zip(BLOCKS[self.arch], WIDTHS), start=1):
      for i in range(1, n + 1):
        name = f"block{b}_conv{i}"
        x = nn.relu(
            Conv3x3(width, self.dtype, self.param_dtype, self.conv_impl, name=name)(x)
        )
        if self._emit(acts, name, x):
          return self._out(x, acts)
      x = max_pool_2x2(x)
      if self._emit(acts, f"block{b}_pool", x):
        return self._out(x, acts)

    if self.include_top:
      x = x.reshape(x.shape[0], -1)  # NHWC flatten == Keras' (h, w, c) order.
      if self._emit(acts, "flatten", x):
        return self._out(x, acts)
      for name in ("fc1", "fc2"):
        x = nn.relu(self._dense(TOP_UNITS, name)(x))
        if self._emit(acts, name, x):
          return self._out(x, acts)
      x = self._dense(self.num_classes, "predictions")(x).astype(jnp.float32)
      if self.classifier_activation == "softmax":
        x = jax.nn.softmax(x)
      self._emit(acts, "predictions", x)
      return self._out(x, acts)
    if self.pooling == "avg":
      x = jnp.mean(x, axis=(1, 2))
    elif self.pooling == "max":
      x = jnp.max(x, axis=(1, 2))
    return self._out(x, acts)

  def _dense(self, units: int, name: str) -> nn.Dense:
    return nn.Dense(
        units, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=kernel_init, bias_init=bias_init, name=name,
    )

  def _emit(self, acts: dict, name: str, x: jax.Array) -> bool:
    """Records `x` if requested; True when it is the requested output."""
    if name in self.return_layers:
      acts[name] = x
    return name == self.output_layer

  def _out(self, x: jax.Array, acts: dict):
    if not self.return_layers:
      return x
    missing = [n for n in self.return_layers if n not in acts]
    if missing:
      raise UserError(f"return_layers {missing} are not computed before the output layer")
    return x, acts

  def _check_config(self, shape: Sequence[int]) -> None:
    _check_arch(self.arch)
    if self.pooling not in (None, "avg", "max"):
      raise UserError(f"pooling must be None, 'avg' or 'max', got {self.pooling!r}")
    if self.conv_impl not in CONV_IMPLS:
      raise UserError(f"conv_impl must be one of {CONV_IMPLS}, got {self.conv_impl!r}")
    if self.classifier_activation not in (None, "softmax"):
      raise UserError(
          f"classifier_activation must be None or 'softmax', got {self.classifier_activation!r}"
      )
    valid = keras_layer_names(self.arch, self.include_top)[1:]
    for layer in (self.output_layer, *self.return_layers):
      if layer is not None and layer not in valid:
        raise UserError(f"output_layer {layer!r} is not a layer of {self.arch}: {valid}")
    if len(shape) != 4 or shape[-1] != 3:
      raise UserError(f"{self.arch} needs (batch, height, width, 3) images, got shape {tuple(shape)}")
    h, w = shape[1], shape[2]
    if self.include_top and (h, w) != (TOP_SIZE, TOP_SIZE) and not _stops_before_flatten(
        self.arch, self.output_layer
    ):
      raise UserError(
          f"{self.arch} with include_top needs {TOP_SIZE}x{TOP_SIZE} images, got {h}x{w} "
          "(use include_top=False for other sizes)"
      )
    if min(h, w) < MIN_SIZE:
      raise UserError(f"{self.arch} needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {h}x{w}")


def _stops_before_flatten(arch: str, output_layer: Optional[str]) -> bool:
  if output_layer is None:
    return False
  names = keras_layer_names(arch, include_top=True)
  return names.index(output_layer) < names.index("flatten")


def VGG16(**kwargs) -> VGG:  # noqa: N802 (Keras' spelling)
  return VGG(arch="vgg16", **kwargs)


def VGG19(**kwargs) -> VGG:  # noqa: N802
  return VGG(arch="vgg19", **kwargs)


def init_params(model: VGG, image_size: int, rng: Optional[jax.Array] = None) -> dict:
  """Initialises `model` for square `image_size` inputs (batch 1)."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return model.init(rng, x)["params"]


def param_shapes(model: VGG, image_size: int) -> dict:
  """The parameter tree as `jax.ShapeDtypeStruct`s, computed without FLOPs."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))["params"]

