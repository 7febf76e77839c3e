"""`oodflow benchmark --baseline`: before/after tables and the issue-12 goal lines, on real runs of the
command over the tiny session-fixture models (tests/training/conftest.py).

The baseline ("before") is the ensemble `quick-pair`; the "after" run is the pixel member alone, with
partly different near- and far-OOD sets, so the comparison has a headline pair that differs
(combined verdict -> the pixel model's shipped score), member scores present in both runs, and sets
and scores present in only one run.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

import training.benchmark as benchmark_module
from models.artifact import load_manifest
from oodflow.cli import main
from tests.training.test_benchmark import ENSEMBLE, bench_repository  # noqa: F401  (module fixture)
from training.benchmark.compare import (
    BaselineError,
    compare,
    goal_findings,
    goal_lines,
    load_baseline,
)
from training.benchmark.metrics import conformal_flag_range

PIXEL = "fmnist-pixel-quick"
LIMIT = "48"
COMMON = ["--symmetries", "hflip", "--limit", LIMIT, "--resamples", "30", "--no-progress"]


def _benchmark(repository: Path, target: str, output: Path, *extra: str) -> int:
    return main(
        ["benchmark", target, "--repository", str(repository), "--output", str(output), *COMMON, *extra]
    )


@pytest.fixture(scope="module")
def runs(
    bench_repository: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("baseline")
    before_dir, after_dir = root / "before", root / "after"
    near_before = ["--near", "vflip,rot90", "--far", "noise", "--far", "sklearn-digits"]
    assert _benchmark(bench_repository, ENSEMBLE, before_dir, *near_before) == 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = _benchmark(
            bench_repository,
            PIXEL,
            after_dir,
            "--near",
            "vflip,invert",
            "--far",
            "noise",
            "--far",
            "constant",
            "--baseline",
            str(before_dir / "benchmark.json"),
        )
    assert rc == 0
    return {
        "repository": bench_repository,
        "before_path": before_dir / "benchmark.json",
        "before": json.loads((before_dir / "benchmark.json").read_text()),
        "after": json.loads((after_dir / "benchmark.json").read_text()),
        "markdown": (after_dir / "benchmark.md").read_text(),
        "printed": printed.getvalue(),
    }


def test_baseline_made_by_the_command_round_trips(runs: dict[str, Any]) -> None:
    before, after = runs["before"], runs["after"]
    base = after["baseline"]
    # The after JSON says which run it was compared with: path, creation time, models and versions.
    assert base["path"] == str(runs["before_path"])
    assert base["created_at"] == before["created_at"] and base["command"] == before["command"]
    assert [(m["name"], m["version"]) for m in base["members"]] == [
        (m["name"], m["version"]) for m in before["members"]
    ]
    assert base["ensemble"]["name"] == ENSEMBLE and after["ensemble"] is None
    assert "--baseline " + str(runs["before_path"]) in after["command"]
    assert len(base["sha256"]) == 64
    # The fingerprint of the in-distribution test images is recorded (and equal: the same images).
    assert before["in_distribution_test"]["fingerprint"] == after["in_distribution_test"]["fingerprint"]
    # Reading the files back gives the comparison the command wrote, to the last bit.
    recomputed = compare(after, load_baseline(runs["before_path"]))
    assert json.loads(json.dumps(recomputed)) == {k: after[k] for k in ("baseline", "comparison")}
    # An "after" file is itself a valid baseline; compared with itself nothing changes.
    itself = compare(after, load_baseline(runs["before_path"].parent.parent / "after" / "benchmark.json"))
    for table in itself["comparison"]["tables"]:
        for row in table["rows"]:
            assert row["status"] == "both" and row["difference"] == 0.0 and row["intervals_overlap"] is True
    # The Markdown names both runs.
    text = runs["markdown"]
    section = text.split("## Before and after")[1].split("\n## ")[0]
    assert f"`{runs['before_path']}`" in section and before["created_at"] in section
    assert f"`{PIXEL}` v{after['members'][0]['version']}" in section


def _independent_rows(
    before: dict[str, Any], after: dict[str, Any], b_key: str, a_key: str
) -> dict[str, Any]:
    """Set -> (difference, overlap) straight from the two JSONs' result rows."""
    b_rows = {r["set"]: r for r in before["results"] if r["score"] == b_key}
    a_rows = {r["set"]: r for r in after["results"] if r["score"] == a_key}
    out = {}
    for name in set(b_rows) & set(a_rows):
        (b_lo, b_hi), (a_lo, a_hi) = b_rows[name]["auroc_ci"], a_rows[name]["auroc_ci"]
        overlap = not (a_hi < b_lo or b_hi < a_lo)
        out[name] = (a_rows[name]["auroc"] - b_rows[name]["auroc"], overlap)
    return out


def test_differences_equal_an_independent_computation_from_the_two_jsons(runs: dict[str, Any]) -> None:
    before, after = runs["before"], runs["after"]
    comparison = after["comparison"]
    statistic = load_manifest(runs["repository"] / PIXEL / "1").score.statistic
    pairs = [(t["before_score"], t["after_score"]) for t in comparison["tables"]]
    # The headlines first (combined verdict before, the pixel model's shipped score after), then every
    # score both runs have: the pixel model's statistics.
    assert pairs[0] == ("combined", f"{PIXEL}/{statistic}")
    assert {a for b, a in pairs[1:] if a == b} == {k for k in after["scores"] if k in before["scores"]}
    assert len(pairs) == 1 + len([k for k in after["scores"] if k in before["scores"]])
    for table in comparison["tables"]:
        expected = _independent_rows(before, after, table["before_score"], table["after_score"])
        both = {r["set"]: r for r in table["rows"] if r["status"] == "both"}
        assert set(both) == set(expected) == {"vflip", "noise"}
        for name, (difference, overlap) in expected.items():
            assert both[name]["difference"] == pytest.approx(difference, abs=1e-15)
            assert both[name]["intervals_overlap"] is overlap
        if table["before_score"] == table["after_score"]:
            # The same graph on the same images: a member score shared by both runs does not move.
            assert all(both[n]["difference"] == 0.0 for n in both)
        # Sets in one run only are rows that say so, never dropped.
        only = {r["set"]: r["status"] for r in table["rows"] if r["status"] != "both"}
        assert only == {
            "rot90": "only_before",
            "sklearn-digits": "only_before",
            "invert": "only_after",
            "constant": "only_after",
        }
    headline = comparison["tables"][0]
    assert any(r["difference"] != 0.0 for r in headline["rows"] if r["status"] == "both")
    assert {(s["name"], s["family"]) for s in comparison["sets_only_before"]} == {
        ("rot90", "near"),
        ("sklearn-digits", "far"),
    }
    assert {(s["name"], s["family"]) for s in comparison["sets_only_after"]} == {
        ("invert", "near"),
        ("constant", "far"),
    }
    assert set(comparison["scores_only_before"]) == {
        "combined",
        *(k for k in before["scores"] if k.startswith("fmnist-embedding-quick/")),
    }
    assert comparison["scores_only_after"] == []
    # False positives at the threshold: the headline pair on the test images and on the symmetry.
    fp = {(e["before_score"], e["set"]): e for e in comparison["false_positives"]}
    test_before = next(e for e in before["in_distribution_test"]["flagged"] if e["score"] == "combined")
    assert fp[("combined", "test")]["before"]["flagged"] == test_before["flagged"]
    assert ("combined", "hflip") in fp

    # The Markdown shows the same figures.
    text = runs["markdown"].split("## Before and after")[1].split("\n## ")[0]
    vflip = next(r for r in headline["rows"] if r["set"] == "vflip")
    line = next(x for x in text.splitlines() if x.startswith("| near | vflip |"))
    assert f"{vflip['difference']:+.3f}" in line and f"{vflip['auroc_before']:.3f}" in line
    assert (
        "| near | rot90 |" in text and "not in this run" in text.split("| near | rot90 |")[1].split("\n")[0]
    )
    assert "not in the baseline" in text.split("| far | constant |")[1].split("\n")[0]
    only_line = next(x for x in text.splitlines() if x.startswith("Scores in the baseline only:"))
    assert "`combined`" in only_line and "`fmnist-embedding-quick/nll`" in only_line
    assert f"| `combined` → {PIXEL} " in text  # the headline pair's false-positive rows
    # ... and so does the console.
    assert "only in the baseline" in runs["printed"] and "vflip" in runs["printed"]


def _finding(goal: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in goal["findings"] if f["set"] == name)


def test_goal_lines_are_computed_and_flip_on_a_doctored_json(runs: dict[str, Any]) -> None:
    after = runs["after"]
    headline = after["headline"]
    goal = after["goal"]
    assert goal == json.loads(json.dumps(goal_findings(after)))
    # One finding per near and far set, none for the declared symmetry, one for the test images.
    assert [(f["kind"], f["set"]) for f in goal["findings"]] == [
        ("near", "vflip"),
        ("near", "invert"),
        ("far", "noise"),
        ("far", "constant"),
        ("in_distribution", after["in_distribution_test"]["dataset"]),
    ]
    for line in goal_lines(goal, headline):
        assert line in runs["printed"]

    def doctored(set_name: str, auroc: float) -> dict[str, Any]:
        data = copy.deepcopy(after)
        row = next(r for r in data["results"] if r["set"] == set_name and r["score"] == headline)
        row["auroc"] = auroc
        return data

    for set_name, goal_value in (("vflip", 0.95), ("noise", 0.99)):
        met = goal_findings(doctored(set_name, goal_value))
        missed = goal_findings(doctored(set_name, math.nextafter(goal_value, 0.0)))
        assert _finding(met, set_name)["met"] is True
        assert _finding(missed, set_name)["met"] is False
        met_line = next(x for x in goal_lines(met, "h") if f"-OOD {set_name}:" in x)
        missed_line = next(x for x in goal_lines(missed, "h") if f"-OOD {set_name}:" in x)
        assert met_line.endswith(": met") and missed_line.endswith(": not met")
        tally = [int(goal_lines(g, "h")[-1].split()[3]) for g in (met, missed)]
        assert tally[0] == tally[1] + 1

    # In-distribution: the flagged count against the range split-conformal calibration predicts.
    data = copy.deepcopy(after)
    entry = next(e for e in data["in_distribution_test"]["flagged"] if e["score"] == headline)
    entry_set = data["in_distribution_test"]["dataset"]
    low, high = entry["conformal_range"]
    assert [low, high] == list(
        conformal_flag_range(entry["calibration_size"], entry["target_fpr"], entry["size"])
    )
    for flagged, expected in ((low, True), (high, True), (low - 1, False), (high + 1, False)):
        entry["flagged"] = flagged
        finding = _finding(goal_findings(data), entry_set)
        assert finding["met"] is expected, flagged
    assert goal_lines(goal_findings(data), "h")[-2].endswith("(95%, beta-binomial): not met")
    # A benchmark file from before the range was recorded falls back to the test-only interval.
    for key in ("calibration_size", "conformal_range", "within_conformal_range"):
        entry.pop(key)
    target = entry["target_fpr"]
    entry["flagged_ci"] = [target - 0.01, target]
    assert _finding(goal_findings(data), entry_set)["met"] is True
    entry["flagged_ci"] = [target + 1e-9, target + 0.02]
    missed = goal_findings(data)
    assert _finding(missed, entry_set)["met"] is False
    assert goal_lines(missed, "h")[-2].endswith("outside the interval: not met")
    # The thresholds are the issue's: changing them changes the verdicts, the figures stay.
    strict = goal_findings(after, near_goal=1.01, far_goal=1.01)
    assert not any(f["met"] for f in strict["findings"] if f["kind"] != "in_distribution")


def _bad_baselines(runs: dict[str, Any], folder: Path) -> list[tuple[str, str]]:
    """(path, expected message) pairs."""
    before = runs["before"]
    out = [(str(folder / "missing.json"), "does not exist"), (str(folder), "is not a file")]
    (folder / "text.json").write_text("AUROC before: 0.9\n")
    out.append((str(folder / "text.json"), "is not readable JSON"))
    (folder / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    out.append((str(folder / "binary.json"), "is not readable JSON"))
    (folder / "list.json").write_text("[1, 2]")
    out.append((str(folder / "list.json"), "is not an oodflow benchmark JSON"))
    ensemble = runs["repository"] / "_ensembles" / f"{ENSEMBLE}.json"
    out.append((str(ensemble), "is not an oodflow benchmark JSON"))
    broken = copy.deepcopy(before)
    broken["results"][0]["auroc"] = "high"
    (folder / "broken.json").write_text(json.dumps(broken))
    out.append((str(folder / "broken.json"), "not an oodflow benchmark JSON (results.0.auroc:"))

    def doctored(name: str, change: Any) -> str:
        data = copy.deepcopy(before)
        change(data)
        (folder / name).write_text(json.dumps(data))
        return str(folder / name)

    def other_dataset(d: dict[str, Any]) -> None:
        d["in_distribution_test"]["dataset"] = "mnist:test"

    def other_training(d: dict[str, Any]) -> None:
        for m in d["members"]:
            m["in_distribution"] = "mnist:train"

    def other_size(d: dict[str, Any]) -> None:
        d["in_distribution_test"]["size"] = 10000

    def other_pixels(d: dict[str, Any]) -> None:
        d["in_distribution_test"]["fingerprint"] = "0" * 64

    out += [
        (doctored("dataset.json", other_dataset), "measured on the in-distribution test set mnist:test"),
        (doctored("training.json", other_training), "is for in-distribution data mnist:train"),
        (doctored("size.json", other_size), "10000 in-distribution test images, this run on 48"),
        (doctored("pixels.json", other_pixels), "other in-distribution test images"),
    ]
    return out


def test_bad_baselines_are_one_line_errors_before_any_scoring(
    runs: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    scored: list[int] = []
    real = benchmark_module._score_set

    def counting(*args: Any, **kwargs: Any) -> Any:
        scored.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(benchmark_module, "_score_set", counting)
    cases = _bad_baselines(runs, tmp_path)
    for path, message in cases:
        output = tmp_path / "out"
        rc = _benchmark(runs["repository"], PIXEL, output, "--near", "vflip", "--baseline", path)
        err = capsys.readouterr().err.strip()
        assert rc == 2, (path, err)
        assert message in err, (message, err)
        assert (
            len(err.splitlines()) == 1
            and err.startswith("oodflow: error: baseline")
            and "Traceback" not in err
        )
        assert not output.exists() and not scored, path
    # The baseline may not be the file this run overwrites (the "before" would be lost).
    same = tmp_path / "same"
    same.mkdir()
    (same / "benchmark.json").write_text(runs["before_path"].read_text())
    rc = _benchmark(runs["repository"], PIXEL, same, "--baseline", str(same / "benchmark.json"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "is the file this run writes" in err and len(err.splitlines()) == 1
    assert (same / "benchmark.json").read_text() == runs["before_path"].read_text() and not scored
    # The file is checked before the target: a bad baseline is the error even for an unknown model.
    rc = main(
        ["benchmark", "no-such-model", "--baseline", cases[0][0], "--repository", str(runs["repository"])]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    # The API raises the same one-line error type.
    with pytest.raises(BaselineError, match="does not exist"):
        load_baseline(cases[0][0])
