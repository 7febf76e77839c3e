"""Near-OOD figures on VALIDATION data only: how issue 12's embedding member was chosen.

Scores the 1,000 validation images of the default pixel run (held out of every default member's
training and calibration), their near-OOD transforms and the four selection proxies through the
exported graphs of two repositories' members, and prints the AUROC of each member alone and of
Fisher's combination (weights 1, 1/2, 1/4 on the pixel member). No test image and no far-OOD
dataset is read: these are the figures a design choice may be made on.

    .venv/bin/python benchmarks/near_ood_validation.py --before /tmp/old-repo --after model-repository
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.artifact import latest_version  # noqa: E402
from models.scores import p_value  # noqa: E402
from training.benchmark.graphs import GraphModel, complexity_bits, statistic_scores  # noqa: E402
from training.benchmark.metrics import ood_metrics_with_ci  # noqa: E402
from training.benchmark.sets import NEAR_TRANSFORMS  # noqa: E402
from training.config import PRESETS  # noqa: E402
from training.data import conform_images  # noqa: E402
from training.runs import load_splits  # noqa: E402
from training.selection import make_proxies  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="repository with the earlier members")
    parser.add_argument("--after", type=Path, default=ROOT / "model-repository")
    parser.add_argument("--pixel", default="fmnist-pixel")
    parser.add_argument("--embedding", default="fmnist-embedding")
    args = parser.parse_args()

    validation = load_splits(PRESETS["fmnist-pixel"], with_eval_sets=False).validation
    sets = {"validation": validation.images}
    sets.update({n: np.ascontiguousarray(fn(validation.images, 0)) for n, (_, fn) in NEAR_TRANSFORMS.items()})
    sets.update({f"proxy:{n}": d.images for n, d in make_proxies(validation, seed=0).items()})

    members = {}
    for tag, repository in (("before", args.before), ("after", args.after)):
        for name in (args.embedding, args.pixel):
            version = latest_version(repository, name)
            if version is None:
                sys.exit(f"no model '{name}' in {repository}")
            members[f"{name.split('-')[-1]} {tag}"] = GraphModel(repository / name / str(version))
    scores: dict[str, dict[str, np.ndarray]] = {k: {} for k in sets}
    references = {}
    for key, model in members.items():
        references[key] = np.asarray(model.manifest.calibration.reference_scores)
        for name, images in sets.items():
            fitted = conform_images(images, model.manifest.input.shape)
            bits = complexity_bits(fitted) if model.manifest.kind == "pixel" else None
            statistic = model.manifest.score.statistic
            scores[name][key] = statistic_scores(model.manifest, statistic, model.run(fitted), bits)

    def combined(name: str, tag: str, pixel_weight: float) -> np.ndarray:
        p_emb = p_value(scores[name][f"embedding {tag}"], references[f"embedding {tag}"])
        p_pix = p_value(scores[name][f"pixel {tag}"], references[f"pixel {tag}"])
        return -2.0 * (np.log(p_emb) + pixel_weight * np.log(p_pix))

    columns: dict[str, object] = {key: key for key in members}
    for tag in ("before", "after"):
        for weight in (1.0, 0.5, 0.25):
            columns[f"fisher {tag} w_pix {weight:g}"] = (tag, weight)
    print(f"{len(validation)} validation images of {validation.name}; AUROC, OOD positive")
    print("| set | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name in sets:
        if name == "validation":
            continue
        row = []
        for column in columns.values():
            if isinstance(column, str):
                inside, outside = scores["validation"][column], scores[name][column]
            else:
                tag, weight = column  # type: ignore[misc]
                inside, outside = combined("validation", tag, weight), combined(name, tag, weight)
            row.append(ood_metrics_with_ci(inside, outside, resamples=0).point["auroc"])
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    for key, model in members.items():
        flagged = np.mean(scores["validation"][key] > model.manifest.calibration.threshold)
        print(
            f"{key} ({model.manifest.score.statistic}): flags {flagged:.1%} of the validation images at its threshold"
        )


if __name__ == "__main__":
    main()
