"""`oodflow reproduce` end to end on the tiny profile (seconds; the numbers mean nothing)."""

from __future__ import annotations

import json
from pathlib import Path

from training.reproduce import PROFILES, STATISTIC_LABELS, reproduce


def test_reproduce_tiny_profile_end_to_end(tmp_path: Path) -> None:
    output = tmp_path / "docs" / "reproduction.md"
    logged: list[str] = []
    payload = reproduce("tiny", output=output, runs_dir=tmp_path / "runs", progress=False, log=logged.append)
    text = output.read_text()
    profile = PROFILES["tiny"]
    assert not payload["failures"]
    # one table row per (pixel variant, statistic), the embedding flow and two combined verdicts
    for variant in profile.variants:
        for label in STATISTIC_LABELS.values():
            assert f"| {variant.label} | {label} |" in text, (variant.label, label)
        assert (tmp_path / "docs" / "figures" / "reproduction" / f"{variant.name}.png").stat().st_size > 0
    assert "| Embedding flow (EfficientNet-Lite0 features) | likelihood |" in text
    assert text.count("| combined (") == 2
    assert (
        "| model | score | parameters | bits/dim FMNIST test | bits/dim MNIST | AUROC | FPR@95%TPR |" in text
    )
    assert "## What reproduces the paper and what does not" in text
    assert "figures/reproduction/realnvp-checkerboard.png" in text
    results = json.loads((tmp_path / "runs" / "results.json").read_text())
    names = [r["name"] for r in results["results"]]
    assert names == [v.name for v in profile.variants] + ["embedding"]
    for r in results["results"]:
        for m in r["metrics"].values():
            assert 0.0 <= m["auroc"] <= 1.0 and 0.0 <= m["fpr_at_95_tpr"] <= 1.0
    assert any("wrote" in line for line in logged)
    # the analysis page of the checkerboard and horizontal RealNVP is regenerated beside it
    analysis = (tmp_path / "docs" / "analysis.md").read_text()
    assert "figures/analysis/realnvp-horizontal/coadaptation.png" in analysis
    assert (tmp_path / "docs" / "figures" / "analysis" / "realnvp-checkerboard" / "latent.png").is_file()
