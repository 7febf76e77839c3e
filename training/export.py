"""Export a trained density model as an artifact version (DESIGN.md §3).

The graph exported is the model's own `forward`: uint8 images `[N, C, H, W]` in, `log_likelihood`
and `bits_per_dim` `[N]` float32 out, with every pre-processing step inside. A model may declare
more outputs in `output_names` (the likelihood-ratio model adds `background_log_likelihood`); they
are exported, and checked for parity, like the first two. Before anything is
published, eager PyTorch, ONNX Runtime and TorchScript must agree on real images at batch 1
and 7; an artifact that fails the check is never written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import save_file
from torch import nn

from models.artifact import (
    GRAPH_INPUT,
    GRAPH_OUTPUTS,
    Manifest,
    find_versions,
    mkdir_readable,
    write_manifest,
)

__all__ = [
    "ExportError",
    "OPSET",
    "PARITY_RTOL",
    "check_parity",
    "export_artifact",
    "export_onnx",
    "export_torchscript",
    "next_version",
    "output_names",
]

OPSET = 17
PARITY_RTOL = 1e-3
OUTPUT_NAMES = list(GRAPH_OUTPUTS)  # named once, in models.artifact


class ExportError(RuntimeError):
    """The exported graphs disagree with the eager model, or the export itself failed."""


def output_names(model: nn.Module) -> list[str]:
    """The graph's output names: `log_likelihood`, `bits_per_dim`, then any the model adds."""
    names = list(getattr(model, "output_names", OUTPUT_NAMES))
    if names[:2] != OUTPUT_NAMES:
        raise ExportError(f"a model's first outputs must be {OUTPUT_NAMES}, got {names}")
    return names


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """TorchScript-based exporter: it handles our static graphs and gives a dynamic batch axis."""
    names = output_names(model)
    dynamic = {name: {0: "batch"} for name in [GRAPH_INPUT, *names]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[GRAPH_INPUT],
            output_names=names,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (example,), check_trace=False)
    traced.save(str(path))


def check_parity(
    model: nn.Module, onnx_path: Path, torchscript_path: Path, images: torch.Tensor, rtol: float = PARITY_RTOL
) -> dict[str, float]:
    """Compare eager, ONNX Runtime and TorchScript `log_likelihood` (and every extra log-likelihood
    output, e.g. `background_log_likelihood`) at batch 1 and 7.

    `images: (N >= 7, C, H, W) uint8` real images. Returns the worst relative error per runtime;
    raises ExportError if any exceeds `rtol`.
    """
    if images.shape[0] < 7:
        raise ValueError("parity check needs at least 7 images")
    names = output_names(model)
    checked = [i for i, name in enumerate(names) if name != "bits_per_dim"]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    graph_outputs = [o.name for o in session.get_outputs()]
    if graph_outputs != names:
        raise ExportError(f"ONNX graph outputs {graph_outputs}, expected {names}; not written")
    scripted = torch.jit.load(str(torchscript_path))
    worst = {"onnxruntime": 0.0, "torchscript": 0.0}
    for batch in (images[:1], images[:7]):
        with torch.no_grad():
            eager_all = model(batch)
            ts_all = scripted(batch)
        onnx_all = session.run(names, {GRAPH_INPUT: batch.numpy()})
        for i in checked:
            eager = eager_all[i].double().numpy()
            ts = ts_all[i].double().numpy()
            onnx_out = onnx_all[i].astype(np.float64)
            for runtime, values in (("onnxruntime", onnx_out), ("torchscript", ts)):
                rel = float(np.max(np.abs(values - eager) / np.maximum(np.abs(eager), 1e-6)))
                worst[runtime] = max(worst[runtime], rel)
    failed = {k: v for k, v in worst.items() if not v <= rtol}
    if failed:
        raise ExportError(f"export parity failed (max relative error {failed}, allowed {rtol}); not written")
    return worst


def next_version(repository: Path, name: str) -> int:
    versions = find_versions(repository, name)
    return versions[-1] + 1 if versions else 1


def export_artifact(
    model: nn.Module,
    manifest: Manifest,
    repository: Path,
    parity_images: torch.Tensor,
    report_dir: Path | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `<repository>/<name>/<version>/` atomically and return its path.

    The version folder appears only after the graphs passed the parity check and the manifest
    (with every file's sha256) is written, so a crash never leaves a half artifact behind. It is
    staged in a private (0700) folder and published with readable modes (folders 0755, files
    0644; `write_manifest` sets them), so a service running as another user can read it.
    """
    model = model.eval()
    repository = Path(repository)
    target = repository / manifest.name / str(manifest.version)
    if target.exists():
        raise ExportError(f"{target} already exists; versions are immutable")
    mkdir_readable(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{manifest.version}-", dir=target.parent))
    try:
        example = parity_images[:2].contiguous()
        export_onnx(model, example, staging / "model.onnx")
        export_torchscript(model, example, staging / "model.torchscript.pt")
        parity = check_parity(model, staging / "model.onnx", staging / "model.torchscript.pt", parity_images)
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        tensors.update(extra_tensors or {})
        save_file(tensors, str(staging / "weights.safetensors"))
        if report_dir is not None and Path(report_dir).is_dir():
            shutil.copytree(report_dir, staging / "report")
        export_info: dict[str, Any] = {
            "onnx_opset": OPSET,
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "parity_max_rel_error": parity,
            "parity_batches": [1, 7],
            "outputs": output_names(model),
        }
        write_manifest(staging, manifest.model_copy(update={"export": export_info}))
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
