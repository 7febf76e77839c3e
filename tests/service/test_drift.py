"""Drift detection (service/core/drift.py): known answers, size and power of the batch test, the
online detector's run length to a false alarm and its delay; then over real HTTP with the real
tiny models (tests/service/conftest.py)."""

from __future__ import annotations

import math
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from models.artifact import (
    load_manifest,
    write_manifest,
)
from models.scores import calibrate_combination, leave_one_out_p_values
from service.core.drift import (
    BATCH_METHOD,
    DriftMonitor,
    OnlineDriftDetector,
    batch_drift_test,
    beta_binomial_sf,
    beta_quantile,
    cusum_arl,
    design_cusum,
    tail_levels,
    wilson_interval,
)
from service.routes.drift import BatchDriftResponse, DriftStateResponse
from tests.artifacts import fashion_mnist_images, write_test_ensemble
from tests.service.helpers import (
    GREY_MODEL,
    Server,
    b64,
    base_settings,
    copy_artifact,
    encode,
    running_server,
)
from training.data import load_dataset

# ---------------------------------------------------------------------------------------------
# known answers


def test_beta_binomial_sf_known_answers() -> None:
    # BetaBinomial(m, 1, 1) is uniform on 0..m.
    for x in range(0, 12):
        assert beta_binomial_sf(x, 10, 1, 1) == pytest.approx(max(0, 11 - x) / 11, abs=1e-12)
    # Against the direct sum of the pmf, in the tails and the bulk.
    for x, m, a, b in [(4, 64, 50, 4951), (10, 1000, 20, 1981), (3, 7, 2.5, 3.0), (30, 100, 2, 199)]:
        lb = lambda p, q: math.lgamma(p) + math.lgamma(q) - math.lgamma(p + q)  # noqa: E731
        direct = sum(
            math.exp(
                math.lgamma(m + 1)
                - math.lgamma(j + 1)
                - math.lgamma(m - j + 1)
                + lb(j + a, m - j + b)
                - lb(a, b)
            )
            for j in range(x, m + 1)
        )
        assert beta_binomial_sf(x, m, a, b) == pytest.approx(direct, rel=1e-9)


def test_beta_quantile_and_wilson_known_answers() -> None:
    # Beta(1, n): P(X <= x) = 1 - (1 - x)^n.
    for level in (0.1, 0.5, 0.9):
        assert beta_quantile(level, 1, 200) == pytest.approx(1 - (1 - level) ** (1 / 200), rel=1e-9)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1.959963984540054**2 / (10 + 1.959963984540054**2))
    low, high = wilson_interval(50, 100)
    assert (low + high) / 2 == pytest.approx(0.5) and high - low == pytest.approx(0.1924, abs=1e-3)
    assert tail_levels(200, 0.01) == (2, 2 / 201)
    assert tail_levels(None, 0.01) == (None, 0.01)


def test_cusum_arl_known_answers() -> None:
    # Threshold at one exceedance: the run length is geometric, mean 1/q.
    assert cusum_arl(5, 5, 0.02) == pytest.approx(50.0)
    # Weight 1, threshold 2: from 0 an exceedance goes to 1; from 1 another alarms, a miss returns
    # to 0. a0 = 1 + q a1 + (1-q) a0, a1 = 1 + (1-q) a0  ->  a0 = (1 + q) / q^2.
    assert cusum_arl(1, 2, 0.1) == pytest.approx(1.1 / 0.01)


def test_design_meets_the_requested_run_length() -> None:
    for n in (None, 200, 5000):
        design = design_cusum(10_000, reference_size=n)
        assert design.run_length_at_design >= 10_000
        # The smallest such threshold: one unit less falls short.
        assert 0.5 * cusum_arl(design.weight, design.threshold - 1, design.design_rate) < 10_000
        assert design.run_length_at_alpha >= design.run_length_at_design
    assert design_cusum(10_000, reference_size=5000).design_rate > 50 / 5001  # the assurance quantile


# ---------------------------------------------------------------------------------------------
# batch test: size and power on synthetic scores


def _rejections(
    rng: np.random.Generator, n: int, m: int, reps: int, shift=None, level: float = 0.05
) -> float:
    hits = 0
    for _ in range(reps):
        reference = np.sort(rng.standard_normal(n))
        batch = rng.standard_normal(m)
        if shift is not None:
            batch = shift(rng, batch)
        hits += batch_drift_test(batch, reference).p_value <= level
    return hits / reps


@pytest.mark.parametrize(("n", "m"), [(200, 2), (200, 50), (2000, 10), (2000, 200), (500, 500)])
def test_batch_test_size(n: int, m: int) -> None:
    """In-distribution batches (fresh reference each time): rejected at most 5 % of the time."""
    reps = 1500
    rate = _rejections(np.random.default_rng(n * 1000 + m), n, m, reps)
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / reps), rate


def test_batch_test_power() -> None:
    rng = np.random.default_rng(3)

    def far_upper(r: np.random.Generator, b: np.ndarray) -> np.ndarray:  # 5 % far-OOD, high scores
        b[:5] = 10.0 + r.random(5)
        return b

    def far_lower(r: np.random.Generator, b: np.ndarray) -> np.ndarray:  # 5 % "too likely" images
        b[:5] = -10.0 - r.random(5)
        return b

    assert _rejections(rng, 2000, 100, 200, far_upper) >= 0.9
    assert _rejections(rng, 2000, 100, 200, far_lower) >= 0.9
    # A slight shift of the whole batch (0.4 standard deviations), either way.
    assert _rejections(rng, 2000, 100, 200, lambda r, b: b + 0.4) >= 0.9
    assert _rejections(rng, 2000, 100, 200, lambda r, b: b - 0.4) >= 0.9


def test_batch_test_answer() -> None:
    rng = np.random.default_rng(0)
    reference = np.sort(rng.standard_normal(1000))
    batch = np.concatenate([rng.standard_normal(95), np.full(5, 9.0)])
    flags = batch > np.quantile(reference, 0.95)
    result = batch_drift_test(batch, reference, is_ood=flags)
    assert result.method == BATCH_METHOD and result.images == 100 and result.reference_size == 1000
    names = [c.name for c in result.components]
    assert names == ["upper_tail", "lower_tail", "rank_sum"]
    assert result.p_value == pytest.approx(min(1.0, 3 * result.statistic))
    assert result.components[0].statistic >= 5 and result.p_value < 1e-3
    assert result.ood_images == int(flags.sum())
    low, high = result.ood_rate_interval
    assert low < result.ood_rate < high
    body = result.to_dict()
    assert body["components"][0]["name"] == "upper_tail" and body["confidence"] == 0.95


def test_batch_test_refuses_bad_input() -> None:
    reference = np.arange(10.0)
    with pytest.raises(ValueError, match="at least 2 images"):
        batch_drift_test(np.array([1.0]), reference)
    with pytest.raises(ValueError, match="finite"):
        batch_drift_test(np.array([1.0, np.nan]), reference)
    with pytest.raises(ValueError, match="ascending"):
        batch_drift_test(np.array([1.0, 2.0]), reference[::-1])
    with pytest.raises(ValueError, match="is_ood"):
        batch_drift_test(np.array([1.0, 2.0]), reference, is_ood=np.array([True]))


# ---------------------------------------------------------------------------------------------
# online detector on synthetic p-values


def _served_p(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """In-distribution p-values as served against a reference of n: uniform on {1..n+1}/(n+1)."""
    return (1.0 + rng.integers(0, n + 1, size=shape)) / (n + 1)


def test_online_false_alarm_run_length() -> None:
    """Mean run length on in-distribution streams: at least the configured value, within error."""
    n, configured, streams = 1000, 2000, 300
    detector = OnlineDriftDetector(configured, reference_size=n, assurance=0.5)
    rng = np.random.default_rng(5)
    lengths = detector.run_lengths(_served_p(rng, n, (streams, 2000)) for _ in range(40))
    assert np.all(lengths > 0)
    mean, se = lengths.mean(), lengths.std() / math.sqrt(streams)
    exact = detector.design.run_length_at_alpha
    assert abs(mean - exact) < 4 * se, (mean, se, exact)
    assert mean >= configured - 3 * se


def test_online_detection_delay() -> None:
    n = 1000
    detector = OnlineDriftDetector(10_000, reference_size=n)
    d = detector.design
    # All far-OOD (smallest p-value): alarm after exactly ceil(h / r) images.
    far = np.full((1, 100), 1.0 / (n + 1))
    assert detector.run_lengths([far])[0] == math.ceil(d.threshold / d.weight)
    # 20 % and 5 % contamination: every stream alarms, the lighter one later.
    rng = np.random.default_rng(9)
    delays = {}
    for fraction in (0.2, 0.05):
        p = _served_p(rng, n, (200, 4000))
        p[rng.random(p.shape) < fraction] = 1.0 / (n + 1)
        lengths = detector.run_lengths([p])
        assert np.all(lengths > 0), fraction
        delays[fraction] = float(np.mean(lengths))
    assert delays[0.2] < delays[0.05] < 4000
    # "Too likely" images (p-value 1) alarm on the lower tail.
    detector.update(np.ones(200))
    state = detector.state()
    assert state["alarm"] and state["alarm_tail"] == "lower_tail"


def test_update_matches_the_vectorised_simulation() -> None:
    rng = np.random.default_rng(2)
    n = 500
    p = _served_p(rng, n, (1, 6000))
    p[0, 3000:][rng.random(3000) < 0.1] = 1.0 / (n + 1)
    detector = OnlineDriftDetector(5_000, reference_size=n)
    expected = int(detector.run_lengths([p])[0])
    assert expected > 0
    for chunk in np.array_split(p[0], 37):  # in uneven request-sized pieces
        detector.update(chunk)
    state = detector.state()
    assert state["alarm"] and state["alarm_at_image"] == expected and state["images"] == 6000


def test_online_state_window_reset_and_threads() -> None:
    n = 999
    detector = OnlineDriftDetector(10_000, reference_size=n, window=100)
    flags = np.zeros(250, dtype=bool)
    flags[-10:] = True
    detector.update(np.full(250, 0.5), is_ood=flags)
    state = detector.state()
    assert state["window_images"] == 100 and state["window_ood_rate"] == pytest.approx(0.1)
    assert not state["alarm"] and state["statistic"] == 0.0 and state["threshold"] > 0
    detector.reset()
    assert detector.state()["images"] == 0 and detector.state()["window_ood_rate"] is None

    def feed() -> None:
        for _ in range(50):
            detector.update(np.full(7, 0.5), is_ood=np.ones(7, dtype=bool))

    threads = [threading.Thread(target=feed) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = detector.state()
    assert state["images"] == 8 * 50 * 7 and state["window_ood_rate"] == 1.0
    with pytest.raises(ValueError, match="is_ood"):
        detector.update(np.full(3, 0.5), is_ood=np.ones(2, dtype=bool))


def test_monitor_binds_detectors_to_the_loaded_object() -> None:
    """A reload (a new loaded object for the same name) starts a fresh detector."""

    class Loaded:  # stands for a LoadedModel: only its identity matters here
        pass

    monitor = DriftMonitor(5_000, window=50)
    first = Loaded()
    monitor.observe("model", "m", first, 999, np.full(40, 0.001))
    assert monitor.get("model", "m") is monitor.watch("model", "m", first, 999)
    assert monitor.watch("model", "m", first, 999).state()["images"] == 40
    second = Loaded()
    fresh = monitor.watch("model", "m", second, 999)
    assert fresh.state()["images"] == 0 and fresh.state()["statistic"] == 0.0
    assert monitor.reset("model", "m") and not monitor.reset("ensemble", "m")
    monitor.observe("ensemble", "e", second, None, np.full(5, 0.5))
    assert [(k, n) for k, n, _ in monitor.items()] == [("ensemble", "e"), ("model", "m")]
    monitor.forget("model", "m")
    assert monitor.get("model", "m") is None
    third = Loaded()
    monitor.watch("model", "gone", third, 999)
    assert ("model", "gone") in [(k, n) for k, n, _ in monitor.items()]
    del third  # unloaded and released: its series leave the exposition
    assert ("model", "gone") not in [(k, n) for k, n, _ in monitor.items()]


# ---------------------------------------------------------------------------------------------
# over real HTTP, with the real tiny models

USER_KEY, ADMIN_KEY = "user-key-drift", "admin-key-drift"
ENSEMBLE = "grey-pair"
TWIN = "fmnist-tiny-twin"


@pytest.fixture(scope="module")
def drift_repository(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fmnist-tiny, a copy of it under another name, and a valid ensemble over the two."""
    repository = tmp_path_factory.mktemp("drift") / "repository"
    shutil.copytree(artifacts[GREY_MODEL], repository / GREY_MODEL / artifacts[GREY_MODEL].name)
    copy_artifact(artifacts[GREY_MODEL], repository, TWIN)
    manifests = [load_manifest(repository / n / "1") for n in (GREY_MODEL, TWIN)]
    reference = np.asarray(manifests[0].calibration.reference_scores)
    p = leave_one_out_p_values(reference)
    threshold, combined = calibrate_combination(np.stack([p, p]), "fisher", 0.05)
    write_test_ensemble(repository, ENSEMBLE, manifests, combined, threshold)
    return repository


@pytest.fixture(scope="module")
def drift_server(drift_repository: Path) -> Iterator[Server]:
    settings = base_settings(drift_repository, api_keys=[USER_KEY], admin_api_keys=[ADMIN_KEY])
    with running_server(settings) as server:
        server.client.headers["X-API-Key"] = USER_KEY
        yield server


def _array_body(images: np.ndarray) -> dict[str, Any]:
    """`(N, 28, 28)` uint8 -> the raw-array JSON body."""
    return {"array": {"b64": b64(np.ascontiguousarray(images).tobytes()), "shape": list(images.shape)}}


def _in_distribution(count: int, seed: int) -> np.ndarray:
    return fashion_mnist_images(count, seed=seed, split="test")[:, 0]


def _noise(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)


def test_http_batch_drift_test(drift_server: Server) -> None:
    client = drift_server.client
    inside = client.post(f"/v1/models/{GREY_MODEL}/drift", json=_array_body(_in_distribution(64, 21)))
    assert inside.status_code == 200, inside.text
    body = inside.json()
    BatchDriftResponse.model_validate(body)  # the documented response schema
    assert body["model"] == GREY_MODEL and body["images"] == 64 and body["reference_size"] == 200
    assert body["method"] == BATCH_METHOD and body["p_value"] > 0.05
    assert [c["name"] for c in body["components"]] == ["upper_tail", "lower_tail", "rank_sum"]
    low, high = body["ood_rate_interval"]
    assert low <= body["ood_rate"] <= high
    shifted = client.post(f"/v1/models/{GREY_MODEL}/drift", json=_array_body(_noise(64, 1))).json()
    assert shifted["p_value"] < 1e-6 and shifted["ood_rate"] > 0.9
    # MNIST digits: a Fashion-MNIST pixel flow finds them *more* likely (the paper's failure case);
    # the drift test still sees the shift.
    digits = load_dataset("mnist", limit=64, seed=3).images[:, 0]
    assert client.post(f"/v1/models/{GREY_MODEL}/drift", json=_array_body(digits)).json()["p_value"] < 1e-6
    # Multipart files work as for scoring, and so does the ensemble.
    files = [("images", (f"{i}.png", encode(im), "image/png")) for i, im in enumerate(_noise(8, 2))]
    assert client.post(f"/v1/models/{GREY_MODEL}/drift", files=files).json()["images"] == 8
    ens = client.post(f"/v1/ensembles/{ENSEMBLE}/drift", json=_array_body(_noise(32, 4)))
    assert ens.status_code == 200, ens.text
    assert ens.json()["ensemble"] == ENSEMBLE and ens.json()["p_value"] < 1e-6
    ens_in = client.post(f"/v1/ensembles/{ENSEMBLE}/drift", json=_array_body(_in_distribution(64, 22)))
    assert ens_in.json()["p_value"] > 0.05


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (lambda: _array_body(_noise(1, 0)), 422, "batch_too_small"),
        (lambda: {"images": []}, 400, None),
        (lambda: {"array": {"b64": "", "shape": [0, 28, 28]}}, 400, None),
        (lambda: {"images": [{"b64": "not base64!"}, {"b64": "x"}]}, 400, None),
        (lambda: _array_body(np.zeros((2, 5, 5), dtype=np.uint8)), 422, None),
        (lambda: {"something": 1}, 422, None),
    ],
)
def test_http_drift_bad_input(drift_server: Server, body: Any, status: int, code: str | None) -> None:
    response = drift_server.client.post(f"/v1/models/{GREY_MODEL}/drift", json=body())
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code


def test_http_drift_unknown_names(drift_server: Server) -> None:
    client = drift_server.client
    assert client.post("/v1/models/nope/drift", json=_array_body(_noise(4, 0))).status_code == 404
    assert client.get("/v1/ensembles/nope/drift").status_code == 404
    assert client.post("/v1/ensembles/nope/drift", json=_array_body(_noise(4, 0))).status_code == 404


def test_http_online_detector_stream_metrics_and_reset(drift_server: Server) -> None:
    client = drift_server.client
    admin = {"X-API-Key": ADMIN_KEY}
    for name, path in ((GREY_MODEL, "models"), (ENSEMBLE, "ensembles")):
        assert client.post(f"/v1/{path}/{name}/drift/reset", headers=admin).status_code == 200
    # An in-distribution stream raises no alarm...
    stream = _in_distribution(640, 23)
    for start in range(0, len(stream), 64):
        chunk = _array_body(stream[start : start + 64])
        assert client.post(f"/v1/models/{GREY_MODEL}/score", json=chunk).status_code == 200
        assert (
            client.post("/v1/score", params={"models": f"{GREY_MODEL},{TWIN}"}, json=chunk).status_code == 200
        )
    state = client.get(f"/v1/models/{GREY_MODEL}/drift").json()
    DriftStateResponse.model_validate(state)
    assert state["images"] == 2 * 640 and not state["alarm"], state
    ens_state = client.get(f"/v1/ensembles/{ENSEMBLE}/drift").json()
    assert ens_state["images"] == 640 and not ens_state["alarm"], ens_state
    # ... a shifted one does, within the delay the benchmark reports for 100 % noise (h / r images).
    design = design_cusum(drift_server.state.settings.drift_run_length, reference_size=200)
    needed = math.ceil(design.threshold / design.weight)
    noise = _array_body(_noise(needed, 5))
    client.post("/v1/score", params={"models": f"{GREY_MODEL},{TWIN}"}, json=noise)
    state = client.get(f"/v1/models/{GREY_MODEL}/drift").json()
    assert state["alarm"] and state["alarm_tail"] == "upper_tail"
    assert 2 * 640 < state["alarm_at_image"] <= 2 * 640 + needed
    assert client.get(f"/v1/ensembles/{ENSEMBLE}/drift").json()["alarm"]
    # The drift endpoint's own batches are an analysis, not traffic.
    client.post(f"/v1/models/{GREY_MODEL}/drift", json=noise)
    assert client.get(f"/v1/models/{GREY_MODEL}/drift").json()["images"] == state["images"]
    # The exposition carries the drift series.
    metrics = client.get("/metrics").text
    for line in (
        f'oodflow_drift_alarm{{kind="model",model="{GREY_MODEL}"}} 1.0',
        f'oodflow_drift_alarm{{kind="ensemble",model="{ENSEMBLE}"}} 1.0',
        f'oodflow_drift_statistic{{kind="model",model="{GREY_MODEL}",tail="upper_tail"}}',
        f'oodflow_drift_window_ood_rate{{kind="model",model="{GREY_MODEL}"}}',
        "oodflow_drift_threshold{",
        "oodflow_drift_images{",
    ):
        assert line in metrics, line
    # Reset needs the admin key: a scoring key is refused, no key is refused.
    assert client.post(f"/v1/models/{GREY_MODEL}/drift/reset").status_code == 403
    anonymous = httpx.post(f"{drift_server.url}/v1/models/{GREY_MODEL}/drift/reset")
    assert anonymous.status_code == 401
    reset = client.post(f"/v1/models/{GREY_MODEL}/drift/reset", headers=admin)
    assert reset.status_code == 200 and reset.json()["images"] == 0 and not reset.json()["alarm"]
    assert f'oodflow_drift_alarm{{kind="model",model="{GREY_MODEL}"}} 0.0' in client.get("/metrics").text


def test_http_reload_resets_the_detector(drift_server: Server) -> None:
    client = drift_server.client
    client.post(f"/v1/models/{TWIN}/score", json=_array_body(_noise(8, 6)))
    assert client.get(f"/v1/models/{TWIN}/drift").json()["images"] >= 8
    state = drift_server.state
    entry = state.registry.models[TWIN]
    state.registry.load(entry)  # a reload: a new LoadedModel for the same name
    assert client.get(f"/v1/models/{TWIN}/drift").json()["images"] == 0


def test_score_batch_prints_the_endpoints_test(
    drift_server: Server, drift_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`oodflow score-batch` tests the whole input exactly as the HTTP endpoints test a batch."""
    from service.batch.cli import main

    images = np.concatenate([_in_distribution(40, 30), _noise(6, 7)])
    np.savez(tmp_path / "input.npz", images=images)
    args = [str(tmp_path / "input.npz"), "--model", GREY_MODEL, "--model", TWIN]
    args += ["--repository", str(drift_repository), "--output", str(tmp_path / "out.csv"), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    client = drift_server.client
    model = client.post(f"/v1/models/{GREY_MODEL}/drift", json=_array_body(images)).json()
    ensemble = client.post(f"/v1/ensembles/{ENSEMBLE}/drift", json=_array_body(images)).json()
    assert model["p_value"] < 0.01 and ensemble["p_value"] < 0.01
    assert f"drift {GREY_MODEL}: p-value {model['p_value']:.3g} " in out, out
    assert f"drift combined:{ENSEMBLE}: p-value {ensemble['p_value']:.3g} " in out, out
    assert f"OOD rate {model['ood_rate']:.1%}" in out


def test_v2_infer_feeds_the_detector(drift_server: Server) -> None:
    client = drift_server.client
    before = client.get(f"/v1/models/{TWIN}/drift").json()["images"]
    images = _in_distribution(5, 31)
    body = {
        "inputs": [
            {"name": "images", "datatype": "UINT8", "shape": [5, 28, 28], "data": images.ravel().tolist()}
        ]
    }
    assert client.post(f"/v2/models/{TWIN}/infer", json=body).status_code == 200
    assert client.get(f"/v1/models/{TWIN}/drift").json()["images"] == before + 5


def test_repository_load_of_a_new_version_resets_the_detector(
    drift_server: Server, drift_repository: Path
) -> None:
    """Runs last in this module: the ensemble goes stale once its member serves version 2."""
    client = drift_server.client
    client.post(f"/v1/models/{TWIN}/score", json=_array_body(_noise(12, 8)))
    assert client.get(f"/v1/models/{TWIN}/drift").json()["images"] >= 12
    target = drift_repository / TWIN / "2"
    shutil.copytree(drift_repository / TWIN / "1", target)
    write_manifest(target, load_manifest(target).model_copy(update={"version": 2}))
    loaded = client.post(f"/v2/repository/models/{TWIN}/load", headers={"X-API-Key": ADMIN_KEY})
    assert loaded.status_code == 200, loaded.text
    state = client.get(f"/v1/models/{TWIN}/drift").json()
    assert state["version"] == 2 and state["images"] == 0 and not state["alarm"]
