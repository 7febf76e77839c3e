"""`make loadtest`: start the service, run the Locust mix headless, write a Markdown + JSON report.

    python deploy/loadtest/run.py --repository ./model-repository --users 16 --run-time 60s \
        --max-requests 20000 --out out/loadtest

Starts `oodflow serve` on a free loopback port (or uses `--url` of a running service), waits for
`/readyz`, runs `locust -f deploy/loadtest/locustfile.py --headless` for the fixed time (stopping
early at `--max-requests`), stops the service with SIGTERM, and writes `report.json` and
`report.md` under `--out`: per request type and in total, requests, failures, error rate,
throughput (requests/s and images/s) and p50/p95/p99 latency. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["main", "parse_stats", "render_markdown"]

HERE = Path(__file__).resolve().parent
IMAGES_PER_REQUEST = {
    "v1 single image": 1,
    "v1 batch of 32 (array)": 32,
    "v1 multi-model, 4 images": 4,
    "v2 infer, 8 images": 8,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, timeout_s: float, process: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the service exited with status {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}/readyz not ready after {timeout_s:.0f} s")


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def parse_stats(stats_csv: Path, models: int = 1) -> dict[str, Any]:
    """Locust's `<prefix>_stats.csv` -> {"requests": {name: figures}, "total": figures}."""
    out: dict[str, Any] = {"requests": {}, "total": None}
    with open(stats_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            count = int(row["Request Count"])
            failures = int(row["Failure Count"])
            rps = _number(row["Requests/s"]) or 0.0
            figures = {
                "requests": count,
                "failures": failures,
                "error_rate": failures / count if count else 0.0,
                "requests_per_s": rps,
                "p50_ms": _number(row["50%"]),
                "p95_ms": _number(row["95%"]),
                "p99_ms": _number(row["99%"]),
                "mean_ms": _number(row["Average Response Time"]),
                "max_ms": _number(row["Max Response Time"]),
            }
            if row["Name"] == "Aggregated":
                out["total"] = figures
            else:
                per_request = IMAGES_PER_REQUEST.get(row["Name"], 1)
                scored = per_request * (models if "multi-model" in row["Name"] else 1)
                figures["images_per_s"] = rps * scored
                out["requests"][row["Name"]] = figures
    if out["total"] is not None:
        out["total"]["images_per_s"] = sum(f["images_per_s"] for f in out["requests"].values())
    return out


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def render_markdown(report: dict[str, Any]) -> str:
    run = report["run"]
    lines = [
        "# oodflow load test",
        "",
        f"{run['finished_at']} · {run['host']} ({run['cpus']} CPUs) · models: {', '.join(run['models']) or 'all'} · "
        f"{run['users']} users, {run['run_time']} (max {run['max_requests'] or '∞'} requests) · "
        f"service: {run['service']}",
        "",
        "| request | requests | error rate | req/s | images/s | p50 ms | p95 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [*report["stats"]["requests"].items(), ("**total**", report["stats"]["total"])]
    for name, f in rows:
        if f is None:
            continue
        lines.append(
            f"| {name} | {f['requests']} | {f['error_rate']:.2%} | {f['requests_per_s']:.1f} | "
            f"{f.get('images_per_s', 0.0):.0f} | {_ms(f['p50_ms'])} | {_ms(f['p95_ms'])} | {_ms(f['p99_ms'])} |"
        )
    lines += ["", "Latency is Locust's, measured client-side on the same machine (it shares the CPU)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repository", default=os.environ.get("OODFLOW_MODEL_REPOSITORY", "model-repository")
    )
    parser.add_argument("--url", help="load-test this running service instead of starting one")
    parser.add_argument("--models", default="", help="comma list (default: every ready model)")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--spawn-rate", type=float, default=8.0)
    parser.add_argument("--run-time", default="60s")
    parser.add_argument(
        "--max-requests", type=int, default=20000, help="stop early after this many (0: no cap)"
    )
    parser.add_argument("--out", type=Path, default=Path("out/loadtest"))
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    service: subprocess.Popen[bytes] | None = None
    url = args.url
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(args.out / "service.log", "wb")  # noqa: SIM115 - closed after the service stops
        env = {**os.environ, "OODFLOW_LOG_LEVEL": "warning"}
        command = [sys.executable, "-m", "oodflow", "serve", "--repository", str(args.repository)]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        service = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_ready(url, args.ready_timeout, service)
        models = [m for m in args.models.split(",") if m]
        if not models:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as response:
                listing = json.load(response)["models"]
            models = sorted(m["name"] for m in listing if m["status"] == "ready")
        prefix = args.out / "locust"
        env = {
            **os.environ,
            "OODFLOW_LOADTEST_MODELS": ",".join(models),
            "OODFLOW_LOADTEST_MAX_REQUESTS": str(args.max_requests),
        }
        locust = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(HERE / "locustfile.py"),
            "--host",
            url,
            "--headless",
        ]
        locust += ["-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time, "--only-summary"]
        locust += ["--csv", str(prefix), "--loglevel", "WARNING", "--exit-code-on-error", "0"]
        started = time.monotonic()
        subprocess.run(locust, env=env, check=True, timeout=_seconds(args.run_time) + 120)
        elapsed = time.monotonic() - started
    finally:
        if service is not None:
            service.send_signal(signal.SIGTERM)
            try:
                service.wait(60)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait()

    stats = parse_stats(Path(f"{prefix}_stats.csv"), models=len(models))
    report = {
        "run": {
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "service": url if args.url else f"oodflow serve --repository {args.repository}",
            "models": models,
            "users": args.users,
            "run_time": args.run_time,
            "max_requests": args.max_requests,
            "elapsed_s": round(elapsed, 1),
        },
        "stats": stats,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (args.out / "report.md").write_text(markdown)
    print(markdown)
    print(f"reports: {args.out / 'report.md'}, {args.out / 'report.json'}")
    total = stats["total"]
    return 0 if total and total["requests"] else 1


def _seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    total, number = 0.0, ""
    for ch in text:
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in units and number:
            total, number = total + float(number) * units[ch], ""
    return total + (float(number) if number else 0.0)


if __name__ == "__main__":
    raise SystemExit(main())
