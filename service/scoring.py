"""The HTTP scoring path shared by v1 and v2: decode -> fit to the model -> batcher -> scores.

The work is the core's (`service.core`: fitting, scores); this module schedules it for the event
loop (worker pool for decoding and large resizes, the model's batcher for inference) and maps
queue and runtime failures to the service's errors (429, 503, 500).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.artifact import Manifest
from service.batcher import BatcherClosed, QueueFull
from service.core import LoadedModel, Scores, ServedModel
from service.decoding import DecodedBatch, ModelInput, decode_image, fit_to_model
from service.errors import InferenceFailed, NotReady, Overloaded, ServiceError
from service.parsing import EncodedFiles, Payload
from service.state import ServiceState

__all__ = ["ModelOutcome", "decode_payload", "score_model"]

_INLINE_BYTES = 32 * 1024  # below this, decoding inline beats a hop to the worker pool
_INLINE_PIXELS = 256 * 1024


@dataclass(frozen=True)
class ModelOutcome:
    model: ServedModel
    manifest: Manifest
    scores: Scores
    resized: tuple[bool, ...]


async def _in_pool(pool: Executor | None, fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


async def decode_payload(state: ServiceState, payload: Payload) -> DecodedBatch:
    """Encoded files are decoded in the worker pool (small ones inline); arrays pass through."""
    if not isinstance(payload, EncodedFiles):
        return DecodedBatch(array=payload.array.transpose(0, 3, 1, 2))
    start = time.perf_counter()
    limit = state.settings.max_image_pixels
    files = payload.files
    if sum(len(f) for f in files) <= _INLINE_BYTES and len(files) <= 4:
        images = tuple(decode_image(data, i, limit) for i, data in enumerate(files))
    else:
        results = await asyncio.gather(
            *(_in_pool(state.decode_pool, decode_image, data, i, limit) for i, data in enumerate(files)),
            return_exceptions=True,
        )
        for result in results:  # the first failing image (lowest index) names the error
            if isinstance(result, BaseException):
                raise result
        images = tuple(results)  # type: ignore[arg-type]
    state.metrics.stage("decode", "", time.perf_counter() - start)
    return DecodedBatch(images=images)


def _prepare(batch: DecodedBatch, model: LoadedModel, resize: bool) -> tuple[ModelInput, np.ndarray | None]:
    fitted = fit_to_model(batch, model.manifest.input, resize, model.manifest.name)
    return fitted, model.complexity_bits(fitted.images)


def _needs_pool(batch: DecodedBatch, model: LoadedModel) -> bool:
    spec = model.manifest.input
    if model.needs_complexity:
        return True
    if batch.array is not None:
        _, _, h, w = batch.array.shape
        return (h, w) != (spec.height, spec.width) and batch.array.size > _INLINE_PIXELS
    return sum(im.shape[1] * im.shape[2] for im in batch.images) > _INLINE_PIXELS


async def score_model(
    state: ServiceState, served: ServedModel, batch: DecodedBatch, resize: bool, *, observe: bool = True
) -> ModelOutcome:
    """Fit the images to one model, queue them on its batcher, and score the outputs. `observe`:
    feed the p-values to the model's online drift detector (served traffic; the drift test's own
    batches do not)."""
    model, batcher = state.require_ready(served)
    start = time.perf_counter()
    if _needs_pool(batch, model):
        fitted, bits = await _in_pool(state.decode_pool, _prepare, batch, model, resize)
    else:
        fitted, bits = _prepare(batch, model, resize)
    version = str(model.manifest.version)
    state.metrics.stage("preprocess", served.name, time.perf_counter() - start, version)
    try:
        outputs = await batcher.submit(fitted.images)
    except QueueFull as exc:
        raise Overloaded(
            f"model '{served.name}' is overloaded ({exc}); retry later", exc.retry_after_s
        ) from None
    except BatcherClosed:
        raise NotReady("the service is shutting down", code="shutting_down") from None
    except ServiceError:
        raise
    except Exception as exc:  # noqa: BLE001 - the runtime itself failed
        raise InferenceFailed(
            f"model '{served.name}': inference failed ({type(exc).__name__}: {exc})"
        ) from exc
    scores = model.scores(outputs, bits)
    state.metrics.scores(served.name, scores.bits_per_dim, scores.is_ood, version)
    if observe and state.serves_by_default(served):  # an old or pinned version's traffic: not the detector's
        reference_size = int(model.reference_sorted.size)
        state.drift.observe("model", served.name, model, reference_size, scores.p_value, scores.is_ood)
    return ModelOutcome(served, model.manifest, scores, fitted.resized)
