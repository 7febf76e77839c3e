"""What one app instance holds: settings, registry, metrics, worker pool, readiness."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from service.batcher import Batcher
from service.metrics import Metrics
from service.registry import Registry, ServedModel
from service.settings import Settings

__all__ = ["ServiceState"]

log = logging.getLogger("service.state")


@dataclass(eq=False)
class ServiceState:
    settings: Settings
    registry: Registry
    metrics: Metrics = field(default_factory=Metrics)
    api_keys: list[bytes] = field(default_factory=list)
    decode_pool: ThreadPoolExecutor | None = None
    loaded: bool = False
    draining: bool = False
    _loading: asyncio.Task[None] | None = None

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
        assert entry.scorer is not None
        s = self.settings
        entry.batcher = Batcher(
            entry.name,
            entry.scorer.run,
            max_batch_images=s.max_batch_images,
            max_wait_s=s.max_wait_ms / 1000.0,
            max_queue_images=s.max_queue_images,
            concurrent_batches=s.concurrent_batches,
            observer=self.metrics,
        )
        entry.batcher.start()

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
        batchers = [m.batcher for m in self.registry.models.values() if m.batcher is not None]
        await asyncio.gather(*(b.close(self.settings.shutdown_timeout_s) for b in batchers))
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped: queued work finished, worker threads released")
