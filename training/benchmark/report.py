"""Write a benchmark result: `<output>/benchmark.md`, `<output>/benchmark.json` and the figures under
`<output>/figures/benchmark/` (ROC curves per family, score histograms)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["FIGURES_DIR", "before_after_markdown", "markdown", "write_report"]

FIGURES_DIR = Path("figures") / "benchmark"
_METRIC_NAMES = {
    "auroc": "AUROC",
    "aupr_in": "AUPR-In",
    "aupr_out": "AUPR-Out",
    "fpr_at_95_tpr": "FPR@95%TPR",
}


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in text).strip("-")


def _label(result: dict[str, Any], key: str) -> str:
    """`fmnist-pixel/complexity` -> `fmnist-pixel complexity (shipped)`; `combined` -> `combined verdict`."""
    if key == "combined":
        return f"combined verdict ({result['ensemble']['rule']})"
    member, _, stat = key.partition("/")
    shipped = any(m["name"] == member and m["statistic"] == stat for m in result["members"])
    return f"{member} {stat}" + (" (shipped ood_score)" if shipped else "")


def _ci(value: float, ci: list[float]) -> str:
    if any(np.isnan(c) for c in ci):
        return f"{value:.3f}"
    return f"{value:.3f} ({ci[0]:.3f}–{ci[1]:.3f})"


def _set_name(result: dict[str, Any], name: str) -> str:
    info = next(s for s in result["sets"] if s["name"] == name)
    return name + (" †" if info["selection_proxy_of"] else "")


# --------------------------------------------------------------------------- figures


def _roc(ax: Any, id_scores: np.ndarray, ood: np.ndarray, label: str) -> None:
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood))]
    s = np.nan_to_num(np.r_[id_scores, ood], nan=np.inf, posinf=1e300, neginf=-1e300)
    fpr, tpr, _ = roc_curve(y, s)
    ax.plot(fpr, tpr, label=f"{label} ({roc_auc_score(y, s):.3f})")


def _figures(result: dict[str, Any], folder: Path) -> list[tuple[str, str]]:
    """PNG files under `folder`; returns (caption, file name) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = result["_arrays"]
    scores: dict[str, dict[str, np.ndarray]] = arrays["scores"]
    families: dict[str, str] = arrays["families"]
    headline = result["headline"]
    out: list[tuple[str, str]] = []
    for family, title in (("near", "near-OOD (transforms of the test split)"), ("far", "far-OOD")):
        names = [n for n, f in families.items() if f == family and n != "test"]
        if family == "near":
            names += [n for n, f in families.items() if f == "symmetry"]
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 5.5))
        for name in names:
            suffix = " [symmetry]" if families[name] == "symmetry" else ""
            _roc(ax, scores["test"][headline], scores[name][headline], name + suffix)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.set_xlabel("false-positive rate (in-distribution test flagged)")
        ax.set_ylabel("true-positive rate (OOD flagged)")
        ax.set_title(f"{result['benchmark']}: {_label(result, headline)}\n{title}, OOD positive", fontsize=9)
        ax.legend(loc="lower right", fontsize=7, title="set (AUROC)", title_fontsize=7)
        fig.tight_layout()
        file = f"roc-{family}.png"
        fig.savefig(folder / file, dpi=100)
        plt.close(fig)
        out.append((f"ROC, {title}: {_label(result, headline)}", file))
    for key in result["thresholded"]:
        threshold = _threshold(result, key)
        for family, title in (("near", "near-OOD and symmetries"), ("far", "far-OOD")):
            names = [n for n, f in families.items() if f == family and n != "test"]
            if family == "near":
                names += [n for n, f in families.items() if f == "symmetry"]
            if not names:
                continue
            series = {"test (in-distribution)": scores["test"][key]}
            series.update(
                {n + (" [symmetry]" if families[n] == "symmetry" else ""): scores[n][key] for n in names}
            )
            finite = np.concatenate([v[np.isfinite(v)] for v in series.values()])
            low, high = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
            if high <= low:
                high = low + 1.0
            bins = np.linspace(low, high, 60)
            fig, ax = plt.subplots(figsize=(7.5, 4.2))
            for i, (name, values) in enumerate(series.items()):
                clipped = np.clip(np.nan_to_num(values, nan=high), low, high)
                ax.hist(
                    clipped,
                    bins=bins.tolist(),
                    density=True,
                    histtype="stepfilled" if i == 0 else "step",
                    alpha=0.35 if i == 0 else 0.9,
                    linewidth=1.2,
                    label=f"{name} (n={len(values)})",
                )
            ax.axvline(threshold, color="k", linestyle="--", label="threshold")
            ax.set_xlabel(f"{_label(result, key)} (higher = more OOD; clipped to the 0.5–99.5% range)")
            ax.set_ylabel("density")
            ax.set_title(f"{result['benchmark']}: {title}", fontsize=9)
            ax.legend(fontsize=6, ncol=2)
            fig.tight_layout()
            file = f"hist-{family}-{_slug(key)}.png"
            fig.savefig(folder / file, dpi=100)
            plt.close(fig)
            out.append((f"{_label(result, key)}, {title}", file))
    return out


def _threshold(result: dict[str, Any], key: str) -> float:
    if key == "combined":
        return float(result["ensemble"]["threshold"])
    member = key.partition("/")[0]
    return float(next(m["threshold"] for m in result["members"] if m["name"] == member))


# --------------------------------------------------------------------------- markdown


def _pct_ci(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "–"
    low, high = entry["flagged_ci"]
    return f"{entry['flagged']}/{entry['size']} = {entry['flagged_fraction']:.2%} ({low:.2%}–{high:.2%})"


def before_after_markdown(result: dict[str, Any]) -> list[str]:
    """The `--baseline` section: which runs are compared, the goal findings, and per score a table of
    AUROC before/after per set (from `result["comparison"]`, computed by `training.benchmark.compare`)."""
    from training.benchmark.compare import goal_lines

    base, comparison = result["baseline"], result["comparison"]
    after_members = ", ".join(f"`{m['name']}` v{m['version']}" for m in result["members"])
    before_members = ", ".join(f"`{m['name']}` v{m['version']}" for m in base["members"])

    def what(run: dict[str, Any], members: str) -> str:
        ensemble = run["ensemble"]
        return (f"ensemble `{ensemble['name']}` ({ensemble['rule']}) over " if ensemble else "") + members

    lines = [
        "## Before and after",
        "",
        f"- **before**: `{base['path']}` (sha256 {base['sha256'][:12]}…), created {base['created_at']} by "
        f"`{base['command'] or 'oodflow benchmark'}`, on {what(base, before_members)}; "
        f"bootstrap {base['bootstrap'].get('resamples', '?')} resamples, seed {base['bootstrap'].get('seed', '?')}",
        f"- **after**: this run, created {result['created_at']}, on {what(result, after_members)}; "
        f"bootstrap {result['bootstrap']['resamples']} resamples, seed {result['bootstrap']['seed']}",
        f"- both on the in-distribution test set {base['in_distribution_test']['dataset']} "
        f"({base['in_distribution_test']['size']} images); difference = after − before; "
        '"intervals overlap" compares the two 95% bootstrap intervals (overlapping intervals do not '
        "show a change; disjoint ones suggest one, without a paired test)",
        "",
    ]
    goal = result["goal"]
    lines += [
        f"### Goal (issue 12), computed from this run's figures for {_label(result, goal['score'])}",
        "",
        f"Near-OOD sets that are not declared symmetries: AUROC ≥ {goal['near_auroc']}; far-OOD sets: "
        f"AUROC ≥ {goal['far_auroc']}; in-distribution test images: the flagged count lies in the 95% "
        "range that a split-conformal threshold at the target FPR, calibrated on the score's held-out "
        "images, predicts (beta-binomial; the test-only binomial interval is shown beside it).",
        "",
    ]
    lines += [f"- {line}" for line in goal_lines(goal, _label(result, goal["score"]))]
    lines.append("")
    for kind, key in (("in the baseline only", "sets_only_before"), ("in this run only", "sets_only_after")):
        if comparison[key]:
            lines.append(
                f"Sets {kind}: " + ", ".join(f"{s['name']} ({s['family']})" for s in comparison[key]) + "."
            )
    for change in comparison["family_changed"]:
        lines.append(
            f"Set {change['name']} was {change['before']} in the baseline, is {change['after']} here."
        )
    for kind, key in (
        ("in the baseline only", "scores_only_before"),
        ("in this run only", "scores_only_after"),
    ):
        if comparison[key]:
            lines.append(f"Scores {kind}: " + ", ".join(f"`{k}`" for k in comparison[key]) + ".")
    if lines[-1] != "":
        lines.append("")

    for table in comparison["tables"]:
        b_key, a_key = table["before_score"], table["after_score"]
        title = (
            _label(result, a_key)
            if b_key == a_key
            else f"headline: `{b_key}` before, {_label(result, a_key)} after"
        )
        lines += [
            f"### AUROC before → after: {title}",
            "",
            "| family | set | AUROC before (95% CI) | AUROC after (95% CI) | difference | intervals overlap |",
            "|---|---|---|---|---:|---|",
        ]
        for r in table["rows"]:
            family = r["family_after"] or r["family_before"]
            if r["family_before"] and r["family_after"] and r["family_before"] != r["family_after"]:
                family = f"{r['family_before']} → {r['family_after']}"
            if r["status"] == "both":
                overlap = {True: "yes", False: "**no**", None: "n/a (no bootstrap)"}[r["intervals_overlap"]]
                cells = [
                    _ci(r["auroc_before"], r["auroc_before_ci"]),
                    _ci(r["auroc_after"], r["auroc_after_ci"]),
                    f"{r['difference']:+.3f}",
                    overlap,
                ]
            elif r["status"] == "only_before":
                why = "a declared symmetry here" if r["family_after"] == "symmetry" else "not in this run"
                cells = [_ci(r["auroc_before"], r["auroc_before_ci"]), why, "–", "–"]
            else:
                why = (
                    "a declared symmetry there" if r["family_before"] == "symmetry" else "not in the baseline"
                )
                cells = [why, _ci(r["auroc_after"], r["auroc_after_ci"]), "–", "–"]
            lines.append(f"| {family} | {r['set']} | " + " | ".join(cells) + " |")
        lines.append("")

    if comparison["false_positives"]:
        lines += [
            "### Flagged at the threshold before → after (in-distribution test images, declared symmetries)",
            "",
            "| score | set | before: flagged (95% Clopper-Pearson) | after: flagged (95% Clopper-Pearson) | target FPR |",
            "|---|---|---|---|---:|",
        ]
        for e in comparison["false_positives"]:
            target = (e["after"] or e["before"] or {}).get("target_fpr")
            score = _label(result, e["after_score"])
            if e["before_score"] != e["after_score"]:
                score = f"`{e['before_score']}` → {score}"
            lines.append(
                f"| {score} | {e['set']} | {_pct_ci(e['before'])} | {_pct_ci(e['after'])} "
                f"| {'–' if target is None else f'{target:.1%}'} |"
            )
        lines.append("")
    return lines


def markdown(result: dict[str, Any], figures: list[tuple[str, str]], figures_prefix: str) -> str:
    headline = result["headline"]
    idt = result["in_distribution_test"]
    lines = [
        f"# OOD benchmark: `{result['benchmark']}`",
        "",
        f"Generated by `{result['command'] or 'oodflow benchmark'}` on {result['created_at']} "
        f"({result['machine']}). Scores come from the exported ONNX graphs, computed as the service computes them.",
        "",
    ]
    for m in result["members"]:
        lines.append(
            f"- model `{m['name']}` v{m['version']} ({m['kind']}): shipped ood_score `{m['statistic']}`, "
            f"threshold {m['threshold']:.4g} at target FPR {m['target_fpr']:.0%}; statistics benchmarked: "
            + ", ".join(f"`{s}`" for s in m["statistics"])
        )
    if result["ensemble"]:
        e = result["ensemble"]
        lines.append(
            f"- ensemble `{e['name']}` over {', '.join(e['members'])}: rule `{e['rule']}`, threshold "
            f"{e['threshold']:.4g} at target FPR {e['target_fpr']:.0%}"
        )
    lines += [
        f"- in-distribution test set: {idt['how']}, {idt['size']} images ({'×'.join(map(str, idt['shape']))})",
        f"- symmetries (reported as a false-positive check, not as OOD): "
        f"{', '.join(result['symmetries']['transforms']) or 'none'} ({result['symmetries']['source']})",
        f"- convention: {result['convention']}",
        f"- intervals: 95% bootstrap, {result['bootstrap']['resamples']} resamples, seed {result['bootstrap']['seed']}, "
        f"{result['bootstrap']['method']}",
        "",
    ]
    proxy_sets = [s for s in result["sets"] if s["selection_proxy_of"]]
    if proxy_sets:
        lines += [
            "† near-OOD family that also served as a proxy (on the validation split) when choosing the "
            "statistic of "
            + "; ".join(f"{s['name']}: {', '.join(s['selection_proxy_of'])}" for s in proxy_sets)
            + ". Its figures here are on the test split, but the family itself was not unseen.",
            "",
        ]
    elif any(m["selection"] for m in result["members"]):
        lines += [
            "No near-OOD family here served as a statistic-selection proxy (manifests' `score.selection`).",
            "",
        ]
    else:
        lines += [
            "No member records a statistic selection (`score.selection`): no family was used as a proxy.",
            "",
        ]
    if "comparison" in result:
        lines += before_after_markdown(result)
    sets = result["sets"]
    rows = {(r["set"], r["score"]): r for r in result["results"]}
    keys = result["scores"]

    lines += [
        "## Summary: AUROC per set and score",
        "",
        f"Headline score: **{_label(result, headline)}**. Point estimates; intervals in the tables below.",
        "",
        "| family | set | n | " + " | ".join(_label(result, k) for k in keys) + " |",
        "|---|---|---:|" + "---:|" * len(keys),
    ]
    for s in sets:
        if s["family"] == "symmetry":
            continue
        cells = []
        for k in keys:
            value = rows[(s["name"], k)]["auroc"]
            cells.append(f"**{value:.3f}**" if k == headline else f"{value:.3f}")
        lines.append(
            f"| {s['family']} | {_set_name(result, s['name'])} | {s['size']} | " + " | ".join(cells) + " |"
        )
    lines.append("")

    if result["ensemble"]:
        shipped = [k for k in result["thresholded"] if k != "combined"]
        trailing = []
        for s in sets:
            if s["family"] == "symmetry":
                continue
            best = max(shipped, key=lambda k: rows[(s["name"], k)]["auroc"])
            gap = rows[(s["name"], best)]["auroc"] - rows[(s["name"], "combined")]["auroc"]
            if gap > 0.01:
                trailing.append((s["name"], best, gap))
        if trailing:
            lines += [
                "Where the combined verdict trails its best member's shipped score by more than 0.01 AUROC "
                "(a member that is blind to a set dilutes the others' evidence): "
                + "; ".join(f"{n}: {_label(result, b)} by {g:.3f}" for n, b, g in trailing)
                + ".",
                "",
            ]

    lines += ["## The sets", "", "| family | set | n | what |", "|---|---|---:|---|"]
    for s in sets:
        lines.append(f"| {s['family']} | {_set_name(result, s['name'])} | {s['size']} | {s['description']} |")
    for spec, reason in result["skipped"].items():
        lines.append(f"| far | {spec} | 0 | skipped: {reason} |")
    lines.append("")

    lines += [
        "## In-distribution test set: flagged fraction vs target",
        "",
        "A split-conformal threshold set on n held-out images flags a fresh in-distribution image with "
        "probability Beta(n + 1 − k, k), k = ⌈(n + 1)(1 − target)⌉, over the draw of those n images; the "
        "count it flags on the test images is then beta-binomial. `expected (95%)` is that count's "
        "central range: a count inside it is the target met; the Clopper-Pearson interval reflects the "
        "test images alone and misses the threshold's own spread.",
        "",
        "| score | flagged | fraction (95% Clopper-Pearson) | target FPR | target inside interval "
        "| calibration images | expected (95%) | inside expected |",
        "|---|---:|---|---:|---|---:|---|---|",
    ]
    for e in idt["flagged"]:
        expected = "–"
        if e.get("conformal_range") is not None:
            lo, hi = e["conformal_range"]
            expected = f"{lo}–{hi} ({lo / e['size']:.2%}–{hi / e['size']:.2%})"
        inside = (
            "–" if "within_conformal_range" not in e else ("yes" if e["within_conformal_range"] else "**no**")
        )
        lines.append(
            f"| {_label(result, e['score'])} | {e['flagged']}/{e['size']} | {_ci(e['flagged_fraction'], e['flagged_ci'])} "
            f"| {e['target_fpr']:.1%} | {'yes' if e['target_within_ci'] else '**no**'} "
            f"| {e.get('calibration_size', '–')} | {expected} | {inside} |"
        )
    lines.append("")

    if result["symmetry_checks"]:
        lines += [
            "## Declared symmetries: false-positive check",
            "",
            "A transform declared a symmetry is in-distribution: at the calibrated threshold it should be "
            "flagged at about the target FPR, like the untransformed test images. `AUROC vs test` "
            "(0.5 = indistinguishable) is shown for every score.",
            "",
            "| transform | score | flagged | fraction (95% Clopper-Pearson) | test images flagged | target FPR | AUROC vs test |",
            "|---|---|---:|---|---:|---:|---|",
        ]
        for e in result["symmetry_checks"]:
            if "flagged" in e:
                flagged = f"{e['flagged']}/{e['size']}"
                fraction = _ci(e["flagged_fraction"], e["flagged_ci"])
                test_frac, target = f"{e['test_flagged_fraction']:.1%}", f"{e['target_fpr']:.1%}"
            else:
                flagged = fraction = test_frac = target = "–"
            lines.append(
                f"| {e['set']} | {_label(result, e['score'])} | {flagged} | {fraction} | {test_frac} | {target} "
                f"| {_ci(e['auroc_vs_test'], e['auroc_vs_test_ci'])} |"
            )
        lines.append("")

    for family, title in (("near", "Near-OOD: transforms of the test split"), ("far", "Far-OOD")):
        family_sets = [s for s in sets if s["family"] == family]
        if not family_sets:
            continue
        lines += [f"## {title}", ""]
        for k in keys:
            thresholded = k in result["thresholded"]
            lines += [
                f"### {_label(result, k)}",
                "",
                "| set | n | "
                + " | ".join(_METRIC_NAMES.values())
                + (" | flagged at threshold |" if thresholded else " |"),
                "|---|---:|" + "---|" * len(_METRIC_NAMES) + ("---:|" if thresholded else ""),
            ]
            for s in family_sets:
                r = rows[(s["name"], k)]
                cells = [_ci(r[m], r[f"{m}_ci"]) for m in _METRIC_NAMES]
                if thresholded:
                    cells.append(f"{r['flagged_fraction']:.1%}")
                lines.append(f"| {_set_name(result, s['name'])} | {s['size']} | " + " | ".join(cells) + " |")
            lines.append("")

    per_class = result["per_class_auroc"]
    if per_class["sets"]:
        classes = list(next(iter(per_class["sets"].values())))
        lines += [
            f"## Near-OOD AUROC per class ({_label(result, per_class['score'])})",
            "",
            "Test images of one class vs the same images transformed: where a transform leaves a class "
            "looking like itself (a bag upside down is still a bag), no detector can separate them.",
            "",
            "| set | " + " | ".join(classes) + " |",
            "|---|" + "---:|" * len(classes),
        ]
        for name, values in per_class["sets"].items():
            lines.append(f"| {name} | " + " | ".join(f"{values[c]:.3f}" for c in classes) + " |")
        lines.append("")

    if figures:
        lines += ["## Figures", ""]
        for caption, file in figures:
            lines += [f"![{caption}]({figures_prefix}/{file})", ""]
    return "\n".join(lines)


def _jsonable(result: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in result.items() if not k.startswith("_")}
    return json.loads(json.dumps(out, allow_nan=True, default=float))


def write_report(result: dict[str, Any], output: Path, *, figures: bool = True) -> Path:
    """`<output>/benchmark.md`, `<output>/benchmark.json`, `<output>/figures/benchmark/*.png`; returns the
    Markdown path."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    made = _figures(result, output / FIGURES_DIR) if figures else []
    (output / "benchmark.json").write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    path = output / "benchmark.md"
    path.write_text(markdown(result, made, FIGURES_DIR.as_posix()))
    return path
