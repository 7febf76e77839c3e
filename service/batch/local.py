"""The local engine: a thread pool on this machine (decoding and ONNX Runtime both release the
GIL), one shared session per model, one intra-op thread per worker."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa

from service.batch.scorer import BatchConfig, BatchScorer

__all__ = ["chunks", "run_local"]


def chunks(table: pa.Table, size: int) -> Iterator[pa.Table]:
    for start in range(0, table.num_rows, size):
        yield table.slice(start, size)


def run_local(
    config: BatchConfig,
    pending: pa.Table,
    workers: int,
    sink: Callable[[pa.Table], None],
    scorer: BatchScorer | None = None,
) -> None:
    """Score `pending` (rows of `input_schema()`) in chunks of `config.batch_size`; each scored
    chunk goes to `sink` in input order."""
    scorer = scorer or BatchScorer(config)
    in_flight: deque[Future[pa.Table]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="score-batch") as pool:
        for chunk in chunks(pending, config.batch_size):
            in_flight.append(pool.submit(scorer.score, chunk))
            while len(in_flight) > 2 * workers:  # bounded: memory stays flat on any input size
                sink(in_flight.popleft().result())
        while in_flight:
            sink(in_flight.popleft().result())
