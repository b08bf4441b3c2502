"""Batch iteration, multi-process sharding, eval padding, prefetching, on-device preprocessing."""

import json
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtl import data
from flaxtl.errors import UserError
from flaxtl.preprocess import CAFFE_MEAN_BGR, prepare_images


def toy(n: int = 22, labelled: bool = True) -> data.Dataset:
  """Image i is filled with the value i, so a batch's rows name their examples."""
  images = np.broadcast_to(
    np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 1)
  ).copy()
  labels = (np.arange(n) % 3).astype(np.int32) if labelled else None
  return data.Dataset(
    images, labels, None, ["a", "b", "c"] if labelled else None
  )


def ids(batch) -> list[int]:
  return batch["image"][:, 0, 0, 0].astype(int).tolist()


def take(it, k):
  return [ids(next(it)) for _ in range(k)]


def test_batches_shapes_and_epochs():
  it = data.TrainIterator(toy(22), batch_size=4, seed=0)
  assert (
    it.steps_per_epoch == 5
  )  # 22 // 4: the incomplete last batch is dropped.
  batch = next(it)
  assert (
    batch["image"].shape == (4, 4, 4, 1) and batch["image"].dtype == np.uint8
  )
  assert batch["label"].dtype == np.int32
  np.testing.assert_array_equal(
    batch["label"], np.array(ids(batch)) % 3
  )  # Labels travel with images.
  epoch0 = [ids(batch)] + take(it, 4)
  assert it.epoch == 0
  epoch1 = take(it, 5)
  assert it.epoch == 1
  for epoch in (epoch0, epoch1):
    flat = sum(epoch, [])
    assert len(set(flat)) == 20  # No repeats within an epoch.
  assert epoch0 != epoch1  # Reshuffled each epoch.


def test_deterministic_and_seeded():
  a = take(data.TrainIterator(toy(), 4, seed=3), 12)
  b = take(data.TrainIterator(toy(), 4, seed=3), 12)
  c = take(data.TrainIterator(toy(), 4, seed=4), 12)
  assert a == b and a != c
  ordered = take(data.TrainIterator(toy(), 4, shuffle=False), 6)
  assert ordered[0] == [0, 1, 2, 3] and ordered[5] == [0, 1, 2, 3]


@pytest.mark.parametrize(
  "consumed", [3, 5, 7]
)  # Mid-epoch, at the epoch boundary, in epoch 1.
def test_resume_gives_the_same_next_batches(consumed):
  it = data.TrainIterator(toy(), 4, seed=9)
  take(it, consumed)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 8)
  resumed = data.TrainIterator(
    toy(), 4, seed=0
  )  # The seed comes from the state.
  resumed.set_state(state)
  assert take(resumed, 8) == expected


def test_resume_rejects_another_dataset():
  state = data.TrainIterator(toy(22), 4).get_state()
  with pytest.raises(UserError, match="had 22 examples in global batches of 4"):
    data.TrainIterator(toy(30), 4).set_state(state)


def test_two_processes_concatenate_to_one():
  one = data.TrainIterator(toy(), 8, seed=5)
  parts = [
    data.TrainIterator(toy(), 8, seed=5, process_index=i, process_count=2)
    for i in range(2)
  ]
  for _ in range(6):  # Crosses an epoch boundary (steps_per_epoch == 2).
    full = next(one)
    halves = [next(p) for p in parts]
    assert halves[0]["image"].shape[0] == 4
    for key in ("image", "label"):
      np.testing.assert_array_equal(
        np.concatenate([h[key] for h in halves]), full[key]
      )


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
  assert all(
    len(batches) == 3 for batches in per_process
  )  # ceil(22 / 8) on every process.
  seen, labels = [], []
  for step in range(3):
    for p in range(process_count):
      batch = per_process[p][step]
      assert (
        batch["image"].shape == (8 // process_count, 4, 4, 1)
        and batch["mask"].dtype == bool
      )
      seen += np.array(ids(batch))[batch["mask"]].tolist()
      labels += batch["label"][batch["mask"]].tolist()
  assert seen == list(range(22))
  assert labels == (np.arange(22) % 3).tolist()
  last = per_process[-1][-1]
  assert (
    not last["mask"][-1] and last["image"][~last["mask"]].max(initial=0) == 0
  )


def test_eval_batches_unlabelled():
  batches = list(data.eval_batches(toy(5, labelled=False), 4))
  assert [b["mask"].sum() for b in batches] == [
    4,
    1,
  ] and "label" not in batches[0]


def test_prefetch_applies_put_and_ends():
  it = data.prefetch(iter(range(10)), size=3, put=lambda x: x * 2)
  assert list(it) == [2 * i for i in range(10)]
  assert list(data.prefetch(iter(range(4)), size=0, put=lambda x: -x)) == [
    0,
    -1,
    -2,
    -3,
  ]


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
  pf.close()
  pf.close()  # Twice is fine.
  assert threading.active_count() == before
  with pytest.raises(StopIteration):
    next(pf)


def test_prefetch_state_is_what_the_consumer_got():
  it = data.TrainIterator(toy(), 4, seed=2)
  with data.prefetch(it, size=3) as pf:
    take(pf, 4)
    state = pf.get_state()  # The thread has already produced more than 4.
    expected = take(pf, 3)
  resumed = data.TrainIterator(toy(), 4)
  resumed.set_state(state)
  assert take(resumed, 3) == expected


def test_prefetch_device_put():
  batch = next(data.prefetch(data.TrainIterator(toy(), 4), put=jax.device_put))
  assert isinstance(batch["image"], jax.Array) and batch["image"].shape == (
    4,
    4,
    4,
    1,
  )


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
  kept = [
    np.array_equal(a, b) for a, b in zip(np.asarray(flips), np.asarray(images))
  ]
  mirrored = [
    np.array_equal(a, b[:, ::-1])
    for a, b in zip(np.asarray(flips), np.asarray(images))
  ]
  assert all(
    k != m for k, m in zip(kept, mirrored)
  )  # Each image kept or mirrored, no crop.
  assert any(kept) and any(mirrored)
  assert np.array_equal(
    data.augment(jax.random.PRNGKey(2), images, pad=0, flip=False), images
  )


def test_prepare_images_on_a_batch_under_jit():
  batch = next(data.TrainIterator(toy(8), 4, shuffle=False))
  batch["image"][:] = 100  # A constant image: resizing keeps it constant.
  out = jax.jit(lambda x: prepare_images(x, 64, "caffe"))(batch["image"])
  assert out.shape == (4, 64, 64, 3) and out.dtype == jnp.float32
  expected = 100.0 - np.asarray(
    CAFFE_MEAN_BGR, np.float32
  )  # Gray tiled to RGB, flipped to BGR, mean-subtracted.
  np.testing.assert_allclose(
    np.asarray(out), np.broadcast_to(expected, out.shape), atol=1e-4
  )
  # A real digit: the jitted path equals the eager one and keeps the bright strokes.
  digits = data.load(_sample_cfg()).test.images[:4]
  jitted = jax.jit(lambda x: prepare_images(x, 64, "caffe"))(digits)
  np.testing.assert_allclose(
    jitted, prepare_images(digits, 64, "caffe"), atol=1e-3
  )
  assert float(jitted.max()) > 100  # 255 minus a mean of ~104-124.


def _sample_cfg():
  import ml_collections

  return ml_collections.ConfigDict(
    dict(
      source="mnist_sample",
      test_source=None,
      val_fraction=0.0,
      split_seed=42,
      stratify=True,
      load_size=None,
      tfds_data_dir=None,
      max_examples=None,
    )
  )
