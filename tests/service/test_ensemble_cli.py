"""`oodflow ensemble create|list` on real exported models: pipeline-built quick pixel flows (whose
manifests let their splits be rebuilt) and the hand-exported test artifacts (whose do not)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models.artifact import ensemble_path, load_ensemble, load_manifest
from models.scores import calibrate_combination
from oodflow.cli import main
from oodflow.ensemble import calibration_images
from service.core import load_model
from tests.service.helpers import GREY_MODEL, RGB_MODEL, copy_artifact
from training.config import load_run_config
from training.data import load_dataset
from training.ensemble import halve
from training.pipeline import build_run
from training.runs import load_splits


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two quick RealNVP pixel flows on the same Fashion-MNIST splits, built by the pipeline."""
    root = tmp_path_factory.mktemp("ensemble-cli")
    for name, seed in (("quick-a", 0), ("quick-b", 3)):
        config = load_run_config(
            "fmnist-pixel-realnvp-quick", ["train.max_steps=10", f"model.seed={seed}", f"name={name}"]
        )
        build_run(config, root / "runs" / name, root / "repository", progress=False)
    return root / "repository"


def test_create_calibrates_on_the_combination_split_through_the_graphs(
    quick: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ensemble", "create", "ab", "--member", "quick-a", "--member", "quick-b",
                 "--repository", str(quick), "--device", "cpu"]) == 0  # fmt: skip
    assert "fisher over quick-a v1" in capsys.readouterr().out
    ens = load_ensemble(ensemble_path(quick, "ab"))
    assert [(m.name, m.version) for m in ens.members] == [("quick-a", 1), ("quick-b", 1)]
    assert "combination split of fashion-mnist:train" in ens.calibration.validation_set
    assert "0 equal images dropped" in ens.calibration.validation_set  # disjoint by construction
    # Recompute: the members' combination images, scored through the exported graphs; by default
    # (--weights auto) one half chose the weights, the other half alone sets the threshold.
    manifests = [load_manifest(quick / n / "1") for n in ("quick-a", "quick-b")]
    data = calibration_images(manifests, None, None, 0)
    models = [load_model(quick / n / "1", device="cpu") for n in ("quick-a", "quick-b")]
    p = np.stack([m.score(data.images).p_value for m in models])
    selection_half, calibration_half = halve(len(data.images))
    assert ens.selection is not None and ens.selection.by == "selection" and ens.weights is not None
    assert ens.selection.images is not None and ens.selection.images.size == len(selection_half)
    threshold, reference = calibrate_combination(p[:, calibration_half], "fisher", 0.05, ens.weights)
    assert ens.calibration.threshold == pytest.approx(threshold)
    assert ens.calibration.reference_scores == pytest.approx(reference.tolist())
    assert ens.calibration.validation_size == len(calibration_half) > 0
    # --weights equal: today's ensemble, every weight 1, every combination image sets the threshold
    assert main(["ensemble", "create", "ab-equal", "--member", "quick-a", "--member", "quick-b",
                 "--repository", str(quick), "--device", "cpu", "--weights", "equal"]) == 0  # fmt: skip
    assert "weights: quick-a 1, quick-b 1 (equal weights, asked for" in capsys.readouterr().out
    equal = load_ensemble(ensemble_path(quick, "ab-equal"))
    assert equal.weights is None and equal.selection is not None and equal.selection.by == "user"
    threshold, reference = calibrate_combination(p, "fisher", 0.05)
    assert equal.calibration.threshold == pytest.approx(threshold)
    assert equal.calibration.reference_scores == pytest.approx(reference.tolist())
    assert equal.calibration.validation_size == len(data.images)
    # The calibration images are none of the members' calibration or training images (splits of
    # the run config, rebuilt here independently of the manifests).
    config = load_run_config("fmnist-pixel-realnvp-quick", ["train.max_steps=10", "name=quick-a"])
    splits = load_splits(config, with_eval_sets=False)
    seen = {img.tobytes() for part in (splits.calibration, splits.train) for img in part.images}
    assert not seen & {img.tobytes() for img in data.images}
    assert len(data.images) == len(splits.combination)

    assert main(["ensemble", "create", "ab", "--member", "quick-a", "--member", "quick-b",
                 "--repository", str(quick)]) == 2  # fmt: skip
    assert "--force" in capsys.readouterr().err


def test_data_overlapping_the_members_images_is_dropped(quick: Path) -> None:
    """--data from the very file the members trained and calibrated on: those images are dropped."""
    manifests = [load_manifest(quick / n / "1") for n in ("quick-a", "quick-b")]
    data = calibration_images(manifests, "fashion-mnist:train", 4000, 1)
    dropped = int(data.description.split(" equal images dropped")[0].rsplit("; ", 1)[1])
    assert dropped > 0 and len(data.images) == 4000 - dropped
    with_own = load_dataset("fashion-mnist:train", limit=4000, seed=1).images
    kept = {img.tobytes() for img in data.images}
    assert len(kept & {img.tobytes() for img in with_own}) == len(data.images)


def test_members_without_a_rebuildable_split_need_data(
    artifacts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = tmp_path / "repository"
    copy_artifact(artifacts[GREY_MODEL], repository, "grey-a")
    copy_artifact(artifacts[GREY_MODEL], repository, "grey-b", statistic="complexity")
    copy_artifact(artifacts[RGB_MODEL], repository, "colour")
    base = [
        "ensemble",
        "create",
        "g",
        "--member",
        "grey-a",
        "--member",
        "grey-b",
        "--repository",
        str(repository),
    ]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "pass --data" in err and "grey-a" in err and "Traceback" not in err
    assert main([*base, "--data", "fashion-mnist:test", "--limit", "200"]) == 0
    ens = load_ensemble(ensemble_path(repository, "g"))
    # 200 images: 100 choose the weights (on proxies of them), the other 100 set the threshold
    assert "not checked" in ens.calibration.validation_set and ens.calibration.validation_size == 100
    assert ens.selection is not None and ens.selection.images is not None
    assert ens.selection.images.source == "fashion-mnist:test" and ens.selection.images.size == 100
    assert [m.statistic for m in ens.members] == ["nll", "complexity"]
    # Another input spec: refused with both specs named.
    assert main(["ensemble", "create", "x", "--member", "grey-a", "--member", "colour",
                 "--repository", str(repository), "--data", "fashion-mnist:test"]) == 2  # fmt: skip
    assert "same input" in capsys.readouterr().err
    assert main(["ensemble", "create", "y", "--member", "grey-a", "--member", "nope",
                 "--repository", str(repository)]) == 2  # fmt: skip
    assert "nope" in capsys.readouterr().err


def test_list_reports_valid_stale_and_failed(
    quick: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(quick, repository)
    assert main(["ensemble", "create", "ab", "--member", "quick-a", "--member", "quick-b",
                 "--repository", str(repository), "--force"]) == 0  # fmt: skip
    text = (repository / "_ensembles" / "ab.json").read_text().replace('"name": "ab"', '"name": "old"', 1)
    (repository / "_ensembles" / "old.json").write_text(text)
    shutil.copytree(
        repository / "quick-b" / "1", repository / "quick-b" / "2"
    )  # not verifiable: manifest says 1
    (repository / "_ensembles" / "broken.json").write_text("{not json")
    capsys.readouterr()
    assert main(["ensemble", "list", "--repository", str(repository)]) == 0
    lines = {line.split(":", 1)[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["broken"].startswith("broken: failed")
    assert lines["ab"].startswith("ab: stale") and "quick-b" in lines["ab"]  # the service serves quick-b v2
    assert lines["old"].startswith("old: stale")
    shutil.rmtree(repository / "quick-b" / "2")
    assert main(["ensemble", "list", "--repository", str(repository)]) == 0
    lines = {line.split(":", 1)[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["ab"].startswith("ab: valid fisher over quick-a v1, quick-b v1")
