"""Choosing the pixel statistic without OOD data (issue 10 §2): the proxies, the rule, and the
record on a real quick run, checked against an independent computation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from models.artifact import verify_artifact
from models.scores import LN2, png_bits_per_dim
from training.calibrate import calibrate, read_calibration
from training.data import ImageSet, load_dataset
from training.runs import Run, load_splits
from training.selection import (
    PROXIES,
    TIE_TOLERANCE,
    auroc,
    choose,
    make_proxies,
    select_statistic,
)

PIXEL = "fmnist-pixel-realnvp-quick"


def _blocks(images: np.ndarray, b: int = 4) -> np.ndarray:
    n, c, h, w = images.shape
    return images[:, :, : h // b * b, : w // b * b].reshape(n, c, h // b, b, w // b, b)


def _total_variation(images: np.ndarray) -> float:
    x = images.astype(np.float64)
    return float(np.abs(np.diff(x, axis=2)).mean() + np.abs(np.diff(x, axis=3)).mean())


def test_proxies_destroy_the_object_and_keep_low_level_statistics() -> None:
    data = load_dataset("fashion-mnist:train", limit=40, seed=3)
    proxies = make_proxies(data, seed=5)
    assert list(proxies) == [p.name for p in PROXIES]
    assert len({p.family for p in PROXIES}) == len(PROXIES)  # one family each
    for name, proxy in proxies.items():
        assert proxy.images.shape == data.images.shape and proxy.images.dtype == np.uint8
        assert np.mean(proxy.images != data.images) > 0.3, name  # most pixels change
        np.testing.assert_array_equal(make_proxies(data, seed=5)[name].images, proxy.images)  # seeded
    # local permutation: each 4x4 block keeps exactly its pixel values
    np.testing.assert_array_equal(
        np.sort(_blocks(proxies["local-permutation"].images).transpose(0, 1, 2, 4, 3, 5).reshape(40, -1, 16)),
        np.sort(_blocks(data.images).transpose(0, 1, 2, 4, 3, 5).reshape(40, -1, 16)),
    )
    assert not np.array_equal(
        make_proxies(data, seed=6)["local-permutation"].images, proxies["local-permutation"].images
    )
    # mosaic: constant blocks at the rounded block mean
    mosaic = _blocks(proxies["mosaic"].images).astype(np.float64)
    assert np.all(mosaic == mosaic[:, :, :, :1, :, :1])
    np.testing.assert_array_equal(
        mosaic[:, :, :, 0, :, 0], np.rint(_blocks(data.images).astype(np.float64).mean(axis=(3, 5)))
    )
    # blur: smoother than the data; blend: the mean of two images, mostly of different classes
    assert _total_variation(proxies["blur"].images) < 0.6 * _total_variation(data.images)
    blend = proxies["blend"].images.astype(np.int64)
    partners = [
        [
            j
            for j in range(40)
            if np.array_equal((data.images[i] + data.images[j].astype(np.int64) + 1) // 2, blend[i])
        ]
        for i in range(40)
    ]
    assert all(partners), "every blended image is the mean of two data images"
    assert data.labels is not None
    assert np.mean([data.labels[p[0]] != data.labels[i] for i, p in enumerate(partners)]) > 0.9


def test_proxies_of_colour_images_of_any_size() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 3, 30, 26), dtype=np.uint8)
    proxies = make_proxies(ImageSet("rgb", images))  # no labels
    for name, proxy in proxies.items():
        assert proxy.images.shape == images.shape, name
    assert all(not np.array_equal(b, x) for b, x in zip(proxies["blend"].images, images, strict=True))


def test_auroc_is_the_mann_whitney_statistic() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 5, size=300).astype(float), rng.integers(1, 6, size=200).astype(float)  # ties
    expected = roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[a, b])
    assert auroc(a, b) == pytest.approx(expected, abs=1e-12)
    assert auroc(np.zeros(3), np.ones(2)) == 1.0 and auroc(np.ones(3), np.zeros(2)) == 0.0
    with pytest.raises(ValueError):
        auroc(np.zeros(0), np.ones(2))


def test_the_rule_by_hand() -> None:
    # the best merit wins
    assert choose({"nll": 0.60, "typicality": 0.55, "complexity": 0.90}) == "complexity"
    # within the tolerance of the best, the simplest wins
    assert choose({"nll": 0.90 - TIE_TOLERANCE / 2, "complexity": 0.90}) == "nll"
    assert choose({"nll": 0.90 - 2 * TIE_TOLERANCE, "typicality": 0.895, "complexity": 0.90}) == "typicality"
    with pytest.raises(ValueError):
        choose({})


def test_selection_on_a_real_run_matches_an_independent_computation(
    quick_repository: dict[str, Path],
) -> None:
    run = Run(quick_repository[PIXEL + ":run"])
    assert run.config.calibration.statistic == "auto"  # the preset's default
    splits = load_splits(run.config, with_eval_sets=False)
    record = select_statistic(run, splits, device="cpu")
    assert record.by == "selection" and record.candidates == ["nll", "typicality", "complexity"]
    assert [p["name"] for p in record.proxies] == [p.name for p in PROXIES]
    # what it used, and what it did not
    validation = splits.validation
    assert record.data["fingerprint"] == validation.fingerprint() and record.data["size"] == len(validation)
    assert splits.combination is not None
    assert validation.fingerprint() not in {
        splits.calibration.fingerprint(),
        splits.combination.fingerprint(),
    }
    assert "test split" in record.data["not_used"]
    # every AUROC again, from the model's log-likelihoods, the PNG lengths and scikit-learn
    model = run.load_model("cpu")
    sets = {"validation": validation.images, **{k: v.images for k, v in make_proxies(validation).items()}}
    with torch.no_grad():
        bpd = {
            k: -model.log_likelihood(torch.from_numpy(x)).double().numpy() / (784 * LN2)
            for k, x in sets.items()
        }
    centre = float(bpd["validation"].mean())
    scores = {
        "nll": bpd,
        "typicality": {k: np.abs(v - centre) for k, v in bpd.items()},
        "complexity": {k: v - png_bits_per_dim(sets[k]) for k, v in bpd.items()},
    }
    for statistic, per_set in scores.items():
        for proxy in (p.name for p in PROXIES):
            id_s, ood_s = per_set["validation"], per_set[proxy]
            expected = roc_auc_score(np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))], np.r_[id_s, ood_s])
            assert record.auroc[statistic][proxy] == pytest.approx(expected, abs=2e-3), (statistic, proxy)
    worst = record.worst_case_auroc
    assert worst == {c: min(row.values()) for c, row in record.auroc.items()}
    mean = record.mean_auroc
    assert mean == pytest.approx(
        {c: float(np.mean(list(row.values()))) for c, row in record.auroc.items()}, abs=1e-6
    )
    # the merit is the mean over the proxies (issue 12), not the worst case
    assert record.chosen == choose(mean) and "mean AUROC" in record.rule
    # the run was calibrated with it, and its manifest says so
    calibration = read_calibration(run)
    assert calibration.statistic == record.chosen
    assert calibration.selection is not None and calibration.selection.by == "selection"
    manifest = verify_artifact(quick_repository[PIXEL])
    assert manifest.score.selection is not None
    assert manifest.score.selection.chosen == manifest.score.statistic == record.chosen
    assert manifest.score.selection.worst_case_auroc == pytest.approx(worst)


def test_an_explicit_statistic_overrides_the_selection(
    quick_repository: dict[str, Path], tmp_path: Path
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(quick_repository[PIXEL + ":run"], copy)
    record = calibrate(str(copy), device="cpu", statistic="typicality")
    assert record.statistic == "typicality" and record.selection is not None
    assert record.selection.by == "user" and record.selection.chosen == "typicality"
    assert "chosen by the user" in record.selection.rule
    assert read_calibration(Run(copy)) == record  # calibration.json reads back as written
    assert (copy / "scores" / "combination.npz").is_file()


def test_bad_candidates_are_refused(quick_repository: dict[str, Path]) -> None:
    run = Run(quick_repository[PIXEL + ":run"])
    splits = load_splits(run.config, with_eval_sets=False)
    with pytest.raises(ValueError, match="candidate statistics"):
        select_statistic(run, splits, candidates=["entropy"], device="cpu")
    with pytest.raises(FileNotFoundError, match="background"):
        select_statistic(run, splits, candidates=["nll", "likelihood_ratio"], device="cpu")


def test_selection_for_an_embedding_flow(quick_repository: dict[str, Path]) -> None:
    """An embedding flow chooses between the statistics it can compute; the proxies go through
    the backbone like any image."""
    run = Run(quick_repository["fmnist-embedding-quick:run"])
    record = select_statistic(run, load_splits(run.config, with_eval_sets=False), device="cpu")
    assert record.candidates == ["nll", "typicality"]
    assert set(record.auroc) == {"nll", "typicality"} and record.chosen == choose(record.mean_auroc)
    assert all(0.0 <= v <= 1.0 for row in record.auroc.values() for v in row.values())
