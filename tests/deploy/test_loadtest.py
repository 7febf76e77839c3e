"""The load test: the Locust mix runs headless against the real service (small real artifacts,
a few seconds, loopback only) and `deploy/loadtest/run.py` writes its Markdown and JSON report."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.artifacts import GREY_MODEL, RGB_MODEL, build_small_artifacts
from tests.deploy.conftest import DEPLOY
from tests.service.helpers import Server, base_settings, running_server

# Never import locust here: it monkey-patches the process with gevent. run.py starts it as a subprocess.
if importlib.util.find_spec("locust") is None:  # a test dependency: missing, fail rather than skip
    raise ImportError("locust not installed (a test dependency: pip install -e '.[test]')")


def _runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("loadtest_run", DEPLOY / "loadtest" / "run.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repository = tmp_path_factory.mktemp("loadtest") / "repository"
    build_small_artifacts(repository)
    with running_server(base_settings(repository)) as server:
        yield server


def test_locust_mix_against_the_real_service(server: Server, tmp_path: Path) -> None:
    run = _runner()
    out = tmp_path / "report"
    status = run.main(
        [
            "--url",
            server.url,
            "--users",
            "2",
            "--spawn-rate",
            "2",
            "--run-time",
            "6s",
            "--max-requests",
            "60",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    report = json.loads((out / "report.json").read_text())
    total = report["stats"]["total"]
    assert 0 < total["requests"] <= 80  # stopped by the request cap (or the time), not before
    assert total["failures"] == 0, report
    assert report["run"]["models"] == [GREY_MODEL, RGB_MODEL]
    assert {"v1 single image", "v1 batch of 32 (array)"} <= set(report["stats"]["requests"])
    for figures in report["stats"]["requests"].values():
        assert figures["p50_ms"] is not None and figures["p50_ms"] <= figures["p99_ms"]
    markdown = (out / "report.md").read_text()
    assert "| **total** |" in markdown and "p99 ms" in markdown
    # The service really scored the traffic: its own metrics count the images.
    metrics = server.client.get("/metrics").text
    assert f'oodflow_verdicts_total{{model="{GREY_MODEL}"' in metrics


def test_stats_parsing(tmp_path: Path) -> None:
    run = _runner()
    header = [
        "Type",
        "Name",
        "Request Count",
        "Failure Count",
        "Median Response Time",
        "Average Response Time",
        "Min Response Time",
        "Max Response Time",
        "Average Content Size",
        "Requests/s",
        "Failures/s",
        "50%",
        "66%",
        "75%",
        "80%",
        "90%",
        "95%",
        "98%",
        "99%",
        "99.9%",
        "99.99%",
        "100%",
    ]
    rows = [
        [
            "POST",
            "v1 batch of 32 (array)",
            10,
            1,
            50,
            55,
            40,
            90,
            100,
            2.0,
            0.2,
            50,
            55,
            60,
            60,
            70,
            80,
            90,
            90,
            90,
            90,
            90,
        ],
        [
            "POST",
            "v1 multi-model, 4 images",
            4,
            0,
            20,
            20,
            10,
            30,
            100,
            1.0,
            0,
            20,
            20,
            20,
            20,
            30,
            30,
            30,
            30,
            30,
            30,
            30,
        ],
        ["", "Aggregated", 14, 1, 40, 45, 10, 90, 100, 3.0, 0.2, 40, 50, 55, 60, 70, 80, 90, 90, 90, 90, 90],
    ]
    path = tmp_path / "locust_stats.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    stats = run.parse_stats(path, models=2)
    batch = stats["requests"]["v1 batch of 32 (array)"]
    assert batch["error_rate"] == pytest.approx(0.1) and batch["images_per_s"] == pytest.approx(64.0)
    assert stats["requests"]["v1 multi-model, 4 images"]["images_per_s"] == pytest.approx(8.0)
    assert stats["total"]["images_per_s"] == pytest.approx(72.0) and stats["total"]["p99_ms"] == 90.0
