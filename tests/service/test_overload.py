"""Timing-dependent behaviour, with a slowed-down real scorer: 429 when the queue is full, 503 while
loading, work dropped when its client disconnects, graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.service.helpers import GREY_MODEL, SlowScorer, b64, base_settings, reaches, running_server

BODY2 = {"array": {"b64": b64(bytes(2 * 784)), "shape": [2, 28, 28]}}
BODY1 = {"array": {"b64": b64(bytes(784)), "shape": [1, 28, 28]}}
URL = f"/v1/models/{GREY_MODEL}/score"
ROOT = Path(__file__).resolve().parents[2]


def test_full_queue_is_429_with_retry_after(repository: Path) -> None:
    settings = base_settings(
        repository,
        models=[GREY_MODEL],
        max_batch_images=2,
        max_wait_ms=0,
        max_queue_images=4,
        max_images_per_request=4,
    )
    with running_server(settings, wrap_scorer=lambda _, s: SlowScorer(s, 0.5, delay_after_calls=4)) as server:
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: server.client.post(URL, json=BODY2), range(8)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
        overloaded = next(r for r in responses if r.status_code == 429)
        assert overloaded.json()["error"]["code"] == "overloaded"
        assert int(overloaded.headers["retry-after"]) >= 1
        assert 'status="429"' in server.client.get("/metrics").text


def test_not_ready_while_loading_is_503(repository: Path) -> None:
    slow_warmup = lambda _, s: SlowScorer(s, 0.0, warmup_delay_s=2.0)  # noqa: E731
    with running_server(base_settings(repository), wrap_scorer=slow_warmup, wait=None) as server:
        assert server.client.get("/healthz").status_code == 200
        ready = server.client.get("/readyz")
        assert ready.status_code == 503 and "loading" in json.dumps(ready.json())
        loading = server.client.post(URL, json=BODY1)
        assert loading.status_code == 503 and loading.json()["error"]["code"] == "model_loading"
        assert "retry-after" in loading.headers
        assert server.client.get("/v2/health/ready").status_code == 503
        assert reaches(lambda: server.client.get("/readyz").status_code == 200, timeout_s=30)
        assert server.client.post(URL, json=BODY1).status_code == 200


def test_work_of_a_disconnected_client_is_dropped(repository: Path) -> None:
    settings = base_settings(repository, models=[GREY_MODEL], max_batch_images=1, max_wait_ms=0)
    scorers: list[SlowScorer] = []

    def wrap(_: str, scorer):  # type: ignore[no-untyped-def]
        scorers.append(SlowScorer(scorer, 0.5, delay_after_calls=2))
        return scorers[-1]

    with running_server(settings, wrap_scorer=wrap) as server:
        calls_before = len(scorers[0].calls)
        batcher = server.state.batchers[GREY_MODEL]
        first = threading.Thread(target=lambda: server.client.post(URL, json=BODY1))
        first.start()
        assert reaches(lambda: batcher.running_batches == 1)  # the first request is running
        body = json.dumps(BODY1).encode()
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert reaches(lambda: batcher.queued_images == 1)  # queued behind the first
        # the client has gone: its image leaves the queue before the first batch is done
        assert reaches(lambda: batcher.queued_images == 0, timeout_s=0.4)
        first.join()
        assert reaches(lambda: batcher.running_batches == 0)
        time.sleep(0.2)
        assert len(scorers[0].calls) - calls_before == 1, "the abandoned request must not run"
        assert server.client.post(URL, json=BODY1).status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVE_SLOWLY = """
import sys
from service.app import create_app, run
from service.settings import Settings
from tests.service.helpers import SlowScorer
settings = Settings(model_repository=sys.argv[1], port=int(sys.argv[2]), models=[sys.argv[3]],
                    max_batch_images=1, max_wait_ms=0, shutdown_timeout_s=20)
run(settings, app=create_app(settings, wrap_scorer=lambda _, s: SlowScorer(s, 1.0, delay_after_calls=2)))
"""


def test_sigterm_finishes_in_flight_requests_then_exits(repository: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_SLOWLY, str(repository), str(port), GREY_MODEL],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        assert reaches(ready, timeout_s=60), "service did not become ready"
        results: list[httpx.Response] = []
        in_flight = threading.Thread(
            target=lambda: results.append(httpx.post(f"{url}{URL}", json=BODY1, timeout=30))
        )
        in_flight.start()

        def running() -> bool:  # the request's batch has been cut: it is in inference now
            metrics = httpx.get(f"{url}/metrics").text
            return (
                f'oodflow_stage_seconds_count{{model="{GREY_MODEL}",stage="queue_wait",version="1"}} 1.0'
                in metrics
            )

        assert reaches(running, timeout_s=20)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        try:
            late = httpx.post(f"{url}{URL}", json=BODY1, timeout=30)
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        except (httpx.ConnectError, httpx.RemoteProtocolError):
            pass  # the listener is already closed: intake stopped either way
        in_flight.join(30)
        assert results and results[0].status_code == 200, "in-flight request must finish"
        # uvicorn re-raises the signal after its graceful shutdown, so the exit status reports SIGTERM
        assert process.wait(30) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = [json.loads(line) for line in process.stderr.read().splitlines() if line.startswith("{")]  # type: ignore[union-attr]
    messages = [line["message"] for line in lines]
    assert any(m.startswith("signal 15: draining") for m in messages)
    assert any(m.startswith("stopped: queued work finished") for m in messages)
    access = [line for line in lines if line["logger"] == "service.access"]
    assert access and all("request_id" in line for line in access)
    assert any(line["status"] == 200 and line["route"] == "/v1/models/{name}/score" for line in access)
