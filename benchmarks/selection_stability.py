"""Which statistic each proxy rule picks, run by run: the stability evidence behind
`training.selection`'s aggregate (the mean AUROC over the OOD proxies, since issue 12).

Reads only the selection records that `oodflow calibrate` / `oodflow build` wrote into each run's
calibration.json (per-proxy AUROC on the validation split and its proxies); no test image and no OOD
evaluation set is read. For every run it prints each candidate's worst-case and mean proxy AUROC and
the statistic each aggregate chooses (ties within `TIE_TOLERANCE` to the simplest, as the build
does), then how often each rule agreed with itself across the runs.

    python benchmarks/selection_stability.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.selection import choose  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders with a calibration.json")
    args = parser.parse_args()
    picks: dict[str, list[str]] = {"worst": [], "mean": []}
    print("| run | steps | candidate | worst-case | mean | per proxy |")
    print("|---|---:|---|---:|---:|---|")
    for run in args.runs:
        path = run / "calibration.json"
        if not path.is_file():
            print(f"selection_stability: {path} does not exist", file=sys.stderr)
            return 2
        selection = json.loads(path.read_text()).get("selection") or {}
        table: dict[str, dict[str, float]] = selection.get("auroc") or {}
        if not table:
            print(f"selection_stability: {path} has no proxy selection record", file=sys.stderr)
            return 2
        summary = run / "train_summary.json"
        steps = json.loads(summary.read_text()).get("steps", "") if summary.is_file() else ""
        worst = {c: min(row.values()) for c, row in table.items()}
        mean = {c: float(np.mean(list(row.values()))) for c, row in table.items()}
        for candidate, row in table.items():
            per_proxy = ", ".join(f"{p} {v:.3f}" for p, v in row.items())
            print(
                f"| {run} | {steps} | {candidate} | {worst[candidate]:.3f} | {mean[candidate]:.3f} | {per_proxy} |"
            )
        picks["worst"].append(choose(worst))
        picks["mean"].append(choose(mean))
        print(f"| {run} | | **chosen** | **{picks['worst'][-1]}** | **{picks['mean'][-1]}** | |")
    print()
    for rule, chosen in picks.items():
        counts = Counter(chosen)
        print(f"{rule}-case rule: " if rule == "worst" else "mean rule: ", end="")
        print(", ".join(f"{k} {v} of {len(chosen)}" for k, v in counts.most_common()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
