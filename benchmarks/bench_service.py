"""Load benchmark of the scoring service against in-process ONNX Runtime on the same graph.

Starts the real service (`python -m service`, uvicorn) on a model repository in a subprocess, then
drives it with a closed-loop aiohttp client (each of `concurrency` workers sends its next request as
soon as the last is answered) for single-image and 32-image raw-array requests at concurrency 1, 8
and 64. Beside it: the same ONNX graph run in this process at the same batch sizes (throughput), and
its single-image latency. Prints a Markdown table.

    .venv/bin/python benchmarks/bench_service.py                       # default models
    .venv/bin/python benchmarks/bench_service.py --repository /tmp/repo --model fmnist-tiny

The client shares the machine with the server: on a small CPU its own cost is part of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.artifact import latest_version, load_manifest  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentiles(latencies_s: list[float]) -> tuple[float, float, float]:
    ms = np.asarray(latencies_s) * 1000.0
    return tuple(float(np.percentile(ms, q)) for q in (50, 95, 99))  # type: ignore[return-value]


# ---------------------------------------------------------------- in-process baseline


def in_process(
    model_path: Path, images: np.ndarray, batch: int, seconds: float, threads: int, spinning: bool
) -> dict[str, float]:
    """ONNX Runtime in this process, one batch after another, with the service's session options."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(images[:batch])
    for _ in range(5):
        session.run(None, {"images": x})
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        session.run(None, {"images": x})
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    p50, p95, p99 = _percentiles(latencies)
    return {"images_per_s": len(latencies) * batch / elapsed, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99}


# ---------------------------------------------------------------- service


def start_service(
    repository: Path, model: str, port: int, extra_env: dict[str, str]
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OODFLOW_LOG_LEVEL": "warning",
        "OODFLOW_MODELS": model,
        "OODFLOW_PORT": str(port),
        "OODFLOW_MODEL_REPOSITORY": str(repository),
        **extra_env,
    }
    return subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env)


async def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"service at {url} did not become ready")


async def load(
    url: str, body: bytes, images_per_request: int, concurrency: int, seconds: float
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(stop_at: float, record: bool) -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
                if record:
                    if ok:
                        latencies.append(time.perf_counter() - t)
                    else:
                        errors += 1

        warm_until = time.perf_counter() + min(1.0, seconds / 4)
        await asyncio.gather(*(worker(warm_until, False) for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + seconds, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    p50, p95, p99 = _percentiles(latencies) if latencies else (float("nan"),) * 3
    return {
        "images_per_s": len(latencies) * images_per_request / elapsed,
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "requests": len(latencies),
        "errors": errors,
    }


def array_body(images: np.ndarray) -> bytes:
    """`(N, C, H, W)` -> the v1 raw-array JSON body (`[N, H, W]` grey or `[N, H, W, C]`)."""
    n, c, h, w = images.shape
    pixels = images[:, 0] if c == 1 else images.transpose(0, 2, 3, 1)
    shape = [n, h, w] if c == 1 else [n, h, w, c]
    b64 = base64.b64encode(np.ascontiguousarray(pixels).tobytes()).decode()
    return json.dumps({"array": {"b64": b64, "shape": shape}}).encode()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path(os.environ.get("OODFLOW_MODEL_REPOSITORY", "model-repository")),
    )
    parser.add_argument("--model", default="fmnist-pixel")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--images-per-request", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--threads", type=int, default=0, help="in-process ORT intra-op threads (0: ORT's default)"
    )
    parser.add_argument(
        "--service-threads",
        type=int,
        default=None,
        help="the service's OODFLOW_INTRA_OP_THREADS (default: its own)",
    )
    parser.add_argument("--max-batch-images", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=1.0)
    parser.add_argument("--concurrent-batches", type=int, default=1, help="OODFLOW_CONCURRENT_BATCHES")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    version = latest_version(args.repository, args.model)
    if version is None:
        sys.exit(f"no model '{args.model}' in {args.repository} (build it, or pass --repository/--model)")
    version_dir = args.repository / args.model / str(version)
    manifest = load_manifest(version_dir)
    rng = np.random.default_rng(0)
    count = max(args.max_batch_images, *args.images_per_request)
    images = rng.integers(0, 256, (count, *manifest.input.shape), dtype=np.uint8)

    print(
        f"model {args.model} v{version} ({manifest.kind}, input {manifest.input.shape}), "
        f"{os.cpu_count()} CPUs"
    )
    baseline = {}
    for batch in sorted({1, *args.images_per_request, args.max_batch_images}):
        candidates = [
            in_process(version_dir / "model.onnx", images, batch, args.seconds / 2, args.threads, spinning)
            for spinning in (False, True)
        ]  # the better of ORT's defaults (spinning threads) and the service's options
        baseline[batch] = max(candidates, key=lambda r: r["images_per_s"])

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **({} if args.service_threads is None else {"OODFLOW_INTRA_OP_THREADS": str(args.service_threads)}),
        "OODFLOW_MAX_BATCH_IMAGES": str(args.max_batch_images),
        "OODFLOW_MAX_WAIT_MS": str(args.max_wait_ms),
        "OODFLOW_CONCURRENT_BATCHES": str(args.concurrent_batches),
    }
    process = start_service(args.repository, args.model, port, env)
    rows: list[dict[str, Any]] = []
    try:
        asyncio.run(wait_ready(url))
        score_url = f"{url}/v1/models/{args.model}/score"
        for per_request in args.images_per_request:
            body = array_body(images[:per_request])
            for concurrency in args.concurrency:
                # in-process figure taken right before each cell: a shared CPU's speed drifts
                beside = in_process(
                    version_dir / "model.onnx", images, per_request, args.seconds / 2, args.threads, False
                )
                result = asyncio.run(load(score_url, body, per_request, concurrency, args.seconds))
                rows.append(
                    {
                        "images_per_request": per_request,
                        "concurrency": concurrency,
                        "in_process_images_per_s": beside["images_per_s"],
                        **result,
                    }
                )
                print(
                    f"  {per_request:>2} img x {concurrency:>2} conc: {result['images_per_s']:.0f} img/s",
                    file=sys.stderr,
                )
    finally:
        process.terminate()
        process.wait(30)

    top = baseline[args.max_batch_images]["images_per_s"]
    print()
    print(
        "| request | concurrency | service img/s | p50 ms | p95 ms | p99 ms "
        "| in-process img/s, same batch, just before | ratio | ratio to in-process batch "
        f"{args.max_batch_images} ({top:.0f} img/s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        base = row["in_process_images_per_s"]
        print(
            f"| {row['images_per_request']} image(s) | {row['concurrency']} | {row['images_per_s']:.0f} | "
            f"{row['p50_ms']:.2f} | {row['p95_ms']:.2f} | {row['p99_ms']:.2f} | {base:.0f} | "
            f"{row['images_per_s'] / base:.0%} | {row['images_per_s'] / top:.0%} |"
        )
    print()
    print("| in-process ONNX Runtime batch | img/s | p50 ms | p95 ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|")
    for batch, b in baseline.items():
        print(
            f"| {batch} | {b['images_per_s']:.0f} | {b['p50_ms']:.2f} | {b['p95_ms']:.2f} "
            f"| {b['p99_ms']:.2f} |"
        )
    single = next((r for r in rows if r["images_per_request"] == 1 and r["concurrency"] == 1), None)
    if single is not None:
        gap = single["p50_ms"] - baseline[1]["p50_ms"]
        print(
            f"\nsingle-image p50 at concurrency 1: service {single['p50_ms']:.2f} ms, in-process "
            f"{baseline[1]['p50_ms']:.2f} ms: {gap:+.2f} ms (target: within 5 ms)"
        )
    errors = sum(r["errors"] for r in rows)
    if errors:
        print(f"\n{errors} non-200 responses during the run")
    if args.json:
        args.json.write_text(json.dumps({"service": rows, "in_process": baseline}, indent=2))


if __name__ == "__main__":
    main()
