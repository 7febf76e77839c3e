"""A dynamic batcher per model that counts images, not requests. It knows nothing of HTTP.

`submit(images)` queues one request's `(n, C, H, W)` batch and resolves with its outputs in input
order. The loop gathers queued images until `max_batch_images` are waiting or the oldest has waited
`max_wait_s` (under concurrent load; a lone request runs at once), cuts a batch (splitting a large
request over several batches and packing small ones together), and runs it in the model's own inference thread(s) so the event loop keeps serving. While
a batch runs, the next one gathers: under load batches fill up without waiting. With
`concurrent_batches` > 1, that many batches run at once (each in its own thread), which keeps the
cores busy while Python prepares the next batch.

Work whose caller has gone (its `submit` was cancelled) is dropped before it is run. The queue is
bounded in images: beyond `max_queue_images`, `submit` raises `QueueFull` with a wait estimate.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = ["BatchObserver", "Batcher", "BatcherClosed", "QueueFull"]

RunBatch = Callable[[np.ndarray], Mapping[str, np.ndarray]]


class QueueFull(Exception):
    def __init__(self, queued: int, limit: int, retry_after_s: float) -> None:
        super().__init__(f"{queued} images queued, limit {limit}")
        self.retry_after_s = retry_after_s


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no new work."""


class BatchObserver(Protocol):
    def batch_done(self, model: str, images: int, seconds: float) -> None: ...
    def queue_waited(self, model: str, seconds: float) -> None: ...
    def queue_depth(self, model: str, images: int) -> None: ...


@dataclass(eq=False)
class _Work:
    images: np.ndarray
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued: float
    taken: int = 0  # images handed to a batch so far
    parts: list[tuple[int, dict[str, np.ndarray]]] = field(default_factory=list)  # (start, outputs)
    received: int = 0

    @property
    def size(self) -> int:
        return int(self.images.shape[0])


class Batcher:
    def __init__(
        self,
        name: str,
        run_batch: RunBatch,
        *,
        max_batch_images: int,
        max_wait_s: float,
        max_queue_images: int,
        concurrent_batches: int = 1,
        observer: BatchObserver | None = None,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self.max_batch_images = max_batch_images
        self.max_wait_s = max_wait_s
        self.max_queue_images = max_queue_images
        self.concurrent_batches = concurrent_batches
        self._observer = observer
        self._queue: collections.deque[_Work] = collections.deque()
        self._queued_images = 0
        self._in_flight = 0
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=concurrent_batches, thread_name_prefix=f"infer-{name}"
        )
        self._seconds_per_batch = 0.05  # running estimate, for Retry-After
        self._concurrent_load = False  # did the last batch find company waiting?

    # ------------------------------------------------------------------ public

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def running_batches(self) -> int:
        return self._in_flight

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def submit(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """`images: (n, C, H, W) uint8`, n >= 1 -> `{output: (n,)}` in input order."""
        if self._closing:
            raise BatcherClosed(self.name)
        n = int(images.shape[0])
        if n < 1:
            raise ValueError("empty batch")
        if self._queued_images + n > self.max_queue_images:
            raise QueueFull(self._queued_images, self.max_queue_images, self.estimated_wait_s(n))
        work = _Work(images, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._queue.append(work)
        self._queued_images += n
        self._idle.clear()
        self._report_depth()
        self._wakeup.set()
        try:
            return await work.future
        finally:
            if not work.future.done():  # the caller went away: free its place in the queue
                work.future.cancel()
            self._discard_if_cancelled(work)

    def estimated_wait_s(self, extra_images: int = 0) -> float:
        batches = (self._queued_images + extra_images) / self.max_batch_images + 1.0
        return batches * self._seconds_per_batch

    async def close(self, timeout_s: float) -> None:
        """Take no new work, finish what is queued (up to `timeout_s`), then stop the loop."""
        self._closing = True
        self._wakeup.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for work in self._queue:
            if not work.future.done():
                work.future.set_exception(BatcherClosed(self.name))
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ loop

    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.queue_depth(self.name, self._queued_images)

    def _discard_if_cancelled(self, work: _Work) -> None:
        if work.future.cancelled() and work in self._queue:
            self._queue.remove(work)
            self._queued_images -= work.size - work.taken
            self._report_depth()
            self._update_idle()

    def _update_idle(self) -> None:
        if not self._queue and self._in_flight == 0:
            self._idle.set()

    async def _gather(self) -> None:
        """Wait until a full batch is queued or the oldest image has waited `max_wait_s`.

        Only under concurrent load: when the last batch held one lone request, a new lone request
        runs at once, since waiting would add `max_wait_s` to every request of a sequential client.
        """
        if not self._concurrent_load:
            return
        while self._queued_images < self.max_batch_images and not self._closing:
            remaining = self._queue[0].enqueued + self.max_wait_s - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return
            if not self._queue:
                return

    def _cut(self) -> list[tuple[_Work, int, int]]:
        """Take up to `max_batch_images` from the head of the queue: (work, start, stop) slices."""
        slices: list[tuple[_Work, int, int]] = []
        requests_waiting = len(self._queue)
        room = self.max_batch_images
        now = time.perf_counter()
        while self._queue and room > 0:
            work = self._queue[0]
            if work.future.done():  # cancelled: its caller has gone
                self._queue.popleft()
                self._queued_images -= work.size - work.taken
                continue
            if work.taken == 0 and self._observer is not None:
                self._observer.queue_waited(self.name, now - work.enqueued)
            take = min(room, work.size - work.taken)
            slices.append((work, work.taken, work.taken + take))
            work.taken += take
            self._queued_images -= take
            room -= take
            if work.taken == work.size:
                self._queue.popleft()
        self._concurrent_load = requests_waiting > 1 or self._in_flight > 0
        return slices

    def _timed_run(self, images: np.ndarray) -> tuple[Mapping[str, np.ndarray], float]:
        start = time.perf_counter()
        outputs = self._run_batch(images)
        return outputs, time.perf_counter() - start

    async def _loop(self) -> None:
        slots = asyncio.Semaphore(self.concurrent_batches)
        running: set[asyncio.Task[None]] = set()
        while True:
            if not self._queue:
                self._update_idle()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await slots.acquire()  # while every slot runs, the queue keeps gathering
            if not self._queue:
                slots.release()
                continue
            await self._gather()
            slices = self._cut()
            self._report_depth()
            if not slices:
                slots.release()
                continue
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(slices, slots))
            running.add(task)
            task.add_done_callback(running.discard)

    async def _run(self, slices: list[tuple[_Work, int, int]], slots: asyncio.Semaphore) -> None:
        parts = [work.images[a:b] for work, a, b in slices]
        images = parts[0] if len(parts) == 1 else np.concatenate(parts)
        loop = asyncio.get_running_loop()
        try:
            outputs, seconds = await loop.run_in_executor(self._executor, self._timed_run, images)
        except Exception as exc:  # noqa: BLE001 - handed to every caller in the batch
            for work, _, _ in slices:
                if not work.future.done():
                    work.future.set_exception(exc)
            return
        finally:
            self._in_flight -= 1
            slots.release()
            self._update_idle()
        self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * seconds
        if self._observer is not None:
            self._observer.batch_done(self.name, int(images.shape[0]), seconds)
        self._distribute(slices, outputs)

    def _distribute(self, slices: list[tuple[_Work, int, int]], outputs: Mapping[str, np.ndarray]) -> None:
        offset = 0
        for work, a, b in slices:
            n = b - a
            if not work.future.done():
                work.parts.append((a, {k: v[offset : offset + n] for k, v in outputs.items()}))
                work.received += n
                if work.received == work.size:
                    if len(work.parts) == 1:
                        result = {k: np.array(v) for k, v in work.parts[0][1].items()}
                    else:  # batches may finish out of order when several run at once
                        ordered = [p for _, p in sorted(work.parts, key=lambda part: part[0])]
                        result = {k: np.concatenate([p[k] for p in ordered]) for k in ordered[0]}
                    work.future.set_result(result)
            offset += n
