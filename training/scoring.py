"""Batched eager scoring used by training, calibration and evaluation (the service runs the
exported graphs instead; export parity ties the two together)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.flows import EmbeddingFlow, PixelFlow
from training.data import ImageSet

__all__ = ["cache_file_tag", "cached_features", "inner_progress", "log_likelihoods"]

# Off inside `oodflow build`, which draws one progress display for the whole build.
_INNER_BARS: ContextVar[bool] = ContextVar("oodflow_inner_bars", default=True)


@contextmanager
def inner_progress(enabled: bool) -> Iterator[None]:
    """Allow (True) or silence (False) the per-split feature-extraction bars in this context."""
    token = _INNER_BARS.set(enabled)
    try:
        yield
    finally:
        _INNER_BARS.reset(token)


def cache_file_tag(key: str) -> str:
    """A file-name-safe tag for a split key that may be a dataset spec (`ood-folder:/a/b`,
    `ood-npz:C:\\x.npz`): unsafe characters become `_`, plus a short hash of the key so two
    specs that differ only in those characters never share a cache file."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:60] or "split"
    if safe == key:
        return key
    return f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


@torch.inference_mode()
def _batched(
    fn, images: np.ndarray, batch_size: int, device: torch.device, desc: str | None = None
) -> np.ndarray:  # type: ignore[no-untyped-def]
    outputs = []
    starts = range(0, len(images), batch_size)
    bar = tqdm(
        starts,
        desc=desc,
        unit="batch",
        leave=False,
        disable=True if desc is None or len(starts) < 4 or not _INNER_BARS.get() else None,
    )  # None: only on a terminal
    for start in bar:
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
        outputs.append(fn(batch).double().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0,))


def cached_features(
    model: EmbeddingFlow, dataset: ImageSet, cache_dir: Path | None, key: str, batch_size: int = 256
) -> np.ndarray:
    """Raw backbone features `(N, backbone_features)` float32, cached on disk by split name,
    fingerprint, resolution and feature kind."""
    device = next(model.parameters()).device
    path = None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        kind = "" if model.config.features == "pooled" else f"-{model.config.features}"
        tag = f"{cache_file_tag(key)}-{dataset.fingerprint()[:16]}-r{model.config.resolution}{kind}"
        path = cache_dir / f"{tag}.npy"
        if path.is_file():
            return np.load(path)
    feats = _batched(model.features, dataset.images, batch_size, device, desc=f"features {key}").astype(
        np.float32
    )
    if path is not None:
        np.save(path, feats)
    return feats


def log_likelihoods(
    model: PixelFlow | EmbeddingFlow,
    dataset: ImageSet,
    *,
    batch_size: int = 256,
    cache_dir: Path | None = None,
    key: str = "",
) -> np.ndarray:
    """`(N,)` float64 log-likelihoods in nats, evaluation mode (deterministic)."""
    model.eval()
    if isinstance(model, EmbeddingFlow):
        feats = cached_features(model, dataset, cache_dir, key or dataset.name, batch_size)
        device = next(model.parameters()).device
        return _batched(model.log_likelihood_features, feats, 4096, device)
    device = next(model.parameters()).device
    return _batched(model.log_likelihood, dataset.images, batch_size, device)
