"""`oodflow evaluate`: OOD metrics against one or more OOD sets, and a report a person can read.

Metrics follow OpenOOD's convention: OOD is the positive class for AUROC, AUPR-Out and
FPR@95%TPR (the fraction of in-distribution images flagged when 95% of OOD images are);
AUPR-In treats in-distribution as positive.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve  # noqa: E402

from models.flows import EmbeddingFlow  # noqa: E402
from models.scores import bits_per_dim  # noqa: E402
from training.calibrate import (  # noqa: E402
    CalibrationRecord,
    compute_scores,
    load_background_for,
    read_calibration,
)
from training.runs import Run, Splits, load_splits, resolve_device  # noqa: E402
from training.scoring import cached_features  # noqa: E402
from training.statistics import save_split_scores, statistic_inputs  # noqa: E402

__all__ = ["evaluate", "gaussian_baseline", "ood_metrics"]


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out, FPR@95%TPR with OOD as the positive class (higher = OOD)."""
    y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    s = np.r_[id_scores, ood_scores]
    fpr, tpr, _ = roc_curve(y, s)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr_in": float(average_precision_score(1 - y, -s)),
        "aupr_out": float(average_precision_score(y, s)),
        "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
    }


def gaussian_baseline(
    train: np.ndarray, test: np.ndarray, oods: dict[str, np.ndarray], l2: bool
) -> dict[str, Any]:
    """A full-covariance Gaussian on the same backbone features (Mahalanobis-style baseline)."""

    def prep(f: np.ndarray) -> np.ndarray:
        f = f.astype(np.float64)
        return f / np.linalg.norm(f, axis=1, keepdims=True).clip(1e-12) if l2 else f

    x = prep(train)
    mean = x.mean(0)
    cov = np.cov((x - mean).T) + 1e-6 * np.eye(x.shape[1])
    precision = np.linalg.inv(cov)

    def nll(f: np.ndarray) -> np.ndarray:
        d = prep(f) - mean
        return 0.5 * np.einsum("ij,jk,ik->i", d, precision, d)

    id_s = nll(test)
    return {name: ood_metrics(id_s, nll(f)) for name, f in oods.items()}


def _plot(path, title: str, xlabel: str, series: dict[str, np.ndarray], threshold: float) -> None:  # type: ignore[no-untyped-def]
    fig, ax = plt.subplots(figsize=(7, 4))
    finite = np.concatenate([s[np.isfinite(s)] for s in series.values()])
    lo, hi = np.percentile(finite, [0.5, 99.5])
    bins = np.linspace(lo, hi, 60)
    for name, values in series.items():
        ax.hist(
            np.clip(values, lo, hi), bins=bins, alpha=0.5, density=True, label=f"{name} (n={len(values)})"
        )
    ax.axvline(threshold, color="k", linestyle="--", label="calibrated threshold")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _roc_plot(path, curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> None:  # type: ignore[no-untyped-def]
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false-positive rate (in-distribution flagged)")
    ax.set_ylabel("true-positive rate (OOD flagged)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(run_dir: str, *, device: str = "auto", splits: Splits | None = None) -> dict[str, Any]:
    run = Run(run_dir)  # type: ignore[arg-type]
    config = run.config
    calibration = read_calibration(run)
    dev = resolve_device(device)
    model = run.load_model(dev)
    background = load_background_for(run, calibration.statistic, dev)
    splits = splits or load_splits(config)
    assert splits.test is not None
    cache = run.dir / "features"
    num_dims = model.num_dims
    threshold = calibration.threshold

    def scored(dataset, key):  # type: ignore[no-untyped-def]
        inputs = statistic_inputs(
            model, dataset, [calibration.statistic], background=background, cache_dir=cache, key=key
        )
        scores = compute_scores(calibration, inputs)
        save_split_scores(run.dir / "scores", key, dataset, scores, inputs.log_likelihood)
        return inputs.log_likelihood, scores

    test_ll, test_scores = scored(splits.test, "test")
    test_bpd = bits_per_dim(test_ll, num_dims)
    results: dict[str, Any] = {
        "convention": "OpenOOD: OOD is the positive class for AUROC, AUPR-Out and FPR@95%TPR; "
        "AUPR-In treats in-distribution as positive",
        "statistic": calibration.statistic,
        "threshold": threshold,
        "target_fpr": calibration.target_fpr,
        "in_distribution": {
            "dataset": config.data.test_set or f"{config.data.in_distribution} (held-out test split)",
            "size": len(test_ll),
            "mean_bits_per_dim": float(np.mean(test_bpd)),
            "flagged_fraction": float(np.mean(test_scores > threshold)),
        },
        "ood": [],
    }
    bpd_series = {f"{results['in_distribution']['dataset']} (in)": test_bpd}
    score_series = {f"{results['in_distribution']['dataset']} (in)": test_scores}
    curves = {}
    for name, dataset in splits.ood.items():
        ll, scores = scored(dataset, f"ood-{name}")
        metrics = ood_metrics(test_scores, scores)
        bpd = bits_per_dim(ll, num_dims)
        results["ood"].append(
            {
                "dataset": name,
                "size": len(ll),
                **metrics,
                "mean_bits_per_dim": float(np.mean(bpd)),
                "flagged_fraction": float(np.mean(scores > threshold)),
            }
        )
        bpd_series[f"{name} (OOD)"] = bpd
        score_series[f"{name} (OOD)"] = scores
        y = np.r_[np.zeros(len(test_scores)), np.ones(len(scores))]
        fpr, tpr, _ = roc_curve(y, np.r_[test_scores, scores])
        curves[name] = (fpr, tpr, metrics["auroc"])
    if model.kind == "pixel" and calibration.statistic != "nll":
        # Raw likelihood on the same images, so the report shows what the corrected score fixes.
        results["baselines"] = {
            "likelihood": {
                m["dataset"]: ood_metrics(test_bpd, bpd_series[f"{m['dataset']} (OOD)"])
                for m in results["ood"]
            }
        }
    if isinstance(model, EmbeddingFlow):
        feats = {n: cached_features(model, d, cache, f"ood-{n}") for n, d in splits.ood.items()}
        results["baselines"] = {
            "gaussian_full_covariance": gaussian_baseline(
                cached_features(model, splits.train, cache, "train"),
                cached_features(model, splits.test, cache, "test"),
                feats,
                config.model.l2_normalize,  # type: ignore[union-attr]
            )
        }
    report = run.report_dir
    report.mkdir(parents=True, exist_ok=True)
    unit = "bits/dim" if model.kind == "pixel" else "bits per feature dim"
    _plot(
        report / "histogram_bits_per_dim.png",
        f"{config.name}: {unit} per dataset",
        unit,
        bpd_series,
        threshold if calibration.statistic == "nll" else float("nan"),
    )
    _plot(
        report / "histogram_ood_score.png",
        f"{config.name}: ood_score ({calibration.statistic})",
        "ood_score (higher = more OOD)",
        score_series,
        threshold,
    )
    if curves:
        _roc_plot(report / "roc.png", curves, f"{config.name}: ROC, OOD positive")
    (report / "metrics.json").write_text(__import__("json").dumps(results, indent=2) + "\n")
    (report / "report.md").write_text(_markdown(run, results, calibration))
    run.write_json("evaluation.json", results)
    return results


def _markdown(run: Run, results: dict[str, Any], calibration: CalibrationRecord) -> str:
    config = run.config
    summary = run.read_json("train_summary.json") if (run.dir / "train_summary.json").is_file() else {}
    idd = results["in_distribution"]
    lines = [
        f"# {config.name}: OOD evaluation",
        "",
        config.description,
        "",
        f"- model kind: **{config.model.kind}**, {summary.get('parameters', '?')} trainable parameters, "
        f"{summary.get('steps', '?')} training steps",
        f"- in-distribution: `{config.data.in_distribution}` (fingerprint in the manifest); test set "
        f"`{idd['dataset']}`, {idd['size']} images, mean **{idd['mean_bits_per_dim']:.3f}** bits/dim",
        f"- OOD score: `{calibration.statistic}` (higher = more OOD); threshold {calibration.threshold:.4f} "
        f"set on {calibration.validation_size} held-out in-distribution images at target FPR "
        f"{calibration.target_fpr:.0%}; {idd['flagged_fraction']:.1%} of the test set is flagged",
        f"- convention: {results['convention']}",
    ]
    selection = calibration.selection
    used = [results["in_distribution"]["dataset"], *(m["dataset"] for m in results["ood"])]
    lines.append(
        f"- choices: the statistic `{calibration.statistic}` was "
        + (
            "chosen on in-distribution validation data and OOD proxies made from it ("
            + ", ".join(str(x.get("name", x)) for x in selection.proxies)
            + ") by the rule recorded in calibration.json and the manifest"
            if selection is not None and selection.by == "selection"
            else "chosen by the user (oodflow calibrate --statistic)"
            if selection is not None and selection.by == "user"
            else "fixed in the run config"
        )
        + "; the threshold was set on the calibration split; the evaluation sets ("
        + ", ".join(f"`{u}`" for u in used)
        + ") played no part in any choice"
    )
    if not results["ood"]:
        lines += [
            "",
            "No OOD set was given, so there are no OOD metrics: the flagged fraction above is the "
            "realised false-positive rate on held-out in-distribution images. Evaluate on sets you "
            "expect to be rejected with `oodflow evaluate RUN --ood SPEC` or `oodflow build ... --ood SPEC`.",
            "",
        ]
    else:
        lines += [
            "",
            "| OOD set | n | AUROC | AUPR-In | AUPR-Out | FPR@95%TPR | mean bits/dim | flagged at threshold |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for m in results["ood"]:
        lines.append(
            f"| {m['dataset']} | {m['size']} | {m['auroc']:.4f} | {m['aupr_in']:.4f} | {m['aupr_out']:.4f} | "
            f"{m['fpr_at_95_tpr']:.4f} | {m['mean_bits_per_dim']:.3f} | {m['flagged_fraction']:.1%} |"
        )
    lines.append("")
    for m in results["ood"]:
        if config.model.kind == "pixel" and calibration.statistic == "nll" and m["auroc"] < 0.5:
            lines.append(
                f"**The likelihood failure is reproduced on {m['dataset']}** (Nalisnick et al. 2019; Kirichenko et al. "
                f"2020): the flow gives the OOD images *higher* likelihood ({m['mean_bits_per_dim']:.3f} bits/dim vs "
                f"{idd['mean_bits_per_dim']:.3f} in-distribution), so likelihood AUROC is {m['auroc']:.3f}, worse than "
                "chance. Raw pixel likelihood must not be trusted as an OOD score here; use the embedding model or "
                "a corrected statistic.\n"
            )
    if "likelihood" in results.get("baselines", {}):
        lines += [
            f"## Raw likelihood vs `{calibration.statistic}`",
            "",
            "| OOD set | raw likelihood AUROC | ood_score AUROC | raw likelihood FPR@95%TPR | ood_score FPR@95%TPR |",
            "|---|---|---|---|---|",
        ]
        ours = {m["dataset"]: m for m in results["ood"]}
        for name, b in results["baselines"]["likelihood"].items():
            o = ours[name]
            lines.append(
                f"| {name} | {b['auroc']:.4f} | {o['auroc']:.4f} | {b['fpr_at_95_tpr']:.4f} | {o['fpr_at_95_tpr']:.4f} |"
            )
        lines.append("")
        for name, b in results["baselines"]["likelihood"].items():
            if b["auroc"] < 0.5:
                lines.append(
                    f"**The likelihood failure is reproduced on {name}**: raw likelihood AUROC {b['auroc']:.3f} "
                    f"(the flow prefers the OOD images); the `{calibration.statistic}` score gives "
                    f"{ours[name]['auroc']:.3f}.\n"
                )
    if "gaussian_full_covariance" in results.get("baselines", {}):
        lines += [
            "## Baseline on the same features",
            "",
            "A full-covariance Gaussian fitted to the same backbone features (after the same L2 normalisation):",
            "",
            "| OOD set | flow AUROC | Gaussian AUROC | flow FPR@95%TPR | Gaussian FPR@95%TPR |",
            "|---|---|---|---|---|",
        ]
        flow = {m["dataset"]: m for m in results["ood"]}
        for name, g in results["baselines"]["gaussian_full_covariance"].items():
            f = flow[name]
            lines.append(
                f"| {name} | {f['auroc']:.4f} | {g['auroc']:.4f} | {f['fpr_at_95_tpr']:.4f} | {g['fpr_at_95_tpr']:.4f} |"
            )
        lines.append("")
    lines += [
        "## Figures",
        "",
        "![bits/dim per dataset](histogram_bits_per_dim.png)",
        "",
        "![ood score per dataset](histogram_ood_score.png)",
        "",
    ]
    if results["ood"]:
        lines += ["![ROC curves](roc.png)", ""]
    return "\n".join(lines)
