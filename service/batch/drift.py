"""The drift test of `POST /v1/models/{name}/drift` over a whole `score-batch` output.

Per model (and per `combined:<ensemble>` row set): the scored rows' `ood_score` (combined score)
against the model's (ensemble's) calibration reference, by `service.core.drift.batch_drift_test`,
so the figure is the HTTP endpoint's for the same images. Rows of another version than the one
loaded (an older output resumed) and error rows are left out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from service.batch.output import COMBINED_PREFIX
from service.core import Registry
from service.core.drift import batch_drift_test

__all__ = ["drift_tests"]


def drift_tests(result: pa.Table, registry: Registry) -> dict[str, dict[str, Any]]:
    """`{model or "combined:<ensemble>": batch test as a dict, or {"skipped": reason}}`."""
    columns = {k: result.column(k).to_pylist() for k in ("model", "version", "ood_score", "is_ood", "error")}
    by_model: dict[str, list[int]] = {}
    for i, name in enumerate(columns["model"]):
        by_model.setdefault(name, []).append(i)
    out: dict[str, dict[str, Any]] = {}
    for name, rows in by_model.items():
        reference: np.ndarray | None
        if name.startswith(COMBINED_PREFIX):
            ens = registry.ensembles.get(name[len(COMBINED_PREFIX) :])
            reference = None if ens is None else ens.reference_sorted
            version = None
        else:
            served = registry.models.get(name)
            loaded = None if served is None else served.model
            reference = None if loaded is None else loaded.reference_sorted
            version = None if loaded is None else loaded.manifest.version
        if reference is None:
            out[name] = {"skipped": "its calibration reference is not loaded"}
            continue
        kept = [
            i
            for i in rows
            if not columns["error"][i] and (version is None or columns["version"][i] == version)
        ]
        if len(kept) < 2:
            out[name] = {"skipped": f"{len(kept)} scored image(s); the test needs at least 2"}
            continue
        scores = np.array([columns["ood_score"][i] for i in kept], dtype=np.float64)
        flags = np.array([bool(columns["is_ood"][i]) for i in kept], dtype=bool)
        out[name] = batch_drift_test(scores, reference, is_ood=flags).to_dict()
    return out
