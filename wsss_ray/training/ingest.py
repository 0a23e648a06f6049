"""Ray Data ingest for training: each epoch's seeded order and crops, the global batch split over the workers,
and the batches on the device.

Every worker streams its own rows through one Ray Data pipeline (``from_blocks`` → ``map_batches``) that spans
the rest of the run, so the map tasks of epoch e+1 run while epoch e trains and nothing is shuffled all-to-all
(a worker with at most ``LOCAL_ROWS`` rows in the whole run decodes them itself: fewer than an actor's start costs).
Which rows a worker sees, in which order, and each row's augmentation seed are computed up front from
``(seed, epoch)`` alone (see :func:`epoch_plan`): the run repeats exactly, a run resumed at epoch e sees epoch e's
draws, and the data order does not depend on the worker count (global batch k is the same rows for any W).
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from wsss_ray.core import storage
from wsss_ray.core.config_base import ConfigError
from wsss_ray.maths.inference import normalize

# Rows per block (one actor call): Ray Data's cost per block (the executor's scheduling round, the object
# store put and get, the Arrow conversion) is ~0.1 s on a loaded 2-CPU machine whatever the block holds,
# against ~1 ms a row to decode and crop at 128², so blocks must be large (measured: 16-row blocks delivered
# ~125 rows/s at 128² and at 320² alike). Blocks run across epoch ends (one stream for the run), so a small
# dataset needs no smaller blocks; the first batch waits for one block (~0.1 s at 128² on a quiet CPU).
ROWS_PER_TASK = 128
# A worker with at most this many rows for the whole run decodes them itself: an ingest actor's start (a process
# that imports torch and this package, ~2.5 s of CPU) costs more than decoding them (~1 ms a row at 128², ~15 ms
# at VOC's 512² crops). Smoke runs and tiny datasets; the demo streams (960 rows a worker).
LOCAL_ROWS = ROWS_PER_TASK
# The first blocks are smaller (one batch, then doubling up to ROWS_PER_TASK): a whole 128-row block before the
# first step was most of epoch 1's wait on a GPU (56-81 % of epoch 1 waiting on input, docs/benchmarks.md).
# Batches each worker keeps decoded ahead of its training step; val rows decoded ahead of the prediction.
PREFETCH_BATCHES = 4
VAL_AHEAD = 4


@dataclass(frozen=True)
class RowSource:
    """Training rows and the function that maps one row (with its ``augment_seed``) to a sample dict.

    ``sample`` runs in Ray workers (a module-level function or a closure Ray can pickle). Each training worker's
    stream maps its rows in ``actors`` Ray Data actors of ``task_cpus`` CPUs (``fit`` sizes them to fit beside
    the trainers): long-lived processes, as a DataLoader's workers, rather than tasks, whose worker processes Ray
    may retire between tasks and start again (seconds each, to import torch: measured, see docs/benchmarks.md).
    ``actors=0`` (no CPU free beside the trainers) has each training worker decode its rows itself.
    """

    records: list[dict[str, Any]]
    sample: Callable[..., dict[str, Any]]
    fn_kwargs: dict[str, Any] = field(default_factory=dict)
    task_cpus: float = 1.0
    actors: int = 1

    def __post_init__(self) -> None:
        # Relative local paths (a dataset root like data/toy-voc) mean the driver's directory; Ray Train's
        # workers, which decode the val rows themselves, run elsewhere.
        records = [{k: storage.absolute_uri(v) if k.endswith("_uri") and isinstance(v, str) else v
                    for k, v in row.items()} for row in self.records]
        object.__setattr__(self, "records", records)


def check_global_batch(batch_size: int, workers: int, where: str) -> None:
    """``batch_size`` is the global batch: it must split evenly over ``workers`` (ConfigError naming the field)."""
    if batch_size % workers:
        raise ConfigError(f"{where}.batch_size: {batch_size} is not divisible by {where}.workers.num_workers "
                          f"({workers}); batch_size is the global batch, split evenly over the workers")


def steps_per_epoch(num_rows: int, batch_size: int, num_workers: int, where: str = "train") -> tuple[int, int]:
    """(per-worker batch, steps per epoch) for the global ``batch_size``: b = B / W and S = N // B (drop_last),
    the same S for every worker count."""
    check_global_batch(batch_size, num_workers, where)
    if num_rows < batch_size:
        raise ConfigError(f"{where}.batch_size: the global batch {batch_size} exceeds the {num_rows} training rows")
    return batch_size // num_workers, num_rows // batch_size


def epoch_plan(num_rows: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, augment seeds) of one epoch: a permutation of the row indices and one 63-bit seed per row index,
    both drawn from ``(seed, epoch)`` only, so every epoch has a new order and new crops and runs repeat."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(num_rows), rng.integers(0, 2**63 - 1, size=num_rows, dtype=np.int64)


def worker_indices(order: np.ndarray, steps: int, batch_size: int, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s rows of one epoch: its slice ``[kB + r·b, kB + (r+1)·b)`` of every global batch k."""
    per_worker = batch_size // world
    batches = order[:steps * batch_size].reshape(steps, world, per_worker)
    return batches[:, rank].reshape(-1)


def augment_rng(row: dict[str, Any]) -> np.random.Generator:
    """The generator for one row's augmentation, from the ``augment_seed`` that :func:`epoch_plan` drew."""
    return np.random.default_rng(int(row["augment_seed"]))


def stack_samples(samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Samples (dicts of one row each) as a batch of numpy columns: arrays stacked, other values an object array."""
    return {key: np.stack([s[key] for s in samples]) if isinstance(samples[0][key], np.ndarray)
            else np.array([s[key] for s in samples], dtype=object) for key in samples[0]}


class _SampleBlock:
    """Ray Data map_batches actor: ``sample`` on every row of an Arrow block, stacked into numpy columns."""

    def __init__(self, sample: Callable[..., dict[str, Any]], fn_kwargs: dict[str, Any]) -> None:
        self.sample, self.fn_kwargs = sample, fn_kwargs

    def __call__(self, block: Any) -> dict[str, np.ndarray]:
        return stack_samples([self.sample(row, **self.fn_kwargs) for row in block.to_pylist()])


def ramp_blocks(rows: int, first: int, largest: int = ROWS_PER_TASK) -> list[int]:
    """Block sizes covering ``rows`` rows: ``first`` (one batch), doubling up to ``largest``, then ``largest``
    (the last block takes the rest), so the first batch waits for one small block, not a full one."""
    sizes: list[int] = []
    size = max(1, min(first, largest))
    while sum(sizes) < rows:
        sizes.append(min(size, rows - sum(sizes)))
        size = min(2 * size, largest)
    return sizes


def shard_stream(source: RowSource, seed: int, epochs: range, steps: int, batch_size: int, rank: int,
                 world: int, warm_start: bool = True,
                 local_rows: int = LOCAL_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """This worker's batches (of ``batch_size / world`` rows) for ``epochs``, ``steps`` per epoch, in order.

    One Ray Data execution for all the epochs: the rows of every epoch are laid out up front (their order and
    seeds from :func:`epoch_plan`) and mapped by ``source.actors`` actors in blocks of ``ROWS_PER_TASK`` rows;
    ``preserve_order`` keeps the laid-out order (cheap with one map operator: a finished block waits at most for
    the blocks before it). The actors start once per run, not once per epoch, and the first blocks are small
    (:func:`ramp_blocks`) so the first step does not wait for a whole block. Until the actors deliver their first
    batch (seconds: each starts a process that imports torch), this worker decodes the first batches itself
    (``warm_start``, :class:`WarmStart`): the same rows and seeds, so the same
    batches, without the first epoch waiting on the actors' start. A run with at most ``local_rows`` rows for
    this worker (a smoke run, a tiny dataset), or a source with no actors, starts none: this worker decodes them
    (:func:`local_batches`).
    """
    items: list[dict[str, Any]] = []
    for epoch in epochs:
        order, seeds = epoch_plan(len(source.records), seed, epoch)
        items += [{**source.records[i], "augment_seed": int(seeds[i])}
                  for i in worker_indices(order, steps, batch_size, rank, world)]
    if not items:
        return iter(())
    if len(items) <= local_rows or source.actors == 0:
        return local_batches(items, source.sample, source.fn_kwargs, batch_size // world)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    starts = np.cumsum([0, *ramp_blocks(len(items), batch_size // world)])
    blocks = [pa.Table.from_pylist(items[a:b]) for a, b in itertools.pairwise(starts)]
    # from_blocks, not from_arrow: from_arrow reads each block's metadata in a remote task of one CPU, which never
    # runs where the trainers leave less than a CPU free (two 0.75-CPU workers on 2 CPUs waited forever), and
    # from_blocks keeps the ramp's block sizes as they are.
    dataset = (ray.data.from_blocks(blocks)
               .map_batches(_SampleBlock, batch_size=None, batch_format="pyarrow", num_cpus=source.task_cpus,
                            compute=ray.data.ActorPoolStrategy(size=source.actors),
                            fn_constructor_kwargs={"sample": source.sample, "fn_kwargs": source.fn_kwargs}))
    stream = _Ahead(iter(dataset.iter_batches(batch_size=batch_size // world, batch_format="numpy", drop_last=True,
                                              prefetch_batches=PREFETCH_BATCHES)))
    return WarmStart(items, source.sample, source.fn_kwargs, batch_size // world, stream) if warm_start else stream


def local_batches(items: list[dict[str, Any]], sample: Callable[..., dict[str, Any]], fn_kwargs: dict[str, Any],
                  batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """``items`` in batches of ``batch_size`` (the last partial batch dropped, as the stream drops it), decoded in
    this worker by two threads, one batch at a time: the stream's batches, without its actors."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        for i in range(len(items) // batch_size):
            rows = items[i * batch_size:(i + 1) * batch_size]
            yield stack_samples(list(pool.map(lambda row: sample(row, **fn_kwargs), rows)))


class _Ahead(Iterator[Any]):
    """Pulls ``source`` in a thread from now on: the stream's actors start (seconds: a process importing torch)
    while the trainer builds its model and restores, not at the first step; errors surface at ``next``."""

    _END = object()

    def __init__(self, source: Iterator[Any]) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=2)
        self.ready = threading.Event()  # set once the first item (or the end, or an error) is in
        threading.Thread(target=self._pull, args=(source,), daemon=True).start()

    def _pull(self, source: Iterator[Any]) -> None:
        try:
            for item in source:
                self._queue.put(item)
                self.ready.set()
            self._queue.put(self._END)
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer's thread
            self._queue.put(error)
        self.ready.set()

    def __next__(self) -> Any:
        return self.next_within(None)

    def next_within(self, timeout: float | None) -> Any:
        """The next item; with a ``timeout``, raises ``queue.Empty`` when none came within it."""
        item = self._queue.get(timeout=timeout)
        if item is self._END:
            self._queue.put(item)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


class WarmStart(Iterator[dict[str, np.ndarray]]):
    """Batch i of ``stream`` (an :class:`_Ahead` over ``items`` in batches of ``batch_size``), or the same batch
    decoded here, whichever comes first.

    A thread in this process decodes the first batches (``sample`` over their items, two rows at a time: PIL and
    zlib release the GIL) until the stream delivers its first batch, when the Ray Data actors are up; from then
    on the stream serves, its batches that were already served from here skipped. Both sides map the same items
    with the same seeds, so the batches are the same whichever side serves them (errors are the stream's to
    raise: a row that fails here fails there too).
    """

    POLL_S = 0.005

    def __init__(self, items: list[dict[str, Any]], sample: Callable[..., dict[str, Any]],
                 fn_kwargs: dict[str, Any], batch_size: int, stream: _Ahead) -> None:
        self._stream, self._next, self._streamed = stream, 0, 0  # next batch to serve; stream batches taken
        self._local: dict[int, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()
        self.local_batches = 0  # how many batches were served from here (benchmarks read it)
        self._decoder = threading.Thread(target=self._decode, args=(items, sample, fn_kwargs, batch_size),
                                         daemon=True)
        self._decoder.start()

    def _decode(self, items: list[dict[str, Any]], sample: Callable[..., dict[str, Any]], fn_kwargs: dict[str, Any],
                batch_size: int) -> None:
        # local_batches decodes batch i only when asked for it, so the wait below bounds how far ahead it runs
        with contextlib.closing(local_batches(items, sample, fn_kwargs, batch_size)) as batches:
            for i in range(len(items) // batch_size):
                while i - self._next >= PREFETCH_BATCHES and not self._stream.ready.is_set():
                    time.sleep(self.POLL_S)  # as far ahead as the stream keeps, no further
                if self._stream.ready.is_set():
                    return
                try:
                    batch = next(batches)
                except Exception:  # noqa: BLE001 - the stream raises it with its context
                    return
                with self._lock:
                    if i >= self._next:
                        self._local[i] = batch

    def __next__(self) -> dict[str, np.ndarray]:
        i = self._next
        while True:
            with self._lock:
                if i in self._local:
                    self._next = i + 1
                    self.local_batches += 1
                    return self._local.pop(i)
            try:  # the stream's batches before i were served from here: skip them
                batch = self._stream.next_within(self.POLL_S if self._decoder.is_alive() else None)
            except queue.Empty:
                continue
            self._streamed += 1
            if self._streamed - 1 == i:
                with self._lock:
                    self._next = i + 1
                    self._local.pop(i, None)
                return batch


def val_stream(source: RowSource, rank: int, world: int) -> Iterator[dict[str, Any]]:
    """Rank ``rank``'s share of the val rows (row i on rank i mod world), one row at a time (their own sizes).

    Decoded in this worker by two threads, a few rows ahead (PIL and zlib release the GIL): val rows are not
    augmented, so there is nothing to seed, and a Ray Data pipeline per validation would start its processes
    again every epoch, which costs more than decoding a worker's share of the images (measured).
    """
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: deque[Future[dict[str, Any]]] = deque()
        for row in source.records[rank::world]:
            pending.append(pool.submit(source.sample, row, **source.fn_kwargs))
            if len(pending) > VAL_AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, Any]:
    """Numeric batch columns as tensors on ``device`` (the image normalised); strings and geometry stay numpy."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key == "image":
            out[key] = normalize(torch.from_numpy(value).to(device))
        elif key == "geometry" or value.dtype.kind in "OUS":
            out[key] = value
        else:
            out[key] = torch.from_numpy(value).to(device)
    return out
