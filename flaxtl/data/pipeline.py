"""Batches on grain: training stream, evaluation, device prefetch.

Training is one grain graph over the global example stream:

    MapDataset.source(ds)            records, read lazily
      .shuffle(seed)                 a new permutation each epoch (seed, epoch)
      [: steps_per_epoch * B]        the incomplete last batch is dropped
      .repeat()                      epochs without end
      .random_map(load)              decode + host transform, rng per position
      [process-major order]          see `_ProcessMajor`
    ElasticIterator(B, ShardOptions) process p takes positions p::P of the
                                     stream, batches of B/P, on `data.prefetch`
                                     threads or `data.workers` processes

N processes together make exactly the global batches one process would, row
for row (process p holds rows p*B/P..(p+1)*B/P-1, which is how
`make_array_from_process_local_data` assembles them; dropout masks and any
per-row randomness then meet the same examples). The iterator state is one
number, the stream position (grain's `global_next_index`), the same on every
process and for any worker count: a resumed run continues with the exact
next batch. Evaluation reads every example once, padded to whole batches
with mask False.

In-memory arrays of one size (the embedded sample, npz, cached features) are
read on the consumer's thread (`ReadOptions(num_threads=0)`, grain's advice
for data already in memory) and keep their native size: the device resizes
them inside the step, as before. Files are decoded and resized on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
import dataclasses
import logging
import math
import multiprocessing
import os
import threading
import time
from typing import Any

from absl import flags
import grain
from grain.experimental import ElasticIterator, ThreadPrefetchDatasetIterator
import numpy as np

from flaxtl.data import images, transforms
from flaxtl.data.dataset import Dataset
from flaxtl.errors import UserError

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

# With data.skip_corrupt, this many unreadable files in a row stop the run:
# the data is not worth training on.
MAX_CONSECUTIVE_CORRUPT = 64


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
    size = d.get("image_size")
    if d.get("load_size") is not None:
      log.warning(
        "data.load_size is deprecated: images of any size are resized on the "
        "host (shorter side, then centre crop); use data.image_size instead"
      )
      size = size or d.load_size
    return cls(
      image_size=size,
      model_size=config.get("image_size"),
      augment=transforms.augment_mode(d.get("augment", "none")),
      workers=d.get("workers", 0),
      prefetch=d.get("prefetch", 2),
      skip_corrupt=bool(d.get("skip_corrupt", False)),
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
class _Loader:
  """One example -> {'image', ['label'], 'corrupt'}; runs in grain's threads
  or worker processes. corrupt: the index of an unreadable example skipped
  in its place (data.skip_corrupt), else -1."""

  ds: Dataset
  size: int | None
  augment: str = "none"
  skip_corrupt: bool = False

  def __setstate__(self, state: dict) -> None:
    # Unpickled only in grain's worker processes.
    self.__dict__.update(state)
    if multiprocessing.parent_process() is not None:
      _exit_with_parent()

  def __call__(self, element: dict, rng: np.random.Generator) -> Batch:
    """random_map for training: a corrupt example is replaced by the next
    readable one (so batches keep their size)."""
    index, corrupt = element["index"], -1
    record = element["record"]
    for attempt in range(MAX_CONSECUTIVE_CORRUPT + 1):
      try:
        image = self.image(index, record, rng)
        break
      except UserError:
        if not self.skip_corrupt or attempt == MAX_CONSECUTIVE_CORRUPT:
          raise
        corrupt = index if corrupt < 0 else corrupt
        index = (index + 1) % len(self.ds)
        record = self.ds.source[index]
    return self._example(image, index, corrupt)

  def padded(self, position: int) -> Batch:
    """map for evaluation: example `position`, or padding past the end."""
    if position >= len(self.ds):
      example = self._example(self._blank(), 0, -1)
    else:
      try:
        image = self.image(position, self.ds.source[position], None)
        example = self._example(image, position, -1)
      except UserError:
        if not self.skip_corrupt:
          raise
        example = self._example(self._blank(), position, position)
    example["mask"] = np.bool_(
      position < len(self.ds) and example["corrupt"] < 0
    )
    return example

  def image(
    self, index: int, record, rng: np.random.Generator | None
  ) -> np.ndarray:
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
      raise UserError(f"{where}: cannot read image: {e}") from None

  def _example(self, image: np.ndarray, index: int, corrupt: int) -> Batch:
    out = {"image": image}
    if self.ds.labels is not None:
      out["label"] = self.ds.labels[index]
    out["corrupt"] = np.int32(corrupt)
    return out

  def _blank(self) -> np.ndarray:
    if self.size is None:
      first = self.ds.source[0]
      return np.zeros(first.shape, first.dtype)
    return np.zeros((self.size, self.size, 3), np.uint8)


class _ProcessMajor(grain.MapDataset):
  """Reorders each global batch of `batch_size` so that grain's strided
  sharding (stream position j to process j % P) hands process p the
  contiguous rows p*b..(p+1)*b-1 of the batch, b = batch_size / P."""

  def __init__(self, parent: grain.MapDataset, batch_size: int, processes: int):
    super().__init__(parent)
    self._batch, self._processes = batch_size, processes
    self._local = batch_size // processes

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    start, j = divmod(index, self._batch)
    row, process = divmod(j, self._processes)
    return self._parent[start * self._batch + process * self._local + row]


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


def _stream_seeds(seed: int) -> tuple[int, int]:
  """(shuffle seed, augmentation seed), 32-bit, from any int seed."""
  # SeedSequence wants non-negative entries; the mask keeps negative seeds
  # distinct. grain reseeds each epoch with seed + epoch, so hash the seed.
  words = np.random.SeedSequence(seed & (2**64 - 1)).generate_state(2)
  return int(words[0]), int(words[1])


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
    _local_batch(batch_size, process_count, process_index, "batch_size")
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
    shuffle_seed, map_seed = _stream_seeds(self.seed)
    loader = _Loader(
      ds,
      options.output_size(ds, train=True),
      options.augment
      if options.augment in transforms.HOST_AUGMENTS
      else "none",
      options.skip_corrupt,
    )
    graph = grain.MapDataset.source(ds)
    if shuffle:
      graph = graph.shuffle(seed=shuffle_seed)
    graph = graph[: self.steps_per_epoch * batch_size].repeat()
    graph = graph.random_map(loader, seed=map_seed)
    if process_count > 1:
      graph = _ProcessMajor(graph, batch_size, process_count)
    self._stream = ElasticIterator(
      graph,
      batch_size,
      grain.sharding.ShardOptions(process_index, process_count),
      read_options=_read_options(ds, options),
      multiprocessing_options=_mp_options(ds, options),
    )
    self._it = iter(self._stream)

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> Batch:
    try:
      batch = next(self._it)
    except UserError as e:
      raise UserError(f"training step {self.step + 1}: {e}") from None
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
  def position(self) -> int:
    """Examples of the global stream consumed so far."""
    return int(self._it.get_state()["global_next_index"])

  @property
  def step(self) -> int:
    """Global batches produced since epoch 0 began."""
    return self.position // self.batch_size

  @property
  def epoch(self) -> int:
    return self.step // self.steps_per_epoch

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
      position = int(state["global_next_index"])
    else:  # Written by the in-memory iterator before grain.
      position = (
        int(state["epoch"]) * self.steps_per_epoch + int(state["position"])
      ) * self.batch_size
      log.warning(
        "checkpoint from the pre-grain data iterator: resuming at the same "
        "step, but the example order differs from the original run's"
      )
    self._it.set_state({"global_next_index": position})
    self.skipped = set(state.get("skipped", ()))

  def close(self) -> None:
    """Stops grain's threads and worker processes."""
    self._stream.close()


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
  loader = _Loader(
    ds, options.output_size(ds, train=False), "none", options.skip_corrupt
  )
  batches = math.ceil(n / batch_size)

  def position(i: int) -> int:  # This process's rows of each global batch.
    return (i // b) * batch_size + process_index * b + i % b

  graph = grain.MapDataset.range(batches * b).map(position)
  graph = graph.map(loader.padded).batch(b)
  stream = graph.to_iter_dataset(_read_options(ds, options))
  mp = _mp_options(ds, options)
  if mp is not None:
    stream = stream.mp_prefetch(mp)
  it = iter(stream)
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
