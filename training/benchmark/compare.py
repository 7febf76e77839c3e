"""Before/after: a benchmark run compared with an earlier run's `benchmark.json` (`--baseline`).

The baseline is read and checked before any scoring (`load_baseline`, then `check_comparable` once
the in-distribution test set is known): a missing, unreadable or foreign file, or one measured on
other in-distribution data, is a one-line `BaselineError`. `compare` then pairs the two runs' rows
by set and score:

- the headline score of each run (the combined verdict for ensembles) and every other score key
  present in both runs (e.g. `fmnist-pixel/complexity`), set by set: AUROC before and after with
  their bootstrap intervals, the difference (after - before) and whether the two intervals overlap;
- sets and scores present in only one run, and sets whose family changed (near-OOD in one run, a
  declared symmetry in the other), are listed as such;
- the flagged fraction at the threshold on the in-distribution test images and on the declared
  symmetries, before and after, for every thresholded score present in both runs.

`goal_findings` checks the issue-12 goal on one run's own figures (its headline score): AUROC >=
`NEAR_GOAL` on every near-OOD set that is not a declared symmetry, >= `FAR_GOAL` on every far-OOD
set, and the in-distribution flagged fraction's 95% interval containing the target FPR.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from training.data import DatasetError

__all__ = [
    "FAR_GOAL",
    "NEAR_GOAL",
    "Baseline",
    "BaselineError",
    "BenchmarkRecord",
    "check_comparable",
    "compare",
    "goal_findings",
    "goal_lines",
    "intervals_overlap",
    "load_baseline",
]

NEAR_GOAL = 0.95  # issue 12: combined-verdict AUROC on every near-OOD set that is not a symmetry
FAR_GOAL = 0.99  # issue 12: combined-verdict AUROC on every far-OOD set


class BaselineError(DatasetError):
    """A `--baseline` that cannot be compared with this run; the message is one line."""


# --------------------------------------------------------------------------- the JSON, typed


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Row(_Loose):
    set: str
    family: Literal["near", "far"]
    score: str
    size: int
    auroc: float
    auroc_ci: list[float] = Field(min_length=2, max_length=2)


class _Set(_Loose):
    name: str
    family: Literal["near", "far", "symmetry"]
    size: int


class _Flagged(_Loose):
    score: str
    flagged: int
    size: int
    flagged_fraction: float
    flagged_ci: list[float] = Field(min_length=2, max_length=2)
    target_fpr: float
    # absent in benchmark files written before the conformal range was reported
    calibration_size: int | None = None
    conformal_range: list[int] | None = None


class _SymmetryCheck(_Loose):
    set: str
    score: str
    size: int
    flagged: int | None = None
    flagged_fraction: float | None = None
    flagged_ci: list[float] | None = None
    target_fpr: float | None = None


class _Test(_Loose):
    dataset: str
    size: int
    shape: list[int]
    flagged: list[_Flagged]
    fingerprint: str | None = None  # recorded since --baseline exists; older files lack it


class _Member(_Loose):
    name: str
    version: int
    kind: str
    statistic: str
    in_distribution: str


class _Ensemble(_Loose):
    name: str
    rule: str
    members: list[str]


class BenchmarkRecord(_Loose):
    """The parts of a `benchmark.json` that a before/after comparison reads."""

    benchmark: str
    kind: str
    created_at: str
    command: str = ""
    headline: str
    scores: list[str]
    members: list[_Member] = Field(min_length=1)
    ensemble: _Ensemble | None
    in_distribution_test: _Test
    sets: list[_Set]
    results: list[_Row]
    symmetry_checks: list[_SymmetryCheck] = []
    bootstrap: dict[str, Any] = {}


@dataclass(frozen=True)
class Baseline:
    """A checked baseline: the path as given, the file's sha256 and its typed content."""

    path: str
    sha256: str
    record: BenchmarkRecord


def _short(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "top level"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {' '.join(first['msg'].split())}{more}"


def load_baseline(path: str | Path) -> Baseline:
    """Read and check a `benchmark.json` written by an earlier `oodflow benchmark`; one-line errors."""
    file = Path(path)
    if not file.exists():
        raise BaselineError(f"baseline {path} does not exist")
    if not file.is_file():
        raise BaselineError(f"baseline {path} is not a file (give the benchmark.json of an earlier run)")
    try:
        raw = file.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise BaselineError(f"baseline {path} is not readable JSON ({reason})") from None
    if not isinstance(data, dict) or "results" not in data or "in_distribution_test" not in data:
        raise BaselineError(
            f"baseline {path} is not an oodflow benchmark JSON (no 'results' and 'in_distribution_test'; "
            "give the benchmark.json an earlier `oodflow benchmark` wrote)"
        )
    try:
        record = BenchmarkRecord.model_validate(data)
    except ValidationError as exc:
        raise BaselineError(f"baseline {path} is not an oodflow benchmark JSON ({_short(exc)})") from None
    return Baseline(str(path), hashlib.sha256(raw).hexdigest(), record)


def check_comparable(
    baseline: Baseline,
    *,
    in_distribution: str,
    dataset: str,
    size: int,
    shape: list[int],
    fingerprint: str | None,
) -> None:
    """Raise `BaselineError` unless the baseline was measured against the same in-distribution data:
    the same training data spec, the same test set (name, size, image shape and, when the baseline
    records it, the same pixels)."""
    before = baseline.record
    test = before.in_distribution_test
    trained_on = sorted({m.in_distribution for m in before.members})
    where = f"baseline {baseline.path}"
    if in_distribution not in trained_on:
        raise BaselineError(
            f"{where} is for in-distribution data {', '.join(trained_on)}, this run for {in_distribution}: "
            "not comparable"
        )
    if test.dataset != dataset or list(test.shape) != list(shape):
        raise BaselineError(
            f"{where} was measured on the in-distribution test set {test.dataset} "
            f"({'x'.join(map(str, test.shape))}), this run on {dataset} ({'x'.join(map(str, shape))}): "
            "not comparable"
        )
    if test.size != size:
        raise BaselineError(
            f"{where} was measured on {test.size} in-distribution test images, this run on {size} "
            "(another --limit?): not comparable"
        )
    if test.fingerprint is not None and fingerprint is not None and test.fingerprint != fingerprint:
        raise BaselineError(
            f"{where} was measured on other in-distribution test images (pixel fingerprint differs): "
            "not comparable"
        )


# --------------------------------------------------------------------------- comparison


def intervals_overlap(a: list[float], b: list[float]) -> bool | None:
    """Whether two closed intervals share a point; None when either is undefined (no bootstrap)."""
    if any(math.isnan(v) for v in (*a, *b)):
        return None
    return a[0] <= b[1] and b[0] <= a[1]


def _pairs(before: BenchmarkRecord, after: BenchmarkRecord) -> list[tuple[str, str]]:
    """`(before key, after key)`: the two headlines first, then every other key both runs scored."""
    pairs = [(before.headline, after.headline)]
    pairs += [(k, k) for k in after.scores if k in before.scores and (k, k) not in pairs]
    return pairs


def _flagged_entry(e: _Flagged | _SymmetryCheck) -> dict[str, Any]:
    return {
        "flagged": e.flagged,
        "size": e.size,
        "flagged_fraction": e.flagged_fraction,
        "flagged_ci": e.flagged_ci,
        "target_fpr": e.target_fpr,
    }


def compare(after_result: dict[str, Any], baseline: Baseline) -> dict[str, Any]:
    """`{"baseline": ..., "comparison": ...}` for a run's result dict (see module docstring)."""
    after = BenchmarkRecord.model_validate({k: v for k, v in after_result.items() if not k.startswith("_")})
    before = baseline.record
    before_sets = {s.name: s for s in before.sets}
    after_sets = {s.name: s for s in after.sets}
    before_rows = {(r.set, r.score): r for r in before.results}
    after_rows = {(r.set, r.score): r for r in after.results}
    # Sets in the order of this run, then the baseline's sets it lacks.
    ordered = list(after_sets) + [n for n in before_sets if n not in after_sets]

    tables = []
    for before_key, after_key in _pairs(before, after):
        rows = []
        for name in ordered:
            b_set, a_set = before_sets.get(name), after_sets.get(name)
            b_row, a_row = before_rows.get((name, before_key)), after_rows.get((name, after_key))
            if b_row is None and a_row is None:
                continue  # a symmetry in both runs (no OOD row): compared as a flagged fraction below
            row: dict[str, Any] = {
                "set": name,
                "family_before": b_set.family if b_set else None,
                "family_after": a_set.family if a_set else None,
                "size_before": b_set.size if b_set else None,
                "size_after": a_set.size if a_set else None,
            }
            if b_row is not None and a_row is not None:
                row.update(
                    status="both",
                    auroc_before=b_row.auroc,
                    auroc_before_ci=b_row.auroc_ci,
                    auroc_after=a_row.auroc,
                    auroc_after_ci=a_row.auroc_ci,
                    difference=a_row.auroc - b_row.auroc,
                    intervals_overlap=intervals_overlap(b_row.auroc_ci, a_row.auroc_ci),
                )
            elif b_row is not None:
                row.update(status="only_before", auroc_before=b_row.auroc, auroc_before_ci=b_row.auroc_ci)
            else:
                assert a_row is not None
                row.update(status="only_after", auroc_after=a_row.auroc, auroc_after_ci=a_row.auroc_ci)
            rows.append(row)
        tables.append({"before_score": before_key, "after_score": after_key, "rows": rows})

    # False positives at the threshold: in-distribution test images and declared symmetries.
    before_flags = {e.score: e for e in before.in_distribution_test.flagged}
    after_flags = {e.score: e for e in after.in_distribution_test.flagged}
    before_sym = {(c.set, c.score): c for c in before.symmetry_checks if c.flagged is not None}
    after_sym = {(c.set, c.score): c for c in after.symmetry_checks if c.flagged is not None}
    false_positives = []
    for before_key, after_key in _pairs(before, after):
        if before_key not in before_flags or after_key not in after_flags:
            continue
        entries: list[tuple[str, _Flagged | _SymmetryCheck | None, _Flagged | _SymmetryCheck | None]] = [
            ("test", before_flags[before_key], after_flags[after_key])
        ]
        symmetry_names = [s.name for s in after.sets if s.family == "symmetry"]
        symmetry_names += [
            s.name for s in before.sets if s.family == "symmetry" and s.name not in symmetry_names
        ]
        for name in symmetry_names:
            b_check, a_check = before_sym.get((name, before_key)), after_sym.get((name, after_key))
            entries.append((name, b_check, a_check))
        for set_name, b, a in entries:
            false_positives.append(
                {
                    "set": set_name,
                    "before_score": before_key,
                    "after_score": after_key,
                    "before": _flagged_entry(b) if b is not None else None,
                    "after": _flagged_entry(a) if a is not None else None,
                }
            )

    def listed(names: set[str], sets: dict[str, _Set]) -> list[dict[str, str]]:
        return [{"name": n, "family": sets[n].family} for n in sorted(names)]

    family_changed = [
        {"name": n, "before": before_sets[n].family, "after": after_sets[n].family}
        for n in ordered
        if n in before_sets and n in after_sets and before_sets[n].family != after_sets[n].family
    ]
    return {
        "baseline": {
            "path": baseline.path,
            "sha256": baseline.sha256,
            "benchmark": before.benchmark,
            "kind": before.kind,
            "created_at": before.created_at,
            "command": before.command,
            "headline": before.headline,
            "members": [
                {"name": m.name, "version": m.version, "kind": m.kind, "statistic": m.statistic}
                for m in before.members
            ],
            "ensemble": None
            if before.ensemble is None
            else {
                "name": before.ensemble.name,
                "rule": before.ensemble.rule,
                "members": before.ensemble.members,
            },
            "bootstrap": before.bootstrap,
            "in_distribution_test": {
                "dataset": before.in_distribution_test.dataset,
                "size": before.in_distribution_test.size,
            },
        },
        "comparison": {
            "tables": tables,
            "false_positives": false_positives,
            "sets_only_before": listed(set(before_sets) - set(after_sets), before_sets),
            "sets_only_after": listed(set(after_sets) - set(before_sets), after_sets),
            "family_changed": family_changed,
            "scores_only_before": [k for k in before.scores if k not in after.scores],
            "scores_only_after": [k for k in after.scores if k not in before.scores],
        },
    }


# --------------------------------------------------------------------------- goal


def goal_findings(
    result: dict[str, Any], *, near_goal: float = NEAR_GOAL, far_goal: float = FAR_GOAL
) -> dict[str, Any]:
    """The issue-12 goal checked on one run's own headline figures (a result dict or its JSON).

    Returns `{"score", "near_auroc", "far_auroc", "findings": [...]}`; each finding has `kind`
    (`near` / `far` / `in_distribution`), `set`, `value`, `ci`, `goal` (text) and `met` (bool)."""
    record = BenchmarkRecord.model_validate({k: v for k, v in result.items() if not k.startswith("_")})
    headline = record.headline
    rows = {(r.set, r.score): r for r in record.results}
    findings: list[dict[str, Any]] = []
    for s in record.sets:
        if s.family == "symmetry":
            continue  # a declared symmetry is a false-positive check, not OOD
        row = rows.get((s.name, headline))
        if row is None:
            continue
        goal = near_goal if s.family == "near" else far_goal
        findings.append(
            {
                "kind": s.family,
                "set": s.name,
                "value": row.auroc,
                "ci": row.auroc_ci,
                "goal": f"AUROC >= {goal}",
                "threshold": goal,
                "met": bool(row.auroc >= goal),
            }
        )
    for e in record.in_distribution_test.flagged:
        if e.score != headline:
            continue
        low, high = e.flagged_ci
        finding: dict[str, Any] = {
            "kind": "in_distribution",
            "set": record.in_distribution_test.dataset,
            "value": e.flagged_fraction,
            "ci": e.flagged_ci,
            "target_fpr": e.target_fpr,
            "target_within_ci": bool(low <= e.target_fpr <= high),
        }
        if e.conformal_range is not None and e.calibration_size is not None:
            # "at its target" for a split-conformal threshold: the flagged count lies in the range that
            # calibration on `calibration_size` images predicts (training.benchmark.metrics)
            r_low, r_high = e.conformal_range
            finding.update(
                goal=f"flagged count inside the 95% range split-conformal calibration on {e.calibration_size} "
                f"images predicts at target FPR {e.target_fpr}",
                calibration_size=e.calibration_size,
                conformal_range=[r_low / e.size, r_high / e.size],
                met=bool(r_low <= e.flagged <= r_high),
            )
        else:
            finding.update(
                goal=f"95% interval of the flagged fraction contains the target FPR {e.target_fpr}",
                met=finding["target_within_ci"],
            )
        findings.append(finding)
    return {"score": headline, "near_auroc": near_goal, "far_auroc": far_goal, "findings": findings}


def _interval(ci: list[float] | None, fmt: str) -> str:
    if ci is None or any(math.isnan(v) for v in ci):
        return "no interval"
    return f"{ci[0]:{fmt}}-{ci[1]:{fmt}}"


def goal_lines(goal: dict[str, Any], label: str) -> list[str]:
    """One line per finding of `goal_findings` ("met" / "not met" with the figure), then a tally;
    `label` names the headline score (e.g. "combined verdict (fisher)")."""
    lines = []
    for f in goal["findings"]:
        verdict = "met" if f["met"] else "not met"
        if f["kind"] == "in_distribution" and "conformal_range" in f:
            where = "inside" if f["met"] else "outside"
            ci_where = "inside" if f["target_within_ci"] else "outside"
            lines.append(
                f"in-distribution {f['set']}: {label} flags {f['value']:.2%} (test images alone: 95% "
                f"interval {_interval(f['ci'], '.2%')}, target {ci_where}); {where} the "
                f"{_interval(f['conformal_range'], '.2%')} that a {f['target_fpr']:.1%} threshold calibrated "
                f"on {f['calibration_size']} images gives (95%, beta-binomial): {verdict}"
            )
        elif f["kind"] == "in_distribution":
            where = "inside" if f["met"] else "outside"
            lines.append(
                f"in-distribution {f['set']}: {label} flags {f['value']:.2%} "
                f"(95% interval {_interval(f['ci'], '.2%')}), target FPR {f['target_fpr']:.1%} {where} "
                f"the interval: {verdict}"
            )
        else:
            lines.append(
                f"{f['kind']}-OOD {f['set']}: {label} AUROC {f['value']:.4f} "
                f"({_interval(f['ci'], '.4f')}), goal >= {f['threshold']}: {verdict}"
            )
    met = sum(f["met"] for f in goal["findings"])
    lines.append(f"goal met on {met} of {len(goal['findings'])} checks")
    return lines
