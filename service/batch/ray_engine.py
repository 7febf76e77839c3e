"""The Ray engine: Ray Data `map_batches` over an actor pool, each actor holding its own
`BatchScorer` (its own sessions; one GPU per actor when the cluster has GPUs). `ray.init()`
locally, or `--address` / `RAY_ADDRESS` for a cluster (a KubeRay RayJob sets the latter)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pyarrow as pa

from service.batch.local import chunks
from service.batch.scorer import BatchConfig, BatchScorer

__all__ = ["RayBatchScorer", "run_ray"]


class RayBatchScorer:
    """The Ray Data actor: one `BatchScorer` (its own ONNX sessions) per actor, built once."""

    def __init__(self, config: BatchConfig) -> None:
        os.environ.update(config.environment)
        self._scorer = BatchScorer(config)

    def __call__(self, rows: pa.Table) -> pa.Table:
        return self._scorer.score(rows)


def run_ray(
    config: BatchConfig,
    pending: pa.Table,
    workers: int | None,
    gpus_per_worker: float | None,
    address: str | None,
    sink: Callable[[pa.Table], None],
) -> None:
    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our progress bar and summary say enough
    owns_ray = not ray.is_initialized()
    if owns_ray:
        options: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": "WARNING",
            "log_to_driver": False,
        }
        if address:
            ray.init(address=address, **options)
        elif os.environ.get("RAY_ADDRESS"):
            ray.init(**options)  # inside a RayJob / `ray job submit`: join that cluster
        else:
            ray.init(num_cpus=max(1, workers or os.cpu_count() or 1), **options)
    try:
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0.0))
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if gpus >= 1 else 0.0
        if workers is None:
            workers = int(gpus // gpus_per_worker) if gpus_per_worker else int(resources.get("CPU", 1))
        workers = max(1, workers)
        device = config.device
        if device == "auto":
            device = "cuda" if gpus_per_worker else "cpu"
        actor_config = replace(config, device=device)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts images across both engines
        # One block per batch, so the actor pool shares the work out instead of one actor taking it all.
        dataset = ray.data.from_arrow(list(chunks(pending, config.batch_size)))
        scored = dataset.map_batches(
            RayBatchScorer,
            fn_constructor_args=(actor_config,),
            batch_size=config.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=0 if gpus_per_worker else config.intra_op_threads,
            num_gpus=gpus_per_worker,
        )
        for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            sink(batch)
    finally:
        if owns_ray:
            ray.shutdown()
