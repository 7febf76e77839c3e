"""Version swap benchmark: time from `load` to serving, and the throughput dip during the swap.

Starts the real service (`python -m service`, uvicorn) in a subprocess on a scratch repository
holding version 1 of a real model (copied from `--repository`), with an admin key. Closed-loop
aiohttp clients (`--concurrency` workers, each sending its next single-image raw-array request as
soon as the last is answered) score continuously. Every `--settle` seconds a new version folder is
staged and renamed into place (the artifact re-sealed as version k+1: same graph, fresh manifest),
then `POST /v2/repository/models/{name}/load` (or, with `--poll-seconds`, the poller) swaps it in;
`--swaps` times. Per swap:

- **load -> serving**: from sending `load` to its answer (the new version verified, loaded, warmed
  and default), and to the first response scored by the new version; with polling, from the rename.
- **throughput**: requests answered per second over the `--settle` seconds before the swap
  (baseline), over the swap window (load sent -> old version unloaded), and in the worst 100 ms
  bucket of that window, each relative to the baseline.
- failed requests (any non-200 or connection error) and versions going back on any client.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_swap.py               # ./model-repository
    .venv/bin/python benchmarks/bench_swap.py --model fmnist-embedding --swaps 5
    .venv/bin/python benchmarks/bench_swap.py --poll-seconds 1

The clients share the machine with the server: on a small CPU the load's own hashing, session
build and warm-up compete with scoring, which is what the dip measures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.artifact import latest_version, load_manifest, write_manifest  # noqa: E402

ADMIN_KEY = "bench-admin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stage_version(source: Path, repository: Path, name: str, version: int) -> Path:
    """Copy `source` in as `name/version`: staged, sealed, then renamed into place (atomic)."""
    staging = repository / name / f".staging-{version}"
    shutil.copytree(source, staging)
    write_manifest(staging, load_manifest(staging).model_copy(update={"version": version}))
    target = repository / name / str(version)
    staging.rename(target)
    return target


@dataclass
class Traffic:
    """Every answered request: (received at, status, version)."""

    log: list[tuple[float, int, int | None]] = field(default_factory=list)
    backwards: int = 0


async def _client(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], traffic: Traffic, stop: asyncio.Event
) -> None:
    last = 0
    while not stop.is_set():
        try:
            async with session.post(url, json=body) as response:
                status = response.status
                version = (await response.json()).get("version") if status == 200 else None
        except aiohttp.ClientError:
            status, version = -1, None
        if version is not None:
            if version < last:
                traffic.backwards += 1
            last = max(last, version)
        traffic.log.append((time.perf_counter(), status, version))


def _rate(log: list[tuple[float, int, int | None]], start: float, stop: float) -> float:
    n = sum(1 for t, _, _ in log if start <= t < stop)
    return n / max(stop - start, 1e-9)


def _longest_gap(log: list[tuple[float, int, int | None]], start: float, stop: float) -> float:
    """The longest time in [start, stop) with no response at all (seconds)."""
    times = sorted([start, *(t for t, _, _ in log if start <= t < stop), stop])
    return float(np.max(np.diff(times)))


def _worst_bucket(
    log: list[tuple[float, int, int | None]], start: float, stop: float, width: float = 0.1
) -> float:
    times = np.array([t for t, _, _ in log if start <= t < stop])
    edges = np.arange(start, max(stop, start + width) + width, width)
    counts, _ = np.histogram(times, bins=edges)
    return float(counts.min()) / width if len(counts) else 0.0


async def _wait_unloaded(session: aiohttp.ClientSession, base: str, name: str, version: int) -> float:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    while True:
        async with session.get(f"{base}/v2/repository/index", headers=headers) as response:
            rows = await response.json()
        state = {r["version"]: r["state"] for r in rows if r["name"] == name}.get(str(version))
        if state != "UNLOADING" and state != "READY":
            return time.perf_counter()
        await asyncio.sleep(0.01)


async def _run(
    args: argparse.Namespace, base: str, source: Path, scratch: Path, body: dict[str, Any]
) -> list[dict[str, Any]]:
    traffic = Traffic()
    stop = asyncio.Event()
    url = f"{base}/v1/models/{args.model}/score"
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    rows: list[dict[str, Any]] = []
    connector = aiohttp.TCPConnector(limit=args.concurrency + 4)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:
        workers = [
            asyncio.create_task(_client(session, url, body, traffic, stop)) for _ in range(args.concurrency)
        ]
        await asyncio.sleep(args.settle)
        for k in range(args.swaps):
            old, new = k + 1, k + 2
            before = time.perf_counter()
            await asyncio.to_thread(stage_version, source, scratch, args.model, new)
            started = time.perf_counter()
            answered = started
            if args.poll_seconds <= 0:
                async with session.post(
                    f"{base}/v2/repository/models/{args.model}/load", headers=headers
                ) as r:
                    assert r.status == 200, await r.text()
                answered = time.perf_counter()
            while not any(v == new and t > started for t, _, v in traffic.log[-args.concurrency * 4 :]):
                await asyncio.sleep(0.002)
            first_new = min(t for t, _, v in traffic.log if v == new)
            unloaded = await _wait_unloaded(session, base, args.model, old)
            baseline = _rate(traffic.log, before - args.settle, before)
            window_rate = _rate(traffic.log, started, unloaded)
            rows.append(
                {
                    "swap": f"v{old} -> v{new}",
                    "load_answer_s": answered - started if args.poll_seconds <= 0 else None,
                    "first_new_response_s": first_new - started,
                    "window_s": unloaded - started,
                    "baseline_rps": baseline,
                    "window_rps": window_rate,
                    "window_rel": window_rate / baseline if baseline else float("nan"),
                    "longest_gap_s": _longest_gap(traffic.log, started, unloaded),
                    "baseline_longest_gap_s": _longest_gap(traffic.log, before - args.settle, before),
                    "worst_100ms_rel": _worst_bucket(traffic.log, started, unloaded) / baseline
                    if baseline
                    else 0.0,
                    "baseline_worst_100ms_rel": _worst_bucket(traffic.log, before - args.settle, before)
                    / baseline
                    if baseline
                    else 0.0,
                }
            )
            await asyncio.sleep(args.settle)
        stop.set()
        await asyncio.gather(*workers)
    failed = sum(1 for _, s, _ in traffic.log if s != 200)
    for row in rows:
        row["failed_total"] = failed
        row["backwards_total"] = traffic.backwards
        row["requests_total"] = len(traffic.log)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=ROOT / "model-repository")
    parser.add_argument("--model", default="fmnist-pixel")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of plain traffic before each swap")
    parser.add_argument("--poll-seconds", type=float, default=0.0, help="swap by polling instead of the API")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()

    version = latest_version(args.repository, args.model)
    if version is None:
        parser.error(f"no versions of '{args.model}' under {args.repository}")
    source = args.repository / args.model / str(version)
    manifest = load_manifest(source)
    shape = manifest.input.shape
    image = (np.arange(int(np.prod(shape)), dtype=np.int64) * 37 % 256).astype(np.uint8)
    hwc = image.reshape(shape).transpose(1, 2, 0)
    body = {"array": {"b64": base64.b64encode(hwc.tobytes()).decode(), "shape": [1, *hwc.shape]}}

    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        scratch = Path(tmp) / "repository"
        stage_version(source, scratch, args.model, 1)
        port = _free_port()
        env = {**os.environ, "OODFLOW_LOG_LEVEL": "warning", "OODFLOW_POLL_SECONDS": str(args.poll_seconds)}
        command = [
            sys.executable, "-m", "service", "--repository", str(scratch), "--port", str(port),
            "--device", args.device, "--admin-key", ADMIN_KEY,
        ]  # fmt: skip
        server = subprocess.Popen(command, cwd=ROOT, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            import urllib.request

            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the service did not become ready")
                time.sleep(0.2)
            rows = asyncio.run(_run(args, base, source, scratch, body))
        finally:
            server.terminate()
            server.wait(30)

    mode = f"polling every {args.poll_seconds:g} s" if args.poll_seconds > 0 else "POST .../load"
    print(
        f"\n{args.model} v1 -> v{args.swaps + 1} by {mode}, {args.concurrency} closed-loop clients, {os.cpu_count()} CPUs\n"
    )
    print(
        "| swap | load answered | first new-version response | swap window | baseline req/s "
        "| window req/s (rel.) | worst 100 ms: swap (before) | longest silence: swap (before) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        answered = "-" if r["load_answer_s"] is None else f"{r['load_answer_s'] * 1000:.0f} ms"
        print(
            f"| {r['swap']} | {answered} | {r['first_new_response_s'] * 1000:.0f} ms | {r['window_s'] * 1000:.0f} ms "
            f"| {r['baseline_rps']:.0f} | {r['window_rps']:.0f} ({r['window_rel']:.0%}) | {r['worst_100ms_rel']:.0%} ({r['baseline_worst_100ms_rel']:.0%}) "
            f"| {r['longest_gap_s'] * 1000:.0f} ms ({r['baseline_longest_gap_s'] * 1000:.0f} ms) |"
        )
    last = rows[-1]
    print(
        f"\n{last['requests_total']} requests, {last['failed_total']} failed, "
        f"{last['backwards_total']} answered by an older version after a newer one on the same client"
    )
    if len(rows) > 1:
        first = [r["first_new_response_s"] for r in rows]
        print(f"median load -> first new-version response: {statistics.median(first) * 1000:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
