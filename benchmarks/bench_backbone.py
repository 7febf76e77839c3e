"""Throughput of the frozen EfficientNet-Lite0 feature extractor on CPU.

Prints images/s for `EfficientNetLite0Features` (eager, under `torch.inference_mode`) in
channels-last and contiguous memory formats, and for the exported ONNX graph under ONNX Runtime.
Inputs are Fashion-MNIST-shaped by default ((N, 1, 28, 28) values in [0, 255]), so the figure
includes the resize to the backbone resolution, as training and serving pay it.

    .venv/bin/python benchmarks/bench_backbone.py [--batch 256] [--resolution 64] [--iters 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch

from models.backbones import EfficientNetLite0Features


def _images_per_second(run: Callable[[], object], batch: int, warmup: int, iters: int) -> float:
    """Total images over total wall time of `iters` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        run()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    return batch * iters / (time.perf_counter() - start)


def _export(model: torch.nn.Module, example: torch.Tensor, path: Path, exporter: str) -> None:
    if exporter == "dynamo":
        kwargs: dict[str, object] = {
            "dynamo": True,
            "dynamic_shapes": {"images": {0: torch.export.Dim("batch")}},
            "verbose": False,
        }
    else:
        kwargs = {"dynamo": False, "dynamic_axes": {"images": {0: "batch"}, "features": {0: "batch"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["features"],
            opset_version=18,
            **kwargs,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=64, help="backbone input side, pixels")
    parser.add_argument("--input-size", type=int, default=28, help="side of the raw images, pixels")
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = (torch.rand(args.batch, args.channels, args.input_size, args.input_size) * 255).round()
    shape = tuple(images.shape)
    print(
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, torch threads {torch.get_num_threads()}"
        f" (os.cpu_count() = {os.cpu_count()}); input {shape} float32 in [0, 255]"
        f" -> resize to {args.resolution}x{args.resolution};"
        f" {args.warmup} warm-up + {args.iters} timed batches"
    )

    for channels_last in (True, False):
        model = EfficientNetLite0Features(resolution=args.resolution, channels_last=channels_last)
        with torch.inference_mode():
            rate = _images_per_second(lambda m=model: m(images), args.batch, args.warmup, args.iters)
        memory_format = "channels_last" if channels_last else "contiguous"
        print(f"eager  {memory_format:<13} batch {args.batch}: {rate:8.1f} images/s")

    model = EfficientNetLite0Features(resolution=args.resolution, channels_last=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.onnx"
        _export(model, images[:2], path, args.exporter)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"images": images.numpy()}
        rate = _images_per_second(lambda: session.run(None, feed), args.batch, args.warmup, args.iters)
    print(
        f"onnxruntime ({args.exporter} export, opset 18, {args.threads} intra-op threads)"
        f" batch {args.batch}: {rate:8.1f} images/s"
    )


if __name__ == "__main__":
    main()
