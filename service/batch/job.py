"""`score_batch`: one offline scoring job, from inputs to a resumable CSV/Parquet output.

The driver finds and loads the models through the core's `Registry` (on the local engine those
are the sessions that score; for Ray it is a check on the CPU before the cluster starts), reads
and resolves the repository's ensembles by the core's rules (the HTTP service's), hands the
pending rows to an engine, journals each scored chunk, and finally writes the output with the
combined-verdict rows of the ensemble `POST /v1/score` would use.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from service.batch.drift import drift_tests
from service.batch.inputs import enumerate_inputs
from service.batch.local import run_local
from service.batch.output import (
    COMBINED_PREFIX,
    KEY,
    Journal,
    combined_order,
    combined_rows,
    summarise,
)
from service.batch.output import (
    output_format as _format,
)
from service.batch.scorer import BatchConfig, BatchScorer, load_registry
from service.core import Registry, ServedEnsemble

__all__ = ["Engine", "score_batch"]

Engine = Literal["local", "ray"]


def score_batch(
    inputs: Sequence[str | Path],
    output: str | Path,
    models: Sequence[str],
    *,
    repository: str | Path | None = None,
    engine: Engine = "local",
    output_format: Literal["csv", "parquet"] | None = None,
    runtime: Literal["onnx", "torchscript"] = "onnx",
    device: Literal["auto", "cpu", "cuda"] = "auto",
    resize: bool = False,
    batch_size: int = 128,
    workers: int | None = None,
    intra_op_threads: int = 1,
    gpus_per_worker: float | None = None,
    address: str | None = None,
    image_column: str | None = None,
    max_image_pixels: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every image of `inputs` with each model into `output`; resumes a previous run.

    Returns `{"output", "pending", "seconds", "images_per_s", "models": {name: {images, scored,
    errors, ood, ood_rate}}, "ensembles": {name: {status, reason}}, "drift": {model: batch drift
    test}}` (`pending`: images scored by
    this run, the rest were already done; `ensembles`: every ensemble manifest of the repository,
    `valid`, `stale` or `failed` with the reason, as `GET /v1/models` lists them; `drift`: the test of
    `POST /v1/models/{name}/drift` over the whole output, per model and combined row set).
    """
    if not models:
        raise ValueError("name at least one model (--model NAME)")
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if engine not in ("local", "ray"):
        raise ValueError(f"unknown engine '{engine}' (local or ray)")
    output = Path(output)
    fmt = _format(output, output_format)
    if repository is None:
        repository = os.environ.get("OODFLOW_MODEL_REPOSITORY", "model-repository")
    config = BatchConfig(
        repository=Path(repository).resolve(),
        models=tuple(models),
        runtime=runtime,
        device=device,
        resize=resize,
        batch_size=batch_size,
        intra_op_threads=intra_op_threads,
        max_image_pixels=max_image_pixels,
        environment={k: v for k, v in os.environ.items() if k.startswith("OODFLOW_")},
    )
    items = enumerate_inputs(inputs, image_column)
    item_keys = list(zip(items.column("source").to_pylist(), items.column("index").to_pylist(), strict=True))
    journal = Journal(output, fmt)
    done: set[tuple[str, int, str]] = set()
    for table in journal.existing():
        done.update(zip(*(table.column(k).to_pylist() for k in KEY), strict=True))
    names = [spec.partition(":")[0] for spec in models]
    todo = [i for i, (s, k) in enumerate(item_keys) if any((s, k, m) not in done for m in names)]
    pending = items.take(pa.array(todo, type=pa.int64())) if len(todo) < items.num_rows else items

    # The driver's models: the scoring sessions on the local engine, a CPU check before Ray starts.
    local_scorer = BatchScorer(config) if engine == "local" and pending.num_rows else None
    if local_scorer is not None:
        registry = local_scorer.registry
    else:
        registry = load_registry(config.registry(device="cpu", warm_batch_sizes=(1,)), config.repository)

    start = time.perf_counter()
    if pending.num_rows:
        bar = tqdm(total=pending.num_rows, unit="img", desc=f"score-batch ({engine})", disable=not progress)

        def sink(table: pa.Table) -> None:
            journal.write(table)
            bar.update(table.num_rows // len(models))

        try:
            if engine == "local":
                local_workers = workers or max(1, min(4, os.cpu_count() or 1))
                run_local(config, pending, local_workers, sink, scorer=local_scorer)
            else:
                from service.batch.ray_engine import run_ray

                run_ray(config, pending, workers, gpus_per_worker, address, sink)
        finally:
            bar.close()
    seconds = time.perf_counter() - start
    order = {
        (s, k, m): i * (len(names) + 1) + j for i, (s, k) in enumerate(item_keys) for j, m in enumerate(names)
    }
    result = journal.finish(order)
    # The combined verdict is derived from the member rows, so it is recomputed on every run
    # (resumed runs included) rather than journaled.
    members_only = result.filter(pc.invert(pc.starts_with(result.column("model"), COMBINED_PREFIX)))
    combined = combined_rows(members_only, registry.ensembles.values())
    if combined is not None:
        journal.write(combined)
        result = journal.finish({**order, **combined_order(combined, item_keys, len(names))})
    return {
        "output": str(output),
        "pending": pending.num_rows,
        "seconds": seconds,
        "images_per_s": pending.num_rows / seconds if pending.num_rows and seconds > 0 else None,
        "models": summarise(result),
        "ensembles": {e.name: _ensemble_status(e, registry) for e in registry.ensembles.values()},
        "drift": drift_tests(result, registry),
    }


def _ensemble_status(ensemble: ServedEnsemble, registry: Registry) -> dict[str, str | None]:
    """The service's status, except that an ensemble with members this job did not ask for is
    `not used` (nothing is wrong with it), not `stale`."""
    if ensemble.manifest is not None:
        missing = [m.name for m in ensemble.manifest.members if m.name not in registry.models]
        if missing:
            return {"status": "not used", "reason": f"members not requested: {', '.join(missing)} (--model)"}
    return {"status": ensemble.status, "reason": ensemble.reason}
