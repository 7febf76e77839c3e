"""`oodflow reproduce`: the paper's Section 7–8 comparison as one command.

Kirichenko, Izmailov & Wilson, "Why Normalizing Flows Fail to Detect Out-of-Distribution Data"
(NeurIPS 2020), on Fashion-MNIST (in-distribution) vs MNIST (OOD):

- RealNVP with checkerboard, horizontal and cycle (quadrant) coupling masks (§7);
- RealNVP whose st-networks are squeezed through a bottleneck of several `latent_dim` (§8);
- Glow;
- each scored by likelihood, typicality (Nalisnick et al. 2019), input complexity (Serrà et al.
  2020) and likelihood ratio (Ren et al. 2019, a background flow of the same architecture per
  variant, trained on perturbed images);
- the embedding flow (a flow on EfficientNet-Lite0 features), alone and combined with a pixel flow.

It writes one Markdown file (a table: bits/dim on Fashion-MNIST test and on MNIST, AUROC,
FPR@95%TPR, training time; then histograms and what reproduces the paper and what does not).
Profiles: `tiny` (CI, seconds), `cpu` (under an hour on a 2-core CPU), `gpu` (to convergence).
Finished trainings are reused, so a re-run only re-scores and rewrites the report.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.config import EmbeddingFlowConfig, PixelFlowConfig  # noqa: E402
from models.flows import EmbeddingFlow, PixelFlow  # noqa: E402
from models.scores import OOD_STATISTICS, bits_per_dim, png_bits_per_dim  # noqa: E402
from training.background import background_dir, load_background, train_background  # noqa: E402
from training.config import PRESETS, CalibrationConfig, DataConfig, RunConfig, TrainConfig  # noqa: E402
from training.ensemble import combine_members  # noqa: E402
from training.evaluate import ood_metrics  # noqa: E402
from training.runs import Run, Splits, load_splits  # noqa: E402
from training.scoring import log_likelihoods  # noqa: E402
from training.statistics import StatisticInputs, score_statistic  # noqa: E402
from training.train import train  # noqa: E402

__all__ = ["PROFILES", "Budget", "Profile", "Variant", "reproduce"]

Budget = Literal["tiny", "cpu", "gpu"]

DEFAULT_PIXEL_STATISTIC = PRESETS["fmnist-pixel"].calibration.statistic

STATISTIC_LABELS = {
    "nll": "likelihood",
    "typicality": "typicality",
    "complexity": "input complexity",
    "likelihood_ratio": "likelihood ratio",
}


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    model: PixelFlowConfig


@dataclass(frozen=True)
class Profile:
    name: Budget
    description: str
    data: DataConfig
    train: TrainConfig
    variants: tuple[Variant, ...]
    background_steps: int
    embedding: EmbeddingFlowConfig
    embedding_train: TrainConfig
    embedding_train_limit: int | None
    minutes_per_flow: float | None = None  # cap per pixel flow (the background gets half)
    embedding_minutes: float | None = None
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    perturbation_rate: float = 0.2
    extra: dict[str, Any] = field(default_factory=dict)


def _variants(
    base: PixelFlowConfig, glow: PixelFlowConfig, latent_dims: tuple[int, ...]
) -> tuple[Variant, ...]:
    cycle_couplings = 4 * max(1, base.couplings_per_scale // 4)  # whole cycles over the four quadrants
    out = [
        Variant("realnvp-checkerboard", "RealNVP, checkerboard mask", base),
        Variant(
            "realnvp-horizontal", "RealNVP, horizontal mask", base.model_copy(update={"mask": "horizontal"})
        ),
        Variant(
            "realnvp-cycle",
            "RealNVP, cycle mask",
            base.model_copy(
                update={
                    "mask": "cycle",
                    "couplings_per_scale": cycle_couplings,
                    "final_couplings": max(4, base.final_couplings),
                }
            ),
        ),
    ]
    for d in latent_dims:
        out.append(
            Variant(
                f"realnvp-bottleneck-{d}",
                f"RealNVP, checkerboard, st-net bottleneck latent_dim={d}",
                base.model_copy(update={"st_net": "bottleneck", "latent_dim": d}),
            )
        )
    out.append(Variant("glow", "Glow", glow))
    return tuple(out)


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        description="CI smoke profile: a few steps on a few hundred images; numbers mean nothing",
        data=DataConfig(train_limit=96, calibration_size=64, test_limit=64, ood_limit=64),
        train=TrainConfig(
            batch_size=16,
            lr=2e-3,
            max_steps=4,
            warmup_steps=1,
            log_every=2,
            checkpoint_every=4,
            validation_size=32,
        ),
        variants=_variants(
            PixelFlowConfig(
                width=4, depth=0, num_scales=2, couplings_per_scale=2, channel_couplings=1, final_couplings=2
            ),
            PixelFlowConfig(architecture="glow", width=4, depth=0, num_scales=2, steps_per_level=1),
            (4,),
        ),
        background_steps=2,
        embedding=EmbeddingFlowConfig(resolution=32, projection_dim=8, hidden=16, num_couplings=2),
        embedding_train=TrainConfig(
            batch_size=32,
            lr=1e-3,
            max_steps=4,
            warmup_steps=0,
            schedule="constant",
            eval_every=2,
            log_every=2,
            checkpoint_every=4,
            validation_size=32,
        ),
        embedding_train_limit=128,
        threads=1,
    ),
    "cpu": Profile(
        name="cpu",
        description="small flows, ~800 steps each, on a 2-core CPU in under an hour",
        data=DataConfig(train_limit=20000, calibration_size=2000, test_limit=2000, ood_limit=2000),
        train=TrainConfig(
            batch_size=64, lr=2e-3, max_steps=800, warmup_steps=50, checkpoint_every=200, validation_size=1000
        ),
        variants=_variants(
            PixelFlowConfig(
                width=16, depth=1, num_scales=2, couplings_per_scale=3, channel_couplings=2, final_couplings=3
            ),
            PixelFlowConfig(architecture="glow", width=32, depth=1, num_scales=2, steps_per_level=4),
            (8, 64),
        ),
        background_steps=400,
        embedding=EmbeddingFlowConfig(projection_dim=128, hidden=256, depth=1, num_couplings=4),
        embedding_train=TrainConfig(
            batch_size=256,
            lr=1e-4,
            weight_decay=1e-4,
            max_steps=600,
            warmup_steps=0,
            schedule="constant",
            eval_every=100,
            validation_size=1000,
            checkpoint_every=300,
        ),
        embedding_train_limit=8000,
        minutes_per_flow=4.0,
        embedding_minutes=3.0,
        # Measured on a 2-core machine shared with other jobs: one intra-op thread trains these
        # small flows 5x faster than two (no oversubscription).
        threads=1,
    ),
    "gpu": Profile(
        name="gpu",
        description="paper-sized training to convergence (hours on one GPU)",
        data=DataConfig(calibration_size=5000),
        train=TrainConfig(batch_size=64, lr=1e-3, max_steps=30000, warmup_steps=500, checkpoint_every=1000),
        variants=_variants(
            PixelFlowConfig(width=64, depth=4, num_scales=3, couplings_per_scale=3, final_couplings=4),
            PixelFlowConfig(architecture="glow", width=256, depth=1, num_scales=3, steps_per_level=16),
            (10, 50, 100),
        ),
        background_steps=30000,
        embedding=EmbeddingFlowConfig(projection_dim=256, hidden=512, depth=2, num_couplings=8),
        embedding_train=TrainConfig(
            batch_size=256,
            lr=1e-4,
            weight_decay=1e-4,
            max_steps=5000,
            warmup_steps=0,
            schedule="constant",
            eval_every=250,
            validation_size=2000,
        ),
        embedding_train_limit=None,
    ),
}


# ----------------------------------------------------------------------------- training


def _timed_train(
    config: RunConfig, run_dir: Path, splits: Splits, device: str, minutes: float | None, progress: bool
) -> float:
    """Train unless finished before; returns the training seconds (kept in `timing.json`)."""
    timing = run_dir / "timing.json"
    if timing.is_file() and (run_dir / "model.safetensors").is_file():
        return float(json.loads(timing.read_text())["seconds"])
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    if resume and (run_dir / "config.json").is_file() and Run(run_dir).config != config:
        raise ValueError(f"{run_dir} holds a run of another config; remove it or use another --runs-dir")
    start = time.monotonic()
    train(
        config, run_dir, resume=resume, max_minutes=minutes, device=device, progress=progress, splits=splits
    )
    seconds = time.monotonic() - start
    timing.write_text(json.dumps({"seconds": round(seconds, 1)}) + "\n")
    return seconds


def _background_train(run: Run, splits: Splits, device: str, minutes: float | None, progress: bool) -> float:
    folder = background_dir(run)
    timing = folder / "timing.json"
    if timing.is_file() and (folder / "model.safetensors").is_file():
        return float(json.loads(timing.read_text())["seconds"])
    start = time.monotonic()
    train_background(run, splits, device=device, max_minutes=minutes, progress=progress)
    seconds = time.monotonic() - start
    timing.write_text(json.dumps({"seconds": round(seconds, 1)}) + "\n")
    return seconds


# ----------------------------------------------------------------------------- scoring


@dataclass
class _Scored:
    """One model's rows of the table and the per-split scores behind them."""

    name: str
    label: str
    kind: str
    parameters: int
    seconds: dict[str, float]  # statistic -> training seconds
    bits_per_dim: dict[str, float]  # split -> mean bits/dim
    rows: dict[str, dict[str, float]]  # statistic -> metrics
    scores: dict[str, dict[str, np.ndarray]]  # statistic -> split -> scores
    steps: int = 0


def _score_all(
    model: PixelFlow | EmbeddingFlow,
    background: PixelFlow | None,
    splits: Splits,
    statistics: tuple[str, ...],
    png: dict[str, np.ndarray],
    cache: Path | None,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    assert splits.test is not None
    sets = {"validation": splits.validation, "calibration": splits.calibration, "test": splits.test}
    sets.update({f"ood-{k}": v for k, v in splits.ood.items()})
    inputs: dict[str, StatisticInputs] = {}
    for key, dataset in sets.items():
        ll = log_likelihoods(model, dataset, cache_dir=cache, key=key)
        bg = log_likelihoods(background, dataset) if background is not None and key != "validation" else None
        inputs[key] = StatisticInputs(ll, bg, png.get(key))
    num_dims = model.num_dims
    reference = float(np.mean(bits_per_dim(inputs["validation"].log_likelihood, num_dims)))
    scores: dict[str, dict[str, np.ndarray]] = {}
    for statistic in statistics:
        scores[statistic] = {
            key: score_statistic(statistic, inp, num_dims=num_dims, reference_bits_per_dim=reference)  # type: ignore[arg-type]
            for key, inp in inputs.items()
            if key != "validation"
        }
    bpd = {key: float(np.mean(bits_per_dim(inp.log_likelihood, num_dims))) for key, inp in inputs.items()}
    return scores, bpd


def _metrics(scores: dict[str, np.ndarray], ood: str) -> dict[str, float]:
    return ood_metrics(scores["test"], scores[f"ood-{ood}"])


def _histograms(path: Path, title: str, scored: _Scored, ood: str) -> None:
    stats = list(scored.scores)
    fig, axes = plt.subplots(1, len(stats), figsize=(3.6 * len(stats), 3.0), squeeze=False)
    for ax, statistic in zip(axes[0], stats, strict=True):
        s = scored.scores[statistic]
        series = {"Fashion-MNIST test": s["test"], f"{ood.upper()} (OOD)": s[f"ood-{ood}"]}
        finite = np.concatenate([v[np.isfinite(v)] for v in series.values()])
        lo, hi = np.percentile(finite, [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 50)
        for label, values in series.items():
            ax.hist(np.clip(values, lo, hi), bins=bins, alpha=0.55, density=True, label=label)
        ax.set_title(
            f"{STATISTIC_LABELS.get(statistic, statistic)}: AUROC {scored.rows[statistic]['auroc']:.3f}"
        )
        ax.set_xlabel("ood_score (higher = more OOD)")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- report


def _total_training(results: list[_Scored]) -> float:
    """Every flow once: main flows, their background flows and the embedding flow."""
    total = 0.0
    for r in results:
        total += r.seconds.get("likelihood_ratio", r.seconds.get("nll", 0.0))
    return total


def _fmt_time(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _findings(results: list[_Scored], ood: str) -> list[str]:
    """What reproduces the paper and what does not, decided from the measured numbers."""
    by = {r.name: r for r in results}
    lines: list[str] = []

    def auroc(name: str, statistic: str = "nll") -> float:
        return by[name].rows[statistic]["auroc"]

    pixel = [r for r in results if r.kind == "pixel"]
    # The bottleneck is the paper's remedy, so the failure itself is judged on the flows without one.
    plain = [r for r in pixel if not r.name.startswith("realnvp-bottleneck-")]
    fails = [r for r in plain if r.bits_per_dim[f"ood-{ood}"] < r.bits_per_dim["test"]]
    verdict = (
        "**Reproduced**"
        if plain and len(fails) == len(plain)
        else ("**Partly reproduced**" if fails else "**Not reproduced**")
    )
    lines.append(
        f"- {verdict}: the likelihood failure (§1, Nalisnick et al.). {len(fails)} of {len(plain)} pixel flows "
        "without an st-network bottleneck give MNIST *lower* bits/dim than Fashion-MNIST test, so their likelihood "
        f"AUROC is far below 0.5 ({', '.join(f'{r.name} {auroc(r.name):.3f}' for r in plain)}). The paper's Glow: "
        "3.14 bits/dim test vs 2.08 on MNIST."
    )
    if {"realnvp-checkerboard", "realnvp-horizontal", "realnvp-cycle"} <= by.keys():
        base = auroc("realnvp-checkerboard")
        better = [n for n in ("realnvp-horizontal", "realnvp-cycle") if auroc(n) > base + 0.02]
        word = (
            "**Reproduced**"
            if len(better) == 2
            else ("**Partly reproduced**" if better else "**Not reproduced**")
        )
        lines.append(
            f"- {word}: masks that take away the local-neighbour shortcut (§7) improve likelihood OOD ranking: "
            f"checkerboard {base:.3f}, horizontal {auroc('realnvp-horizontal'):.3f}, cycle {auroc('realnvp-cycle'):.3f} "
            "AUROC. The paper reports that these masks reduce coupling-layer co-adaptation and improve OOD ranking; "
            + (
                "at this budget every mask variant still ranks MNIST as more in-distribution than Fashion-MNIST."
                if max(auroc("realnvp-horizontal"), auroc("realnvp-cycle")) < 0.5
                else "here at least one mask variant ranks MNIST as OOD."
            )
        )
    bottlenecks = sorted(
        (r for r in pixel if r.name.startswith("realnvp-bottleneck-")),
        key=lambda r: int(r.name.rsplit("-", 1)[1]),
    )
    if bottlenecks and "realnvp-checkerboard" in by:
        seq = ", ".join(f"latent_dim {r.name.rsplit('-', 1)[1]}: {auroc(r.name):.3f}" for r in bottlenecks)
        best = max(auroc(r.name) for r in bottlenecks)
        word = "**Reproduced**" if best > auroc("realnvp-checkerboard") + 0.02 else "**Not reproduced**"
        lines.append(
            f"- {word}: an st-network bottleneck (§8) improves likelihood AUROC over the unrestricted checkerboard "
            f"RealNVP ({auroc('realnvp-checkerboard'):.3f}): {seq}. Bits/dim on Fashion-MNIST test "
            f"(here {', '.join(format(r.bits_per_dim['test'], '.2f') for r in bottlenecks)} vs "
            f"{by['realnvp-checkerboard'].bits_per_dim['test']:.2f} on Fashion-MNIST test). At this budget the "
            "bottleneck flows are also further from convergence, so part of the gain may come from modelling less "
            "local structure at all, which is the mechanism the paper proposes, but not a controlled comparison."
        )
    if "glow" in by:
        g = by["glow"]
        lines.append(
            f"- {'**Reproduced**' if g.bits_per_dim[f'ood-{ood}'] < g.bits_per_dim['test'] else '**Not reproduced**'}: "
            f"Glow fails like RealNVP: {g.bits_per_dim['test']:.2f} bits/dim on Fashion-MNIST test vs "
            f"{g.bits_per_dim[f'ood-{ood}']:.2f} on MNIST (paper: 3.14 vs 2.08 with 69M parameters and 80 epochs; "
            f"ours has {g.parameters / 1e6:.2f}M parameters and {g.steps} steps, so absolute bits/dim are higher)."
        )
    emb = [r for r in results if r.kind == "embedding"]
    if emb and pixel:
        best_pixel_nll = max(auroc(r.name) for r in pixel)
        e = emb[0]
        lines.append(
            f"- {'**Reproduced**' if auroc(e.name) > best_pixel_nll + 0.05 else '**Not reproduced**'}: a flow on "
            f"semantic embeddings detects the OOD set far better than any pixel flow's likelihood "
            f"(AUROC {auroc(e.name):.3f} vs at best {best_pixel_nll:.3f})."
        )
    if pixel:
        failing = [r for r in pixel if r.rows["nll"]["auroc"] < 0.5]
        lines.append(
            f"- Beyond the paper: scores that correct raw likelihood, on the {len(failing)} pixel flows whose "
            "likelihood fails (AUROC < 0.5):"
        )
        for statistic, ref in (
            ("typicality", "Nalisnick et al. 2019"),
            ("complexity", "Serrà et al. 2020"),
            ("likelihood_ratio", "Ren et al. 2019"),
        ):
            if not failing or statistic not in failing[0].rows:
                continue
            values = [r.rows[statistic]["auroc"] for r in failing]
            fixed = sum(v > 0.5 for v in values)
            lines.append(
                f"  - {STATISTIC_LABELS[statistic]} ({ref}): AUROC above 0.5 on {fixed} of {len(failing)} "
                f"(mean {np.mean(values):.3f}, best {max(values):.3f}, worst {min(values):.3f})."
            )
        if "realnvp-checkerboard" in by:
            rows = by["realnvp-checkerboard"].rows
            ranked = sorted(rows, key=lambda k: rows[k]["auroc"], reverse=True)
            lines.append(
                "- The default `fmnist-pixel` model is a checkerboard RealNVP; on that variant the statistics rank "
                + ", ".join(f"{STATISTIC_LABELS[k]} {rows[k]['auroc']:.3f}" for k in ranked)
                + f" (AUROC). `fmnist-pixel` ships `{DEFAULT_PIXEL_STATISTIC}`."
            )
    return lines


def _table(results: list[_Scored], ood: str, extra_rows: list[str]) -> list[str]:
    lines = [
        f"| model | score | parameters | bits/dim FMNIST test | bits/dim {ood.upper()} | AUROC | FPR@95%TPR | training time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for statistic, row in r.rows.items():
            bpd_unit = "" if r.kind == "pixel" else " (per feature)"
            lines.append(
                f"| {r.label} | {STATISTIC_LABELS[statistic]} | {r.parameters:,} | "
                f"{r.bits_per_dim['test']:.3f}{bpd_unit} | {r.bits_per_dim[f'ood-{ood}']:.3f}{bpd_unit} | "
                f"{row['auroc']:.3f} | {row['fpr_at_95_tpr']:.3f} | {_fmt_time(r.seconds[statistic])} |"
            )
    return lines + extra_rows


def _markdown(
    profile: Profile,
    results: list[_Scored],
    ensembles: list[str],
    ood: str,
    figures: dict[str, str],
    elapsed: float,
    data_sizes: dict[str, int],
    command: str,
) -> str:
    lines = [
        "# Reproducing Kirichenko et al. 2020, Sections 7–8",
        "",
        "*Why Normalizing Flows Fail to Detect Out-of-Distribution Data* (NeurIPS 2020): Fashion-MNIST is the "
        f"in-distribution data, {ood.upper()} the OOD set. Generated by `{command}`; do not edit by hand.",
        "",
        f"- profile **{profile.name}**: {profile.description}; training time of all flows "
        f"{_fmt_time(_total_training(results))}, wall time of the last invocation {_fmt_time(elapsed)} "
        "(finished trainings are reused), "
        f"{torch.get_num_threads()} CPU thread(s)" + (" / CUDA" if torch.cuda.is_available() else ""),
        f"- data: {data_sizes['train']} Fashion-MNIST training images (pixel flows), {data_sizes['calibration']} held-out "
        f"calibration images (typicality centre from {data_sizes['validation']} validation images), "
        f"{data_sizes['test']} Fashion-MNIST test images, {data_sizes['ood']} MNIST digits (a seeded random sample)",
        f"- pixel flows: {profile.train.max_steps} steps of batch {profile.train.batch_size}"
        + (f", capped at {profile.minutes_per_flow:g} min each" if profile.minutes_per_flow else "")
        + f"; each likelihood-ratio background flow: same architecture, {profile.background_steps} steps on "
        f"images with each pixel replaced by noise with rate μ={profile.perturbation_rate}",
        "- scores (higher = more OOD): *likelihood* = bits/dim; *typicality* = |bits/dim − mean validation bits/dim|; "
        "*input complexity* = bits/dim − PNG bits/dim (level 9); *likelihood ratio* = bits/dim − background bits/dim",
        "- metrics: OpenOOD convention, OOD is the positive class; the training time of a likelihood-ratio row "
        "includes its background flow",
        "",
        "## Results",
        "",
        *_table(results, ood, ensembles),
        "",
        "## What reproduces the paper and what does not",
        "",
        *_findings(results, ood),
        "",
        "The paper trains to convergence (its Glow: 69M parameters, 80 epochs); the CPU profile trains small flows "
        "for minutes, so absolute bits/dim are far from the paper's and differences of a few AUROC points between "
        "variants are within run-to-run noise. `--budget gpu` trains to convergence. Figures of the flows' internals "
        "(latents, s and t maps, coupling outputs, co-adaptation) are in [analysis.md](analysis.md).",
        "",
        "## Histograms",
        "",
    ]
    for name, rel in figures.items():
        lines += [f"### {name}", "", f"![{name}]({rel})", ""]
    return "\n".join(lines)


def _pixel_variant(
    variant: Variant,
    base: RunConfig,
    splits: Splits,
    png: dict[str, np.ndarray],
    run_dir: Path,
    device: str,
    minutes: float | None,
    progress: bool,
    ood: str,
    log: Callable[[str], None],
) -> _Scored:
    config = base.model_copy(
        update={"name": f"reproduce-{variant.name}", "description": variant.label, "model": variant.model}
    )
    log(f"{variant.name}: training")
    seconds = _timed_train(config, run_dir, splits, device, minutes, progress)
    run = Run(run_dir)
    log(f"{variant.name}: background flow")
    bg_seconds = _background_train(run, splits, device, None if minutes is None else minutes / 2, progress)
    model = run.load_model(_dev(device))
    assert isinstance(model, PixelFlow)
    background = load_background(run, next(model.parameters()).device)
    log(f"{variant.name}: scoring")
    scores, bpd = _score_all(model, background, splits, OOD_STATISTICS, png, None)
    summary = run.read_json("train_summary.json")
    return _Scored(
        name=variant.name,
        label=variant.label,
        kind="pixel",
        parameters=int(summary["parameters"]),
        seconds={s: seconds + (bg_seconds if s == "likelihood_ratio" else 0.0) for s in OOD_STATISTICS},
        bits_per_dim=bpd,
        rows={s: _metrics(v, ood) for s, v in scores.items()},
        scores=scores,
        steps=int(summary["steps"]),
    )


# ----------------------------------------------------------------------------- the command


def reproduce(
    budget: Budget = "cpu",
    *,
    output: Path = Path("docs/reproduction.md"),
    figures_dir: Path | None = None,
    runs_dir: Path | None = None,
    device: str = "auto",
    progress: bool = True,
    variants: list[str] | None = None,
    with_embedding: bool = True,
    analysis: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train (or reuse), score and report every variant of the profile; returns the results.

    With `analysis`, also regenerates `analysis.md` beside `output` (figures of the checkerboard and
    horizontal RealNVP's internals, `training.analyze`)."""
    profile = PROFILES[budget]
    threads = torch.get_num_threads()
    if profile.threads is not None and device != "cuda":
        torch.set_num_threads(profile.threads)
    try:
        return _reproduce(
            profile, output, figures_dir, runs_dir, device, progress, variants, with_embedding, analysis, log
        )
    finally:
        torch.set_num_threads(threads)


def _reproduce(
    profile: Profile,
    output: Path,
    figures_dir: Path | None,
    runs_dir: Path | None,
    device: str,
    progress: bool,
    variants: list[str] | None,
    with_embedding: bool,
    analysis: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    budget = profile.name
    start = time.monotonic()
    output = Path(output)
    figures_dir = Path(figures_dir) if figures_dir else output.parent / "figures" / "reproduction"
    runs_dir = Path(runs_dir) if runs_dir else Path("runs") / f"reproduce-{budget}"
    figures_dir.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    ood = profile.data.ood_sets[0]
    chosen = [v for v in profile.variants if variants is None or v.name in variants]
    if variants is not None and len(chosen) != len(variants):
        known = ", ".join(v.name for v in profile.variants)
        raise ValueError(f"unknown variant(s) in {variants}; this profile has {known}")

    calibration = CalibrationConfig(statistic="likelihood_ratio")
    calibration = calibration.model_copy(
        update={
            "background": calibration.background.model_copy(
                update={"perturbation_rate": profile.perturbation_rate, "max_steps": profile.background_steps}
            )
        }
    )
    base = RunConfig(
        name="reproduce",
        model=chosen[0].model if chosen else profile.variants[0].model,
        data=profile.data,
        train=profile.train,
        calibration=calibration,
    )
    splits = load_splits(base)
    assert splits.test is not None
    png = {
        key: png_bits_per_dim(d.images)
        for key, d in {
            "calibration": splits.calibration,
            "test": splits.test,
            f"ood-{ood}": splits.ood[ood],
        }.items()
    }
    results: list[_Scored] = []
    failures: list[str] = []
    figures: dict[str, str] = {}
    rel_root = Path(os.path.relpath(figures_dir, output.parent))
    cpu_minutes = (
        None
        if device == "cuda" or (device == "auto" and torch.cuda.is_available())
        else profile.minutes_per_flow
    )
    for i, variant in enumerate(chosen, 1):
        try:
            scored = _pixel_variant(
                variant,
                base,
                splits,
                png,
                runs_dir / variant.name,
                device,
                cpu_minutes,
                progress,
                ood,
                log=lambda m, i=i: log(f"[{i}/{len(chosen)}] {m}"),
            )
        except (FloatingPointError, RuntimeError, ValueError) as exc:
            # One diverging variant must not cost the hour spent on the others.
            log(f"[{i}/{len(chosen)}] {variant.name}: FAILED ({type(exc).__name__}: {exc})")
            failures.append(f"{variant.label}: {type(exc).__name__}: {exc}")
            continue
        results.append(scored)
        fig = figures_dir / f"{variant.name}.png"
        _histograms(fig, f"{variant.label}: Fashion-MNIST (in) vs {ood.upper()}", scored, ood)
        figures[variant.label] = (rel_root / fig.name).as_posix()
    ensemble_rows: list[str] = []
    if with_embedding:
        log("embedding flow: features and training")
        emb_config = RunConfig(
            name="reproduce-embedding",
            description="flow on EfficientNet-Lite0 features",
            model=profile.embedding,
            data=profile.data.model_copy(update={"train_limit": profile.embedding_train_limit}),
            train=profile.embedding_train,
        )
        emb_splits = load_splits(emb_config)
        emb_dir = runs_dir / "embedding"
        seconds = _timed_train(
            emb_config,
            emb_dir,
            emb_splits,
            device,
            None if cpu_minutes is None else profile.embedding_minutes,
            progress,
        )
        emb_model = Run(emb_dir).load_model(_dev(device))
        emb_scores, emb_bpd = _score_all(emb_model, None, emb_splits, ("nll",), {}, emb_dir / "features")
        summary = Run(emb_dir).read_json("train_summary.json")
        emb = _Scored(
            name="embedding",
            label="Embedding flow (EfficientNet-Lite0 features)",
            kind="embedding",
            parameters=int(summary["parameters"]),
            seconds={"nll": seconds},
            bits_per_dim=emb_bpd,
            rows={"nll": _metrics(emb_scores["nll"], ood)},
            scores=emb_scores,
            steps=int(summary["steps"]),
        )
        results.append(emb)
        fig = figures_dir / "embedding.png"
        _histograms(fig, f"Embedding flow: Fashion-MNIST (in) vs {ood.upper()}", emb, ood)
        figures[emb.label] = (rel_root / fig.name).as_posix()
        same_images = emb_splits.calibration.fingerprint() == splits.calibration.fingerprint()
        pixel = [r for r in results if r.kind == "pixel"]
        if pixel and same_images:
            # Combine the embedding flow with the pixel flow the default models use (checkerboard RealNVP)
            # scored by the default statistic, as `build-defaults` does (issue 6 §2).
            partner = next((r for r in pixel if r.name == "realnvp-checkerboard"), pixel[0])
            statistic = DEFAULT_PIXEL_STATISTIC
            for rule in ("fisher", "min_p"):
                comb = combine_members(
                    [partner.scores[statistic]["calibration"], emb.scores["nll"]["calibration"]],
                    {k: [partner.scores[statistic][k], emb.scores["nll"][k]] for k in ("test", f"ood-{ood}")},
                    rule,  # type: ignore[arg-type]
                )
                m = ood_metrics(comb.splits["test"], comb.splits[f"ood-{ood}"])
                ensemble_rows.append(
                    f"| combined ({rule}): embedding + {partner.label} | p-values of embedding likelihood "
                    f"(alone {emb.rows['nll']['auroc']:.3f}) and {STATISTIC_LABELS[statistic]} (alone "
                    f"{partner.rows[statistic]['auroc']:.3f}) | {emb.parameters + partner.parameters:,} | | | "
                    f"{m['auroc']:.3f} | "
                    f"{m['fpr_at_95_tpr']:.3f} | {_fmt_time(emb.seconds['nll'] + partner.seconds[statistic])} |"
                )
    if analysis:
        from training.analyze import analyze_many

        chosen_names = {r.name: r.label for r in results}
        targets = {
            chosen_names[n]: runs_dir / n
            for n in ("realnvp-checkerboard", "realnvp-horizontal")
            if n in chosen_names
        }
        if targets:
            log("analysis figures")
            analyze_many(
                targets,
                output.parent / "figures" / "analysis",
                output.parent / "analysis.md",
                command=f"oodflow reproduce --budget {budget}",
            )
    elapsed = time.monotonic() - start
    sizes = {
        "train": len(splits.train),
        "validation": len(splits.validation),
        "calibration": len(splits.calibration),
        "test": len(splits.test),
        "ood": len(splits.ood[ood]),
    }
    command = f"oodflow reproduce --budget {budget}"
    output.parent.mkdir(parents=True, exist_ok=True)
    text = _markdown(profile, results, ensemble_rows, ood, figures, elapsed, sizes, command)
    if failures:
        text += "\n## Variants that failed\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
    output.write_text(text)
    payload = {
        "profile": budget,
        "seconds": round(elapsed, 1),
        "results": [
            {
                "name": r.name,
                "label": r.label,
                "kind": r.kind,
                "parameters": r.parameters,
                "steps": r.steps,
                "bits_per_dim": r.bits_per_dim,
                "training_seconds": r.seconds,
                "metrics": r.rows,
            }
            for r in results
        ],
        "ensembles": ensemble_rows,
        "failures": failures,
    }
    (runs_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    log(f"wrote {output} ({_fmt_time(elapsed)})")
    return payload


def _dev(device: str) -> torch.device:
    from training.runs import resolve_device

    return resolve_device(device)
