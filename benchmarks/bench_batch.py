"""Offline batch scoring benchmark: `score-batch` images/s with the local engine and Ray Data.

Writes the 10,000 Fashion-MNIST test images once as PNG files (and/or one .npz), then scores them
with `--engine local` and `--engine ray` (a local Ray started here, so its start-up is reported
apart), each into a fresh output, and checks that both engines produced identical scores. Beside
them: the same ONNX graph run in this process on pre-decoded arrays at the same batch size (the
ceiling: no decoding, no I/O). Prints a Markdown table.

    .venv/bin/python benchmarks/bench_batch.py                                  # ./model-repository, fmnist-pixel
    .venv/bin/python benchmarks/bench_batch.py --repository /tmp/repo --model fmnist-tiny --limit 2000

Figures include each engine's model loading (sha256 check, session, warm-up) and, for Ray, actor
start-up; on a 2-core machine the engines compete with the benchmark itself for the cores.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.artifact import latest_version, load_manifest  # noqa: E402
from service.batch import score_batch  # noqa: E402
from training.data import load_dataset  # noqa: E402


def _write_inputs(folder: Path, images: np.ndarray, kinds: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if "png" in kinds:
        png = folder / "png"
        for i, image in enumerate(images):
            sub = png / f"{i // 1000:02d}"
            sub.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            Image.fromarray(image[0]).save(buffer, format="PNG")
            (sub / f"{i:05d}.png").write_bytes(buffer.getvalue())
        out["png"] = png
    if "npz" in kinds:
        out["npz"] = folder / "images.npz"
        np.savez(out["npz"], images=images[:, 0])
    return out


def _in_process(model_dir: Path, images: np.ndarray, batch: int, threads: int) -> float:
    """ONNX Runtime on pre-decoded uint8 arrays, one batch after another: images/s."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    session.run(None, {"images": images[:batch]})
    start = time.perf_counter()
    for s in range(0, len(images), batch):
        session.run(None, {"images": images[s : s + batch]})
    return len(images) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repository", default=os.environ.get("OODFLOW_MODEL_REPOSITORY", "model-repository")
    )
    parser.add_argument("--model", default="fmnist-pixel")
    parser.add_argument("--limit", type=int, default=10_000, help="Fashion-MNIST test images (10,000: all)")
    parser.add_argument("--inputs", default="png", help="comma list of png, npz")
    parser.add_argument("--engines", default="local,ray")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="threads (local) / actors (ray)"
    )
    args = parser.parse_args(argv)

    repository = Path(args.repository)
    version = latest_version(repository, args.model)
    if version is None:
        print(f"no model {args.model} in {repository}", file=sys.stderr)
        return 2
    model_dir = repository / args.model / str(version)
    manifest = load_manifest(model_dir)
    spec = manifest.input
    if (spec.channels, spec.height, spec.width) != (1, 28, 28):
        print(f"note: {args.model} takes {spec.shape}; images are resized (--resize)", file=sys.stderr)
    images = load_dataset("fashion-mnist:test").images[: args.limit]
    kinds = [k for k in args.inputs.split(",") if k]
    engines = [e for e in args.engines.split(",") if e]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        inputs = _write_inputs(folder, images, kinds)
        print(
            f"wrote {len(images)} images as {', '.join(kinds)} in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
        ray_start = None
        if "ray" in engines:
            import ray

            start = time.perf_counter()
            ray.init(
                num_cpus=args.workers, include_dashboard=False, logging_level="WARNING", log_to_driver=False
            )
            ray_start = time.perf_counter() - start
        try:
            for kind, path in inputs.items():
                tables = {}
                for engine in engines:
                    output = folder / f"{kind}-{engine}.parquet"
                    result = score_batch(
                        [path],
                        output,
                        [args.model],
                        repository=repository,
                        engine=engine,  # type: ignore[arg-type]
                        batch_size=args.batch_size,
                        workers=args.workers,
                        resize=(spec.height, spec.width) != (28, 28),
                        progress=False,
                    )
                    tables[engine] = pq.read_table(output)
                    summary = result["models"][args.model]
                    rows.append(
                        {
                            "input": kind,
                            "engine": engine,
                            "images": result["pending"],
                            "seconds": result["seconds"],
                            "images_per_s": result["images_per_s"],
                            "errors": summary["errors"],
                            "ood_rate": summary["ood_rate"],
                        }
                    )
                if len(tables) == 2:
                    same = tables["local"].equals(tables["ray"])
                    print(f"{kind}: local and ray scores identical: {same}", file=sys.stderr)
                    if not same:
                        return 1
        finally:
            if ray_start is not None:
                import ray

                ray.shutdown()
    ceiling = _in_process(model_dir, images, args.batch_size, threads=args.workers)

    print(
        f"\n### score-batch on {len(images)} Fashion-MNIST test images, {args.model} v{version} "
        f"({manifest.kind}), batch {args.batch_size}, {args.workers} workers, {os.cpu_count()} CPUs\n"
    )
    print("| input | engine | images | seconds | images/s | errors | OOD rate |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['input']} | {r['engine']} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.0f} | "
            f"{r['errors']} | {r['ood_rate']:.1%} |"
        )
    print(
        f"| arrays in memory | ONNX Runtime in-process, one session, {args.workers} intra-op threads "
        f"| {len(images)} | – | {ceiling:.0f} | – | – |"
    )
    if ray_start is not None:
        print(f"\nRay start-up (`ray.init`, local, not included above): {ray_start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
