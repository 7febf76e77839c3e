"""The batch front door's scorer: input rows -> output rows, over the scoring core.

Each model is found, verified and warmed by the core's `Registry` (the code the HTTP service
runs); each file is decoded by `models.images.read_image`, fitted to the model by
`service.core.fit_to_model` and its graph outputs turned into scores by the core, so a file gets
the HTTP service's scores. Only the wording of errors is this front door's own (`pass --resize`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from models.images import ImageTooLarge, SizeMismatch, UndecodableImage, read_image
from service.core import (
    DecodedBatch,
    LoadedModel,
    LoadOptions,
    ModelInput,
    Registry,
    UnsupportedInput,
    fit_to_model,
)

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "BatchConfig", "BatchScorer", "load_registry", "output_schema"]

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096  # the HTTP service's default limit: a decompression-bomb guard


def output_schema() -> pa.Schema:
    return pa.schema(
        [
            ("source", pa.string()),
            ("index", pa.int64()),
            ("model", pa.string()),
            ("version", pa.int64()),
            ("log_likelihood", pa.float64()),
            ("bits_per_dim", pa.float64()),
            ("ood_score", pa.float64()),
            ("threshold", pa.float64()),
            ("p_value", pa.float64()),
            ("is_ood", pa.bool_()),
            ("resized", pa.bool_()),
            ("error", pa.string()),
        ]
    )


@dataclass(frozen=True)
class BatchConfig:
    """What every engine worker needs to load the models (plain data: it travels to Ray actors)."""

    repository: Path
    models: tuple[str, ...]  # 'name' or 'name:version'
    runtime: Literal["onnx", "torchscript"] = "onnx"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resize: bool = False
    batch_size: int = 128
    intra_op_threads: int = 1
    max_image_pixels: int | None = None  # None: DEFAULT_MAX_IMAGE_PIXELS
    environment: dict[str, str] = field(default_factory=dict)  # OODFLOW_* seen by the driver

    def registry(
        self, *, device: str | None = None, warm_batch_sizes: tuple[int, ...] | None = None
    ) -> Registry:
        """The core registry of the requested models (not loaded yet)."""
        options = LoadOptions(
            runtime=self.runtime,
            device=device or self.device,  # type: ignore[arg-type]
            intra_op_threads=self.intra_op_threads,
            warm_batch_sizes=warm_batch_sizes or tuple(sorted({1, self.batch_size})),
        )
        return Registry(self.repository, self.models, options)


def load_registry(registry: Registry, repository: Path) -> Registry:
    """Discover and load every requested model; any that cannot be used is a RuntimeError."""
    entries = registry.discover()
    if not entries:
        raise RuntimeError(f"no models found in {repository}")
    for entry in entries:
        if entry.status == "loading":
            registry.load(entry)
        if entry.status != "ready":
            raise RuntimeError(f"model '{entry.name}' cannot be used: {entry.reason}")
    registry.resolve_ensembles()
    return registry


class BatchScorer:
    """Every requested model, loaded by the core's Registry (manifest validated, sha256 verified,
    graph checked and warmed); `score(rows)` turns a table of `input_schema()` into output rows.
    `run` on one session is thread-safe (ONNX Runtime), so one BatchScorer serves many threads."""

    def __init__(self, config: BatchConfig) -> None:
        self.config = config
        self.max_image_pixels = config.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS
        self.registry = load_registry(config.registry(), config.repository)
        self.models: list[LoadedModel] = [
            e.model for e in self.registry.models.values() if e.model is not None
        ]

    def _decode(self, row: dict[str, Any]) -> DecodedBatch | str:
        """One input row -> a `DecodedBatch` of one image, or the error message."""
        if row["error"]:
            return str(row["error"])
        if row["channels"]:
            shape = (1, row["height"], row["width"], row["channels"])
            pixels = np.frombuffer(row["data"], dtype=np.uint8).reshape(shape)
            return DecodedBatch(array=pixels.transpose(0, 3, 1, 2))
        data = row["data"]
        if row["path"]:
            try:
                data = Path(row["path"]).read_bytes()
            except OSError as exc:
                return f"unreadable file: {exc.strerror or exc}"
        try:
            image = read_image(data, max_pixels=self.max_image_pixels)
        except ImageTooLarge as exc:
            if exc.limit is None:
                return str(exc)
            pixels_count = exc.width * exc.height
            return f"{exc.width}×{exc.height} = {pixels_count} pixels exceeds max_image_pixels={exc.limit}"
        except UndecodableImage as exc:
            return str(exc)
        return DecodedBatch(images=(image,))

    def _fit(self, decoded: DecodedBatch, model: LoadedModel) -> ModelInput | str:
        spec, name = model.manifest.input, model.manifest.name
        try:
            return fit_to_model(decoded, spec, self.config.resize)
        except SizeMismatch as exc:
            return f"{exc.width}×{exc.height} pixels but model '{name}' takes {spec.width}×{spec.height}; pass --resize"
        except UnsupportedInput:
            return f"model '{name}' takes {spec.channels} channels; only 1 or 3 are supported"

    def score(self, rows: pa.Table) -> pa.Table:
        """`rows` (`input_schema()`) -> one output row per (row, model), in row-major order."""
        items = rows.to_pylist()
        decoded = [self._decode(row) for row in items]
        columns: dict[str, list[Any]] = {name: [] for name in output_schema().names}
        per_model = []
        for model in self.models:
            fitted = [d if isinstance(d, str) else self._fit(d, model) for d in decoded]
            good = [i for i, f in enumerate(fitted) if not isinstance(f, str)]
            scores = None
            if good:
                images = np.concatenate([f.images for f in fitted if not isinstance(f, str)])
                scores = model.scores(
                    model.run(images, self.config.batch_size), model.complexity_bits(images)
                )
            per_model.append((model.manifest, fitted, {i: k for k, i in enumerate(good)}, scores))
        for i, row in enumerate(items):
            for manifest, fitted, position, scores in per_model:
                k = position.get(i)
                columns["source"].append(row["source"])
                columns["index"].append(row["index"])
                columns["model"].append(manifest.name)
                columns["version"].append(manifest.version)
                columns["threshold"].append(float(manifest.calibration.threshold))
                model_input = fitted[i]
                if k is None or scores is None or isinstance(model_input, str):
                    for name in (
                        "log_likelihood",
                        "bits_per_dim",
                        "ood_score",
                        "p_value",
                        "is_ood",
                        "resized",
                    ):
                        columns[name].append(None)
                    columns["error"].append(model_input)
                    continue
                columns["log_likelihood"].append(float(scores.log_likelihood[k]))
                columns["bits_per_dim"].append(float(scores.bits_per_dim[k]))
                columns["ood_score"].append(float(scores.ood_score[k]))
                columns["p_value"].append(float(scores.p_value[k]))
                columns["is_ood"].append(bool(scores.is_ood[k]))
                columns["resized"].append(bool(model_input.resized[0]))
                columns["error"].append("")
        return pa.Table.from_pydict(columns, schema=output_schema())
