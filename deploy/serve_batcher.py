"""Dynamic micro-batching for the inspection service: one bounded queue per model and its lanes.

Stations post one image at a time; the graph runs several images for little more than the cost
of one (on the CPU, :meth:`anomaly.deploy.runtime.Runtime.infer` cuts a batch into one slice per
core). A :class:`MicroBatcher` collects the images that arrive together: its thread takes the
oldest queued image and, while other admitted images are still being decoded, waits for them
until ``max_batch`` are queued or ``max_wait`` has passed since that image arrived (the
Triton/TorchServe bound), then runs them as one batch through
:meth:`Runtime.score_batch <anomaly.deploy.runtime.Runtime.score_batch>`. It does not wait for
requests that have not arrived: a lone station's image runs at once. While one batch runs the
next one gathers, so under load batches fill by themselves.

A batch's time is its graph (on every core) and then its results (calibration, and each image's
regions, one image after another in one thread). With one thread per model the cores would
wait through that second part; so a model has two *lanes*, threads that each take and score
batches. A lane joins in while another one is busy only with a full batch (``max_batch``
queued): under load the next full batch's graph runs while the last one's regions are found,
and the batches stay full; below it, one lane at a time runs as before. The graph's threads are
shared (:meth:`Runtime.infer <anomaly.deploy.runtime.Runtime.infer>` queues its slices), so two
batches never run their graphs on more threads than there are cores.

Admission is bounded and answered at once: :meth:`MicroBatcher.reserve` takes places in the queue
before the request's body is even decoded and raises :class:`QueueFull` when ``queue_size`` are
taken (the service answers 429); there is no unbounded queue anywhere.

Each queued image carries the :class:`~anomaly.deploy.runtime.Runtime` it was admitted under. A
threshold change or a reload installs a new runtime for later requests; a batch never mixes
runtimes, so the images admitted before the change are decided with the old threshold, and a
runtime no queued image needs any more is closed.

Torch-free and FastAPI-free: the standard library and numpy.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["MicroBatcher", "QueueFull", "Scored", "BatchStats"]

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The model's queue holds ``queue_size`` images; ``retry_after`` is a hint in seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Scored:
    """One image's result from a batch.

    Attributes:
        result: the runtime's :class:`~anomaly.deploy.runtime.ImageResult`.
        queue_s: seconds from being queued to its batch starting.
        inference_s: seconds its batch took (graph, calibration, regions; with the other lane
            busy, its graph's slices may also have waited for that lane's).
        batch_size: images in its batch.
    """

    result: Any
    queue_s: float
    inference_s: float
    batch_size: int


@dataclass(frozen=True)
class BatchStats:
    """What one batch did, for the metrics: its size, inference time and each image's queue time."""

    size: int
    inference_s: float
    queue_s: Sequence[float]
    scores: Sequence[float]


@dataclass
class _Item:
    x: np.ndarray  # (C, S, S) float32, the runtime's preprocessing of the image ((C, H', W') when tiled)
    size: tuple[int, int]  # (H, W) of the original
    runtime: Any
    future: Future
    queued: float  # time.perf_counter() when queued


class MicroBatcher:
    """Collect images into batches for one model and score them in a thread of its own.

    Args:
        name: the model's name (thread name, messages).
        max_batch: most images per batch (a power of two: the batch sizes the graph is fastest at).
        max_wait: seconds the oldest queued image may wait for others to join its batch.
        queue_size: most images admitted and not yet taken into a batch (decoding or queued).
        on_batch: called in a lane's thread after each batch (metrics; lanes may call it at once).
        on_idle_runtime: called with a runtime that is no longer current once no queued image
            needs it (to close it).
        nice: raise the lanes' nice value by this much (Linux: per thread, inherited by the
            inference threads they start), so that under overload the event loop keeps the CPU
            it needs to refuse the excess at once.
        lanes: threads taking and scoring batches (see the module docstring); 1 scores one batch
            at a time.
    """

    def __init__(self, name: str, *, max_batch: int = 16, max_wait: float = 0.005, queue_size: int = 64,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_idle_runtime: Callable[[Any], None] | None = None, nice: int = 0, lanes: int = 2) -> None:
        if max_batch < 1 or max_batch & (max_batch - 1):
            raise ValueError(f"max_batch must be a power of two (1, 2, 4, ...), got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        self.name = name
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait)
        self.queue_size = int(queue_size)
        self.nice = int(nice)
        self._on_batch = on_batch
        self._on_idle_runtime = on_idle_runtime
        self._queue: deque[_Item] = deque()
        self._reserved = 0  # places taken: images being decoded + queued
        self._cv = threading.Condition()
        self._stopping = False
        self._flush = False
        self._current: Any = None  # the runtime new requests get
        self._running: list[Any] = []  # the runtimes of the batches being scored, one per busy lane
        self._gathering = False  # a lane is waiting for its batch to fill
        self._recent: deque[float] = deque(maxlen=32)  # seconds per image of recent batches
        self.lanes = int(lanes)
        self._threads = [threading.Thread(target=self._loop, name=f"anomaly-batcher-{name}-{k}", daemon=True)
                         for k in range(self.lanes)]
        for t in self._threads:
            t.start()

    # -- admission ------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Images queued for a batch (decoded, waiting)."""
        with self._cv:
            return len(self._queue)

    @property
    def admitted(self) -> int:
        """Places taken in the queue: images being decoded plus images queued."""
        with self._cv:
            return self._reserved

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (no places are given any more)."""
        return self._stopping

    def retry_after(self) -> float:
        """Seconds until the queue has room again, estimated from recent batches (at least 0.05)."""
        with self._cv:
            recent = sorted(self._recent)  # at most 32: cheaper than numpy's median on the refusal path
            per_image = recent[len(recent) // 2] if recent else 0.01
            return max(0.05, per_image * max(1, self._reserved))

    def has_room(self, n: int = 1) -> bool:
        """Whether ``n`` places are free now (taking none: the service's early refusal asks this
        before a request is routed; :meth:`reserve` decides)."""
        with self._cv:
            return self._reserved + n <= self.queue_size

    def reserve(self, n: int = 1) -> None:
        """Take ``n`` places in the queue (all or none).

        Raises:
            QueueFull: fewer than ``n`` places are free, or the batcher is stopping.
        """
        with self._cv:
            if self._stopping:
                raise QueueFull(f"model {self.name!r} is shutting down", 1.0)
            if self._reserved + n > self.queue_size:
                raise QueueFull(f"model {self.name!r} is busy: {self._reserved} of {self.queue_size} queue places "
                                f"taken, {n} more asked for", 0.0)
            self._reserved += n

    def release(self, n: int = 1) -> None:
        """Give back places taken by :meth:`reserve` that will not be submitted (a bad image)."""
        with self._cv:
            self._reserved = max(0, self._reserved - n)
            self._cv.notify_all()

    def submit(self, runtime: Any, x: np.ndarray, size: tuple[int, int]) -> Future:
        """Queue one preprocessed image ``(C, S, S)`` (``(C, H', W')`` for a tiled bundle) under a
        place taken by :meth:`reserve`.

        Returns:
            a future of :class:`Scored` (or of the exception its batch raised).
        """
        item = _Item(x=x, size=(int(size[0]), int(size[1])), runtime=runtime, future=Future(),
                     queued=time.perf_counter())
        with self._cv:
            self._queue.append(item)
            self._cv.notify_all()
        return item.future

    def set_runtime(self, runtime: Any) -> Any:
        """Make ``runtime`` the one :attr:`runtime` hands to new requests; returns the previous one."""
        with self._cv:
            old, self._current = self._current, runtime
        if old is not None and old is not runtime:
            self._maybe_idle(old)
        return old

    @property
    def runtime(self) -> Any:
        """The runtime new requests are scored with."""
        with self._cv:
            return self._current

    # -- the batching thread ---------------------------------------------------------------------
    def _take(self) -> list[_Item] | None:
        with self._cv:
            while True:
                while not self._queue:
                    if self._stopping and self._reserved == 0:
                        return None
                    self._cv.wait(0.5 if self._stopping else None)
                # one lane gathers at a time; another lane is busy: join in with a full batch only (the
                # graph stays busy and the batches full), else wait for it to finish or the queue to fill
                if not self._gathering and (not self._running or len(self._queue) >= self.max_batch
                                            or self._stopping or self._flush):
                    break
                self._cv.wait()
            self._gathering = True
            deadline = self._queue[0].queued + self.max_wait
            # wait for images already admitted and still decoding, not for arrivals that may never come:
            # a lone station's image runs at once, a burst's images run together
            while (len(self._queue) < self.max_batch and self._reserved > len(self._queue)
                   and not (self._stopping or self._flush)):
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            rt = self._queue[0].runtime
            batch: list[_Item] = []
            while self._queue and len(batch) < self.max_batch and self._queue[0].runtime is rt:
                batch.append(self._queue.popleft())
            self._reserved -= len(batch)
            self._gathering = False
            self._running.append(rt)
            self._cv.notify_all()
            return batch

    def _loop(self) -> None:
        if self.nice and hasattr(os, "setpriority"):
            # below the event loop and the decoders: under overload the loop must still answer 429 at
            # once; the inference threads this thread starts (the runtime's slices) inherit it (Linux)
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
            except OSError as exc:
                log.debug("model %r: cannot lower the batcher's priority: %s", self.name, exc)
        while (batch := self._take()) is not None:
            rt = batch[0].runtime
            start = time.perf_counter()
            try:
                xs = [it.x for it in batch]
                # a tiled bundle's images keep their own sizes: the runtime takes them as a list
                inputs = xs if getattr(rt.preprocess, "tiled", False) else np.stack(xs)
                results = rt.score_batch(inputs, [it.size for it in batch])
            except BaseException as exc:  # one batch's failure is its requests' error, not the service's end
                log.exception("model %r: a batch of %d failed", self.name, len(batch))
                for it in batch:
                    it.future.set_exception(exc)
                results = None
            took = time.perf_counter() - start
            with self._cv:
                # this lane's entry (by identity: another lane may be running the same runtime)
                del self._running[next(i for i, r in enumerate(self._running) if r is rt)]
                self._recent.append(took / len(batch))
                self._cv.notify_all()  # a lane waiting for this one to finish
            if results is not None:
                for it, r in zip(batch, results):
                    it.future.set_result(Scored(result=r, queue_s=start - it.queued, inference_s=took,
                                                batch_size=len(batch)))
                if self._on_batch is not None:
                    try:
                        self._on_batch(BatchStats(size=len(batch), inference_s=took,
                                                  queue_s=[start - it.queued for it in batch],
                                                  scores=[r.score for r in results]))
                    except Exception:  # metrics must never fail a request
                        log.exception("model %r: recording a batch's metrics failed", self.name)
            if rt is not self.runtime:
                self._maybe_idle(rt)

    def _maybe_idle(self, runtime: Any) -> None:
        """Hand ``runtime`` to ``on_idle_runtime`` once no queued image needs it."""
        with self._cv:
            needed = (runtime is self._current or any(r is runtime for r in self._running)
                      or any(it.runtime is runtime for it in self._queue))
        if not needed and self._on_idle_runtime is not None:
            try:
                self._on_idle_runtime(runtime)
            except Exception:
                log.exception("model %r: closing a replaced runtime failed", self.name)

    def flush(self) -> None:
        """Stop waiting for batches to fill (draining): queued images run at once from now on."""
        with self._cv:
            self._flush = True
            self._cv.notify_all()

    def stop(self, timeout: float | None = None) -> bool:
        """Refuse new places, score everything admitted, stop the lanes; ``True`` if they stopped in time."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)
