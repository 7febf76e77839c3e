"""What a serving install costs: installed size, cold start to ready, memory (issue 9 §4).

For each virtual environment given (e.g. the old full install and `pip install 'oodflow[serve]'`):
the distributions installed, the disk usage of site-packages (`du`), whether torch is there, which
ONNX Runtime; then, over a model repository, `oodflow serve` started `--runs` times from that
environment: seconds from process start to the first `GET /readyz` 200 (every model loaded,
verified and warmed), the server's resident memory (VmRSS) once ready, and how many lines ONNX
Runtime printed on stderr while starting. Optionally the size of Docker images and of their
largest layer. Prints a Markdown table.

    python benchmarks/bench_install.py --venv full=/tmp/full --venv serve=.venv-serve \\
        --repository model-repository [--runs 3] [--image oodflow:cpu-old --image oodflow:cpu]

The environments run on the same machine one after the other; start-up figures include Python's
imports from disk (the first run after an install pays a cold page cache; the median hides it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ServeRun", "VenvFacts", "main", "measure_serve", "venv_facts"]

_FACTS = """
import importlib.metadata as m, importlib.util as u, json, site, sys
names = sorted({d.metadata["Name"].lower() for d in m.distributions()})
print(json.dumps({
    "python": sys.version.split()[0],
    "site_packages": site.getsitepackages()[0],
    "distributions": names,
    "torch": u.find_spec("torch") is not None,
    "onnxruntime": [n for n in names if n.startswith("onnxruntime")],
}))
"""


@dataclass
class VenvFacts:
    name: str
    path: Path
    python: str
    site_packages: Path
    distributions: list[str]
    torch: bool
    onnxruntime: list[str]
    du_bytes: int


@dataclass
class ServeRun:
    ready_s: float
    rss_bytes: int
    ort_lines: int
    models: list[str] = field(default_factory=list)


def _du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) * 1024


def venv_facts(name: str, venv: Path) -> VenvFacts:
    python = venv / "bin" / "python"
    facts = json.loads(
        subprocess.run([str(python), "-c", _FACTS], capture_output=True, text=True, check=True).stdout
    )
    site_packages = Path(facts["site_packages"])
    return VenvFacts(
        name=name,
        path=venv,
        python=facts["python"],
        site_packages=site_packages,
        distributions=facts["distributions"],
        torch=facts["torch"],
        onnxruntime=facts["onnxruntime"],
        du_bytes=_du_bytes(site_packages),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def measure_serve(venv: Path, repository: Path, timeout_s: float = 300.0) -> ServeRun:
    """Start `oodflow serve` from `venv`, time it to `/readyz` 200, read its RSS, stop it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OODFLOW_")}
    env.update({"OODFLOW_LOG_JSON": "false", "PYTHONDONTWRITEBYTECODE": "1"})
    command = [str(venv / "bin" / "oodflow"), "serve", "--repository", str(repository), "--port", str(port)]
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd="/", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command} exited {process.returncode}: {process.stderr.read()[-2000:]}")  # type: ignore[union-attr]
            if time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"{url}/readyz not ready after {timeout_s:.0f} s")
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                    if response.status == 200:
                        ready_s = time.perf_counter() - started
                        break
            except urllib.error.HTTPError as error:  # 503 while loading; give up on a model that failed
                states = json.loads(error.read() or b"{}").get("models", {})
                if any(str(state).startswith("failed") for state in states.values()):
                    raise RuntimeError(f"{url}/readyz: a model will not load: {states}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.02)
        rss = _rss_bytes(process.pid)
        with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as response:
            listed = json.loads(response.read())
        models = sorted(
            m["name"] for m in (listed.get("models", listed) if isinstance(listed, dict) else listed)
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
    ort_lines = sum(":onnxruntime:" in line for line in stderr.splitlines())
    return ServeRun(ready_s=ready_s, rss_bytes=rss, ort_lines=ort_lines, models=models)


def _image_sizes(image: str) -> tuple[int, int] | None:
    """(image size, largest layer) in bytes, from `docker image inspect` / `docker history`."""
    if shutil.which("docker") is None:
        return None
    inspect = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Size}}", image], capture_output=True, text=True
    )
    if inspect.returncode != 0:
        return None
    history = subprocess.run(
        ["docker", "history", "--no-trunc", "--human=false", "--format", "{{.Size}}", image],
        capture_output=True,
        text=True,
        check=True,
    )
    layers = [int(s) for s in history.stdout.split() if s.isdigit()]
    return int(inspect.stdout.strip()), max(layers, default=0)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--venv", action="append", default=[], metavar="NAME=PATH", help="repeatable")
    parser.add_argument("--repository", type=Path, help="model repository to serve (omit: sizes only)")
    parser.add_argument("--runs", type=int, default=3, help="cold starts per environment (median)")
    parser.add_argument("--image", action="append", default=[], help="Docker image to size (repeatable)")
    args = parser.parse_args(argv)
    if not args.venv and not args.image:
        parser.error("give at least one --venv NAME=PATH or --image")

    print(
        "| install | Python | distributions | site-packages (du) | torch | ONNX Runtime |"
        + (
            " cold start to /readyz (median, runs) | RSS when ready | ORT lines on stderr |"
            if args.repository
            else ""
        )
    )
    print("|---|---|---|---|---|---|" + ("---|---|---|" if args.repository else ""))
    for spec in args.venv:
        name, _, path = spec.partition("=")
        facts = venv_facts(name, Path(path))
        row = (
            f"| {name} | {facts.python} | {len(facts.distributions)} | {_mb(facts.du_bytes)} | "
            f"{'yes' if facts.torch else 'no'} | {', '.join(facts.onnxruntime) or '-'} |"
        )
        if args.repository:
            runs = [measure_serve(Path(path), args.repository) for _ in range(args.runs)]
            ready = sorted(r.ready_s for r in runs)
            rss = statistics.median(r.rss_bytes for r in runs)
            row += (
                f" {statistics.median(ready):.2f} s ({', '.join(f'{s:.2f}' for s in ready)}) |"
                f" {rss / 2**20:,.0f} MiB | {max(r.ort_lines for r in runs)} |"
            )
            print(f"<!-- {name}: models served {runs[0].models} -->", file=sys.stderr)
        print(row, flush=True)
    if args.image:
        print()
        print("| image | size | largest layer |")
        print("|---|---|---|")
        for image in args.image:
            sizes = _image_sizes(image)
            if sizes is None:
                print(f"| {image} | (no Docker engine or no such image) | |")
            else:
                print(f"| {image} | {_mb(sizes[0])} | {_mb(sizes[1])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
