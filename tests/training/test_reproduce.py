"""`oodflow reproduce`: the verdict logic on known numbers, the profiles' fairness (matched
variants), the likelihood-ratio background's fresh perturbation, and the command end to end on the
tiny profile (seconds; the numbers mean nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from models.config import PixelFlowConfig
from models.flows import PixelFlow
from training.config import RunConfig, TrainConfig
from training.data import ImageSet, load_dataset
from training.reproduce import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    PARTLY,
    PROFILES,
    REPRODUCED,
    STATISTIC_LABELS,
    above_chance_verdict,
    auroc_difference,
    count_verdict,
    failure_verdict,
    fit_control,
    generated_ood_sets,
    improvement_verdict,
    margin_verdict,
    matched_verdict,
    ordering_verdict,
    reproduce,
)
from training.runs import Run, Splits
from training.train import _PixelTrainer

# ----------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    "hits, total, word",
    [(3, 3, REPRODUCED), (1, 3, PARTLY), (0, 3, NOT_REPRODUCED), (0, 0, INCONCLUSIVE)],
)
def test_count_verdict(hits: int, total: int, word: str) -> None:
    assert count_verdict(hits, total) == word


def test_failure_verdict_is_about_auroc_below_chance() -> None:
    assert failure_verdict({"a": 0.06, "b": 0.2}).word == REPRODUCED
    partly = failure_verdict({"a": 0.06, "b": 0.7})
    assert partly.word == PARTLY and "1 of 2" in partly.reason and "b 0.700" in partly.reason
    assert failure_verdict({"a": 0.5, "b": 0.9}).word == NOT_REPRODUCED  # 0.5 is chance, not a failure


def test_rank_auroc_matches_sklearn_with_ties() -> None:
    from training.reproduce import _auroc

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 50).astype(float), rng.integers(1, 6, 70).astype(float)
    expected = roc_auc_score(np.r_[np.zeros(50), np.ones(70)], np.r_[a, b])
    assert _auroc(a, b) == pytest.approx(expected, abs=1e-12)


def test_auroc_difference_is_paired_and_has_an_interval() -> None:
    rng = np.random.default_rng(1)
    base = (rng.normal(0, 1, 300), rng.normal(0, 1, 300))  # chance
    better = (rng.normal(0, 1, 300), rng.normal(3, 1, 300))  # separates
    delta, lo, hi = auroc_difference(base, better, reps=100)
    assert delta > 0.3 and lo > 0.2 and lo <= delta <= hi
    same, lo, hi = auroc_difference(base, base, reps=50)
    assert same == 0.0 and lo == 0.0 and hi == 0.0
    with pytest.raises(ValueError, match="same images"):
        auroc_difference(base, (better[0][:10], better[1]))


def test_improvement_verdict_counts_only_families_with_room() -> None:
    base = {"mnist": 0.10, "photos": 0.50, "uniform-noise": 0.999}
    deltas = {"mnist": (0.20, 0.10, 0.30), "photos": (0.30, 0.20, 0.40), "uniform-noise": (0.0, -0.001, 0.0)}
    v = improvement_verdict(deltas, base)
    assert v.word == REPRODUCED and "Improved on 2 of 2 families where the baseline is below 0.99" in v.reason
    deltas["photos"] = (0.01, -0.02, 0.04)  # interval contains 0: no improvement
    assert improvement_verdict(deltas, base).word == PARTLY
    deltas["photos"] = (-0.2, -0.3, -0.1)  # worse somewhere: never better than partly
    v = improvement_verdict(deltas, base)
    assert v.word == PARTLY and "worse on 1 (photos)" in v.reason
    deltas["mnist"] = (0.01, -0.01, 0.03)
    assert improvement_verdict(deltas, base).word == NOT_REPRODUCED
    assert improvement_verdict({"n": (0.0, 0.0, 0.0)}, {"n": 1.0}).word == INCONCLUSIVE


def test_matched_verdict_needs_matched_size_and_fit() -> None:
    improved = improvement_verdict({"mnist": (0.5, 0.4, 0.6)}, {"mnist": 0.06})
    assert improved.word == REPRODUCED
    # the old bottleneck rows: 21x the parameters and 1.3 bits/dim worse -> no verdict
    v = matched_verdict(improved, 950_994 / 44_626, 4.916 - 3.651)
    assert v.word == INCONCLUSIVE and "Parameter counts differ" in v.reason
    v = matched_verdict(improved, 41_152 / 40_720, 0.30)
    assert v.word == INCONCLUSIVE and "worse" in v.reason and "reproduced" in v.reason
    v = matched_verdict(improved, 41_152 / 40_720, 0.02)
    assert v.word == REPRODUCED and "match" in v.reason
    not_improved = improvement_verdict({"mnist": (0.0, -0.1, 0.1)}, {"mnist": 0.06})
    assert matched_verdict(not_improved, 1.0, 0.0).word == NOT_REPRODUCED


def test_fit_control() -> None:
    others = {"horizontal": (6.8, 0.07), "cycle": (6.9, 0.23), "baseline": (4.1, 0.05)}
    text = fit_control(("bottleneck", 5.4, 0.61), others)
    assert "does not produce it" in text and "horizontal 6.80 bits/dim" in text and "baseline" not in text
    assert fit_control(("b", 5.4, 0.61), others, "MNIST").startswith("Fit control (MNIST):")
    others["cycle"] = (6.9, 0.7)
    assert "could explain it" in fit_control(("bottleneck", 5.4, 0.61), others)
    assert "no fit control" in fit_control(("bottleneck", 9.0, 0.61), others)


def test_above_chance_margin_and_ordering_verdicts() -> None:
    v = above_chance_verdict({"a/mnist": 0.9, "b/mnist": 0.4})
    assert v.word == PARTLY and "1 of 2" in v.reason and "worst 0.400 on b/mnist" in v.reason
    assert margin_verdict({"mnist": 0.99, "photos": 0.9}, {"mnist": 0.7, "photos": 0.88}).word == PARTLY
    assert margin_verdict({"mnist": 0.99}, {"mnist": 0.7}).word == REPRODUCED
    assert margin_verdict({"mnist": 0.72}, {"mnist": 0.7}).word == NOT_REPRODUCED
    # a reference already near 1.0 leaves no room to be ahead: not counted
    v = margin_verdict({"mnist": 0.99, "uniform-noise": 0.997}, {"mnist": 0.6, "uniform-noise": 1.0})
    assert v.word == REPRODUCED and "1 of 1 families" in v.reason and "no room" in v.reason
    v = margin_verdict({"mnist": 0.99, "photos": 0.80}, {"mnist": 0.6, "photos": 0.9})
    assert v.word == PARTLY and "behind by more than 0.05 on 1 (photos)" in v.reason
    v = ordering_verdict(3.6, {"mnist": 2.1, "uniform-noise": 8.0})
    assert v.word == PARTLY and "lower on 1 of 2" in v.reason


# ----------------------------------------------------------------------------- profiles


def _params(config: PixelFlowConfig) -> int:
    return sum(p.numel() for p in PixelFlow(config).parameters())


@pytest.mark.parametrize("budget", ["tiny", "cpu", "gpu"])
def test_mask_variants_are_single_scale_and_match_the_baseline(budget: str) -> None:
    """§7: the paper's mask variants are single-scale (no squeeze) with the baseline's couplings and
    st-networks, so the parameter counts are equal; the bottleneck is sized to the baseline."""
    by = {v.name: v for v in PROFILES[budget].variants}
    base = by["single-checkerboard"].model
    assert base.num_scales == 1 and base.mask == "checkerboard"
    for name, mask in (("single-horizontal", "horizontal"), ("single-cycle", "cycle")):
        variant = by[name].model
        assert variant.mask == mask
        assert variant.model_copy(update={"mask": "checkerboard"}) == base
    assert _params(by["single-cycle"].model) == _params(base)
    if budget != "tiny":  # the smoke profile's flows are too small to match
        bottleneck = next(v.model for n, v in by.items() if n.startswith("single-bottleneck-"))
        ratio = _params(bottleneck) / _params(base)
        assert bottleneck.st_net == "bottleneck" and abs(ratio - 1) < 0.05, ratio
    # the likelihood-ratio baseline runs at least on the default model's architecture
    assert by["realnvp-checkerboard"].background
    # the compared single-scale flows train for the same number of steps
    assert len({v.steps for n, v in by.items() if n.startswith("single-")}) == 1


def test_generated_ood_sets() -> None:
    sets = generated_ood_sets(50, (1, 28, 28), seed=0)
    noise, constant = sets["uniform-noise"].images, sets["constant"].images
    assert noise.shape == (50, 1, 28, 28) and noise.dtype == np.uint8 and noise.std() > 60
    assert constant.shape == (256, 1, 28, 28)
    assert (constant.reshape(256, -1).std(1) == 0).all()
    np.testing.assert_array_equal(constant[:, 0, 0, 0], np.arange(256))
    np.testing.assert_array_equal(generated_ood_sets(50, (1, 28, 28), seed=0)["uniform-noise"].images, noise)


def test_background_batches_are_perturbed_afresh_every_step(tmp_path: Path) -> None:
    """Ren et al.: a new perturbation of every batch at every step, at rate μ."""
    images = load_dataset("fashion-mnist:test", limit=64, seed=0).images
    config = RunConfig(
        name="bg",
        model=PixelFlowConfig(width=4, depth=0, num_scales=1, final_couplings=2),
        train=TrainConfig(),
    )
    splits = Splits(
        train=ImageSet("t", images),
        validation=ImageSet("v", images[:8]),
        calibration=ImageSet("c", images[:8]),
    )
    model = PixelFlow(config.model)
    trainer = _PixelTrainer(Run(tmp_path, config), model, splits, torch.device("cpu"), perturbation_rate=0.2)
    batch = torch.from_numpy(images)
    a, b = trainer.perturb(batch), trainer.perturb(batch)
    changed_a, changed_b = a != batch, b != batch
    assert not torch.equal(changed_a, changed_b)
    # about μ = 0.2 of the pixels are redrawn (a redrawn value equals the old one 1/256 of the time)
    assert 0.17 < float(changed_a.float().mean()) < 0.22
    plain = _PixelTrainer(Run(tmp_path, config), model, splits, torch.device("cpu"))
    assert torch.equal(plain.perturb(batch), batch)
    with pytest.raises(ValueError, match="perturbation_rate"):
        _PixelTrainer(Run(tmp_path, config), model, splits, torch.device("cpu"), perturbation_rate=1.5)


# ----------------------------------------------------------------------------- end to end


def test_reproduce_tiny_profile_end_to_end(tmp_path: Path) -> None:
    output = tmp_path / "docs" / "reproduction.md"
    logged: list[str] = []
    payload = reproduce("tiny", output=output, runs_dir=tmp_path / "runs", progress=False, log=logged.append)
    text = output.read_text()
    profile = PROFILES["tiny"]
    assert not payload["failures"]
    families = payload["families"]
    assert families == ["mnist", "sklearn-digits", "photos", "uniform-noise", "constant"]
    assert "| model | score | MNIST | sklearn digits | photos | uniform noise | constant |" in text
    for variant in profile.variants:
        label = variant.label + (" + background" if variant.background else "")
        statistics = list(STATISTIC_LABELS.values())
        if not variant.background:
            statistics.remove("likelihood ratio")
        for statistic in statistics:
            assert f"| {label} | {statistic} |" in text, (label, statistic)
        assert (tmp_path / "docs" / "figures" / "reproduction" / f"{variant.name}.png").stat().st_size > 0
    assert "| Embedding flow (EfficientNet-Lite0 features) | likelihood |" in text
    assert text.count("| combined (") == 4  # two rules, AUROC and FPR tables
    assert "## What reproduces the paper and what does not" in text
    for claim in (
        "§4, the likelihood failure",
        "§7, a horizontal mask",
        "§7, a cycle mask",
        "§7, st-networks",
        "§8",
    ):
        assert claim in text, claim
    assert "released notebook" in text and "random uniform dequantization" in text
    results = json.loads((tmp_path / "runs" / "results.json").read_text())
    names = [r["name"] for r in results["results"]]
    assert names == [v.name for v in profile.variants] + ["embedding"]
    for r in results["results"]:
        for statistic in r["metrics"].values():
            assert set(statistic) == set(families)
            for m in statistic.values():
                assert 0.0 <= m["auroc"] <= 1.0 and 0.0 <= m["fpr_at_95_tpr"] <= 1.0
    # the background flow trains as long as its main flow
    for r in results["results"]:
        if r["background_steps"]:
            assert r["background_steps"] == r["steps"]
    assert any("wrote" in line for line in logged)
    analysis = (tmp_path / "docs" / "analysis.md").read_text()
    assert "figures/analysis/single-cycle/coadaptation.png" in analysis
    assert "Measured:" in analysis and "another image" in analysis
    assert (tmp_path / "docs" / "figures" / "analysis" / "realnvp-checkerboard" / "latent.png").is_file()
