"""Scorers: run one exported graph on one uint8 batch. They know nothing of batching or HTTP.

Graph I/O (DESIGN §3, names in `models.artifact`): input `images` uint8 `[N, C, H, W]` (dynamic
N); outputs `log_likelihood` float32 `[N]` (nats) and `bits_per_dim` float32 `[N]`, plus
`background_log_likelihood` (nats) for models scored by likelihood ratio. A TorchScript graph
returns them as a tuple in that order.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from models.artifact import BACKGROUND_OUTPUT, GRAPH_FILES, GRAPH_INPUT, GRAPH_OUTPUTS

__all__ = [
    "Device",
    "OnnxScorer",
    "RuntimeName",
    "Scorer",
    "TorchScriptScorer",
    "load_scorer",
]

RuntimeName = Literal["onnx", "torchscript"]
Device = Literal["auto", "cpu", "cuda"]
_ORT_DEFAULT_SEVERITY = 2  # ONNX Runtime's default logger level (warning)


class Scorer(Protocol):
    """`run(images: (N, C, H, W) uint8) -> {output name: (N,) float32}`; safe to call from one thread."""

    runtime: str
    device: str
    output_names: tuple[str, ...]
    input_shape: tuple[int | None, int | None, int | None]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


def _session(ort: Any, path: Path, options: Any, use_cuda: bool, quiet: bool) -> Any:
    """An InferenceSession on CUDA (falling back to CPU) or on CPU.

    onnxruntime-gpu lists the CUDA provider as available whether or not the machine has a GPU and
    the CUDA libraries; when it cannot start, ONNX Runtime logs errors (or prints a banner) and
    falls back to CPU. For `auto` that fallback is the expected outcome on a CPU machine, so it is
    silenced; `cuda` checks the session's providers afterwards instead.
    """
    if not use_cuda:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if not quiet:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    ort.set_default_logger_severity(4)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


class OnnxScorer:
    """ONNX Runtime session; CUDA execution provider when asked for (or `auto` and available)."""

    runtime = "onnx"

    def __init__(
        self, path: Path, device: str = "auto", intra_op_threads: int = 0, allow_spinning: bool = False
    ) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise RuntimeError(f"device 'cuda' requested but ONNX Runtime offers only {available}")
        use_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # One batch at a time per model (the batcher's thread): no inter-op parallelism to buy.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Idle intra-op threads spin by default; on a small CPU they would take the event loop's core.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        self._session = _session(ort, path, options, use_cuda, quiet=device == "auto")
        self.device = "cuda" if "CUDAExecutionProvider" in self._session.get_providers() else "cpu"
        if device == "cuda" and self.device != "cuda":
            raise RuntimeError(
                "device 'cuda' requested but ONNX Runtime's CUDA provider did not start (no GPU, driver, "
                "or CUDA/cuDNN libraries it needs); use --device cpu or auto"
            )
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != GRAPH_INPUT or inputs[0].type != "tensor(uint8)":
            described = [(i.name, i.type) for i in inputs]
            raise RuntimeError(f"graph input must be one uint8 tensor 'images', found {described}")
        shape = list(inputs[0].shape)
        if len(shape) != 4:
            raise RuntimeError(f"graph input 'images' must be [N, C, H, W], found {shape}")
        c, h, w = (d if isinstance(d, int) else None for d in shape[1:])
        self.input_shape: tuple[int | None, int | None, int | None] = (c, h, w)
        self.output_names: tuple[str, ...] = tuple(o.name for o in self._session.get_outputs())

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self._session.run(None, {GRAPH_INPUT: images})
        return {name: np.asarray(value) for name, value in zip(self.output_names, outputs, strict=True)}


class TorchScriptScorer:
    """`torch.jit.load` on `cuda` (when asked for, or `auto` and available) or `cpu`."""

    runtime = "torchscript"

    def __init__(self, path: Path, device: str = "auto", intra_op_threads: int = 0) -> None:
        try:
            import torch  # imported here so an ONNX-only service never pays for it
        except ImportError:
            raise RuntimeError(
                "the torchscript runtime needs torch, which this install lacks: "
                "pip install 'oodflow[torchscript]', or serve with --runtime onnx"
            ) from None

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
        self.device = "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
        if intra_op_threads:
            torch.set_num_threads(intra_op_threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._module: Any = torch.jit.load(str(path), map_location=self.device).eval()
        self._torch = torch
        self.input_shape: tuple[int | None, int | None, int | None] = (None, None, None)
        self.output_names: tuple[str, ...] = GRAPH_OUTPUTS  # refined by the first run (warm-up)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            outputs = self._module(torch.from_numpy(images).to(self.device))
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        names = (*GRAPH_OUTPUTS, BACKGROUND_OUTPUT)[: len(outputs)]
        self.output_names = names
        return {name: value.detach().cpu().numpy() for name, value in zip(names, outputs, strict=True)}


def load_scorer(
    directory: Path,
    runtime: RuntimeName,
    device: str,
    intra_op_threads: int = 0,
    allow_spinning: bool = False,
) -> Scorer:
    """The scorer for `<directory>/<graph file of runtime>`."""
    path = Path(directory) / GRAPH_FILES[runtime]
    if runtime == "onnx":
        return OnnxScorer(path, device, intra_op_threads, allow_spinning)
    return TorchScriptScorer(path, device, intra_op_threads)
