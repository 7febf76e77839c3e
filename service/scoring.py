"""The scoring pipeline shared by v1 and v2: decode -> fit to the model -> batcher -> scores.

Scores follow DESIGN §4 from the graph outputs and the manifest alone: `ood_score` by the manifest's
statistic (`models.scores.ood_score`), `threshold` from its calibration, `p_value` against its sorted
in-distribution reference scores, `is_ood = ood_score > threshold`.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.artifact import Manifest
from models.scores import ood_score, p_value
from service.batcher import BatcherClosed, QueueFull
from service.complexity import png_bits_per_dim
from service.decoding import DecodedBatch, ModelInput, decode_image, fit_to_model
from service.errors import InferenceFailed, NotReady, Overloaded, ServiceError
from service.parsing import EncodedFiles, Payload
from service.registry import ServedModel
from service.runtime import BACKGROUND_OUTPUT
from service.state import ServiceState

__all__ = ["ModelOutcome", "Scores", "compute_scores", "decode_payload", "score_model"]

_INLINE_BYTES = 32 * 1024  # below this, decoding inline beats a hop to the worker pool
_INLINE_PIXELS = 256 * 1024


@dataclass(frozen=True)
class Scores:
    """Per image, `(N,)` each."""

    log_likelihood: np.ndarray  # float64, nats
    bits_per_dim: np.ndarray  # float64
    ood_score: np.ndarray  # float64, higher = more OOD
    p_value: np.ndarray  # float64
    is_ood: np.ndarray  # bool
    threshold: float


@dataclass(frozen=True)
class ModelOutcome:
    model: ServedModel
    manifest: Manifest
    scores: Scores
    resized: tuple[bool, ...]

    def to_v1(self) -> dict[str, Any]:
        s = self.scores
        columns = zip(
            s.log_likelihood.tolist(),
            s.bits_per_dim.tolist(),
            s.ood_score.tolist(),
            s.p_value.tolist(),
            s.is_ood.tolist(),
            self.resized,
            strict=True,
        )
        return {
            "model": self.manifest.name,
            "version": self.manifest.version,
            "kind": self.manifest.kind,
            "statistic": self.manifest.score.statistic,
            "results": [
                {
                    "log_likelihood": ll,
                    "bits_per_dim": bpd,
                    "ood_score": score,
                    "threshold": s.threshold,
                    "p_value": p,
                    "is_ood": flag,
                    "resized": resized,
                }
                for ll, bpd, score, p, flag, resized in columns
            ],
        }


def compute_scores(
    manifest: Manifest,
    outputs: dict[str, np.ndarray],
    complexity_bits: np.ndarray | None = None,
    reference_sorted: np.ndarray | None = None,
) -> Scores:
    """Graph outputs (`log_likelihood`, `bits_per_dim`, maybe `background_log_likelihood`) -> Scores."""
    log_likelihood = np.asarray(outputs["log_likelihood"], dtype=np.float64)
    background = outputs.get(BACKGROUND_OUTPUT)
    scores = ood_score(
        manifest.score.statistic,
        log_likelihood,
        num_dims=manifest.num_dims,
        reference_nll_mean=manifest.score.reference_bits_per_dim,
        complexity_bits=complexity_bits,
        background_log_likelihood=None if background is None else np.asarray(background, dtype=np.float64),
    )
    if reference_sorted is None:
        reference_sorted = np.asarray(manifest.calibration.reference_scores, dtype=np.float64)
    threshold = float(manifest.calibration.threshold)
    return Scores(
        log_likelihood=log_likelihood,
        bits_per_dim=np.asarray(outputs["bits_per_dim"], dtype=np.float64),
        ood_score=np.asarray(scores, dtype=np.float64),
        p_value=p_value(scores, reference_sorted),
        is_ood=np.asarray(scores > threshold, dtype=bool),
        threshold=threshold,
    )


async def _in_pool(pool: Executor | None, fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


async def decode_payload(state: ServiceState, payload: Payload) -> DecodedBatch:
    """Encoded files are decoded in the worker pool (small ones inline); arrays pass through."""
    if not isinstance(payload, EncodedFiles):
        return DecodedBatch(array=payload.array)
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


def _prepare(batch: DecodedBatch, manifest: Manifest, resize: bool) -> tuple[ModelInput, np.ndarray | None]:
    fitted = fit_to_model(batch, manifest.input, resize, manifest.name)
    bits = png_bits_per_dim(fitted.images) if manifest.score.statistic == "complexity" else None
    return fitted, bits


def _needs_pool(batch: DecodedBatch, manifest: Manifest) -> bool:
    spec = manifest.input
    if manifest.score.statistic == "complexity":
        return True
    if batch.array is not None:
        _, h, w, _ = batch.array.shape
        return (h, w) != (spec.height, spec.width) and batch.array.size > _INLINE_PIXELS
    return sum(im.size[0] * im.size[1] for im in batch.images) > _INLINE_PIXELS


async def score_model(
    state: ServiceState, served: ServedModel, batch: DecodedBatch, resize: bool
) -> ModelOutcome:
    """Fit the images to one model, queue them on its batcher, and score the outputs."""
    manifest, batcher = served.require_ready()
    start = time.perf_counter()
    if _needs_pool(batch, manifest):
        fitted, bits = await _in_pool(state.decode_pool, _prepare, batch, manifest, resize)
    else:
        fitted, bits = _prepare(batch, manifest, resize)
    state.metrics.stage("preprocess", served.name, time.perf_counter() - start)
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
    reference = served.extra.get("reference_sorted")
    if reference is None:
        reference = served.extra["reference_sorted"] = np.asarray(
            manifest.calibration.reference_scores, dtype=np.float64
        )
    scores = compute_scores(manifest, outputs, bits, reference)
    state.metrics.scores(served.name, scores.bits_per_dim, scores.is_ood)
    return ModelOutcome(served, manifest, scores, fitted.resized)
