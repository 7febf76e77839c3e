"""What one app instance holds: settings, the core's registry, a batcher per model, metrics,
worker pool, readiness."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from service.batcher import Batcher
from service.core import LoadedModel, LoadOptions, Registry, ScorerWrapper, ServedModel
from service.core.drift import DriftMonitor
from service.errors import ModelUnavailable, NotReady
from service.metrics import Metrics
from service.settings import Settings

__all__ = ["ServiceState", "registry_for"]

log = logging.getLogger("service.state")


def registry_for(settings: Settings, wrap_scorer: ScorerWrapper | None = None) -> Registry:
    """The core registry the settings describe (models warmed at the batch sizes the batcher runs)."""
    options = LoadOptions(
        runtime=settings.runtime,
        device=settings.device,
        intra_op_threads=settings.intra_op_threads,
        allow_spinning=settings.ort_allow_spinning,
        warm_batch_sizes=tuple(sorted({1, settings.max_batch_images})),
        wrap_scorer=wrap_scorer,
    )
    return Registry(settings.model_repository, settings.models, options)


@dataclass(eq=False)
class ServiceState:
    settings: Settings
    registry: Registry
    metrics: Metrics = field(default_factory=Metrics)
    api_keys: list[bytes] = field(default_factory=list)
    admin_api_keys: list[bytes] = field(default_factory=list)
    drift: DriftMonitor = field(init=False)
    decode_pool: ThreadPoolExecutor | None = None
    batchers: dict[str, Batcher] = field(default_factory=dict)
    loaded: bool = False
    draining: bool = False
    _loading: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        # One online drift detector per model and ensemble (service.core.drift), read by /metrics.
        self.drift = DriftMonitor(self.settings.drift_run_length, window=self.settings.drift_window)
        self.metrics.drift.monitor = self.drift

    def require_ready(self, served: ServedModel) -> tuple[LoadedModel, Batcher]:
        """The loaded model and batcher of a model that serves, or 503 saying why it does not."""
        batcher = self.batchers.get(served.name)
        if served.status == "ready" and served.model is not None and batcher is not None:
            return served.model, batcher
        if served.status == "loading" or served.status == "ready":
            raise NotReady(f"model '{served.name}' is still loading", code="model_loading")
        raise ModelUnavailable(f"model '{served.name}' was refused: {served.reason}", retry_after_s=None)

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """Ready when every configured model is loaded, verified and warmed (DESIGN §6)."""
        models = {
            m.name: m.status if m.reason is None else f"{m.status}: {m.reason}"
            for m in self.registry.models.values()
        }
        ready = (
            self.loaded
            and not self.draining
            and bool(self.registry.models)
            and all(m.status == "ready" for m in self.registry.models.values())
        )
        return ready, models

    async def start(self) -> None:
        """Discover the models and start loading them in the background (the server answers meanwhile)."""
        self.decode_pool = ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="decode")
        for entry in self.registry.discover():
            self.metrics.set_ready(entry.name, False)
        self._loading = asyncio.get_running_loop().create_task(self._load_all(), name="load-models")

    async def _load_all(self) -> None:
        try:
            for entry in list(self.registry.models.values()):
                if entry.status == "loading":
                    await asyncio.to_thread(self.registry.load, entry)
                    if entry.status == "ready":
                        self._start_batcher(entry)
                self.metrics.set_ready(entry.name, entry.status == "ready")
        finally:
            self.registry.resolve_ensembles()
            self.loaded = True
            ready, models = self.readiness()
            log.info("model loading finished: %s", "ready" if ready else f"not ready {models}")

    def _start_batcher(self, entry: ServedModel) -> None:
        assert entry.model is not None
        s = self.settings
        batcher = self.batchers[entry.name] = Batcher(
            entry.name,
            entry.model.scorer.run,
            max_batch_images=s.max_batch_images,
            max_wait_s=s.max_wait_ms / 1000.0,
            max_queue_images=s.max_queue_images,
            concurrent_batches=s.concurrent_batches,
            observer=self.metrics,
        )
        batcher.start()

    async def wait_loaded(self) -> None:
        if self._loading is not None:
            await asyncio.shield(self._loading)

    async def stop(self) -> None:
        """Finish queued work (bounded by shutdown_timeout_s), then release threads."""
        self.draining = True
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loading
        batchers = list(self.batchers.values())
        await asyncio.gather(*(b.close(self.settings.shutdown_timeout_s) for b in batchers))
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped: queued work finished, worker threads released")
