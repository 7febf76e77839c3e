"""`oodflow score-batch` flags and entry point (`python -m service.batch` is the same command).

Only argparse at import time: `oodflow --help` builds this parser without loading the job's
dependencies (pyarrow, ONNX Runtime, Ray).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["add_score_batch_arguments", "main", "main_score_batch"]


def add_score_batch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `oodflow score-batch` flags (oodflow/cli.py builds its verb from this function)."""
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image folders (recursive), image, .npz or .parquet files"
    )
    parser.add_argument(
        "--model", action="append", required=True, help="model name or name:version (repeatable)"
    )
    parser.add_argument(
        "--output", required=True, help="CSV or Parquet file (by suffix); re-running resumes it"
    )
    parser.add_argument(
        "--repository", help="model repository (OODFLOW_MODEL_REPOSITORY, ./model-repository)"
    )
    parser.add_argument("--engine", choices=["local", "ray"], default="local")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--workers", type=int, help="threads (local) or actors (ray); default: cores / GPUs")
    parser.add_argument(
        "--gpus-per-worker", type=float, help="Ray: GPUs per actor (default 1 when the cluster has GPUs)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="images per inference call")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per worker")
    parser.add_argument("--runtime", choices=["onnx", "torchscript"], default="onnx")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--resize", action="store_true", help="resize images to the model's size instead of error rows"
    )
    parser.add_argument("--format", choices=["csv", "parquet"], help="output format (default: by suffix)")
    parser.add_argument("--image-column", help="Parquet inputs: the column of encoded images")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main_score_batch(args: argparse.Namespace) -> int:
    """Run `score-batch` from parsed arguments; prints the summary, returns the exit status."""
    from service.batch.job import score_batch

    result = score_batch(
        args.inputs,
        args.output,
        args.model,
        repository=args.repository,
        engine=args.engine,
        output_format=args.format,
        runtime=args.runtime,
        device=args.device,
        resize=args.resize,
        batch_size=args.batch_size,
        workers=args.workers,
        intra_op_threads=args.threads,
        gpus_per_worker=args.gpus_per_worker,
        address=args.address,
        image_column=args.image_column,
        progress=not args.no_progress,
    )
    rate = f", {result['images_per_s']:.0f} images/s" if result["images_per_s"] else ""
    print(f"{result['output']}: {result['pending']} images scored in {result['seconds']:.1f} s{rate}")
    for model, s in result["models"].items():
        print(
            f"  {model}: {s['images']} images, {s['scored']} scored, {s['errors']} errors, "
            f"{s['ood']} OOD ({s['ood_rate']:.1%} of scored)"
        )
    for name, e in result["ensembles"].items():
        reason = f": {e['reason']}" if e["reason"] else ""
        print(f"  ensemble {name}: {e['status']}{reason}")
    for model, d in result.get("drift", {}).items():
        if "skipped" in d:
            print(f"  drift {model}: not tested ({d['skipped']})")
            continue
        low, high = d["ood_rate_interval"]
        parts = ", ".join(f"{c['name']} {c['p_value']:.3g}" for c in d["components"])
        print(
            f"  drift {model}: p-value {d['p_value']:.3g} that the input is in-distribution "
            f"({d['method']}: {parts}); OOD rate {d['ood_rate']:.1%} [{low:.1%}, {high:.1%}] "
            f"at {d['confidence']:.0%}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m service.batch ...`, the same as `oodflow score-batch ...`."""
    from service.batch import __doc__ as description

    parser = add_score_batch_arguments(
        argparse.ArgumentParser(prog="oodflow score-batch", description=description)
    )
    try:
        return main_score_batch(parser.parse_args(argv))
    except (ValueError, RuntimeError) as exc:
        print(f"oodflow score-batch: error: {exc}", file=sys.stderr)
        return 2
