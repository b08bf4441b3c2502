"""One SGD step with Keras' model.layers[:k] frozen: flaxtl against Keras.

MobileNetV2 (alpha 0.35) with perturbed BN statistics; k stops inside block
15, between `block_15_depthwise` (frozen) and `block_15_depthwise_BN`
(trained), so the frozen prefix ends mid-block. Keras trains with
`layer.trainable = False` on model.layers[:k] and `train_on_batch`; flaxtl
with `freeze.first_layers = k` through `flaxtl.train.setup`. Frozen BN layers
run in inference mode in both (their statistics must not move); the others
normalise with batch statistics and update their moving ones.

Why late and at 64 px, batch 16: a BN layer in training mode whose batch
variance is far below its epsilon (1e-3) scales float32 rounding by up to
1/sqrt(1e-3) ~ 30x, and a random MobileNetV2 has such channels. Through the
~40 training-mode BN layers that follow block 2, two correct
implementations drift apart (measured: 1e-4 relative at 64 px, outputs
unrelated at 32 px, where the last blocks see 1x1 maps); after block 15 they
agree to ~3e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from flaxtl import tree, weights
from flaxtl.preprocess import preprocess_input
from flaxtl.train import setup, steps
from tests import keras_oracle as oracle

SIZE, BATCH, ALPHA, CLASSES, LR = 64, 16, 0.35, 5, 0.1
FIRST_TRAINED = "block_15_depthwise_BN"  # model.layers[k]


@pytest.fixture(scope="module")
def keras_step(keras, module_tmp):
  model = oracle.keras_model(
    keras,
    keras.applications.MobileNetV2,
    True,
    SIZE,
    1,
    alpha=ALPHA,
    classes=CLASSES,
  )
  oracle.perturb(model)
  path = module_tmp("bn") / "start.weights.h5"
  model.save_weights(path)
  k = [layer.name for layer in model.layers].index(FIRST_TRAINED)
  x = np.asarray(preprocess_input(oracle.images(SIZE, n=BATCH), "tf"))
  y = np.arange(BATCH) % CLASSES

  def arrays():
    return {
      layer.name: [np.asarray(w) for w in layer.weights]
      for layer in model.layers
      if layer.weights
    }

  before = arrays()
  for layer in model.layers[:k]:
    layer.trainable = False
  model.compile(
    optimizer=keras.optimizers.SGD(learning_rate=LR),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  model.train_on_batch(x, y)
  frozen = {layer.name for layer in model.layers[:k] if layer.weights}
  return k, x, y, path, before, arrays(), frozen


@pytest.fixture(scope="module")
def flaxtl_step(keras_step):
  k, x, y, path, *_ = keras_step
  config = base.get_base()
  config.model.arch = "mobilenetv2"
  config.model.alpha = ALPHA
  config.model.head = "keras_top"
  config.image_size = SIZE
  config.freeze.first_layers = k
  config.optim.name, config.optim.lr = "sgd", LR
  config.optim.momentum, config.optim.nesterov = 0.0, False
  config.optim.schedule = "constant"
  converted, prov = weights.load_file(path)
  assert prov["options"] == {"alpha": ALPHA}
  model = setup.build_model(config, CLASSES)
  params = {"backbone": converted.variables["params"]}
  stats = {"backbone": converted.variables["batch_stats"]}
  plan = setup.freeze_plan(config, params, k, log_matches=False)
  tx, step_fn, _ = setup.train_step(
    config, model, plan, 1, lambda images: images, stats
  )
  state = steps.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=stats,
    opt_state=tx.init(params),
    rng=jax.random.PRNGKey(0),
  )
  batch = {"image": jnp.asarray(x), "label": jnp.asarray(y, jnp.int32)}
  new, metrics = jax.jit(step_fn)(state, batch)
  assert bool(metrics["finite"])
  return plan, new


def _ours(state, name):
  """A layer's arrays in Keras' order, from the flaxtl state."""
  p = tree.flatten(state.params["backbone"])
  s = tree.flatten(state.batch_stats["backbone"])
  if f"{name}/scale" in p:  # BatchNormalization.
    return [
      p[f"{name}/scale"],
      p[f"{name}/bias"],
      s[f"{name}/mean"],
      s[f"{name}/var"],
    ]
  for var in ("depthwise_kernel", "kernel"):
    if f"{name}/{var}" in p:
      return [p[f"{name}/{var}"]] + (
        [p[f"{name}/bias"]] if f"{name}/bias" in p else []
      )
  raise KeyError(name)


def test_same_frozen_layers(keras_step, flaxtl_step):
  *_, frozen = keras_step
  plan, _ = flaxtl_step
  assert {n.removeprefix("backbone/") for n in plan.frozen_layers()} == frozen
  assert "block_15_depthwise" in frozen and FIRST_TRAINED not in frozen


def test_frozen_layers_and_their_statistics_do_not_move(
  keras_step, flaxtl_step
):
  *_, before, after, frozen = keras_step
  _, state = flaxtl_step
  for name in frozen:
    for got, want, start in zip(_ours(state, name), after[name], before[name]):
      np.testing.assert_array_equal(want, start)  # Keras
      np.testing.assert_array_equal(np.asarray(got), start)  # flaxtl


def _scales(steps: list[float]) -> list[float]:
  """How far Keras moved each array: a layer's parameters share one scale
  (their gradients have one size; a beta summing cancelling terms moves
  little), BN's moving mean and variance have their own."""
  params = max(steps[:2]) if len(steps) == 4 else max(steps)
  return (
    [params, params, *steps[2:]] if len(steps) == 4 else [params] * len(steps)
  )


def test_updated_kernels_and_statistics_match_keras(
  keras_step, flaxtl_step, record_property
):
  *_, before, after, frozen = keras_step
  _, state = flaxtl_step
  worst = 0.0
  moved = 0
  for name in sorted(set(after) - frozen):
    steps = [
      float(np.abs(w - b).max()) for w, b in zip(after[name], before[name])
    ]
    moved += sum(step > 0 for step in steps)
    for got, want, scale in zip(
      _ours(state, name), after[name], _scales(steps)
    ):
      # Relative to how far Keras moved the layer in this step, give or take
      # the float32 rounding of the array itself.
      ulps = 2 * np.spacing(np.abs(want).max())
      diff = float(np.abs(np.asarray(got) - want).max())
      assert diff <= 1e-3 * scale + ulps, (name, diff, scale)
      worst = max(worst, diff / (scale + ulps))
  record_property("max_rel_diff_of_update", float(worst))
  trained_bn = [n for n in set(after) - frozen if len(after[n]) == 4]
  assert FIRST_TRAINED in trained_bn
  # Every trained array and every moving statistic of a trained BN moved.
  assert moved == sum(len(after[n]) for n in set(after) - frozen)
