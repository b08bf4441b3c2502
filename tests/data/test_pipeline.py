"""Training stream, resume, process sharding, eval padding, device prefetch,
on-device augmentation and preprocessing, on in-memory data."""

import json
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from flaxtl import data
from flaxtl.errors import UserError
from flaxtl.preprocess import CAFFE_MEAN_BGR, prepare_images


def toy(n: int = 22, labelled: bool = True) -> data.Dataset:
  """Image i is filled with the value i, so a batch's rows name their
  examples."""
  images = np.broadcast_to(
    np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 1)
  ).copy()
  labels = (np.arange(n) % 3).astype(np.int32) if labelled else None
  return data.Dataset.from_arrays(
    images, labels, None, ["a", "b", "c"] if labelled else None
  )


def ids(batch) -> list[int]:
  return batch["image"][:, 0, 0, 0].astype(int).tolist()


def take(it, k):
  return [ids(next(it)) for _ in range(k)]


def test_batches_shapes_and_epochs():
  it = data.TrainIterator(toy(22), batch_size=4, seed=0)
  assert it.steps_per_epoch == 5  # 22 // 4: the last 2 are dropped.
  batch = next(it)
  assert batch["image"].shape == (4, 4, 4, 1)
  assert batch["image"].dtype == np.uint8
  assert batch["label"].dtype == np.int32
  assert set(batch) == {"image", "label"}
  # Labels travel with images.
  np.testing.assert_array_equal(batch["label"], np.array(ids(batch)) % 3)
  epoch0 = [ids(batch), *take(it, 4)]
  assert it.epoch == 1 and it.step == 5
  epoch1 = take(it, 5)
  for epoch in (epoch0, epoch1):
    seen = [i for batch in epoch for i in batch]
    assert len(set(seen)) == 20  # No repeats within an epoch.
  assert epoch0 != epoch1  # Reshuffled each epoch.


def test_deterministic_and_seeded():
  a = take(data.TrainIterator(toy(), 4, seed=3), 12)
  b = take(data.TrainIterator(toy(), 4, seed=3), 12)
  c = take(data.TrainIterator(toy(), 4, seed=4), 12)
  assert a == b and a != c
  ordered = take(data.TrainIterator(toy(), 4, shuffle=False), 6)
  assert ordered[0] == [0, 1, 2, 3] and ordered[5] == [0, 1, 2, 3]


# Mid-epoch, at the epoch boundary, in epoch 1.
@pytest.mark.parametrize("consumed", [3, 5, 7])
def test_resume_gives_the_same_next_batches(consumed):
  it = data.TrainIterator(toy(), 4, seed=9)
  take(it, consumed)
  state = json.loads(json.dumps(it.get_state()))
  assert state["global_next_index"] == 4 * consumed
  expected = take(it, 8)
  resumed = data.TrainIterator(toy(), 4, seed=9)
  resumed.set_state(state)
  assert take(resumed, 8) == expected


def test_order_and_pre_grain_checkpoint_state():
  it = data.TrainIterator(toy(), 4, seed=9)
  # The permutation the in-memory iterator before grain used: a run on
  # in-memory data gives the same batches, and its checkpoints resume.
  np.testing.assert_array_equal(
    it.order(1), np.random.default_rng([9, 1]).permutation(22)
  )
  old = {"epoch": 1, "position": 2, "seed": 9, "shuffle": True}
  it.set_state({**old, "num_examples": 22, "batch_size": 4})
  assert ids(next(it)) == it.order(1)[8:12].tolist()
  assert it.step == 5 + 3


def test_resume_rejects_another_dataset_or_seed():
  state = data.TrainIterator(toy(22), 4).get_state()
  with pytest.raises(UserError, match="had 22 examples in global batches of 4"):
    data.TrainIterator(toy(30), 4).set_state(state)
  with pytest.raises(UserError, match="shuffled with seed 0"):
    data.TrainIterator(toy(22), 4, seed=1).set_state(state)


def test_two_processes_split_each_global_batch():
  one = data.TrainIterator(toy(), 8, seed=5)
  parts = [
    data.TrainIterator(toy(), 8, seed=5, process_index=i, process_count=2)
    for i in range(2)
  ]
  for _ in range(6):  # Crosses epoch boundaries (steps_per_epoch == 2).
    full = next(one)
    halves = [next(p) for p in parts]
    assert halves[0]["image"].shape[0] == 4
    # Row for row the global batch: make_array_from_process_local_data
    # concatenates the processes' rows.
    for key in ("image", "label"):
      np.testing.assert_array_equal(
        np.concatenate([h[key] for h in halves]), full[key]
      )
  # The state is the global position, the same on every process.
  assert parts[0].get_state() == parts[1].get_state() == one.get_state()


def test_batch_must_split_across_processes():
  with pytest.raises(
    UserError, match="batch_size=6 does not split evenly across 4 processes"
  ):
    data.TrainIterator(toy(), 6, process_count=4)
  with pytest.raises(UserError, match="larger than the 22 training examples"):
    data.TrainIterator(toy(), 32)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_example_once(process_count):
  ds = toy(22)
  per_process = [
    list(data.eval_batches(ds, 8, i, process_count))
    for i in range(process_count)
  ]
  # ceil(22 / 8) batches on every process.
  assert all(len(batches) == 3 for batches in per_process)
  seen, labels = [], []
  for step in range(3):
    for p in range(process_count):
      batch = per_process[p][step]
      assert batch["image"].shape == (8 // process_count, 4, 4, 1)
      assert batch["mask"].dtype == bool
      seen += np.array(ids(batch))[batch["mask"]].tolist()
      labels += batch["label"][batch["mask"]].tolist()
  assert seen == list(range(22))  # In order, each once.
  assert labels == [s % 3 for s in seen]
  last = per_process[-1][-1]
  assert not last["mask"][-1]
  assert last["image"][~last["mask"]].max(initial=0) == 0


def test_eval_batches_unlabelled():
  batches = list(data.eval_batches(toy(5, labelled=False), 4))
  assert [b["mask"].sum() for b in batches] == [4, 1]
  assert "label" not in batches[0]


def test_prefetch_applies_put_and_ends():
  it = data.prefetch(iter(range(10)), size=3, put=lambda x: x * 2)
  assert list(it) == [2 * i for i in range(10)]
  sync = data.prefetch(iter(range(4)), size=0, put=lambda x: -x)
  assert list(sync) == [0, -1, -2, -3]


def test_prefetch_reraises_in_consumer():
  def failing():
    yield 1
    yield 2
    raise ValueError("corrupt batch 3")

  got = []
  with pytest.raises(ValueError, match="corrupt batch 3"):
    for x in data.prefetch(failing(), size=2):
      got.append(x)
  assert got == [1, 2]

  def bad_put(x):
    raise RuntimeError("device_put failed")

  with pytest.raises(RuntimeError, match="device_put failed"):
    next(data.prefetch(iter(range(3)), put=bad_put))


def test_prefetch_closes_its_thread():
  before = threading.active_count()
  pf = data.prefetch(data.TrainIterator(toy(), 4), size=2)
  next(pf)
  assert threading.active_count() > before
  pf.close()
  pf.close()  # Twice is fine.
  assert threading.active_count() == before


def test_prefetch_state_is_what_the_consumer_got():
  it = data.TrainIterator(toy(), 4, seed=2)
  pf = data.prefetch(it, size=3)
  take(pf, 4)
  state = pf.get_state()  # The thread has already produced more than 4.
  assert state["global_next_index"] == 16
  expected = take(pf, 3)
  pf.close()
  resumed = data.TrainIterator(toy(), 4, seed=2)
  resumed.set_state(state)
  assert take(resumed, 3) == expected


def test_prefetch_device_put():
  pf = data.prefetch(data.TrainIterator(toy(), 4), put=jax.device_put)
  batch = next(pf)
  pf.close()
  assert isinstance(batch["image"], jax.Array)
  assert batch["image"].shape == (4, 4, 4, 1)


def test_augment_under_jit():
  images = jnp.asarray(
    np.random.default_rng(0).integers(0, 255, (6, 16, 16, 3)), jnp.float32
  )
  out = jax.jit(data.augment)(jax.random.PRNGKey(0), images)
  assert out.shape == images.shape
  assert not np.allclose(out, images)
  flips = jax.jit(lambda r, x: data.augment(r, x, pad=0))(
    jax.random.PRNGKey(1), images
  )
  pairs = list(zip(np.asarray(flips), np.asarray(images)))
  kept = [np.array_equal(a, b) for a, b in pairs]
  mirrored = [np.array_equal(a, b[:, ::-1]) for a, b in pairs]
  # Each image kept or mirrored, no crop.
  assert all(k != m for k, m in zip(kept, mirrored))
  assert any(kept) and any(mirrored)
  assert np.array_equal(
    data.augment(jax.random.PRNGKey(2), images, pad=0, flip=False), images
  )


def test_device_augment_modes():
  def cfg(value):
    return ml_collections.ConfigDict({"data": {"augment": value}})

  assert data.device_augment(cfg("flip_crop")) is data.augment
  assert data.device_augment(cfg(True)) is data.augment  # Older configs.
  assert data.device_augment(cfg("inception")) is None  # On the host.
  assert data.device_augment(cfg("none")) is None


def test_prepare_images_on_a_batch_under_jit():
  batch = next(data.TrainIterator(toy(8), 4, shuffle=False))
  images = np.full_like(batch["image"], 100)  # Resizing keeps it constant.
  out = jax.jit(lambda x: prepare_images(x, 64, "caffe"))(images)
  assert out.shape == (4, 64, 64, 3) and out.dtype == jnp.float32
  # Gray tiled to RGB, flipped to BGR, mean-subtracted.
  expected = 100.0 - np.asarray(CAFFE_MEAN_BGR, np.float32)
  np.testing.assert_allclose(
    np.asarray(out), np.broadcast_to(expected, out.shape), atol=1e-4
  )
  # A real digit: the jitted path equals the eager one and keeps the strokes.
  digits = data.load(_sample_cfg())
  digits = digits.test.images[:4]
  jitted = jax.jit(lambda x: prepare_images(x, 64, "caffe"))(digits)
  np.testing.assert_allclose(
    jitted, prepare_images(digits, 64, "caffe"), atol=1e-3
  )
  assert float(jitted.max()) > 100  # 255 minus a mean of ~104-124.


def _sample_cfg():
  """The declared data config on the embedded sample, nothing held out."""
  cfg = base.get_base().data
  cfg.val_fraction = 0.0
  return cfg
