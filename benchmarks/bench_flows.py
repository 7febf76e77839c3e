"""Throughput of `log_likelihood` at batch 256 on CPU for the default models' architectures.

- the default pixel RealNVP (preset `fmnist-pixel-realnvp`, 1x28x28), eager PyTorch and ONNX Runtime;
- the embedding path (EfficientNet-Lite0 at 64 px, channels-last, + the preset's vector flow).

Untrained weights: throughput does not depend on their values. Prints the thread count and memory
format used, and a Markdown table.

    .venv/bin/python benchmarks/bench_flows.py [--batch 256] [--iters 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch

from models.flows import build_model
from training.config import PRESETS
from training.export import export_onnx


def _rate(fn: Callable[[], object], batch: int, iters: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {threads} intra-op threads, batch {args.batch}, inference_mode")
    rows = []
    for preset in ("fmnist-pixel-realnvp", "fmnist-embedding"):
        config = PRESETS[preset]
        model = build_model(config.model).eval()
        params = sum(p.numel() for p in model.parameters())
        images = torch.randint(0, 256, (args.batch, *config.model.input_shape), dtype=torch.uint8)
        fmt = "channels-last backbone" if config.model.kind == "embedding" else "contiguous (NCHW)"
        with torch.inference_mode():
            eager = _rate(lambda m=model, x=images: m(x), args.batch, args.iters)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            export_onnx(model, images[:2], path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = {"images": images.numpy()}
            onnx_rate = _rate(lambda s=session, f=feed: s.run(None, f), args.batch, args.iters)
        rows.append((preset, config.model.kind, params, fmt, eager, onnx_rate))
    print()
    print("| model | kind | parameters | memory format | eager img/s | ONNX Runtime img/s |")
    print("|---|---|---|---|---|---|")
    for preset, kind, params, fmt, eager, onnx_rate in rows:
        print(f"| {preset} | {kind} | {params / 1e6:.2f}M | {fmt} | {eager:.0f} | {onnx_rate:.0f} |")


if __name__ == "__main__":
    main()
