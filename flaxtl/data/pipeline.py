"""Batches from an in-memory Dataset: training order, evaluation, prefetching.

Every process computes the same global permutation from (seed, epoch) and
takes its own rows of each global batch, so N processes together see exactly
the batches one process would, and a run resumed from `get_state()` continues
with the batch that would have come next, whatever the process count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
import queue
import threading
from typing import Any

import numpy as np

from flaxtl.data.dataset import Dataset
from flaxtl.errors import UserError

Batch = dict[str, np.ndarray]


def _local_batch(
  batch_size: int, process_count: int, process_index: int, what: str
) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise UserError(
      f"{what}={batch_size} does not split evenly across {process_count} processes"
    )
  if not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index {process_index} outside 0..{process_count - 1}"
    )
  return batch_size // process_count


class TrainIterator:
  """Infinite training batches {'image': uint8 (b, H, W, C), 'label': int32 (b,)}, b = B / processes.

  Each epoch is a fresh permutation seeded by (seed, epoch); the incomplete
  last batch of an epoch is dropped, so every step has the full batch size.
  """

  def __init__(
    self,
    ds: Dataset,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    process_index: int = 0,
    process_count: int = 1,
  ):
    if ds.labels is None:
      raise UserError("training data needs labels")
    self._local = _local_batch(
      batch_size, process_count, process_index, "batch_size"
    )
    if len(ds) < batch_size:
      raise UserError(
        f"batch_size={batch_size} is larger than the {len(ds)} training examples"
      )
    self.ds = ds
    self.batch_size = batch_size
    self.seed = int(seed)
    self.shuffle = shuffle
    self.process_index = process_index
    self.process_count = process_count
    self.steps_per_epoch = len(ds) // batch_size
    self.epoch = 0
    self.position = 0  # Batches of `epoch` already produced.
    self._order: np.ndarray | None = None

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> Batch:
    if self.position >= self.steps_per_epoch:
      self.epoch, self.position, self._order = self.epoch + 1, 0, None
    if self._order is None:
      self._order = self.order(self.epoch)
    start = self.position * self.batch_size + self.process_index * self._local
    idx = self._order[start : start + self._local]
    self.position += 1
    return {"image": self.ds.images[idx], "label": self.ds.labels[idx]}

  def order(self, epoch: int) -> np.ndarray:
    """The global example order of `epoch` (identical on every process)."""
    if not self.shuffle:
      return np.arange(len(self.ds))
    # SeedSequence wants non-negative entries; the mask keeps negative seeds distinct.
    return np.random.default_rng([self.seed & (2**64 - 1), epoch]).permutation(
      len(self.ds)
    )

  @property
  def step(self) -> int:
    """Batches produced since epoch 0 began."""
    return self.epoch * self.steps_per_epoch + self.position

  def get_state(self) -> dict[str, Any]:
    """JSON-able position of the global stream (independent of the process count)."""
    return {
      "epoch": self.epoch,
      "position": self.position,
      "seed": self.seed,
      "shuffle": self.shuffle,
      "num_examples": len(self.ds),
      "batch_size": self.batch_size,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues exactly after the last batch produced before `get_state()`."""
    saved = (state["num_examples"], state["batch_size"])
    if saved != (len(self.ds), self.batch_size):
      raise UserError(
        f"the checkpoint's data stream had {saved[0]} examples in global batches of {saved[1]}; "
        f"this run has {len(self.ds)} and {self.batch_size}, so it cannot resume where it stopped"
      )
    if not 0 <= state["position"] <= self.steps_per_epoch:
      raise ValueError(
        f"position {state['position']} outside 0..{self.steps_per_epoch}"
      )
    self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
    self.epoch, self.position, self._order = (
      int(state["epoch"]),
      int(state["position"]),
      None,
    )


def eval_batches(
  ds: Dataset, batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[Batch]:
  """Every example once, in order: {'image', 'label' (labelled data only), 'mask'}.

  All batches have b = batch_size / process_count rows; rows past the end of
  the data are zeros with mask False. Every process yields the same number of
  batches (ceil(N / batch_size)), as collective ops across processes require.
  """
  b = _local_batch(batch_size, process_count, process_index, "eval_batch_size")
  n = len(ds)
  for start in range(0, n, batch_size):
    lo = min(n, start + process_index * b)
    hi = min(n, lo + b)
    batch = {"image": _padded(ds.images, lo, hi, b)}
    if ds.labels is not None:
      batch["label"] = _padded(ds.labels, lo, hi, b)
    batch["mask"] = np.arange(b) < hi - lo
    yield batch


def _padded(x: np.ndarray, lo: int, hi: int, rows: int) -> np.ndarray:
  if hi - lo == rows:
    return x[lo:hi]
  out = np.zeros((rows, *x.shape[1:]), x.dtype)
  out[: hi - lo] = x[lo:hi]
  return out


_ITEM, _END, _ERROR = "item", "end", "error"


class Prefetcher:
  """Runs `iterator` (and `put`) on a background thread, `size` items ahead.

  An exception in the iterator or in `put` is re-raised in the consumer, with
  its traceback. `get_state()` is the wrapped iterator's state after the last
  item the consumer received (not after the ones queued ahead), so saving it
  loses no batch. Set state on the wrapped iterator before wrapping it.
  size=0 runs synchronously, without a thread.
  """

  def __init__(
    self,
    iterator: Iterable,
    size: int = 2,
    put: Callable[[Any], Any] | None = None,
  ):
    self._it = iter(iterator)
    self._put = put
    self._state = _state_of(self._it)
    self._done = False
    self._stop = threading.Event()
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
    self._thread = None
    if size > 0:
      # The thread gets no reference to self, so a Prefetcher dropped without
      # close() is still collected, and __del__ stops the thread.
      self._thread = threading.Thread(
        target=_produce,
        args=(self._it, put, self._queue, self._stop),
        name="flaxtl-prefetch",
        daemon=True,
      )
      self._thread.start()

  def __iter__(self) -> Prefetcher:
    return self

  def __next__(self) -> Any:
    if self._done:
      raise StopIteration
    if self._thread is None:
      return self._next_inline()
    kind, value, state = self._get()
    if kind == _ITEM:
      self._state = state
      return value
    self.close()
    if kind == _ERROR:
      raise value
    raise StopIteration

  def _get(self):
    while True:
      try:
        return self._queue.get(timeout=0.1)
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          return (_END, None, None)  # Closed from elsewhere.

  def _next_inline(self) -> Any:
    try:
      item = next(self._it)
    except StopIteration:
      self._done = True
      raise
    item = self._put(item) if self._put is not None else item
    self._state = _state_of(self._it)
    return item

  def get_state(self) -> dict[str, Any]:
    if self._state is None:
      raise TypeError(f"{type(self._it).__name__} has no get_state()")
    return dict(self._state)

  def close(self) -> None:
    """Stops the thread; queued items are dropped. Safe to call twice."""
    self._done = True
    self._stop.set()
    if (
      self._thread is not None
      and self._thread is not threading.current_thread()
    ):
      while self._thread.is_alive():
        _drain(self._queue)
        self._thread.join(timeout=0.05)
    _drain(self._queue)

  def __enter__(self) -> Prefetcher:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    if not getattr(self, "_done", True):
      self.close()


def _produce(
  it: Iterator, put: Callable | None, q: queue.Queue, stop: threading.Event
) -> None:
  """The producer thread: items, then an end marker or the exception, in order."""
  try:
    for item in it:
      if stop.is_set():
        break
      if put is not None:
        item = put(item)
      if not _offer(q, stop, (_ITEM, item, _state_of(it))):
        break
    else:
      _offer(q, stop, (_END, None, None))
  except BaseException as e:
    _offer(q, stop, (_ERROR, e, None))
  finally:
    # Closing a generator must happen on the thread that runs it.
    close = getattr(it, "close", None)
    if callable(close):
      close()


def _offer(q: queue.Queue, stop: threading.Event, entry) -> bool:
  # Polls so that close() can stop a producer waiting on a full queue.
  while not stop.is_set():
    try:
      q.put(entry, timeout=0.05)
      return True
    except queue.Full:
      pass
  return False


def prefetch(
  iterator: Iterable, size: int = 2, put: Callable[[Any], Any] | None = None
) -> Prefetcher:
  """Wraps `iterator` so its next `size` items (with `put` applied, e.g. a
  `jax.device_put` to the batch sharding) are prepared while the step runs."""
  return Prefetcher(iterator, size, put)


def _state_of(it) -> dict | None:
  get_state = getattr(it, "get_state", None)
  return get_state() if callable(get_state) else None


def _drain(q: queue.Queue) -> None:
  try:
    while True:
      q.get_nowait()
  except queue.Empty:
    pass
