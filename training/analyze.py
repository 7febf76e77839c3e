"""`oodflow analyze`: pictures of what a pixel flow computes (Kirichenko et al. 2020, §5–7).

For a trained pixel flow and a few in-distribution and OOD images it writes PNG grids:

- `latent.png` (2 rows × N images): the input and its latent `z`, laid out on the image grid (our
  flows keep the factored-out halves in place, so `z` has the input's shape). The input's edges
  stay visible in `z`: the flow transforms images locally, not semantically.
- `st_maps.png` (2N rows × L couplings): the log-scale `s` and shift `t` of every coupling layer,
  on the entries it transforms; squeezed tensors are un-squeezed back to the image grid.
- `coupling_outputs.png` (N rows × L+1): the input (logit space) and the output after each coupling.
- `coadaptation.png` (N rows × 3, RealNVP): what the first two couplings predict for the pixels
  they transform, `x̂ = −t · exp(−s)` (the value the coupling maps to 0), mapped back to pixels and
  drawn over the half they cannot see. With a horizontal mask the first coupling predicts the
  bottom half of an OOD digit from its top half, and the second predicts the top half back from
  the first one's *output*: the coupling layers co-adapt (§7).

`analyze.md` beside them says in one sentence what each picture shows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import Tensor  # noqa: E402

from models.config import PixelFlowConfig  # noqa: E402
from models.coupling import AffineCoupling  # noqa: E402
from models.flows import PixelFlow  # noqa: E402
from models.preprocessing import dequantize  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.runs import Run  # noqa: E402

__all__ = [
    "CouplingTrace",
    "analysis_markdown",
    "analyze",
    "analyze_many",
    "analyze_model",
    "load_pixel_flow",
    "to_grid",
    "trace_couplings",
]


@dataclass
class CouplingTrace:
    """One coupling layer's view of a batch, in forward order. All `(N, c, h, w)`."""

    index: int
    shape: tuple[int, ...]
    mask: str
    inputs: Tensor
    outputs: Tensor
    s: Tensor
    t: Tensor
    condition: Tensor  # (1, c, h, w) {0, 1}
    transformed: Tensor  # (1, c, h, w) {0, 1}


@torch.no_grad()
def trace_couplings(model: PixelFlow, images: Tensor) -> list[CouplingTrace]:
    """Run `images: (N, C, H, W) uint8` through the flow and record every coupling layer."""
    traces: list[CouplingTrace] = []

    def hook(module: torch.nn.Module, args: tuple[Tensor, ...], output: tuple[Tensor, Tensor]) -> None:
        assert isinstance(module, AffineCoupling)
        x = args[0]
        s, t = module._scale_shift(x)
        traces.append(
            CouplingTrace(
                len(traces),
                module.shape,
                module.mask.kind,
                x.clone(),
                output[0].clone(),
                s,
                t,
                module.condition,
                module.transformed,
            )
        )

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, AffineCoupling)]
    try:
        model.eval()
        model.latent(images)
    finally:
        for h in handles:
            h.remove()
    return traces


def to_grid(x: Tensor) -> np.ndarray:
    """`(c, h, w)` -> a 2-D array on the image grid: un-squeeze while the channels allow it
    (space-to-depth inverted), then tile what channels remain side by side."""
    x = x.detach().float().cpu()
    c, h, w = x.shape
    while c % 4 == 0 and c >= 4:
        x = x.reshape(c // 4, 2, 2, h, w).permute(0, 3, 1, 4, 2).reshape(c // 4, h * 2, w * 2)
        c, h, w = x.shape
    return torch.cat(list(x), dim=1).numpy() if c > 1 else x[0].numpy()


def logit_to_pixels(x: Tensor, alpha: float) -> Tensor:
    """Inverse of the flow's pre-processing: logit space -> pixel values 0..255 (float)."""
    y = (torch.sigmoid(x) - alpha) / (1.0 - 2.0 * alpha)
    return (y * 256.0 - 0.5).clamp(0.0, 255.0)


def edge_map(image: np.ndarray) -> np.ndarray:
    """Gradient magnitude of a 2-D image (where its edges are)."""
    gy, gx = np.gradient(np.asarray(image, dtype=np.float64))
    return np.hypot(gx, gy)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _mean_by_group(values: list[float], labels: list[str]) -> tuple[float, float]:
    ood = np.array([lab.startswith("OOD") for lab in labels])
    v = np.array(values)
    return float(v[~ood].mean()) if (~ood).any() else float("nan"), float(
        v[ood].mean()
    ) if ood.any() else float("nan")


def _panel(
    ax: Any, image: np.ndarray, title: str | None = None, cmap: str = "gray", symmetric: bool = False
) -> None:
    if symmetric:
        v = float(np.abs(image).max()) or 1.0
        ax.imshow(image, cmap="RdBu_r", vmin=-v, vmax=v, interpolation="nearest")
    else:
        ax.imshow(image, cmap=cmap, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _figure(rows: int, cols: int, size: float = 1.25) -> tuple[Any, np.ndarray]:
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size + 0.6, rows * size + 0.6), squeeze=False)
    return fig, axes


def _save(fig: Any, path: Path, title: str) -> None:
    fig.suptitle(title, fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def analyze_model(
    model: PixelFlow, images: np.ndarray, labels: list[str], output_dir: Path, title: str
) -> dict[str, tuple[int, int]]:
    """Write the figures for `images: (N, C, H, W) uint8`; returns `{file name: (rows, cols)}`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    batch = torch.from_numpy(np.ascontiguousarray(images))
    n = len(batch)
    grids: dict[str, tuple[int, int]] = {}
    with torch.no_grad():
        z = model.latent(batch)
        bpd = model(batch)[1]
    traces = trace_couplings(model, batch)

    fig, axes = _figure(2, n)
    for j in range(n):
        _panel(axes[0, j], to_grid(batch[j].float()), f"{labels[j]}\n{float(bpd[j]):.2f} bits/dim")
        _panel(axes[1, j], to_grid(z[j]), "latent z", symmetric=True)
    _save(fig, output_dir / "latent.png", f"{title}: inputs (top) and latents z on the image grid (bottom)")
    grids["latent.png"] = (2, n)
    # How much of the input's edge map survives in |z| (§5: latents keep local structure).
    edge_corr = [_corr(np.abs(to_grid(z[j])), edge_map(to_grid(batch[j].float()))) for j in range(n)]
    e_in, e_ood = _mean_by_group(edge_corr, labels)
    notes: dict[str, str] = {
        "latent.png": f"Measured: the correlation between |z| and the input's edge map (gradient magnitude) is "
        f"{e_in:.2f} for the in-distribution images and {e_ood:.2f} for the OOD images "
        "(0 would mean no trace of the input's edges)."
    }

    cols = len(traces)
    fig, axes = _figure(2 * n, cols, size=1.0)
    for j in range(n):
        for k, tr in enumerate(traces):
            head = f"coupling {k + 1}\n{tr.mask} {tuple(tr.shape)}" if j == 0 else None
            _panel(axes[2 * j, k], to_grid(tr.s[j] * tr.transformed[0]), head, symmetric=True)
            _panel(axes[2 * j + 1, k], to_grid(tr.t[j] * tr.transformed[0]), None, symmetric=True)
        axes[2 * j, 0].set_ylabel(f"{labels[j]}: s", fontsize=7)
        axes[2 * j + 1, 0].set_ylabel(f"{labels[j]}: t", fontsize=7)
    _save(fig, output_dir / "st_maps.png", f"{title}: log-scale s and shift t of every coupling layer")
    grids["st_maps.png"] = (2 * n, cols)
    first = traces[0]
    t_corr = [
        _corr(np.abs(to_grid(first.t[j] * first.transformed[0])), edge_map(to_grid(batch[j].float())))
        for j in range(n)
    ]
    t_in, t_ood = _mean_by_group(t_corr, labels)
    notes["st_maps.png"] = (
        f"Measured: |t| of the first coupling correlates with the input's edge map at {t_in:.2f} "
        f"(in-distribution) and {t_ood:.2f} (OOD)."
    )

    fig, axes = _figure(n, cols + 1, size=1.0)
    with torch.no_grad():
        x0, _ = model.logit(dequantize(batch, "midpoint"))
    for j in range(n):
        _panel(axes[j, 0], to_grid(x0[j]), "input (logit)" if j == 0 else None)
        axes[j, 0].set_ylabel(labels[j], fontsize=7)
        for k, tr in enumerate(traces):
            _panel(axes[j, k + 1], to_grid(tr.outputs[j]), f"after coupling {k + 1}" if j == 0 else None)
    _save(fig, output_dir / "coupling_outputs.png", f"{title}: the representation after each coupling layer")
    grids["coupling_outputs.png"] = (n, cols + 1)

    spatial = [tr for tr in traces if tuple(tr.shape) == tuple(model.input_shape)]
    if model.config.architecture == "realnvp" and len(spatial) >= 2:
        fig, axes = _figure(n, 3, size=1.4)
        alpha = model.config.alpha
        errors: dict[int, list[float]] = {0: [], 1: []}
        black: dict[int, list[float]] = {0: [], 1: []}
        for j in range(n):
            _panel(axes[j, 0], to_grid(batch[j].float()), "input" if j == 0 else None)
            axes[j, 0].set_ylabel(labels[j], fontsize=7)
            for k, tr in enumerate(spatial[:2]):
                predicted = -tr.t[j] * torch.exp(-tr.s[j])  # the input value the coupling maps to 0
                # The transformed entries of both couplings are still logit(pixels) (coupling 2 transforms
                # what coupling 1 conditioned on), so the prediction maps back to pixels; the visible half
                # is drawn from the image (for coupling 2 it is really coupling 1's output).
                visible = batch[j].float() * (1 - tr.transformed[0])
                pixels = visible + logit_to_pixels(predicted, alpha) * tr.transformed[0]
                hidden = tr.transformed[0].bool()
                errors[k].append(float((pixels - batch[j].float())[hidden].abs().mean()))
                black[k].append(float(batch[j].float()[hidden].mean()))
                head = (
                    "coupling 1 predicts\nthe masked half"
                    if k == 0
                    else "coupling 2 predicts it back\nfrom coupling 1's output"
                )
                _panel(axes[j, k + 1], to_grid(pixels), head if j == 0 else None)
                mask = to_grid(tr.transformed[0])
                axes[j, k + 1].contour(mask, levels=[0.5], colors="r", linewidths=0.6)
        _save(
            fig,
            output_dir / "coadaptation.png",
            f"{title}: predicted masked pixels −t·exp(−s) (inside the red line)",
        )
        grids["coadaptation.png"] = (n, 3)
        parts = []
        for k in (0, 1):
            err_in, err_ood = _mean_by_group(errors[k], labels)
            base_in, base_ood = _mean_by_group(black[k], labels)
            parts.append(
                f"coupling {k + 1} misses the hidden pixels by {err_in:.0f} (in) / {err_ood:.0f} (OOD) grey levels "
                f"on average, against {base_in:.0f} / {base_ood:.0f} for an all-black guess"
            )
        notes["coadaptation.png"] = "Measured: " + "; ".join(parts) + "."
    (output_dir / "grids.json").write_text(
        json.dumps({k: list(v) for k, v in grids.items()}, indent=2) + "\n"
    )
    (output_dir / "notes.json").write_text(json.dumps(notes, indent=2, ensure_ascii=False) + "\n")
    return grids


def load_pixel_flow(path: Path) -> PixelFlow:
    """A pixel flow from a run folder (`config.json` + `model.safetensors`) or an artifact version
    folder (`manifest.json` + `weights.safetensors`; a likelihood-ratio artifact's main flow)."""
    path = Path(path)
    if (path / "config.json").is_file():
        model = Run(path).load_model("cpu")
        if not isinstance(model, PixelFlow):
            raise ValueError(f"{path}: analyze needs a pixel flow, this run is an {model.kind} flow")
        return model
    if (path / "manifest.json").is_file():
        from models.artifact import verify_artifact

        manifest = verify_artifact(path)
        if manifest.kind != "pixel":
            raise ValueError(f"{path}: analyze needs a pixel flow, this artifact is an {manifest.kind} flow")
        model = PixelFlow(PixelFlowConfig.model_validate(manifest.architecture))
        state = load_file(str(path / "weights.safetensors"))
        if any(k.startswith("main.") for k in state):
            state = {k[len("main.") :]: v for k, v in state.items() if k.startswith("main.")}
        model.load_state_dict(state, strict=True)
        return model.eval()
    raise FileNotFoundError(f"{path}: neither a run folder (config.json) nor an artifact (manifest.json)")


def analyze(
    model_path: Path,
    output_dir: Path,
    *,
    in_distribution: str = "fashion-mnist:test",
    ood: str = "mnist",
    count: int = 3,
    seed: int = 0,
    markdown: Path | None = None,
    title: str | None = None,
) -> dict[str, tuple[int, int]]:
    """Figures for `count` in-distribution and `count` OOD images; writes `analysis.md` (or
    `markdown`) describing them. Returns `{file name: (rows, cols)}`."""
    model = load_pixel_flow(Path(model_path))
    shape = model.input_shape
    idd = load_dataset(in_distribution, shape=shape, limit=count, seed=seed)
    oods = load_dataset(ood, shape=shape, limit=count, seed=seed)
    images = np.concatenate([idd.images, oods.images])
    labels = [f"in {i + 1}" for i in range(len(idd))] + [f"OOD {i + 1}" for i in range(len(oods))]
    name = title or f"{model.config.architecture} ({model.config.mask} mask)"
    output_dir = Path(output_dir)
    grids = analyze_model(model, images, labels, output_dir, name)
    markdown = Path(markdown) if markdown else output_dir / "analysis.md"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(
        analysis_markdown(
            {name: (output_dir, grids)},
            markdown.parent,
            in_distribution,
            ood,
            f"oodflow analyze {model_path}",
        )
    )
    return grids


def analyze_many(
    models: dict[str, Path],
    figures_root: Path,
    markdown: Path,
    *,
    in_distribution: str = "fashion-mnist:test",
    ood: str = "mnist",
    count: int = 3,
    seed: int = 0,
    command: str = "oodflow analyze",
) -> dict[str, dict[str, tuple[int, int]]]:
    """`analyze` for several models (`{title: run or artifact folder}`) into one Markdown page;
    figures go to `<figures_root>/<folder name>/`."""
    done: dict[str, tuple[Path, dict[str, tuple[int, int]]]] = {}
    for title, path in models.items():
        model = load_pixel_flow(Path(path))
        shape = model.input_shape
        idd = load_dataset(in_distribution, shape=shape, limit=count, seed=seed)
        oods = load_dataset(ood, shape=shape, limit=count, seed=seed)
        images = np.concatenate([idd.images, oods.images])
        labels = [f"in {i + 1}" for i in range(len(idd))] + [f"OOD {i + 1}" for i in range(len(oods))]
        folder = Path(figures_root) / Path(path).name
        done[title] = (folder, analyze_model(model, images, labels, folder, title))
    markdown = Path(markdown)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(analysis_markdown(done, markdown.parent, in_distribution, ood, command))
    return {title: grids for title, (_, grids) in done.items()}


SENTENCES = {
    "latent.png": "Inputs (top) and their latents z laid out on the image grid (bottom): the paper's §5 finding is "
    "that the input's edges and shape stay visible in z, i.e. the flow maps images to latents locally and "
    "generically rather than by what they show, so a smooth OOD digit gets as Gaussian-looking a latent as a garment.",
    "st_maps.png": "The log-scale s (odd rows) and shift t (even rows) of every coupling layer on the entries it "
    "transforms (blue negative, red positive): where they follow the object's outline, the st-networks act as "
    "local pixel predictors, for in-distribution and OOD images alike.",
    "coupling_outputs.png": "The representation after each coupling layer (squeezed scales un-squeezed onto the "
    "image grid): the picture's structure survives layer after layer, whatever the image shows.",
    "coadaptation.png": "What the first two coupling layers predict for the pixels they transform, −t·exp(−s) "
    "(the input value the layer maps to 0), drawn inside the red line: the first layer predicts the hidden half "
    "from the visible half; the second predicts the first layer's visible half back from the first layer's "
    "*output*, which it can only do if the first layer encoded it there: the co-adaptation of §7.",
}


def analysis_markdown(
    models: dict[str, tuple[Path, dict[str, tuple[int, int]]]],
    doc_dir: Path,
    in_distribution: str,
    ood: str,
    command: str,
) -> str:
    lines = [
        "# Inside a pixel flow: what `oodflow analyze` shows",
        "",
        f"Images: a few `{in_distribution}` (in-distribution, 'in') and `{ood}` (OOD) images, scored by flows trained "
        f"on Fashion-MNIST. Generated by `{command}`. Section numbers refer to Kirichenko, Izmailov & Wilson, "
        "*Why Normalizing Flows Fail to Detect Out-of-Distribution Data* (NeurIPS 2020).",
        "",
    ]
    for name, (folder, grids) in models.items():
        lines += [f"## {name}", ""]
        for fig, (rows, cols) in grids.items():
            rel = Path(os.path.relpath(Path(folder) / fig, doc_dir)).as_posix()
            notes_path = Path(folder) / "notes.json"
            notes = json.loads(notes_path.read_text()) if notes_path.is_file() else {}
            note = f" {notes[fig]}" if fig in notes else ""
            lines += [
                f"![{fig}]({rel})",
                "",
                f"*{fig}* ({rows} × {cols}): {SENTENCES.get(fig, '')}{note}",
                "",
            ]
    return "\n".join(lines)
