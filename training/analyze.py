"""`oodflow analyze`: pictures of what a pixel flow computes (Kirichenko et al. 2020, §5–6).

For a trained pixel flow and a few in-distribution and OOD images it writes PNG grids:

- `latent.png` (2 rows × N images): the input and its latent `z`, laid out on the image grid (our
  flows keep the factored-out halves in place, so `z` has the input's shape). §5: the paper finds
  the input's edges visible in `z`.
- `st_maps.png` (2N rows × L couplings): the log-scale `s` and shift `t` of every coupling layer,
  on the entries it transforms; squeezed tensors are un-squeezed back to the image grid.
- `coupling_outputs.png` (N rows × L+1): the input (logit space) and the output after each coupling.
- `coadaptation.png` (N rows × 3, RealNVP): what the first two couplings predict for the pixels
  they transform, `x̂ = −t · exp(−s)` (the value the coupling maps to 0), mapped back to pixels and
  drawn over the part they cannot see (§6: coupling layers predict masked pixels and co-adapt).

Every caption in `analysis.md` is generated from measurements on more images than the figures
show (`measure_count` per group), each against a control: the edge map of *another* image for
the edge correlations, a blank (all-black) and a mean-of-visible-pixels guess for the
predictions. The small functions `edge_verdict` and `prediction_verdict` decide the wording.
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
    "edge_caption",
    "edge_verdict",
    "prediction_caption",
    "prediction_verdict",
    "analyze",
    "analyze_many",
    "analyze_model",
    "coadaptation_sentence",
    "measure",
    "save_png",
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


def save_png(fig: Any, path: Path, dpi: int) -> None:
    """Save a figure as a small PNG (a 128-colour palette: a third of the RGBA size, the docs
    carry many of them) and close it."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    tmp = Path(path).with_suffix(".tmp.png")
    palette.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)


def _save(fig: Any, path: Path, title: str) -> None:
    fig.suptitle(title, fontsize=8, wrap=True)
    fig.tight_layout()
    save_png(fig, path, dpi=80)


# ----------------------------------------------------------------------------- captions
#
# Pure functions: measured numbers in, the caption's claim out. A claim is only made when the
# measurement beats its control by a margin.


def edge_verdict(own: float, control: float, margin: float = 0.1) -> str:
    """`own`: correlation of a map with its input's edge map; `control`: with another image's edge
    map. Returns "follows" (own beats the control by `margin` and is positive), "opposes" (own is
    below −`margin` and below the control by `margin`), or "no more than control"."""
    if own > 0 and own - control > margin:
        return "follows"
    if own < -margin and control - own > margin:
        return "opposes"
    return "no more than control"


def edge_caption(
    what: str, own: tuple[float, float], control: tuple[float, float], margin: float = 0.1
) -> str:
    """Caption sentence for `what` (e.g. "|z|") correlated with the input's edge map, for the
    (in-distribution, OOD) groups."""
    words = {
        "follows": "follows the input's own edges",
        "opposes": "is *anti*-correlated with the input's edges (large where the image is flat)",
        "no more than control": "follows the input's edges no more than another image's edges",
    }
    measured = (
        f"Measured: the correlation of {what} with the input's edge map (gradient magnitude) is {own[0]:.2f} "
        f"(in-distribution) / {own[1]:.2f} (OOD); control, the edge map of another image of the same group: "
        f"{control[0]:.2f} / {control[1]:.2f}."
    )
    v_in, v_ood = edge_verdict(own[0], control[0], margin), edge_verdict(own[1], control[1], margin)
    if v_in == v_ood:
        return f"{measured} So {what} {words[v_in]}, for in-distribution and OOD images alike."
    return f"{measured} So {what} {words[v_in]} on in-distribution images and {words[v_ood]} on OOD images."


def prediction_verdict(error: float, controls: dict[str, float], margin: float = 0.1) -> str:
    """A coupling's prediction of the pixels it transforms, `error` (mean absolute error in grey
    levels), against guesses that need no network (`controls`, same units): "better" when it beats
    the best control by a relative `margin`, "worse" when it is worse than every control, otherwise
    "no better"."""
    best = min(controls.values())
    if error < (1 - margin) * best:
        return "better"
    if error > max(controls.values()):
        return "worse"
    return "no better"


def prediction_caption(
    name: str, errors: tuple[float, float], controls: dict[str, tuple[float, float]], margin: float = 0.1
) -> tuple[str, tuple[str, str]]:
    """Caption clause for one coupling (`name`), errors and controls for (in, OOD); returns the
    clause and the two verdicts."""
    verdicts = (
        prediction_verdict(errors[0], {k: v[0] for k, v in controls.items()}, margin),
        prediction_verdict(errors[1], {k: v[1] for k, v in controls.items()}, margin),
    )
    guesses = ", ".join(f"{k} {v[0]:.0f} / {v[1]:.0f}" for k, v in controls.items())
    phrase = {
        "better": "better than every guess",
        "no better": "no better than the best guess",
        "worse": "worse than every guess",
    }
    where = (
        f"{phrase[verdicts[0]]} on in-distribution and OOD images alike"
        if verdicts[0] == verdicts[1]
        else f"{phrase[verdicts[0]]} on in-distribution images, {phrase[verdicts[1]]} on OOD images"
    )
    return (
        f"{name} misses the pixels it transforms by {errors[0]:.0f} (in) / {errors[1]:.0f} (OOD) grey levels on "
        f"average (guesses that need no network: {guesses}): {where}",
        verdicts,
    )


def coadaptation_sentence(coupling2: tuple[str, str]) -> str:
    """What coupling 2's prediction verdicts (in-distribution, OOD) say about co-adaptation (§6)."""
    caveat = "though a prediction from coupling 1's unchanged pixels would look the same: these numbers do not isolate it"
    if coupling2 == ("better", "better"):
        return (
            "Coupling 2 predicts the part it transforms from coupling 1's *output* better than both guesses, which "
            f"is consistent with co-adaptation (§6), {caveat}."
        )
    if "better" in coupling2:
        where, other = ("in-distribution", "OOD") if coupling2[0] == "better" else ("OOD", "in-distribution")
        return (
            f"Coupling 2 beats both guesses on {where} images only: consistent with co-adaptation (§6) there, "
            f"{caveat}; not on {other} images, while the paper finds both transformed alike."
        )
    return (
        "Coupling 2's predictions do not beat both guesses: this figure shows no sign of co-adaptation (§6)."
    )


def _derange(n: int) -> list[int]:
    """Another image of the same group for each image: the next one, cyclically."""
    return [(j + 1) % n for j in range(n)] if n > 1 else [0]


def _group_means(values: np.ndarray, ood: np.ndarray) -> tuple[float, float]:
    return (
        float(values[~ood].mean()) if (~ood).any() else float("nan"),
        float(values[ood].mean()) if ood.any() else float("nan"),
    )


def _own_and_control(
    maps: list[np.ndarray], edges: list[np.ndarray], ood: np.ndarray
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Mean correlation of each map with its own image's edges and, as the control, with the edges
    of another image of the same group."""
    own = np.array([_corr(m, e) for m, e in zip(maps, edges, strict=True)])
    control = np.zeros(len(maps))
    for group in (ood, ~ood):
        idx = np.flatnonzero(group)
        for j, k in zip(idx, np.array(idx)[_derange(len(idx))], strict=True):
            control[j] = _corr(maps[j], edges[k])
    return _group_means(own, ood), _group_means(control, ood)


@torch.no_grad()
def measure(model: PixelFlow, images: np.ndarray, labels: list[str]) -> dict[str, str]:
    """The captions' measurements on `images: (N, C, H, W) uint8` (labels starting with "OOD" are
    the OOD group); returns `{figure file name: caption sentence}`."""
    model = model.eval().cpu()
    batch = torch.from_numpy(np.ascontiguousarray(images))
    ood = np.array([lab.startswith("OOD") for lab in labels])
    n = len(batch)
    z = model.latent(batch)
    traces = trace_couplings(model, batch)
    edges = [edge_map(to_grid(batch[j].float())) for j in range(n)]
    notes: dict[str, str] = {}
    own, control = _own_and_control([np.abs(to_grid(z[j])) for j in range(n)], edges, ood)
    notes["latent.png"] = edge_caption("|z|", own, control)
    first = traces[0]
    t_maps = [np.abs(to_grid(first.t[j] * first.transformed[0])) for j in range(n)]
    own, control = _own_and_control(t_maps, edges, ood)
    notes["st_maps.png"] = edge_caption("|t| of the first coupling", own, control)
    x0, _ = model.logit(dequantize(batch, "midpoint"))
    # After the last coupling the representation is the latent z (factored-out parts in place).
    own, control = _own_and_control(
        [to_grid(z[j]) for j in range(n)], [to_grid(x0[j]) for j in range(n)], ood
    )
    v_in, v_ood = edge_verdict(own[0], control[0]), edge_verdict(own[1], control[1])
    kept = {"follows": "keeps", "opposes": "inverts", "no more than control": "does not keep"}
    where = (
        f"{kept[v_in]} the input's layout, for in-distribution and OOD images alike"
        if v_in == v_ood
        else f"{kept[v_in]} the input's layout for in-distribution images and {kept[v_ood]} it for OOD images"
    )
    notes["coupling_outputs.png"] = (
        f"Measured: after the last coupling (the latent z) the representation correlates with its own input "
        f"(logit space) at {own[0]:.2f} (in) / {own[1]:.2f} (OOD), with another image of the group at "
        f"{control[0]:.2f} / {control[1]:.2f}: it {where}."
    )
    spatial = [tr for tr in traces if tuple(tr.shape) == tuple(model.input_shape)]
    if model.config.architecture == "realnvp" and len(spatial) >= 2:
        alpha = model.config.alpha
        clauses, verdicts = [], []
        for k, tr in enumerate(spatial[:2]):
            predicted = logit_to_pixels(-tr.t * torch.exp(-tr.s), alpha)
            hidden = tr.transformed[0].bool()
            visible = tr.condition[0].bool()
            err, blank, mean = (np.zeros(n) for _ in range(3))
            for j in range(n):
                x = batch[j].float()
                err[j] = float((predicted[j] - x)[hidden].abs().mean())
                blank[j] = float(x[hidden].abs().mean())
                mean[j] = float((x[hidden] - x[visible].mean()).abs().mean())
            clause, v = prediction_caption(
                f"coupling {k + 1}",
                _group_means(err, ood),
                {
                    "all-black guess": _group_means(blank, ood),
                    "mean of the visible pixels": _group_means(mean, ood),
                },
            )
            clauses.append(clause)
            verdicts.append(v)
        notes_coadapt = coadaptation_sentence(verdicts[1])
        notes["coadaptation.png"] = "Measured: " + "; ".join(clauses) + ". " + notes_coadapt
    return notes


def analyze_model(
    model: PixelFlow,
    images: np.ndarray,
    labels: list[str],
    output_dir: Path,
    title: str,
    measure_on: tuple[np.ndarray, list[str]] | None = None,
) -> dict[str, tuple[int, int]]:
    """Write the figures for `images: (N, C, H, W) uint8`; returns `{file name: (rows, cols)}`.
    The captions (`notes.json`) are measured on `measure_on` (images, labels), default the same
    images."""
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
        second = (
            "coupling 2 predicts the\nnext quadrant from\ncoupling 1's output"
            if spatial[1].mask == "cycle"
            else "coupling 2 predicts the\nother half from\ncoupling 1's output"
        )
        for j in range(n):
            _panel(axes[j, 0], to_grid(batch[j].float()), "input" if j == 0 else None)
            axes[j, 0].set_ylabel(labels[j], fontsize=7)
            for k, tr in enumerate(spatial[:2]):
                predicted = -tr.t[j] * torch.exp(-tr.s[j])  # the input value the coupling maps to 0
                # The entries a coupling transforms are still logit(pixels) when it runs (coupling 2
                # transforms what coupling 1 did not), so the prediction maps back to pixels.
                visible = batch[j].float() * (1 - tr.transformed[0])
                pixels = visible + logit_to_pixels(predicted, alpha) * tr.transformed[0]
                head = "coupling 1 predicts\nthe pixels it transforms" if k == 0 else second
                _panel(axes[j, k + 1], to_grid(pixels), head if j == 0 else None)
                mask = to_grid(tr.transformed[0])
                axes[j, k + 1].contour(mask, levels=[0.5], colors="r", linewidths=0.6)
        _save(
            fig,
            output_dir / "coadaptation.png",
            f"{title}: predicted pixels −t·exp(−s) (inside the red line)",
        )
        grids["coadaptation.png"] = (n, 3)
    m_images, m_labels = measure_on if measure_on is not None else (images, labels)
    notes = measure(model, m_images, m_labels)
    notes["_measured_on"] = (
        f"{sum(not lab.startswith('OOD') for lab in m_labels)} in-distribution and "
        f"{sum(lab.startswith('OOD') for lab in m_labels)} OOD images"
    )
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


def _images(
    shape: tuple[int, int, int], in_distribution: str, ood: str, count: int, seed: int
) -> tuple[np.ndarray, list[str]]:
    idd = load_dataset(in_distribution, shape=shape, limit=count, seed=seed)
    oods = load_dataset(ood, shape=shape, limit=count, seed=seed)
    labels = [f"in {i + 1}" for i in range(len(idd))] + [f"OOD {i + 1}" for i in range(len(oods))]
    return np.concatenate([idd.images, oods.images]), labels


def analyze(
    model_path: Path,
    output_dir: Path,
    *,
    in_distribution: str = "fashion-mnist:test",
    ood: str = "mnist",
    count: int = 3,
    measure_count: int = 64,
    seed: int = 0,
    markdown: Path | None = None,
    title: str | None = None,
) -> dict[str, tuple[int, int]]:
    """Figures for `count` in-distribution and `count` OOD images, captions measured on
    `measure_count` of each; writes `analysis.md` (or `markdown`) describing them. Returns
    `{file name: (rows, cols)}`."""
    model = load_pixel_flow(Path(model_path))
    images, labels = _images(model.input_shape, in_distribution, ood, count, seed)
    measured = _images(model.input_shape, in_distribution, ood, max(count, measure_count), seed)
    name = title or f"{model.config.architecture} ({model.config.mask} mask)"
    output_dir = Path(output_dir)
    grids = analyze_model(model, images, labels, output_dir, name, measured)
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
    measure_count: int = 64,
    seed: int = 0,
    command: str = "oodflow analyze",
) -> dict[str, dict[str, tuple[int, int]]]:
    """`analyze` for several models (`{title: run or artifact folder}`) into one Markdown page;
    figures go to `<figures_root>/<folder name>/`."""
    done: dict[str, tuple[Path, dict[str, tuple[int, int]]]] = {}
    for title, path in models.items():
        model = load_pixel_flow(Path(path))
        images, labels = _images(model.input_shape, in_distribution, ood, count, seed)
        measured = _images(model.input_shape, in_distribution, ood, max(count, measure_count), seed)
        folder = Path(figures_root) / Path(path).name
        done[title] = (folder, analyze_model(model, images, labels, folder, title, measured))
    markdown = Path(markdown)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(analysis_markdown(done, markdown.parent, in_distribution, ood, command))
    return {title: grids for title, (_, grids) in done.items()}


# What each figure shows (no claim) and the paper's claim it illustrates; the measured caption
# (`notes.json`) says whether these numbers support it.
SENTENCES = {
    "latent.png": "Inputs (top) and their latents z laid out on the image grid (bottom). The paper's claim (§5): "
    "the input's edges stay visible in z, i.e. the flow maps images to latents locally rather than by what they "
    "show.",
    "st_maps.png": "The log-scale s (odd rows) and shift t (even rows) of every coupling layer on the entries it "
    "transforms (blue negative, red positive). The paper's claim (§6): s and t follow the object's outline, the "
    "st-networks acting as local pixel predictors for in-distribution and OOD images alike.",
    "coupling_outputs.png": "The representation after each coupling layer (squeezed scales un-squeezed onto the "
    "image grid). The paper's claim (§6): the picture's structure survives the couplings whatever the image shows.",
    "coadaptation.png": "What the first two coupling layers predict for the pixels they transform, −t·exp(−s) "
    "(the input value the layer maps to 0), drawn inside the red line. The paper's claim (§6): with checkerboard "
    "masks a coupling predicts masked pixels from their neighbours, and consecutive couplings co-adapt (the second "
    "reads back what the first encoded in its output).",
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
        f"Figures: three `{in_distribution}` (in-distribution, 'in') and three `{ood}` (OOD) images, through flows "
        f"trained on Fashion-MNIST. Generated by `{command}`; do not edit by hand. Section numbers refer to "
        "Kirichenko, Izmailov & Wilson, *Why Normalizing Flows Fail to Detect Out-of-Distribution Data* (NeurIPS "
        "2020): §5 latent spaces, §6 transformations learned by coupling layers (co-adaptation), §7 masks.",
        "",
        "Each caption says what the figure shows and what the paper claims; the *Measured* sentence is computed on "
        "more images than the figure shows, against a control (a shuffled-edge control: the edge map of another "
        "image of the same group; an all-black and a mean-of-visible-pixels guess), and claims only what those numbers show (`training/analyze.py`: "
        "`edge_verdict`, `prediction_verdict`).",
        "",
    ]
    for name, (folder, grids) in models.items():
        notes_path = Path(folder) / "notes.json"
        notes = json.loads(notes_path.read_text()) if notes_path.is_file() else {}
        lines += [f"## {name}", ""]
        if "_measured_on" in notes:
            lines += [f"Measurements on {notes['_measured_on']}.", ""]
        for fig, (rows, cols) in grids.items():
            rel = Path(os.path.relpath(Path(folder) / fig, doc_dir)).as_posix()
            note = f" {notes[fig]}" if fig in notes else ""
            lines += [
                f"![{fig}]({rel})",
                "",
                f"*{fig}* ({rows} × {cols}): {SENTENCES.get(fig, '')}{note}",
                "",
            ]
    return "\n".join(lines)
