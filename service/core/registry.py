"""The model registry: find, verify, load and warm the models of a repository (DESIGN §3), several
versions of a model at once, and the bookkeeping of an atomic version swap.

A version that fails any check (`service.core.model.load_model`) is refused with its reason (logged,
and kept for the front doors to report); the others keep serving. Ensembles under
`<repository>/_ensembles` are read at discovery and resolved against the loaded models
(`service.core.ensembles`).

Versions. A `VersionPolicy` (`latest:N`, `specific:3,4` or `all`) chooses which of a model's version
folders serve; a `name:version` in the requested models pins that model to one version. Refused
versions count as absent: under `latest:1`, a broken version 2 leaves version 1 serving. A refusal
is remembered with a fingerprint of its folder (file names, sizes, mtimes), so a folder still being
copied is retried once it changes, and an unchanged broken one is not re-hashed on every poll.

The swap (driven by a front door, which owns threads and queues): `next_to_load(name)` names a
version the policy wants that is not serving yet; `new_entry` + `load` (blocking, in a worker
thread) build it away from the request path; `publish(entry)` makes it addressable, and the
default for its name when it is the highest serving version: one dict assignment, so a request
resolves either the old entry or the new one, never a half-made one. `retirements(name)` lists the
versions the policy no longer wants once its choice serves; `retire(entry)` stops new requests
reaching them (requests already holding the entry finish on it), and `release(entry)` drops the
graph once they have.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from models.artifact import Manifest, find_versions
from service.core.ensembles import ServedEnsemble, discover_ensembles, resolve_ensembles
from service.core.model import LoadedModel, ModelLoadError, ScorerWrapper, load_model
from service.core.runtime import Device, RuntimeName, Scorer

__all__ = [
    "LoadOptions",
    "ModelStatus",
    "Refusal",
    "Registry",
    "ServedModel",
    "UnknownModel",
    "VersionPolicy",
    "VersionState",
    "folder_fingerprint",
]

log = logging.getLogger("service.core.registry")

ModelStatus = Literal["loading", "ready", "failed", "unloading", "unloaded"]
VersionState = Literal["loading", "ready", "unloading", "refused", "unloaded", "available"]


class UnknownModel(LookupError):
    """No model (or no serving version) of that name in the registry; the message says what is."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown model"


@dataclass(frozen=True)
class VersionPolicy:
    """Which version folders of a model serve: the `count` highest (`latest`), the listed ones
    (`specific`), or every one (`all`). Text form: `latest:2`, `specific:3,4`, `all`."""

    kind: Literal["latest", "specific", "all"] = "latest"
    count: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`latest` / `latest:N`, `specific:V[,V...]` or `all`; ValueError (one line) otherwise."""
        kind, _, rest = text.strip().partition(":")
        kind, rest = kind.strip().lower(), rest.strip()
        if kind == "all" and not rest:
            return cls("all")
        if kind == "latest":
            if not rest:
                return cls("latest", 1)
            if rest.isdigit() and int(rest) >= 1:
                return cls("latest", int(rest))
            raise ValueError(f"version policy 'latest:{rest}': the count must be a positive integer")
        if kind == "specific":
            parts = [p.strip() for p in rest.split(",") if p.strip()]
            if parts and all(p.isdigit() and int(p) >= 1 for p in parts):
                return cls("specific", versions=tuple(sorted({int(p) for p in parts})))
            raise ValueError(
                f"version policy 'specific:{rest}': list positive version numbers, e.g. specific:3,4"
            )
        raise ValueError(f"unknown version policy '{text}': use latest:N, specific:V[,V...] or all")

    def select(self, available: Iterable[int]) -> list[int]:
        """The versions of `available` this policy serves, ascending."""
        versions = sorted(set(available))
        if self.kind == "latest":
            return versions[-self.count :]
        if self.kind == "specific":
            return [v for v in versions if v in self.versions]
        return versions

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, self.versions))
        return "all"


@dataclass(frozen=True)
class LoadOptions:
    """How every model of a registry is loaded (`service.core.model.load_model`'s arguments)."""

    runtime: RuntimeName = "onnx"
    device: Device = "auto"
    intra_op_threads: int = 0
    allow_spinning: bool = False
    warm_batch_sizes: tuple[int, ...] = (1,)
    wrap_scorer: ScorerWrapper | None = None


@dataclass(eq=False)
class ServedModel:
    """One version of a model: where it lies, its status (and reason when refused), once
    loaded its `LoadedModel`."""

    name: str
    version: int | None
    path: Path | None
    status: ModelStatus = "loading"
    reason: str | None = None
    model: LoadedModel | None = None
    load_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def manifest(self) -> Manifest | None:
        return None if self.model is None else self.model.manifest

    @property
    def scorer(self) -> Scorer | None:
        return None if self.model is None else self.model.scorer


@dataclass(frozen=True)
class Refusal:
    """A version that could not serve: why, and the state of its folder when it was tried."""

    version: int
    reason: str
    fingerprint: tuple[tuple[str, int, int], ...]
    at: float


def folder_fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """(relative path, bytes, mtime ns) of every file under `folder`, sorted: changes while a copy
    is in progress, cheap (no hashing)."""
    out: list[tuple[str, int, int]] = []
    for root, _, files in os.walk(folder):
        for file in files:
            path = Path(root) / file
            try:
                stat = path.stat()
            except OSError:
                continue
            out.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(out))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class Registry:
    def __init__(
        self,
        repository: str | Path,
        models: Sequence[str] = (),
        options: LoadOptions | None = None,
        policy: VersionPolicy | None = None,
    ) -> None:
        """`models`: 'name' or 'name:version' to serve; empty: every model of the repository.
        `policy`: which versions of each (default `latest:1`); a 'name:version' pins that model."""
        self.repository = Path(repository)
        self.requested = tuple(models)
        self.options = options or LoadOptions()
        self.policy = policy or VersionPolicy()
        # name -> the entry a request without a version resolves to (the highest serving version;
        # or, when none serves, the entry that says why).
        self.models: dict[str, ServedModel] = {}
        self.ensembles: dict[str, ServedEnsemble] = {}
        self.versions: dict[str, dict[int, ServedModel]] = {}  # name -> version -> serving entry
        self.loading: dict[tuple[str, int], ServedModel] = {}
        self.draining: dict[tuple[str, int], ServedModel] = {}
        self.refused: dict[str, dict[int, Refusal]] = {}
        self.unloaded: dict[str, set[int] | None] = {}  # by request: None = the whole model
        self._pins: dict[str, int | None] = {}
        for spec in self.requested:
            name, _, version_text = spec.partition(":")
            self._pins[name] = int(version_text) if version_text.isdigit() else None

    # ------------------------------------------------------------------ discovery

    def discover(self) -> list[ServedModel]:
        """One entry per version to serve, status `loading` (or `failed` if it cannot even be
        found); `models` holds the highest per name."""
        repository = self.repository
        entries: list[ServedModel] = []
        if self.requested:
            for spec in self.requested:
                name, _, version_text = spec.partition(":")
                versions = find_versions(repository, name)
                if version_text:
                    version = int(version_text) if version_text.isdigit() else None
                    if version is None or version not in versions:
                        entries.append(self._missing(name, version, f"version '{version_text}' not found"))
                        continue
                    entries.append(ServedModel(name, version, repository / name / str(version)))
                elif not versions:
                    entries.append(self._missing(name, None, f"no versions under {repository / name}"))
                else:
                    for version in self.policy.select(versions):
                        entries.append(ServedModel(name, version, repository / name / str(version)))
        elif repository.is_dir():
            for name in self.repository_names():
                versions = find_versions(repository, name)
                if not versions:
                    log.warning("skipping %s: no numbered version folders", repository / name)
                    continue
                for version in self.policy.select(versions):
                    entries.append(ServedModel(name, version, repository / name / str(version)))
        else:
            log.error("model repository %s does not exist", repository)
        self.models = {}
        for entry in entries:  # ascending versions: the highest wins
            self.models[entry.name] = entry
        self.ensembles = {e.name: e for e in discover_ensembles(repository)} if repository.is_dir() else {}
        return entries

    def repository_names(self) -> list[str]:
        """Model folders of the repository (not `_ensembles` or other `_`/`.` folders), sorted."""
        if not self.repository.is_dir():
            return []
        return sorted(
            p.name for p in self.repository.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
        )

    def model_names(self) -> list[str]:
        """The models this registry looks after: the requested ones, else every model folder
        (and any model still known though its folder went)."""
        if self.requested:
            return list(dict.fromkeys(spec.partition(":")[0] for spec in self.requested))
        return sorted(set(self.repository_names()) | set(self.models))

    def resolve_ensembles(self) -> None:
        """Once loading is done: each ensemble is valid only if its members serve at its versions
        (any serving version counts, not only the default)."""
        for ens in self.ensembles.values():
            if ens.manifest is None:
                continue
            members = {m.name: self._member(m.name, m.version) for m in ens.manifest.members}
            resolve_ensembles([ens], {k: v for k, v in members.items() if v is not None})

    def read_ensembles(self) -> list[ServedEnsemble]:
        """The repository's ensemble manifests as they are on disk (blocking file reads)."""
        return discover_ensembles(self.repository) if self.repository.is_dir() else []

    def rediscover_ensembles(self, read: list[ServedEnsemble] | None = None) -> list[str]:
        """Take the ensemble manifests (`read`, from `read_ensembles`; None: read them now) and
        resolve them against what serves now. An ensemble whose manifest and resolution are
        unchanged keeps its object (and so its drift detector). Returns the names whose status or
        manifest changed."""
        fresh = {e.name: e for e in (self.read_ensembles() if read is None else read)}
        old = self.ensembles
        self.ensembles = fresh
        self.resolve_ensembles()
        changed: list[str] = []
        for name, ens in fresh.items():
            before = old.get(name)
            if (
                before is not None
                and before.manifest is not None
                and before.manifest == ens.manifest
                and (before.status, before.reason) == (ens.status, ens.reason)
            ):
                self.ensembles[name] = before
                continue
            changed.append(name)
        changed += [name for name in old if name not in fresh]
        return sorted(changed)

    def _member(self, name: str, version: int) -> ServedModel | None:
        serving = self.versions.get(name, {})
        if version in serving:
            return serving[version]
        return self.models.get(name)

    def _missing(self, name: str, version: int | None, reason: str) -> ServedModel:
        log.error("refusing model %s: %s", name, reason, extra={"model": name})
        return ServedModel(name, version, None, status="failed", reason=reason)

    # ------------------------------------------------------------------ loading

    def load(self, entry: ServedModel) -> None:
        """Verify, load and warm one version (blocking; run it in a thread). Sets status and reason."""
        assert entry.path is not None
        start = time.perf_counter()
        entry.extra["fingerprint"] = folder_fingerprint(entry.path)
        o = self.options
        try:
            model = load_model(
                entry.path,
                runtime=o.runtime,
                device=o.device,
                intra_op_threads=o.intra_op_threads,
                allow_spinning=o.allow_spinning,
                warm_batch_sizes=o.warm_batch_sizes,
                expected_name=entry.name,
                wrap_scorer=o.wrap_scorer,
            )
        except ModelLoadError as exc:
            entry.status, entry.reason = "failed", _one_line(exc) or "ModelLoadError"
            entry.load_seconds = time.perf_counter() - start
            log.error(
                "refusing model %s v%s: %s",
                entry.name,
                entry.version,
                entry.reason,
                extra={"model": entry.name, "version": entry.version},
            )
            return
        entry.model = model
        entry.load_seconds = time.perf_counter() - start
        entry.status = "ready"
        log.info(
            "model %s v%s ready on %s/%s in %.2f s",
            entry.name,
            entry.version,
            model.scorer.runtime,
            model.scorer.device,
            entry.load_seconds,
            extra={"model": entry.name, "version": entry.version, "duration_s": round(entry.load_seconds, 3)},
        )

    def load_all(self) -> None:
        """Discover (if not yet done), load every model, then resolve the ensembles (blocking)."""
        entries = self.discover() if not self.models else list(self.models.values())
        for entry in entries:
            if entry.status == "loading":
                self.load(entry)
        for entry in entries:
            if entry.status in ("ready", "failed") and entry.version is not None and entry.path is not None:
                self.publish(entry)
        self.resolve_ensembles()

    # ------------------------------------------------------------------ versions and swaps

    def policy_for(self, name: str) -> VersionPolicy:
        """The model's policy: pinned by a 'name:version' request, else the registry's."""
        pin = self._pins.get(name)
        return VersionPolicy("specific", versions=(pin,)) if pin is not None else self.policy

    def candidates(self, name: str) -> list[int]:
        """Version folders that may serve: on disk, not refused in their present state, not
        unloaded by request. Ascending."""
        refused = self.refused.get(name, {})
        unloaded = self.unloaded.get(name, set())
        if unloaded is None:
            return []
        out = []
        for version in find_versions(self.repository, name):
            refusal = refused.get(version)
            if refusal is not None and refusal.fingerprint == folder_fingerprint(
                self.repository / name / str(version)
            ):
                continue
            if version not in unloaded:
                out.append(version)
        return out

    def wanted(self, name: str) -> list[int]:
        """The versions the policy serves among the candidates, ascending."""
        if name not in self.model_names() and name not in self.versions:
            return []
        return self.policy_for(name).select(self.candidates(name))

    def next_to_load(self, name: str) -> int | None:
        """The highest wanted version that is neither serving nor being loaded, or None."""
        serving = self.versions.get(name, {})
        todo = [v for v in self.wanted(name) if v not in serving and (name, v) not in self.loading]
        return todo[-1] if todo else None

    def new_entry(self, name: str, version: int) -> ServedModel:
        """A `loading` entry for one version (listed as loading, not yet addressable)."""
        entry = ServedModel(name, version, self.repository / name / str(version))
        self.loading[(name, version)] = entry
        if name not in self.models:
            self.models[name] = entry
        return entry

    def publish(self, entry: ServedModel) -> None:
        """A loaded (or refused) entry takes its place: a ready one becomes addressable, and the
        default for its name when it is the highest serving version; a refused one is
        remembered with its reason. Call from the thread that serves requests."""
        assert entry.version is not None
        key = (entry.name, entry.version)
        self.loading.pop(key, None)
        if entry.status == "ready":
            self.versions.setdefault(entry.name, {})[entry.version] = entry
            self.refused.get(entry.name, {}).pop(entry.version, None)
        else:
            fingerprint = entry.extra.get("fingerprint")
            if fingerprint is None and entry.path is not None:
                fingerprint = folder_fingerprint(entry.path)
            self.refused.setdefault(entry.name, {})[entry.version] = Refusal(
                entry.version, entry.reason or "refused", fingerprint or (), time.time()
            )
        self._refresh_default(entry.name)

    def retirements(self, name: str) -> list[ServedModel]:
        """Serving versions the policy no longer wants, once at least one wanted version serves
        (a model never drops to no version because its new one was refused)."""
        serving = self.versions.get(name, {})
        wanted = set(self.wanted(name))
        if not wanted & set(serving):
            return []
        return [entry for version, entry in sorted(serving.items()) if version not in wanted]

    def retire(self, entry: ServedModel) -> None:
        """New requests no longer reach `entry` (status `unloading`); requests that hold it finish
        on it. Call `release` once they have."""
        assert entry.version is not None
        serving = self.versions.get(entry.name, {})
        if serving.get(entry.version) is entry:
            del serving[entry.version]
        entry.status = "unloading"
        self.draining[(entry.name, entry.version)] = entry
        self._refresh_default(entry.name)

    def release(self, entry: ServedModel) -> None:
        """Drop a retired entry's graph (its runtime session and memory go with the last reference)."""
        assert entry.version is not None
        self.draining.pop((entry.name, entry.version), None)
        entry.status, entry.model = "unloaded", None
        self._refresh_default(entry.name)

    def unload(self, name: str, version: int | None = None) -> None:
        """By request: from now on `version` (None: every version) of `name` is not wanted, and
        polling leaves it unloaded until it is loaded again by request. The caller retires what
        no longer serves: the whole model at once; one version once the policy's next choice
        serves (`retirements`), so a model does not drop to no version on the way."""
        if version is None:
            self.unloaded[name] = None
        else:
            known = self.unloaded.get(name, set())
            if known is not None:
                known.add(version)
                self.unloaded[name] = known
        self._refresh_default(name)

    def forget_unloads(self, name: str) -> None:
        """A load by request: earlier unloads of this model no longer hold, and its refused
        versions are tried again."""
        self.unloaded.pop(name, None)
        self.refused.pop(name, None)

    def _refresh_default(self, name: str) -> None:
        serving = self.versions.get(name, {})
        if serving:
            self.models[name] = serving[max(serving)]
            return
        current = self.models.get(name)
        if self.unloaded.get(name, set()) is None:
            latest = current.version if current is not None else None
            self.models[name] = ServedModel(
                name, latest, None, status="unloaded", reason="unloaded by request"
            )
            return
        loading = [e for (n, _), e in self.loading.items() if n == name]
        if loading:
            self.models[name] = max(loading, key=lambda e: e.version or 0)
            return
        refused = self.refused.get(name, {})
        if refused:
            latest_refusal = refused[max(refused)]
            self.models[name] = ServedModel(
                name,
                latest_refusal.version,
                self.repository / name / str(latest_refusal.version),
                status="failed",
                reason=latest_refusal.reason,
            )
            return
        if current is not None and current.status in ("ready", "unloading", "unloaded"):
            self.models[name] = ServedModel(
                name, current.version, None, status="unloaded", reason="no version serves"
            )

    # ------------------------------------------------------------------ lookup

    def get(self, name: str, version: int | str | None = None) -> ServedModel:
        """The entry for `name` (its default version), `name:version`, or `name` at `version`."""
        if version is None and ":" in name:
            name, _, version = name.partition(":")
        try:
            default = self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise UnknownModel(f"no model named '{name}' (served: {known})") from None
        if version is None:
            return default
        text = str(version).strip()
        serving = self.versions.get(name, {})
        if text.isdigit() and int(text) in serving:
            return serving[int(text)]
        listed = ", ".join(map(str, sorted(serving))) or "none"
        raise UnknownModel(f"model '{name}' has no version '{text}' serving (serving: {listed})")

    def serving_versions(self, name: str) -> list[int]:
        return sorted(self.versions.get(name, {}))

    def ready_models(self) -> list[ServedModel]:
        return [m for m in self.models.values() if m.status == "ready"]

    def version_table(self, name: str) -> list[dict[str, Any]]:
        """Every known version of a model: `{version, state, reason}`, state one of `ready`,
        `loading`, `unloading`, `refused`, `unloaded` (by request) or `available` (on disk, not
        chosen by the policy). Ascending."""
        states: dict[int, tuple[VersionState, str | None]] = {}
        unloaded = self.unloaded.get(name, set())
        policy = self.policy_for(name)
        for version in find_versions(self.repository, name):
            if unloaded is None or version in unloaded:
                states[version] = ("unloaded", "unloaded by request")
            else:
                states[version] = ("available", f"not chosen by the version policy {policy}")
        for version, refusal in self.refused.get(name, {}).items():
            states[version] = ("refused", refusal.reason)
        for (n, version), _ in self.draining.items():
            if n == name:
                states[version] = ("unloading", "draining: requests admitted on it finish first")
        for (n, version), _ in self.loading.items():
            if n == name:
                states[version] = ("loading", None)
        for version in self.versions.get(name, {}):
            states[version] = ("ready", None)
        return [{"version": v, "state": s, "reason": r} for v, (s, r) in sorted(states.items())]

    def index(self) -> list[dict[str, Any]]:
        """`version_table` of every model, with its name: `{name, version, state, reason}`."""
        names = sorted(set(self.model_names()) | set(self.models) | set(self.versions))
        out: list[dict[str, Any]] = []
        for name in names:
            table = self.version_table(name)
            if not table:
                entry = self.models.get(name)
                if entry is not None:
                    state: VersionState = "refused" if entry.status == "failed" else "unloaded"
                    table = [{"version": entry.version, "state": state, "reason": entry.reason}]
            out += [{"name": name, **row} for row in table]
        return out
