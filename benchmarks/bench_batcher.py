"""Dynamic batcher latency: a lone request must not wait `max_wait_s` for company.

The batcher (`service.batcher.Batcher`) runs a lone request at once and gathers only work that
queues while a batch runs. This script times both cases on a trivial scorer (so the figures are
the batcher's own overhead, not inference): a sequential client (each request waits for its
answer before sending the next) and concurrent clients, for a few `max_wait_s` values. A lone
request's latency must stay far below `max_wait_s`; the test suite checks the behaviour
(tests/service/test_batcher.py), this script measures it. Prints a Markdown table.

    .venv/bin/python benchmarks/bench_batcher.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.batcher import Batcher  # noqa: E402


def _scorer(images: np.ndarray) -> Mapping[str, np.ndarray]:
    return {"log_likelihood": images.reshape(len(images), -1).sum(axis=1).astype(np.float64)}


async def _sequential(max_wait_s: float, requests: int) -> list[float]:
    batcher = Batcher("bench", _scorer, max_batch_images=64, max_wait_s=max_wait_s, max_queue_images=4096)
    batcher.start()
    image = np.zeros((1, 1, 28, 28), np.uint8)
    latencies = []
    for _ in range(requests):
        start = time.perf_counter()
        await batcher.submit(image)
        latencies.append(time.perf_counter() - start)
    await batcher.close(5.0)
    return latencies


async def _concurrent(max_wait_s: float, clients: int, per_client: int) -> tuple[float, float]:
    batcher = Batcher("bench", _scorer, max_batch_images=64, max_wait_s=max_wait_s, max_queue_images=4096)
    batcher.start()
    image = np.zeros((1, 1, 28, 28), np.uint8)
    latencies: list[float] = []

    async def client() -> None:
        for _ in range(per_client):
            start = time.perf_counter()
            await batcher.submit(image)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    seconds = time.perf_counter() - start
    await batcher.close(5.0)
    return statistics.median(latencies), clients * per_client / seconds


def main() -> None:
    print(
        "| max_wait_s | lone request p50 (ms) | lone request max (ms) | 32 clients p50 (ms) | 32 clients images/s |"
    )
    print("|---:|---:|---:|---:|---:|")
    for max_wait_s in (0.001, 0.05, 0.5):
        lone = asyncio.run(_sequential(max_wait_s, 200))
        p50, rate = asyncio.run(_concurrent(max_wait_s, 32, 50))
        print(
            f"| {max_wait_s} | {1000 * statistics.median(lone):.2f} | {1000 * max(lone):.2f} | "
            f"{1000 * p50:.2f} | {rate:,.0f} |"
        )


if __name__ == "__main__":
    main()
