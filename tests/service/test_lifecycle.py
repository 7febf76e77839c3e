"""New model versions without downtime (issue 14), over real HTTP with the real tiny exported models.

Concurrent clients score continuously (v1 and v2 routes) while a second version folder is copied
into the repository and loaded, by the repository API and, in another test, by polling; the old
version is retired and unloaded. Checked: no request fails, every response names the version
that scored it, per client the versions never go back (the switch happens once and stays), every
request sent after the swap scores on the new version, a request admitted on the old version
finishes there, and the old version's graph is released once it drains. Broken versions (a
flipped byte, a half-copied folder, a graph that cannot serve the manifest's statistic) are
refused with their reason while the old version keeps serving.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from models.artifact import (
    MANIFEST_NAME,
    Calibration,
    EnsembleManifest,
    EnsembleMember,
    load_manifest,
    write_ensemble,
    write_manifest,
)
from models.scores import combine_p_values, leave_one_out_p_values
from service.cli import add_serve_arguments, settings_from_args
from service.core import Scorer
from service.core.registry import VersionPolicy
from service.settings import Settings
from tests.service.helpers import (
    GREY_MODEL,
    RGB_MODEL,
    Server,
    SlowScorer,
    b64,
    base_settings,
    reaches,
    running_server,
)
from training.ensemble import RULE_DEFINITIONS

ADMIN = {"Authorization": "Bearer admin-secret"}
SCORING = {"Authorization": "Bearer scoring-secret"}
NAME = GREY_MODEL


# ---------------------------------------------------------------- version folders


def add_version(source: Path, repository: Path, version: int, name: str = NAME) -> Path:
    """Copy an exported version folder in as `name/version` the way an operator should: into a
    staging folder first, sealed (manifest rewritten, fresh hashes), then renamed into place."""
    staging = repository / name / f".staging-{version}"
    shutil.copytree(source, staging)
    write_manifest(staging, load_manifest(staging).model_copy(update={"name": name, "version": version}))
    target = repository / name / str(version)
    staging.rename(target)
    return target


def flip_a_byte(folder: Path) -> None:
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))


def half_copy(source: Path, repository: Path, version: int, name: str = NAME) -> Path:
    """A version folder caught mid-copy: the graph is there, the manifest not yet."""
    target = repository / name / str(version)
    target.mkdir(parents=True)
    shutil.copy2(source / "model.onnx", target / "model.onnx")
    return target


def finish_copy(source: Path, target: Path, name: str = NAME) -> None:
    for item in source.iterdir():
        if item.name != MANIFEST_NAME and not (target / item.name).exists():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, target / item.name)
    manifest = load_manifest(source).model_copy(update={"name": name, "version": int(target.name)})
    write_manifest(target, manifest)


@pytest.fixture()
def repo(artifacts: dict[str, Path], tmp_path: Path) -> Path:
    """A fresh repository holding version 1 of the grey model."""
    repository = tmp_path / "repository"
    add_version(artifacts[GREY_MODEL], repository, 1)
    return repository


def _settings(repository: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"admin_api_keys": ["admin-secret"], "shutdown_timeout_s": 20.0}
    values.update(overrides)
    return base_settings(repository, **values)


# ---------------------------------------------------------------- clients under load


@dataclass
class Client:
    """One client scoring in a loop: (sent, received, status, version) per request."""

    route: str
    body: dict[str, Any]
    log: list[tuple[float, float, int, int | None]] = field(default_factory=list)

    def run(self, url: str, stop: threading.Event) -> None:
        with httpx.Client(base_url=url, timeout=30.0) as client:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.post(self.route, json=self.body)
                except httpx.HTTPError:
                    self.log.append((sent, time.monotonic(), -1, None))
                    continue
                version = None
                if response.status_code == 200:
                    body = response.json()
                    raw = body.get("version", body.get("model_version"))
                    version = None if raw is None else int(raw)
                self.log.append((sent, time.monotonic(), response.status_code, version))

    @property
    def versions(self) -> list[int | None]:
        return [v for _, _, _, v in self.log]


def _clients(images: np.ndarray) -> list[Client]:
    one = images[:1]
    v1 = {"array": {"b64": b64(one.tobytes()), "shape": list(one.shape)}}
    v2 = {
        "inputs": [
            {"name": "images", "datatype": "UINT8", "shape": list(one.shape), "data": one.ravel().tolist()}
        ]
    }
    return [
        Client(f"/v1/models/{NAME}/score", v1),
        Client(f"/v1/models/{NAME}/score", v1),
        Client(f"/v2/models/{NAME}/infer", v2),
    ]


@dataclass
class Load:
    clients: list[Client]
    stop: threading.Event
    threads: list[threading.Thread]

    def count(self) -> int:
        return min(len(c.log) for c in self.clients)

    def more(self, n: int, timeout_s: float = 60.0) -> None:
        """Wait until every client has made `n` more requests."""
        target = [len(c.log) + n for c in self.clients]
        assert reaches(
            lambda: all(len(c.log) >= t for c, t in zip(self.clients, target, strict=True)), timeout_s
        )


@pytest.fixture()
def under_load(grey_images: np.ndarray) -> Iterator[Callable[[Server], Load]]:
    started: list[Load] = []

    def start(server: Server) -> Load:
        clients = _clients(grey_images)
        stop = threading.Event()
        threads = [threading.Thread(target=c.run, args=(server.url, stop), daemon=True) for c in clients]
        for thread in threads:
            thread.start()
        load = Load(clients, stop, threads)
        started.append(load)
        load.more(5)
        return load

    yield start
    for load in started:
        load.stop.set()
        for thread in load.threads:
            thread.join(30)


def assert_clean_switch(load: Load, old: int, new: int, swapped_at: float) -> None:
    """No failure, a version on every response, per client old...old new...new (once, for good),
    and everything sent after the swap answered by the new version."""
    load.stop.set()
    for thread in load.threads:
        thread.join(30)
    for client in load.clients:
        statuses = [s for _, _, s, _ in client.log]
        assert statuses.count(200) == len(statuses), f"{client.route}: failed requests {set(statuses)}"
        versions = client.versions
        assert None not in versions
        assert set(versions) == {old, new}, versions
        assert versions == sorted(versions), f"{client.route}: versions went back: {versions}"  # type: ignore[type-var]
        after = [v for sent, _, _, v in client.log if sent > swapped_at]
        assert after and set(after) == {new}


def _index(server: Server) -> dict[tuple[str, str], dict[str, str]]:
    response = server.client.get("/v2/repository/index", headers=ADMIN)
    assert response.status_code == 200, response.text
    return {(row["name"], row["version"]): row for row in response.json()}


def _metrics(server: Server) -> str:
    return server.client.get("/metrics").text


def _released(ref: weakref.ref[Any]) -> Callable[[], bool]:
    def gone() -> bool:
        gc.collect()
        return ref() is None

    return gone


# ---------------------------------------------------------------- the swap, by API and by polling


def test_swap_by_api_under_load(
    repo: Path,
    artifacts: dict[str, Path],
    under_load: Callable[[Server], Load],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="service.state")
    with running_server(_settings(repo)) as server:
        old_model = weakref.ref(server.state.registry.get(NAME).model)
        drift_before = server.client.get(f"/v1/models/{NAME}/drift")
        load = under_load(server)
        assert server.client.get(f"/v1/models/{NAME}/drift").json()["images"] > drift_before.json()["images"]

        add_version(artifacts[GREY_MODEL], repo, 2)
        load.more(3)  # a version folder that appears is not loaded without polling or a request
        assert set(load.clients[0].versions) == {1}
        readiness: list[int] = []
        probing = threading.Event()

        def probe() -> None:  # a Kubernetes readiness probe, many times a second
            with httpx.Client(base_url=server.url, timeout=10) as client:
                while not probing.is_set():
                    readiness.append(client.get("/readyz").status_code)
                    readiness.append(client.get("/v2/health/ready").status_code)

        prober = threading.Thread(target=probe)
        prober.start()
        started = time.monotonic()
        response = server.client.post(f"/v2/repository/models/{NAME}/load", headers=ADMIN)
        swapped_at = time.monotonic()
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["loaded"] == ["2"] and body["unloading"] == ["1"] and body["serving"] == ["2"]
        assert body["refused"] == [] and 0 < body["seconds"] <= swapped_at - started
        load.more(10)
        probing.set()
        prober.join(10)
        assert readiness and set(readiness) == {200}  # the pod stays ready through the swap

        # A broken version 3 (one flipped byte after export) is refused; version 2 keeps serving.
        flip_a_byte(add_version(artifacts[GREY_MODEL], repo, 3))
        refused = server.client.post(f"/v2/repository/models/{NAME}/load", headers=ADMIN)
        assert refused.status_code == 400 and refused.json()["code"] == "load_refused"
        message = refused.json()["error"]
        assert (
            "version 3" in message and "sha256 mismatch" in message and "still serving version 2" in message
        )
        load.more(10)
        assert_clean_switch(load, 1, 2, swapped_at)

        # The old version drains, then its graph goes; the refusal is reported everywhere.
        assert reaches(_released(old_model), 20), "version 1's LoadedModel is still referenced"
        index = _index(server)
        assert index[(NAME, "2")]["state"] == "READY"
        assert index[(NAME, "1")]["state"] == "UNAVAILABLE" and "latest:1" in index[(NAME, "1")]["reason"]
        assert index[(NAME, "3")]["state"] == "UNAVAILABLE" and "sha256" in index[(NAME, "3")]["reason"]
        listed = server.client.get("/v1/models").json()["models"][0]
        assert listed["version"] == 2 and listed["status"] == "ready"
        states = {row["version"]: row["state"] for row in listed["versions"]}
        assert states == {1: "available", 2: "ready", 3: "refused"}
        metrics = _metrics(server)
        assert f'oodflow_model_ready{{model="{NAME}",version="2"}} 1.0' in metrics
        assert f'oodflow_model_ready{{model="{NAME}",version="1"}}' not in metrics
        assert f'oodflow_model_version{{model="{NAME}"}} 2.0' in metrics
        assert f'oodflow_model_loads_refused_total{{model="{NAME}",version="3"}} 1.0' in metrics
        assert f'oodflow_model_unloads_total{{model="{NAME}",version="1"}} 1.0' in metrics
        assert f'oodflow_bits_per_dim_count{{model="{NAME}",version="2"}}' in metrics
        # The drift detector is bound to the loaded version: a fresh one after the swap.
        drift = server.client.get(f"/v1/models/{NAME}/drift").json()
        assert drift["version"] == 2 and drift["images"] < sum(len(c.log) for c in load.clients)

    messages = [r for r in caplog.records if r.name == "service.state"]
    loaded = [r for r in messages if "v2 loaded in" in r.getMessage()]
    unloaded = [r for r in messages if "v1 unloaded in" in r.getMessage()]
    refusals = [r for r in messages if "v3 refused" in r.getMessage()]
    assert loaded and unloaded and refusals
    assert all(getattr(r, "duration_s", None) is not None for r in (*loaded, *unloaded, *refusals))


def test_swap_by_polling_under_load(
    repo: Path,
    artifacts: dict[str, Path],
    under_load: Callable[[Server], Load],
) -> None:
    with running_server(_settings(repo, poll_seconds=0.1)) as server:
        load = under_load(server)
        add_version(artifacts[GREY_MODEL], repo, 2)
        assert reaches(lambda: server.state.registry.get(NAME).version == 2, 30)
        swapped_at = time.monotonic()
        load.more(10)

        # A half-copied version 3 (no manifest yet) is refused, once, while version 2 serves on.
        target = half_copy(artifacts[GREY_MODEL], repo, 3)
        assert reaches(lambda: "manifest" in _index(server).get((NAME, "3"), {}).get("reason", ""), 30)
        row = _index(server)[(NAME, "3")]
        assert row["state"] == "UNAVAILABLE" and "no manifest.json" in row["reason"]
        load.more(10)
        time.sleep(0.5)  # several polls: an unchanged folder is not tried again
        assert f'oodflow_model_loads_refused_total{{model="{NAME}",version="3"}} 1.0' in _metrics(server)
        assert_clean_switch(load, 1, 2, swapped_at)

        # The copy completes: the changed folder is tried again and serves.
        finish_copy(artifacts[GREY_MODEL], target)
        assert reaches(lambda: server.state.registry.get(NAME).version == 3, 30)
        score = server.client.post(f"/v1/models/{NAME}/score", json=load.clients[0].body)
        assert score.status_code == 200 and score.json()["version"] == 3
        assert reaches(lambda: server.state.registry.serving_versions(NAME) == [3], 20)


def test_request_admitted_on_the_old_version_finishes_there(
    repo: Path, artifacts: dict[str, Path], grey_images: np.ndarray
) -> None:
    """A slow request holds version 1 through the swap: it answers from version 1, the index
    says UNLOADING meanwhile, new requests already score on version 2, then version 1's scorer
    (and the ONNX Runtime session inside it) is released."""
    scorers: list[weakref.ref[SlowScorer]] = []

    def wrap(name: str, scorer: Scorer) -> Scorer:
        slow = SlowScorer(scorer, delay_s=0.0)
        scorers.append(weakref.ref(slow))
        return slow

    body = {"array": {"b64": b64(grey_images[:1].tobytes()), "shape": [1, 28, 28]}}
    with running_server(_settings(repo), wrap_scorer=wrap) as server:
        first = scorers[0]()
        assert first is not None
        first.delay_s = 3.0
        del first
        answers: list[httpx.Response] = []
        slow = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{server.url}/v1/models/{NAME}/score", json=body, timeout=30)
            )
        )
        slow.start()
        assert reaches(lambda: server.state.batchers[NAME].running_batches == 1, 10)  # in inference

        add_version(artifacts[GREY_MODEL], repo, 2)
        loaded = server.client.post(f"/v2/repository/models/{NAME}/load", headers=ADMIN)
        assert loaded.status_code == 200 and loaded.json()["unloading"] == ["1"]
        assert _index(server)[(NAME, "1")]["state"] == "UNLOADING"
        fresh = server.client.post(f"/v1/models/{NAME}/score", json=body)
        assert fresh.status_code == 200 and fresh.json()["version"] == 2
        assert server.client.post(f"/v1/models/{NAME}:1/score", json=body).status_code == 404

        slow.join(30)
        assert answers and answers[0].status_code == 200 and answers[0].json()["version"] == 1
        assert reaches(lambda: _index(server)[(NAME, "1")]["state"] == "UNAVAILABLE", 20)
        assert reaches(_released(scorers[0]), 20), "version 1's scorer is still referenced"
        assert scorers[1]() is not None  # version 2's is not
        assert list(server.state.batchers) == [NAME] and len(server.state._batchers) == 1  # v1's went


def test_request_admitted_before_its_body_arrives_finishes_on_the_old_version(
    repo: Path, artifacts: dict[str, Path], grey_images: np.ndarray
) -> None:
    """A request is admitted on version 1 (its model resolved) while its body is still on the
    wire; version 2 is loaded meanwhile. Version 1 waits for it (UNLOADING, not closed under it),
    and the request, once its body arrives, scores on version 1; then version 1 unloads."""
    body = {"array": {"b64": b64(grey_images[:1].tobytes()), "shape": [1, 28, 28]}}
    payload = json.dumps(body).encode()
    with running_server(_settings(repo)) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            head = (
                f"POST /v1/models/{NAME}/score HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                "Connection: close\r\n\r\n"
            )
            sock.sendall(head.encode() + payload[:20])
            entry = server.state.registry.get(NAME)
            assert reaches(lambda: server.state._inflight.get(entry, 0) == 1, 10)  # admitted on v1

            add_version(artifacts[GREY_MODEL], repo, 2)
            loaded = server.client.post(f"/v2/repository/models/{NAME}/load", headers=ADMIN)
            assert loaded.status_code == 200 and loaded.json()["unloading"] == ["1"]
            assert server.client.post(f"/v1/models/{NAME}/score", json=body).json()["version"] == 2
            time.sleep(0.5)
            assert _index(server)[(NAME, "1")]["state"] == "UNLOADING"  # held by the admitted request

            sock.sendall(payload[20:])
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        head_bytes, _, answer = raw.partition(b"\r\n\r\n")
        assert head_bytes.startswith(b"HTTP/1.1 200"), raw[:300]
        assert json.loads(answer)["version"] == 1
        assert reaches(lambda: _index(server)[(NAME, "1")]["state"] == "UNAVAILABLE", 20)


# ---------------------------------------------------------------- several versions, ensembles


def _ensemble(repository: Path, artifacts: dict[str, Path], name: str, grey_version: int) -> None:
    grey, rgb = (load_manifest(artifacts[n]) for n in (GREY_MODEL, RGB_MODEL))
    refs = [np.asarray(m.calibration.reference_scores) for m in (grey, rgb)]
    n = min(len(r) for r in refs)
    reference = np.sort(combine_p_values(np.stack([leave_one_out_p_values(r)[:n] for r in refs]), "fisher"))
    threshold = float(np.quantile(reference, 0.95))
    members = [
        EnsembleMember(name=GREY_MODEL, version=grey_version, kind=grey.kind, statistic=grey.score.statistic),
        EnsembleMember(name=RGB_MODEL, version=1, kind=rgb.kind, statistic=rgb.score.statistic),
    ]
    write_ensemble(
        repository,
        EnsembleManifest(
            name=name,
            rule="fisher",
            rule_definition=RULE_DEFINITIONS["fisher"],
            members=members,
            calibration=Calibration(
                target_fpr=0.05,
                threshold=threshold,
                validation_set="calibration",
                validation_size=len(reference),
                validation_fpr=float(np.mean(reference > threshold)),
                reference_scores=reference.tolist(),
            ),
        ),
    )


def test_two_versions_addressing_unload_and_ensembles(
    repo: Path, artifacts: dict[str, Path], grey_images: np.ndarray
) -> None:
    add_version(artifacts[GREY_MODEL], repo, 2)
    add_version(artifacts[RGB_MODEL], repo, 1, name=RGB_MODEL)
    _ensemble(repo, artifacts, "pair", grey_version=1)
    body = {"array": {"b64": b64(grey_images[:2].tobytes()), "shape": [2, 28, 28]}}
    infer = {
        "inputs": [
            {
                "name": "images",
                "datatype": "UINT8",
                "shape": [1, 28, 28],
                "data": grey_images[0].ravel().tolist(),
            }
        ]
    }
    with running_server(_settings(repo, version_policy="latest:2")) as server:
        c = server.client
        assert c.post(f"/v1/models/{NAME}/score", json=body).json()["version"] == 2  # the default: highest
        one = c.post(f"/v1/models/{NAME}:1/score", json=body).json()
        two = c.post(f"/v1/models/{NAME}:2/score", json=body).json()
        assert one["version"] == 1 and two["version"] == 2
        assert [r["ood_score"] for r in one["results"]] == [
            r["ood_score"] for r in two["results"]
        ]  # same graph
        assert c.post(f"/v2/models/{NAME}/versions/1/infer", json=infer).json()["model_version"] == "1"
        assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["1", "2"]
        assert c.post(f"/v1/models/{NAME}:7/score", json=body).status_code == 404
        missing = c.post(f"/v2/models/{NAME}/versions/7/infer", json=infer)
        assert missing.status_code == 404 and "serving: 1, 2" in missing.json()["error"]

        # The ensemble pins version 1, which still serves: valid, and used when v1 is asked for.
        ensembles = {e["name"]: e for e in c.get("/v1/models").json()["ensembles"]}
        assert ensembles["pair"]["status"] == "valid"
        combined = c.post(
            "/v1/score", json=body, params={"models": f"{NAME}:1,{RGB_MODEL}", "resize": True}
        ).json()["combined"]
        assert combined is not None and combined["members"][0] == {"name": NAME, "version": 1}
        plain = c.post("/v1/score", json=body, params={"models": f"{NAME},{RGB_MODEL}", "resize": True})
        assert plain.json()["combined"] is None  # version 2 was scored: the ensemble does not apply

        # Unload version 1: the ensemble goes stale, with the reason.
        unloaded = c.post(
            f"/v2/repository/models/{NAME}/unload", headers=ADMIN, json={"parameters": {"version": 1}}
        )
        assert unloaded.status_code == 200
        assert unloaded.json()["unloading"] == ["1"] and unloaded.json()["serving"] == ["2"]
        pair = {e["name"]: e for e in c.get("/v1/models").json()["ensembles"]}["pair"]
        assert pair["status"] == "stale" and "version 2" in pair["reason"] and "version 1" in pair["reason"]
        assert c.post(f"/v1/models/{NAME}:1/score", json=body).status_code == 404
        assert reaches(lambda: _index(server)[(NAME, "1")]["reason"] == "unloaded by request", 20)

        # The ensemble re-made over version 2 resolves to it at the next load.
        _ensemble(repo, artifacts, "pair", grey_version=2)
        reloaded = c.post(f"/v2/repository/models/{NAME}/load", headers=ADMIN)
        assert reloaded.status_code == 200 and reloaded.json()["serving"] == [
            "1",
            "2",
        ]  # an unload by request is undone
        pair = {e["name"]: e for e in c.get("/v1/models").json()["ensembles"]}["pair"]
        assert pair["status"] == "valid" and pair["members"][0] == {"name": NAME, "version": 2}

        # Unloading the whole model: 503 with the reason, readiness unaffected (it was asked for).
        assert c.post(f"/v2/repository/models/{RGB_MODEL}/unload", headers=ADMIN).status_code == 200
        gone = c.post(f"/v1/models/{RGB_MODEL}/score", json=body)
        assert gone.status_code == 503 and "unloaded by request" in gone.json()["error"]["message"]
        assert c.get("/readyz").status_code == 200
        ready_only = c.post("/v2/repository/index", headers=ADMIN, json={"ready": True}).json()
        assert {(r["name"], r["version"]) for r in ready_only} == {(NAME, "1"), (NAME, "2")}


def test_unloading_the_newest_version_rolls_back_without_a_gap(
    repo: Path, artifacts: dict[str, Path], grey_images: np.ndarray, under_load: Callable[[Server], Load]
) -> None:
    add_version(artifacts[GREY_MODEL], repo, 2)
    with running_server(_settings(repo)) as server:
        load = under_load(server)
        assert server.state.registry.serving_versions(NAME) == [2]
        back = server.client.post(
            f"/v2/repository/models/{NAME}/unload", headers=ADMIN, json={"parameters": {"version": "2"}}
        )
        swapped_at = time.monotonic()
        assert back.status_code == 200, back.text
        assert (
            back.json()["loaded"] == ["1"]
            and back.json()["unloading"] == ["2"]
            and back.json()["serving"] == ["1"]
        )
        load.more(10)
        load.stop.set()
        for thread in load.threads:
            thread.join(30)
        for client in load.clients:
            assert {s for _, _, s, _ in client.log} == {200}
            versions = client.versions
            assert versions == sorted(versions, reverse=True) and set(versions) == {1, 2}  # type: ignore[type-var]
            assert {v for sent, _, _, v in client.log if sent > swapped_at} == {1}
        empty = repo / "empty"
        empty.mkdir()
        nothing = server.client.post("/v2/repository/models/empty/load", headers=ADMIN)
        assert nothing.status_code == 404 and "no version folder" in nothing.json()["error"]


def test_broken_newest_version_at_start_falls_back(repo: Path, artifacts: dict[str, Path]) -> None:
    """A graph that cannot serve the manifest's statistic (the warm-up check), as version 2 at
    start: version 1 serves, version 2 is listed as refused with the reason."""
    bad = add_version(artifacts[GREY_MODEL], repo, 2)
    manifest = load_manifest(bad)
    write_manifest(
        bad,
        manifest.model_copy(
            update={"score": manifest.score.model_copy(update={"statistic": "likelihood_ratio"})}
        ),
    )
    with running_server(_settings(repo)) as server:
        assert server.client.get("/readyz").status_code == 200
        model = server.client.get(f"/v1/models/{NAME}").json()
        assert model["version"] == 1 and model["status"] == "ready"
        refused = {row["version"]: row for row in model["versions"]}[2]
        assert refused["state"] == "refused" and "background_log_likelihood" in refused["reason"]
        assert f'oodflow_model_loads_refused_total{{model="{NAME}",version="2"}} 1.0' in _metrics(server)


# ---------------------------------------------------------------- access, settings


def test_repository_control_needs_the_admin_key(repo: Path) -> None:
    with running_server(_settings(repo, api_keys=["scoring-secret"])) as server:
        c = server.client
        for method, path in (
            ("GET", "/v2/repository/index"),
            ("POST", "/v2/repository/index"),
            ("POST", f"/v2/repository/models/{NAME}/load"),
            ("POST", f"/v2/repository/models/{NAME}/unload"),
        ):
            assert c.request(method, path).status_code == 401, path
            assert c.request(method, path, headers=SCORING).status_code == 403, path
        assert c.get("/v2/repository/index", headers=ADMIN).json() == [
            {"name": NAME, "version": "1", "state": "READY", "reason": ""}
        ]
        assert c.post(f"/v1/models/{NAME}/score", headers=SCORING, json={}).status_code != 401
        unknown = c.post("/v2/repository/models/no-such/load", headers=ADMIN)
        assert unknown.status_code == 404 and "no-such" in unknown.json()["error"]
        bad = c.post(
            f"/v2/repository/models/{NAME}/unload", headers=ADMIN, json={"parameters": {"version": "x"}}
        )
        assert bad.status_code == 400
        assert c.post("/v2/repository/index", headers=ADMIN, content=b"{not json").status_code == 400
        assert c.get(f"/v1/models/{NAME}", headers=SCORING).json()["status"] == "ready"  # nothing happened

    with running_server(base_settings(repo)) as server:  # no admin key configured: closed
        refused = server.client.post(f"/v2/repository/models/{NAME}/load")
        assert refused.status_code == 403 and "OODFLOW_ADMIN_API_KEYS" in refused.json()["error"]


def test_tritonclient_repository_calls(repo: Path, artifacts: dict[str, Path]) -> None:
    """The standard Open Inference Protocol client's repository calls work unchanged."""
    triton = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    with running_server(_settings(repo)) as server:
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        index = client.get_model_repository_index(headers=ADMIN)
        assert index == [{"name": NAME, "version": "1", "state": "READY", "reason": ""}]
        add_version(artifacts[GREY_MODEL], repo, 2)
        client.load_model(NAME, headers=ADMIN)
        assert client.is_model_ready(NAME, "2") and server.state.registry.get(NAME).version == 2
        with pytest.raises(InferenceServerException, match="not supported"):
            client.load_model(NAME, headers=ADMIN, config="{}")
        with pytest.raises(InferenceServerException, match="admin API key"):
            client.load_model(NAME)
        client.unload_model(NAME, headers=ADMIN)
        assert reaches(lambda: not client.is_model_ready(NAME), 20)
        states = lambda: {r["state"] for r in client.get_model_repository_index(headers=ADMIN)}  # noqa: E731
        assert reaches(lambda: states() == {"UNAVAILABLE"}, 20)


def test_version_policy_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert VersionPolicy.parse("latest:2").select([1, 2, 3]) == [2, 3]
    assert VersionPolicy.parse("specific:4, 1").select([1, 2, 3]) == [1]
    assert VersionPolicy.parse("all").select([3, 1]) == [1, 3]
    assert str(VersionPolicy.parse(" Latest ")) == "latest:1"
    for bad in ("latest:0", "specific:", "specific:a", "newest", "all:2"):
        with pytest.raises(ValueError, match="policy"):
            VersionPolicy.parse(bad)
    with pytest.raises(ValueError, match="latest:N"):
        Settings(version_policy="newest")
    monkeypatch.setenv("OODFLOW_VERSION_POLICY", "specific:3,4")
    monkeypatch.setenv("OODFLOW_POLL_SECONDS", "5")
    assert Settings().version_policy == "specific:3,4" and Settings().poll_seconds == 5.0
    args = add_serve_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["--version-policy", "latest:2", "--poll-seconds", "0.5", "--admin-key", "k"]
    )
    settings = settings_from_args(args)
    assert settings.version_policy == "latest:2" and settings.poll_seconds == 0.5
    assert settings.resolved_admin_api_keys() == [b"k"]
