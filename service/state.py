"""What one app instance holds: settings, the core's registry, a batcher per served model version,
metrics, worker pool, readiness; and the version lifecycle (load, atomic swap, drain, unload).

Swap, for one model (`sync_model`, serialised by one lock; started by the repository API, the
poller, or start-up): the version the policy wants is verified, loaded and warmed in a worker
thread while the old one keeps serving; its batcher starts; `Registry.publish` makes it the
default in one assignment on the event loop, so every request admitted from then on scores on it.
The versions the policy no longer wants are retired: no new request reaches them, and each
request already admitted on one holds a lease on it (taken by `require_ready`, returned when the
request ends, `admission`), so it finishes there. Once a retired version's leases are back (or
`shutdown_timeout_s` passed), its batcher closes and the registry drops its graph: the runtime
session and its memory go. A refused version changes nothing that serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from service.batcher import Batcher
from service.core import LoadedModel, LoadOptions, Registry, ScorerWrapper, ServedModel
from service.core.drift import DriftMonitor
from service.errors import ModelUnavailable, NotReady
from service.metrics import Metrics
from service.settings import Settings

__all__ = ["ServiceState", "SyncResult", "registry_for"]

log = logging.getLogger("service.state")

# The model versions the current request holds (see `ServiceState.admission`).
_leases: contextvars.ContextVar[set[ServedModel] | None] = contextvars.ContextVar("leases", default=None)


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
    return Registry(settings.model_repository, settings.models, options, settings.parsed_version_policy())


@dataclass
class SyncResult:
    """What one load (or poll) of a model did: versions loaded, refused (with reasons), retired
    (draining, then unloaded), and the versions serving afterwards."""

    name: str
    loaded: list[int] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    retired: list[int] = field(default_factory=list)
    serving: list[int] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(eq=False)
class ServiceState:
    settings: Settings
    registry: Registry
    metrics: Metrics = field(default_factory=Metrics)
    api_keys: list[bytes] = field(default_factory=list)
    admin_api_keys: list[bytes] = field(default_factory=list)
    drift: DriftMonitor = field(init=False)
    decode_pool: ThreadPoolExecutor | None = None
    loaded: bool = False
    draining: bool = False
    _loading: asyncio.Task[None] | None = None
    _poller: asyncio.Task[None] | None = None
    _batchers: dict[ServedModel, Batcher] = field(default_factory=dict)
    _inflight: dict[ServedModel, int] = field(default_factory=dict)
    _drained: dict[ServedModel, asyncio.Event] = field(default_factory=dict)
    _drains: set[asyncio.Task[None]] = field(default_factory=set)
    _required: set[str] = field(default_factory=set)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        # One online drift detector per model and ensemble (service.core.drift), read by /metrics.
        self.drift = DriftMonitor(self.settings.drift_run_length, window=self.settings.drift_window)
        self.metrics.drift.monitor = self.drift

    # ------------------------------------------------------------------ requests

    @property
    def batchers(self) -> dict[str, Batcher]:
        """The batcher of each model's default version, by model name."""
        out = {}
        for name, entry in self.registry.models.items():
            batcher = self._batchers.get(entry)
            if batcher is not None:
                out[name] = batcher
        return out

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Around one request: the model versions it is admitted on (`require_ready`) stay loaded
        until it ends."""
        leases: set[ServedModel] = set()
        token = _leases.set(leases)
        try:
            yield
        finally:
            _leases.reset(token)
            for entry in leases:
                self._return_lease(entry)

    def _return_lease(self, entry: ServedModel) -> None:
        left = self._inflight.get(entry, 1) - 1
        if left > 0:
            self._inflight[entry] = left
            return
        self._inflight.pop(entry, None)
        event = self._drained.get(entry)
        if event is not None:
            event.set()

    def require_ready(self, served: ServedModel) -> tuple[LoadedModel, Batcher]:
        """The loaded model and batcher of a model version that serves (the current request then
        holds it until it ends), or 503 saying why it does not serve."""
        batcher = self._batchers.get(served)
        if served.status in ("ready", "unloading") and served.model is not None and batcher is not None:
            leases = _leases.get()
            if leases is not None and served not in leases:
                leases.add(served)
                self._inflight[served] = self._inflight.get(served, 0) + 1
            return served.model, batcher
        if served.status == "loading" or served.status == "ready":
            raise NotReady(f"model '{served.name}' is still loading", code="model_loading")
        if served.status in ("unloading", "unloaded"):
            raise ModelUnavailable(
                f"model '{served.name}' version {served.version} is not served: {served.reason or 'unloaded'}",
                retry_after_s=None,
            )
        raise ModelUnavailable(f"model '{served.name}' was refused: {served.reason}", retry_after_s=None)

    def serves_by_default(self, served: ServedModel) -> bool:
        """Whether `served` is the version a request without one goes to (its traffic feeds the
        model's online drift detector)."""
        return self.registry.models.get(served.name) is served

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """Ready when every model configured at start serves a version, verified and warmed
        (DESIGN §6). A model unloaded by request, or added later and refused, does not count."""
        models = {
            m.name: m.status if m.reason is None else f"{m.status}: {m.reason}"
            for m in self.registry.models.values()
        }
        required = [
            m
            for name, m in self.registry.models.items()
            if name in self._required and self.registry.unloaded.get(name, set()) is not None
        ]
        ready = (
            self.loaded
            and not self.draining
            and bool(self.registry.models)
            and all(m.status == "ready" for m in required)
        )
        return ready, models

    # ------------------------------------------------------------------ start and stop

    async def start(self) -> None:
        """Discover the models and start loading them in the background (the server answers meanwhile)."""
        self.decode_pool = ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="decode")
        for entry in self.registry.discover():
            self.metrics.set_ready(entry.name, False, entry.version)
        self._loading = asyncio.get_running_loop().create_task(self._load_all(), name="load-models")

    async def _load_all(self) -> None:
        names = list(dict.fromkeys([*self.registry.models, *self.registry.model_names()]))
        try:
            for name in names:
                await self.sync_model(name)
        finally:
            self._required = set(self.registry.models)
            self.registry.resolve_ensembles()
            self.loaded = True
            ready, models = self.readiness()
            log.info("model loading finished: %s", "ready" if ready else f"not ready {models}")
            if self.settings.poll_seconds > 0 and not self.draining:
                self._poller = asyncio.get_running_loop().create_task(self._poll(), name="poll-repository")

    async def wait_loaded(self) -> None:
        if self._loading is not None:
            await asyncio.shield(self._loading)

    async def stop(self) -> None:
        """Finish queued work (bounded by shutdown_timeout_s), then release threads."""
        self.draining = True
        for task in (self._poller, self._loading):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        batchers = list(self._batchers.values())
        await asyncio.gather(*(b.close(self.settings.shutdown_timeout_s) for b in batchers))
        for task in list(self._drains):
            task.cancel()
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped: queued work finished, worker threads released")

    # ------------------------------------------------------------------ versions

    async def _poll(self) -> None:
        """Every `poll_seconds`: bring each model in line with its folders (new versions load,
        versions the policy drops unload; refused ones are retried once their folder changes)."""
        while True:
            await asyncio.sleep(self.settings.poll_seconds)
            try:
                for name in self.registry.model_names():
                    if self.registry.unloaded.get(name, set()) is not None:
                        await self.sync_model(name)
                async with self._lock:
                    await self._ensembles_changed()  # new, changed or removed ensemble files
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bad poll must not stop the next one
                log.exception("repository poll failed")

    async def sync_model(self, name: str, *, explicit: bool = False) -> SyncResult:
        """Load the versions of `name` the policy wants and do not serve yet, newest first, then
        retire the versions it no longer wants. `explicit` (a load by request): earlier unloads
        and refusals of this model are forgotten, so every version is tried again."""
        async with self._lock:
            start = time.perf_counter()
            if explicit:
                self.registry.forget_unloads(name)
            result = await self._sync_locked(name)
            if explicit and not (result.loaded or result.refused or result.retired):
                await self._after_change(name)  # still re-read the ensembles, as asked
            result.seconds = time.perf_counter() - start
            return result

    async def unload_model(self, name: str, version: int | None = None) -> SyncResult:
        """By request: stop serving one version, or the whole model (None). For one version, the
        policy's next choice among the other versions is loaded first (so unloading the newest
        version rolls back to the one before, without a gap). Retired versions unload once the
        requests admitted on them finish."""
        async with self._lock:
            start = time.perf_counter()
            self.registry.get(name)  # UnknownModel -> 404
            self.registry.unload(name, version)
            if version is None:
                result = SyncResult(name)
                for entry in list(self.registry.versions.get(name, {}).values()):
                    self._retire(entry, "unloaded by request")
                    result.retired.append(entry.version or 0)
                await self._after_change(name)
            else:
                result = await self._sync_locked(name)
                still = self.registry.versions.get(name, {}).get(version)
                if still is not None:  # nothing replaced it: it goes anyway, as asked
                    self._retire(still, "unloaded by request")
                    result.retired.append(version)
                    await self._after_change(name)
            result.serving = self.registry.serving_versions(name)
            result.seconds = time.perf_counter() - start
            return result

    async def _sync_locked(self, name: str) -> SyncResult:
        registry = self.registry
        result = SyncResult(name)
        while (version := registry.next_to_load(name)) is not None:
            entry = registry.new_entry(name, version)
            await asyncio.to_thread(registry.load, entry)
            seconds = entry.load_seconds or 0.0
            refused = entry.status != "ready"
            self.metrics.loaded(name, version, seconds, refused)
            if refused:
                result.refused.append((version, entry.reason or "refused"))
                registry.publish(entry)
                serving = registry.serving_versions(name)
                log.warning(
                    "load of model %s v%s refused after %.2f s: %s; serving %s",
                    name,
                    version,
                    seconds,
                    entry.reason,
                    ", ".join(f"v{v}" for v in serving) or "no version",
                    extra={"model": name, "version": version, "duration_s": round(seconds, 3)},
                )
                continue
            self._start_batcher(entry)
            self.metrics.set_ready(name, True, version)
            before = registry.models.get(name)
            registry.publish(entry)  # from here on, new requests may score on it
            result.loaded.append(version)
            default = registry.models.get(name)
            log.info(
                "model %s v%s loaded in %.2f s%s",
                name,
                version,
                seconds,
                f"; default v{before.version} -> v{version}"
                if default is entry and before is not None and before.status == "ready"
                else "",
                extra={"model": name, "version": version, "duration_s": round(seconds, 3)},
            )
        for old in registry.retirements(name):
            why = (
                "unloaded by request"
                if old.version in (registry.unloaded.get(name) or set())
                else ("the version policy no longer chooses it")
            )
            self._retire(old, why)
            result.retired.append(old.version or 0)
        if result.loaded or result.refused or result.retired:
            await self._after_change(name)
        result.serving = registry.serving_versions(name)
        return result

    def _retire(self, entry: ServedModel, why: str) -> None:
        if entry.status == "ready":
            self.registry.retire(entry)
        entry.reason = why
        self.metrics.set_ready(entry.name, False, entry.version)
        self._drained[entry] = event = asyncio.Event()
        if self._inflight.get(entry, 0) == 0:
            event.set()
        task = asyncio.get_running_loop().create_task(self._drain(entry, event), name=f"drain-{entry.name}")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, entry: ServedModel, drained: asyncio.Event) -> None:
        """Wait for the requests admitted on `entry`, then close its batcher and drop its graph."""
        start = time.perf_counter()
        holding = self._inflight.get(entry, 0)
        timeout = self.settings.shutdown_timeout_s
        try:
            await asyncio.wait_for(drained.wait(), timeout)
        except TimeoutError:
            log.warning(
                "model %s v%s: %d requests still running after %.0f s; unloading anyway",
                entry.name,
                entry.version,
                self._inflight.get(entry, 0),
                timeout,
            )
        batcher = self._batchers.pop(entry, None)
        if batcher is not None:
            await batcher.close(timeout)
        self._drained.pop(entry, None)
        self._inflight.pop(entry, None)
        self.registry.release(entry)
        assert entry.version is not None
        self.metrics.unloaded(entry.name, entry.version)
        seconds = time.perf_counter() - start
        log.info(
            "model %s v%s unloaded in %.2f s (%d requests were still on it)",
            entry.name,
            entry.version,
            seconds,
            holding,
            extra={"model": entry.name, "version": entry.version, "duration_s": round(seconds, 3)},
        )

    async def _after_change(self, name: str) -> None:
        """After a load, refusal or unload of `name`: its default-version gauge, and the ensembles
        re-read and re-resolved (once start-up loading is done; it resolves them itself)."""
        default = self.registry.models.get(name)
        ready = default is not None and default.status == "ready"
        self.metrics.set_default_version(name, default.version if ready and default else None)
        if self.loaded:
            await self._ensembles_changed()

    async def _ensembles_changed(self) -> None:
        read = await asyncio.to_thread(self.registry.read_ensembles)  # JSON parsing off the loop
        for ens_name in self.registry.rediscover_ensembles(read):
            ens = self.registry.ensembles.get(ens_name)
            if ens is None:
                log.info("ensemble %s is gone", ens_name)
                self.drift.forget("ensemble", ens_name)
            else:
                log.info(
                    "ensemble %s re-resolved: %s%s",
                    ens_name,
                    ens.status,
                    f" ({ens.reason})" if ens.reason else "",
                )

    def _start_batcher(self, entry: ServedModel) -> None:
        assert entry.model is not None and entry.version is not None
        s = self.settings
        batcher = self._batchers[entry] = Batcher(
            entry.name,
            entry.model.scorer.run,
            max_batch_images=s.max_batch_images,
            max_wait_s=s.max_wait_ms / 1000.0,
            max_queue_images=s.max_queue_images,
            concurrent_batches=s.concurrent_batches,
            observer=self.metrics.for_version(entry.version),
        )
        batcher.start()
