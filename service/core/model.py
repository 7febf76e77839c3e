"""One served model: load, verify and warm an artifact version; turn graph outputs into scores.

Scores follow DESIGN §4 from the graph outputs and the manifest alone: `ood_score` by the manifest's
statistic (`models.scores.ood_score`), `threshold` from its calibration, `p_value` against its sorted
in-distribution reference scores, `is_ood = ood_score > threshold`.

Checks made by `load_model`, in order: the manifest validates and every listed file matches its
sha256 (`models.artifact.verify_artifact`); the manifest's name is the expected one; the graph
loads on the runtime and device, takes `images` at the manifest's input shape and has the outputs
the score statistic needs; for input complexity, this machine's PNG encoder gives the lengths
the manifest's compressor canary recorded (`models.scores.complexity_canary_mismatch`); warm-up
batches give finite `(N,)` outputs. Any failure raises `ModelLoadError` with a one-line reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.artifact import (
    BACKGROUND_OUTPUT,
    GRAPH_FILES,
    GRAPH_OUTPUTS,
    ArtifactError,
    Manifest,
    verify_artifact,
)
from models.scores import complexity_canary_mismatch, ood_score, p_value, png_bits_per_dim
from service.core.runtime import Device, RuntimeName, Scorer, load_scorer

__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "Scores",
    "ScorerWrapper",
    "compute_scores",
    "load_model",
    "warm_images",
]

ScorerWrapper = Callable[[str, Scorer], Scorer]


class ModelLoadError(RuntimeError):
    """An artifact version that cannot serve; the message (one line) says why."""


@dataclass(frozen=True)
class Scores:
    """Per image, `(N,)` each."""

    log_likelihood: np.ndarray  # float64, nats
    bits_per_dim: np.ndarray  # float64
    ood_score: np.ndarray  # float64, higher = more OOD
    p_value: np.ndarray  # float64
    is_ood: np.ndarray  # bool
    threshold: float


def compute_scores(
    manifest: Manifest,
    outputs: dict[str, np.ndarray],
    complexity_bits: np.ndarray | None = None,
    reference_sorted: np.ndarray | None = None,
) -> Scores:
    """Graph outputs (`log_likelihood`, `bits_per_dim`, maybe `background_log_likelihood`) -> Scores.

    `complexity_bits` (`models.scores.png_bits_per_dim` of the graph's input images) is needed
    by the `complexity` statistic only."""
    log_likelihood = np.asarray(outputs[GRAPH_OUTPUTS[0]], dtype=np.float64)
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
        bits_per_dim=np.asarray(outputs[GRAPH_OUTPUTS[1]], dtype=np.float64),
        ood_score=np.asarray(scores, dtype=np.float64),
        p_value=p_value(scores, reference_sorted),
        is_ood=np.asarray(scores > threshold, dtype=bool),
        threshold=threshold,
    )


@dataclass(eq=False)
class LoadedModel:
    """A verified, warmed artifact version: its manifest and graph scorer."""

    manifest: Manifest
    scorer: Scorer
    path: Path
    reference_sorted: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.reference_sorted = np.asarray(self.manifest.calibration.reference_scores, dtype=np.float64)

    @property
    def needs_complexity(self) -> bool:
        """Whether `scores` needs the PNG code length of the images (statistic `complexity`)."""
        return self.manifest.score.statistic == "complexity"

    def complexity_bits(self, images: np.ndarray) -> np.ndarray | None:
        """`models.scores.png_bits_per_dim(images)` when the statistic needs it, else None."""
        return png_bits_per_dim(images) if self.needs_complexity else None

    def scores(self, outputs: dict[str, np.ndarray], complexity_bits: np.ndarray | None = None) -> Scores:
        """Scores from graph outputs already computed (e.g. by a batcher)."""
        return compute_scores(self.manifest, outputs, complexity_bits, self.reference_sorted)

    def run(self, images: np.ndarray, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Graph outputs for `images: (N, C, H, W) uint8`, in chunks of `batch_size` (None: one)."""
        if batch_size is None or len(images) <= batch_size:
            return self.scorer.run(images)
        parts = [self.scorer.run(images[s : s + batch_size]) for s in range(0, len(images), batch_size)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def score(self, images: np.ndarray, batch_size: int | None = None) -> Scores:
        """`images: (N, C, H, W) uint8` at the model's input shape -> Scores."""
        spec = self.manifest.input.shape
        if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != spec:
            raise ValueError(
                f"images must be (N, {', '.join(map(str, spec))}) uint8, got {images.dtype} {images.shape}"
            )
        return self.scores(self.run(images, batch_size), self.complexity_bits(images))


def warm_images(shape: tuple[int, int, int], n: int) -> np.ndarray:
    """A deterministic, non-constant uint8 batch (a constant image can hit degenerate fast paths)."""
    count = n * shape[0] * shape[1] * shape[2]
    return (np.arange(count, dtype=np.int64) * 37 % 256).astype(np.uint8).reshape(n, *shape)


def _check_graph(manifest: Manifest, scorer: Scorer, graph: str, warm_batch_sizes: Sequence[int]) -> None:
    spec = manifest.input.shape
    if any(d is not None and d != want for d, want in zip(scorer.input_shape, spec, strict=True)):
        raise ModelLoadError(f"{graph} takes images {scorer.input_shape} but the manifest says {spec}")
    # Warm at the batch sizes that will run, and check the outputs on the way.
    for n in sorted(set(warm_batch_sizes)):
        for _ in range(2):  # TorchScript's profiling executor optimises on the second call
            outputs = scorer.run(warm_images(spec, n))
        for name in GRAPH_OUTPUTS:
            if name not in outputs:
                raise ModelLoadError(f"{graph} has no output '{name}' (outputs: {sorted(outputs)})")
            if outputs[name].shape != (n,) or not np.all(np.isfinite(outputs[name])):
                raise ModelLoadError(f"{graph} output '{name}' is not {n} finite values at batch {n}")
    if manifest.score.statistic == "likelihood_ratio" and BACKGROUND_OUTPUT not in scorer.output_names:
        raise ModelLoadError(
            f"score statistic 'likelihood_ratio' needs graph output '{BACKGROUND_OUTPUT}', "
            f"which {graph} lacks"
        )
    if manifest.score.statistic == "typicality" and manifest.score.reference_bits_per_dim is None:
        raise ModelLoadError(
            "score statistic 'typicality' needs score.reference_bits_per_dim in the manifest"
        )


def load_model(
    path: str | Path,
    *,
    runtime: RuntimeName = "onnx",
    device: Device = "auto",
    intra_op_threads: int = 0,
    allow_spinning: bool = False,
    warm_batch_sizes: Sequence[int] = (1,),
    expected_name: str | None = None,
    wrap_scorer: ScorerWrapper | None = None,
) -> LoadedModel:
    """Verify, load and warm the artifact version at `path` (blocking). Raises ModelLoadError.

    `warm_batch_sizes`: the batch sizes to warm (and check) the graph at; `expected_name`: the name
    the manifest must carry (its model folder's); `wrap_scorer(name, scorer) -> scorer` lets tests
    control timing."""
    path = Path(path)
    graph = GRAPH_FILES[runtime]
    try:
        manifest = verify_artifact(path, required=(graph,))
    except ArtifactError as exc:
        raise ModelLoadError(f"artifact check failed: {exc}") from None
    except OSError as exc:  # e.g. a version folder the serving user may not read (mode 0700)
        raise ModelLoadError(
            f"artifact check failed: cannot read {exc.filename or path}: {exc.strerror or exc}"
        ) from None
    if expected_name is not None and manifest.name != expected_name:
        raise ModelLoadError(
            f"manifest names model '{manifest.name}' but it lies in folder '{expected_name}'"
        )
    complexity = manifest.score.complexity
    if manifest.score.statistic == "complexity" and complexity is not None:
        mismatch = complexity_canary_mismatch(complexity.canary)
        if mismatch is not None:
            raise ModelLoadError(mismatch)
    try:
        scorer = load_scorer(path, runtime, device, intra_op_threads, allow_spinning)
        if wrap_scorer is not None:
            scorer = wrap_scorer(manifest.name, scorer)
        _check_graph(manifest, scorer, graph, warm_batch_sizes)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any runtime failure refuses this model
        raise ModelLoadError(" ".join(str(exc).split()) or type(exc).__name__) from None
    return LoadedModel(manifest, scorer, path)
