"""Batches on grain: training stream, evaluation, device prefetch.

A grain element is one batch, so in-memory arrays are gathered with one
fancy index per batch (as fast as before grain) while files are decoded per
example inside the element, in grain's threads or worker processes:

    MapDataset.range(step, ...)      global step numbers, from where we are
      .map(_TrainBatches(...))       step -> this process's rows of the
                                     global batch: epoch permutation seeded by
                                     (seed, epoch), rows p*b..(p+1)*b-1 of it,
                                     read + decoded + host transform
      .to_iter_dataset(ReadOptions)  data.prefetch batches ahead on threads
      .mp_prefetch(workers)          or in data.workers processes

N processes together make exactly the global batches one process would, row
for row (process p holds rows p*B/P..(p+1)*B/P-1, which is how
`make_array_from_process_local_data` assembles them; dropout masks then meet
the same examples). Per-example randomness (data.augment='inception') is
seeded by the example's position in the global stream, so it does not depend
on worker or process counts either. The iterator state is that stream
position (`global_next_index`, as grain's ElasticIterator calls it), the same
on every process: a resumed run rebuilds the graph at that step and continues
with the exact next batch. The incomplete last batch of each epoch is
dropped. Evaluation reads every example once, padded to whole batches with
mask False.

In-memory arrays of one size (the embedded sample, npz, cached features) keep
their native size (the device resizes them inside the step) and are read on
the consumer's thread (`ReadOptions(num_threads=0)`, grain's advice for data
already in memory); files are decoded and resized on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
import dataclasses
import logging
import math
import multiprocessing
import os
import sys
import threading
import time
from typing import Any

from absl import flags
import grain
from grain.experimental import ThreadPrefetchDatasetIterator
import numpy as np

from flaxtl.data import images, transforms
from flaxtl.data.dataset import Dataset
from flaxtl.errors import UserError

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

# With data.skip_corrupt, this many unreadable files in a row stop the run:
# the data is not worth training on.
MAX_CONSECUTIVE_CORRUPT = 64
# Tells augmentation streams apart from the shuffle's (seed, epoch).
_AUGMENT = 0x417567


@dataclasses.dataclass(frozen=True)
class Options:
  """How batches are made. image_size: host output size (None: in-memory
  arrays keep theirs, files get `model_size`); augment: transforms.AUGMENTS."""

  image_size: int | None = None
  model_size: int | None = None
  augment: str = "none"
  workers: int = 0
  prefetch: int = 2
  skip_corrupt: bool = False

  def __post_init__(self):
    if self.augment not in transforms.AUGMENTS:
      raise UserError(
        f"data.augment={self.augment!r}: expected one of "
        f"{', '.join(transforms.AUGMENTS)}"
      )
    for key in ("workers", "prefetch"):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"data.{key} must be an integer >= 0, got {value!r}")
    if self.image_size is not None and self.image_size < 1:
      raise UserError(
        f"data.image_size must be positive, got {self.image_size}"
      )

  @classmethod
  def from_config(cls, config: Any) -> Options:
    """From a whole config (its `data` keys and the model's `image_size`)."""
    d = config.data
    size = d.image_size
    if d.load_size is not None:
      log.warning(
        "data.load_size is deprecated: images of any size are resized on the "
        "host (shorter side, then centre crop); use data.image_size instead"
      )
      size = size or d.load_size
    return cls(
      image_size=size,
      model_size=config.image_size,
      augment=transforms.augment_mode(d.augment),
      workers=d.workers,
      prefetch=d.prefetch,
      skip_corrupt=bool(d.skip_corrupt),
    )

  def output_size(self, ds: Dataset, train: bool) -> int | None:
    """Host output size for `ds` (None: batched at its own size)."""
    host_aug = train and self.augment in transforms.HOST_AUGMENTS
    if ds.in_memory and self.image_size is None and not host_aug:
      return None
    size = self.image_size or self.model_size
    if size is None:
      raise ValueError("decoding images needs Options.image_size/model_size")
    return size

  def for_arrays(self) -> Options:
    """The same pipeline for arrays that must pass as they are (features)."""
    return dataclasses.replace(self, image_size=None, augment="none")


_watching = threading.Event()


def _exit_with_parent() -> None:
  """In a grain worker: exits when the training process is gone.

  grain's workers are daemon processes, stopped by their parent at a normal
  exit; a SIGKILLed run would leave them running (found by the SIGKILL resume
  test). They are spawned from grain's own threads, so PR_SET_PDEATHSIG
  (tied to the creating thread) does not fit; a polling thread does.
  """
  if _watching.is_set():
    return
  _watching.set()
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(1)

  threading.Thread(
    target=watch, name="flaxtl-parent-watch", daemon=True
  ).start()


@dataclasses.dataclass(frozen=True)
class _Reader:
  """Reads examples of `ds` as uint8 images of one shape; runs in grain's
  threads or worker processes. size None: in-memory arrays as they are."""

  ds: Dataset
  size: int | None
  augment: str = "none"  # Host augmentation: 'none' or 'inception'.
  skip_corrupt: bool = False

  def __setstate__(self, state: dict) -> None:
    # Unpickled only in grain's worker processes.
    self.__dict__.update(state)
    if multiprocessing.parent_process() is not None:
      _exit_with_parent()

  def gather(self, indices: np.ndarray) -> np.ndarray:
    """In-memory arrays: one fancy index."""
    return self.ds.source.images[indices]

  def image(self, index: int, rng: np.random.Generator | None) -> np.ndarray:
    """Example `index` decoded and fitted to `size` (RGB)."""
    record = self.ds.source[index]
    if isinstance(record, np.ndarray) and self.size is None:
      return record
    where = self.ds.describe(index)
    if isinstance(record, np.ndarray):
      img = images.from_array(record)
    else:
      img = images.open_image(record, where)
    try:
      # RGB whatever the file: batches need one channel count, and a set may
      # mix grayscale and colour files.
      return transforms.fit(img, self.size, rng, self.augment)
    except images.DECODE_ERRORS as e:
      reason = images.describe_error(e)
      raise UserError(f"{where}: cannot read image: {reason}") from None

  def blank(self) -> np.ndarray:
    if self.size is None:
      first = self.ds.source[0]
      return np.zeros(first.shape, first.dtype)
    return np.zeros((self.size, self.size, 3), np.uint8)


@dataclasses.dataclass(frozen=True)
class _TrainBatches:
  """Global step -> {'image', 'label', 'corrupt'}: this process's rows of the
  step's global batch. corrupt: per row, the index of an unreadable example
  replaced by the next readable one (data.skip_corrupt), else -1."""

  reader: _Reader
  batch_size: int
  local: int
  process_index: int
  steps_per_epoch: int
  seed: int
  shuffle: bool

  def order(self, epoch: int) -> np.ndarray:
    """The global example order of `epoch` (identical on every process)."""
    n = len(self.reader.ds)
    if not self.shuffle:
      return np.arange(n)
    cache = self.__dict__.get("_order")
    if cache is None or cache[0] != epoch:  # One permutation per epoch.
      # SeedSequence wants non-negative entries; the mask keeps negative
      # seeds distinct.
      rng = np.random.default_rng([self.seed & (2**64 - 1), epoch])
      cache = (epoch, rng.permutation(n))
      self.__dict__["_order"] = cache
    return cache[1]

  def __call__(self, step: int) -> Batch:
    epoch, k = divmod(step, self.steps_per_epoch)
    first = k * self.batch_size + self.process_index * self.local
    rows = self.order(epoch)[first : first + self.local].copy()
    labels = self.reader.ds.labels
    corrupt = np.full(self.local, -1, np.int32)
    if self.reader.size is None:
      return {
        "image": self.reader.gather(rows),
        "label": labels[rows],
        "corrupt": corrupt,
      }
    position = step * self.batch_size + self.process_index * self.local
    out = []
    for r, index in enumerate(rows):
      rng = None
      if self.reader.augment != "none":  # Per stream position.
        seed = [self.seed & (2**64 - 1), _AUGMENT, position + r]
        rng = np.random.default_rng(seed)
      index, corrupt[r] = self._readable(int(index), rng, out)
      rows[r] = index
    return {"image": np.stack(out), "label": labels[rows], "corrupt": corrupt}

  def _readable(self, index: int, rng, out: list) -> tuple[int, int]:
    """Appends example `index` (or the next readable one) to `out`."""
    n, skipped = len(self.reader.ds), -1
    for attempt in range(MAX_CONSECUTIVE_CORRUPT + 1):
      try:
        out.append(self.reader.image(index, rng))
        return index, skipped
      except UserError:
        if not self.reader.skip_corrupt or attempt == MAX_CONSECUTIVE_CORRUPT:
          raise
        skipped = index if skipped < 0 else skipped
        index = (index + 1) % n
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class _EvalBatches:
  """Batch j -> this process's rows of global eval batch j, padded past the
  end (and, with data.skip_corrupt, for unreadable examples) with mask False."""

  reader: _Reader
  batch_size: int
  local: int
  process_index: int

  def __call__(self, j: int) -> Batch:
    n = len(self.reader.ds)
    first = j * self.batch_size + self.process_index * self.local
    positions = np.arange(first, first + self.local)
    valid = positions < n
    rows = np.where(valid, positions, 0)
    corrupt = np.full(self.local, -1, np.int32)
    if self.reader.size is None:
      images_ = self.reader.gather(rows)
    else:
      out = []
      for r, index in enumerate(rows):
        if not valid[r]:
          out.append(self.reader.blank())
          continue
        try:
          out.append(self.reader.image(int(index), None))
        except UserError:
          if not self.reader.skip_corrupt:
            raise
          out.append(self.reader.blank())
          corrupt[r] = index
      images_ = np.stack(out)
    mask = valid & (corrupt < 0)
    keep = mask.reshape(-1, *[1] * (images_.ndim - 1))
    images_ = np.where(keep, images_, 0).astype(images_.dtype)
    batch = {"image": images_}
    if self.reader.ds.labels is not None:
      batch["label"] = np.where(mask, self.reader.ds.labels[rows], 0).astype(
        np.int32
      )
    batch["mask"] = mask
    batch["corrupt"] = corrupt
    return batch


def _local_batch(
  batch_size: int, process_count: int, process_index: int, what: str
) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise UserError(
      f"{what}={batch_size} does not split evenly across {process_count} "
      "processes"
    )
  if not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index {process_index} outside 0..{process_count - 1}"
    )
  return batch_size // process_count


def _read_options(ds: Dataset, opts: Options) -> grain.ReadOptions:
  if ds.in_memory:
    return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  # Inside worker processes one thread each: the processes are the parallelism.
  threads = 1 if opts.workers else max(1, opts.prefetch)
  return grain.ReadOptions(
    num_threads=threads, prefetch_buffer_size=max(1, opts.prefetch)
  )


def _mp_options(ds: Dataset, opts: Options):
  if ds.in_memory or not opts.workers:
    return None  # Arrays would be pickled into every worker.
  # grain's workers read absl flags; CLIs without absl have not parsed any.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return grain.MultiprocessingOptions(
    num_workers=opts.workers, per_worker_buffer_size=max(1, opts.prefetch)
  )


def _iterate(
  graph: grain.MapDataset, ds: Dataset, opts: Options
) -> grain.DatasetIterator:
  stream = graph.to_iter_dataset(_read_options(ds, opts))
  mp = _mp_options(ds, opts)
  if mp is not None:
    stream = stream.mp_prefetch(mp)
  return iter(stream)


class TrainIterator:
  """Infinite training batches {'image': uint8 (b, H, W, C), 'label': int32
  (b,)}, b = B / processes. Each epoch is a fresh permutation seeded by
  (seed, epoch); the incomplete last batch of an epoch is dropped."""

  def __init__(
    self,
    ds: Dataset,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    options: Options = Options(),
  ):
    if ds.labels is None:
      raise UserError("training data needs labels")
    local = _local_batch(batch_size, process_count, process_index, "batch_size")
    if len(ds) < batch_size:
      raise UserError(
        f"batch_size={batch_size} is larger than the {len(ds)} training "
        "examples"
      )
    self.ds = ds
    self.batch_size = batch_size
    self.seed = int(seed)
    self.shuffle = shuffle
    self.steps_per_epoch = len(ds) // batch_size
    self.skipped: set[int] = set()  # Corrupt examples skipped so far.
    self._options = options
    host_aug = options.augment in transforms.HOST_AUGMENTS
    self._batches = _TrainBatches(
      reader=_Reader(
        ds,
        options.output_size(ds, train=True),
        options.augment if host_aug else "none",
        options.skip_corrupt,
      ),
      batch_size=batch_size,
      local=local,
      process_index=process_index,
      steps_per_epoch=self.steps_per_epoch,
      seed=self.seed,
      shuffle=shuffle,
    )
    self.step = 0  # Global batches produced since epoch 0 began.
    self._it: grain.DatasetIterator | None = None

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> Batch:
    if self._it is None:  # Started lazily: set_state may come first.
      graph = grain.MapDataset.range(self.step, sys.maxsize)
      self._it = _iterate(graph.map(self._batches), self.ds, self._options)
    try:
      batch = next(self._it)
    except UserError as e:
      raise UserError(f"training step {self.step + 1}: {e}") from None
    self.step += 1
    for index in np.unique(batch.pop("corrupt")):
      if index >= 0 and int(index) not in self.skipped:
        self.skipped.add(int(index))
        log.warning(
          "training step %d: skipped unreadable %s (data.skip_corrupt)",
          self.step,
          self.ds.describe(int(index)),
        )
    return batch

  @property
  def epoch(self) -> int:
    return self.step // self.steps_per_epoch

  @property
  def position(self) -> int:
    """Examples of the global stream consumed so far."""
    return self.step * self.batch_size

  def order(self, epoch: int) -> np.ndarray:
    """The global example order of `epoch` (identical on every process)."""
    return self._batches.order(epoch)

  def get_state(self) -> dict[str, Any]:
    """JSON-able position of the global stream (independent of the process
    and worker counts)."""
    return {
      "global_next_index": self.position,
      "seed": self.seed,
      "shuffle": self.shuffle,
      "num_examples": len(self.ds),
      "batch_size": self.batch_size,
      "skipped": sorted(self.skipped),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues exactly after the last batch produced before `get_state()`."""
    saved = (state["num_examples"], state["batch_size"])
    if saved != (len(self.ds), self.batch_size):
      raise UserError(
        f"the checkpoint's data stream had {saved[0]} examples in global "
        f"batches of {saved[1]}; this run has {len(self.ds)} and "
        f"{self.batch_size}, so it cannot resume where it stopped: use the "
        "old values or a new workdir"
      )
    if (int(state["seed"]), bool(state["shuffle"])) != (
      self.seed,
      self.shuffle,
    ):
      raise UserError(
        f"the checkpoint's data stream was shuffled with seed "
        f"{state['seed']} (shuffle={state['shuffle']}); this run has "
        f"{self.seed} ({self.shuffle}): use the old seed or a new workdir"
      )
    if "global_next_index" in state:
      step = int(state["global_next_index"]) // self.batch_size
    else:  # Written by the iterator before grain: same steps, same order.
      step = int(state["epoch"]) * self.steps_per_epoch + int(state["position"])
    self.close()
    self.step = step
    self.skipped = set(state.get("skipped", ()))

  def close(self) -> None:
    """Stops grain's threads and worker processes."""
    if self._it is not None:
      self._it.close()
      self._it = None


def eval_batches(
  ds: Dataset,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  options: Options = Options(),
  skipped: set[int] | None = None,
) -> Iterator[Batch]:
  """Every example once, in order: {'image', 'label' (labelled data only),
  'mask'}.

  All batches have b = batch_size / process_count rows; rows past the end of
  the data are zeros with mask False. Every process yields the same number of
  batches (ceil(N / batch_size)), as collective ops across processes require.
  With data.skip_corrupt an unreadable example is masked out and its index
  added to `skipped`.
  """
  b = _local_batch(batch_size, process_count, process_index, "eval_batch_size")
  n = len(ds)
  if n == 0:
    return
  reader = _Reader(
    ds, options.output_size(ds, train=False), "none", options.skip_corrupt
  )
  make = _EvalBatches(reader, batch_size, b, process_index)
  graph = grain.MapDataset.range(math.ceil(n / batch_size)).map(make)
  it = _iterate(graph, ds, options)
  try:
    for batch in it:
      corrupt = batch.pop("corrupt")
      for index in corrupt[corrupt >= 0]:
        if skipped is not None:
          skipped.add(int(index))
        log.warning(
          "skipped unreadable %s (data.skip_corrupt)", ds.describe(int(index))
        )
      yield batch
  finally:
    it.close()


class _Put:
  """`put(next(iterator))` with the wrapped iterator's state."""

  def __init__(self, iterator, put: Callable[[Any], Any] | None):
    self._it = iterator
    self._put = put

  def __iter__(self):
    return self

  def __next__(self):
    item = next(self._it)
    return self._put(item) if self._put is not None else item

  def get_state(self):
    get_state = getattr(self._it, "get_state", None)
    return get_state() if callable(get_state) else None

  def set_state(self, state) -> None:
    self._it.set_state(state)


def prefetch(
  iterator: Iterable, size: int = 2, put: Callable[[Any], Any] | None = None
) -> ThreadPrefetchDatasetIterator:
  """grain's thread prefetch of `put(item)` (e.g. a device_put to the batch
  sharding), `size` items ahead; size=0 runs on the consumer's thread.

  `get_state()` is the iterator's state after the last item the consumer
  received, not after the ones queued ahead, so saving it loses no batch.
  An exception in the iterator or in `put` is raised in the consumer.
  """
  return ThreadPrefetchDatasetIterator(_Put(iter(iterator), put), size)
