"""The batcher alone (no HTTP): images counted, large requests split, small ones packed, cancelled
work dropped, the queue bounded."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping

import numpy as np
import pytest

from service.batcher import Batcher, BatcherClosed, QueueFull


class Recorder:
    """A fake scorer: log_likelihood = the sum of each image's pixels; records batch sizes."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[int] = []
        self.gate = gate

    def __call__(self, images: np.ndarray) -> Mapping[str, np.ndarray]:
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(len(images))
        total = images.reshape(len(images), -1).sum(axis=1).astype(np.float32)
        return {"log_likelihood": total, "bits_per_dim": -total}


def images(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.uint8).repeat(4).reshape(n, 1, 2, 2)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_splits_large_requests_and_packs_small_ones() -> None:
    async def main() -> None:
        recorder = Recorder()
        batcher = Batcher("m", recorder, max_batch_images=8, max_wait_s=0.05, max_queue_images=100)
        batcher.start()
        requests = [images(0, 20), images(20, 3), images(23, 1), images(24, 5)]
        results = await asyncio.gather(*(batcher.submit(x) for x in requests))
        for x, out in zip(requests, results, strict=True):
            np.testing.assert_array_equal(out["log_likelihood"], x.reshape(len(x), -1).sum(axis=1))
        assert sum(recorder.batches) == 29 and max(recorder.batches) == 8
        assert len(recorder.batches) == 4  # 29 images in batches of at most 8
        await batcher.close(1.0)

    run(main())


def test_lone_requests_do_not_wait_but_concurrent_ones_gather() -> None:
    async def main() -> None:
        gate = threading.Event()
        recorder = Recorder(gate)
        # max_wait_s of an hour: a lone request that waited for company would never finish within
        # the 60 s guard below (a liveness check, not a timing; benchmarks/bench_batcher.py times it).
        batcher = Batcher("m", recorder, max_batch_images=64, max_wait_s=3600.0, max_queue_images=100)
        batcher.start()
        gate.set()
        for i in range(3):  # a sequential client: never waits max_wait_s
            out = await asyncio.wait_for(batcher.submit(images(i, 1)), timeout=60)
            assert out["log_likelihood"].shape == (1,)
        assert recorder.batches == [1, 1, 1]
        gate.clear()
        first = asyncio.ensure_future(batcher.submit(images(0, 1)))  # runs alone, blocked on the gate
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.submit(images(i, 1))) for i in range(1, 4)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first, *rest)
        assert recorder.batches[3:] == [1, 3]  # the three that queued meanwhile ran together
        await batcher.close(1.0)

    run(main())


def test_cancelled_work_is_dropped_and_the_queue_bounded() -> None:
    async def main() -> None:
        gate = threading.Event()
        recorder = Recorder(gate)
        batcher = Batcher("m", recorder, max_batch_images=2, max_wait_s=0.0, max_queue_images=6)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(images(0, 2)))
        await asyncio.sleep(0.05)  # first is running (blocked on the gate)
        gone = asyncio.ensure_future(batcher.submit(images(2, 4)))
        await asyncio.sleep(0.01)
        assert batcher.queued_images == 4
        with pytest.raises(QueueFull) as full:
            await batcher.submit(images(6, 3))
        assert full.value.retry_after_s > 0
        gone.cancel()  # its client went away
        await asyncio.sleep(0.01)
        assert batcher.queued_images == 0
        kept = asyncio.ensure_future(batcher.submit(images(10, 1)))
        gate.set()
        await first
        await kept
        assert recorder.batches == [2, 1]  # the cancelled request never ran
        await batcher.close(1.0)
        with pytest.raises(BatcherClosed):
            await batcher.submit(images(0, 1))

    run(main())


def test_runtime_errors_reach_every_caller_of_the_batch() -> None:
    def broken(images: np.ndarray) -> Mapping[str, np.ndarray]:
        raise RuntimeError("boom")

    async def main() -> None:
        batcher = Batcher("m", broken, max_batch_images=8, max_wait_s=0.01, max_queue_images=100)
        batcher.start()
        results = await asyncio.gather(
            *(batcher.submit(images(0, 2)) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in results)
        await batcher.close(1.0)

    run(main())


def test_concurrent_batches_keep_input_order() -> None:
    calls: list[int] = []

    def uneven(images: np.ndarray) -> Mapping[str, np.ndarray]:
        calls.append(len(images))
        if len(calls) == 1:
            time.sleep(0.2)  # the first half finishes last
        total = images.reshape(len(images), -1).sum(axis=1).astype(np.float32)
        return {"log_likelihood": total, "bits_per_dim": -total}

    async def main() -> None:
        batcher = Batcher(
            "m", uneven, max_batch_images=4, max_wait_s=0.0, max_queue_images=100, concurrent_batches=2
        )
        batcher.start()
        x = images(0, 8)
        out = await batcher.submit(x)
        np.testing.assert_array_equal(out["log_likelihood"], x.reshape(8, -1).sum(axis=1))
        assert calls == [4, 4]
        await batcher.close(1.0)

    run(main())
