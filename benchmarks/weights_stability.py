"""Which combination weights the build's rule picks for independently trained pixel flows, each paired
with the same embedding member: the proxy-side stability of `training.ensemble`'s weight choice.

For every pixel member (an exported model folder, or a run folder, scored eagerly with the code the
build's statistic selection uses) it
1. takes the statistic the build's rule picks from the member's own selection record
   (`training.selection.choose` on `score.selection.mean_auroc`; proxies of the validation split);
2. scores the default build's calibration split with that statistic for the member's p-values, and
   the combination split's **selection half** and its four OOD proxies through both graphs;
3. applies the build's weight rule (`training.ensemble.select_weights`) and prints the candidates'
   worst-case proxy AUROC and the choice;
4. for a view of what the choice does, prints the combined AUROC under the chosen and under equal
   weights on the default pixel run's 1,000 **validation** images against their near-OOD transforms.

No test image and no far-OOD dataset is read. The splits are those of the default build's pixel run
(`--run-config`, data seed 0): every member listed must come from a run with the same data config.

    .venv/bin/python benchmarks/weights_stability.py model-repository/fmnist-pixel/1 /tmp/other/fmnist-pixel/1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.artifact import StatisticSelection  # noqa: E402
from models.scores import bits_per_dim, combine_p_values, p_value  # noqa: E402
from training.benchmark.graphs import GraphModel, complexity_bits, statistic_scores  # noqa: E402
from training.benchmark.sets import NEAR_TRANSFORMS  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.data import conform_images  # noqa: E402
from training.ensemble import SELECTION_SEED, halve, select_weights  # noqa: E402
from training.runs import Run, load_splits  # noqa: E402
from training.selection import auroc, choose, make_proxies  # noqa: E402
from training.statistics import score_statistic, statistic_inputs  # noqa: E402

SYMMETRIES = ("hflip",)  # declared for Fashion-MNIST: not OOD, so not shown


def _scores(model: GraphModel, images: np.ndarray, statistic: str) -> np.ndarray:
    fitted = conform_images(images, model.manifest.input.shape)
    bits = complexity_bits(fitted) if statistic == "complexity" else None
    return statistic_scores(model.manifest, statistic, model.run(fitted), bits)  # type: ignore[arg-type]


class _EagerPixel:
    """A pixel run folder scored in PyTorch (no exported graph): its model, its selection record."""

    def __init__(self, folder: Path, validation: np.ndarray) -> None:
        from training.data import ImageSet

        self.run = Run(folder)
        self.model = self.run.load_model("cpu")
        self.selection = StatisticSelection.model_validate(
            self.run.read_json("calibration.json")["selection"]
        )
        self._set = ImageSet
        # typicality's centre, as calibration computes it: the mean validation bits/dim
        inputs = statistic_inputs(self.model, ImageSet("validation", validation), ["nll"])
        self.reference = float(np.mean(bits_per_dim(inputs.log_likelihood, self.model.num_dims)))

    def scores(self, images: np.ndarray, statistic: str) -> np.ndarray:
        inputs = statistic_inputs(self.model, self._set("images", images), [statistic])
        return score_statistic(
            statistic,  # type: ignore[arg-type]
            inputs,
            num_dims=self.model.num_dims,
            reference_bits_per_dim=self.reference,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pixel", nargs="+", type=Path, help="exported pixel model folders (…/name/version)")
    parser.add_argument(
        "--embedding", type=Path, default=ROOT / "model-repository" / "fmnist-embedding" / "1"
    )
    parser.add_argument("--run-config", type=Path, default=ROOT / "runs" / "fmnist-pixel" / "config.json")
    args = parser.parse_args()

    config = RunConfig.model_validate_json(args.run_config.read_text())
    splits = load_splits(config, with_eval_sets=False)
    if splits.combination is None:
        print("weights_stability: the run config has no combination split", file=sys.stderr)
        return 2
    selection_idx, _ = halve(len(splits.combination))
    selection = splits.combination.images[selection_idx]
    proxies = {
        n: d.images
        for n, d in make_proxies(splits.combination.subset(selection_idx), seed=SELECTION_SEED).items()
    }
    validation = splits.validation.images
    near = {
        n: np.ascontiguousarray(fn(validation, 0))
        for n, (_, fn) in NEAR_TRANSFORMS.items()
        if n not in SYMMETRIES
    }

    embedding = GraphModel(args.embedding)
    e_ref = np.sort(np.asarray(embedding.manifest.calibration.reference_scores))
    e_stat = embedding.manifest.score.statistic
    e_p = {
        "selection": p_value(_scores(embedding, selection, e_stat), e_ref),
        **{n: p_value(_scores(embedding, x, e_stat), e_ref) for n, x in proxies.items()},
        "validation": p_value(_scores(embedding, validation, e_stat), e_ref),
        **{f"near:{n}": p_value(_scores(embedding, x, e_stat), e_ref) for n, x in near.items()},
    }
    names = [embedding.manifest.name, "pixel"]
    chosen_counts: dict[str, int] = {}
    for folder in args.pixel:
        if (folder / "manifest.json").is_file():
            graph = GraphModel(folder)
            record = graph.manifest.score.selection

            def score(images: np.ndarray, statistic: str, graph: GraphModel = graph) -> np.ndarray:
                return _scores(graph, images, statistic)
        else:
            eager = _EagerPixel(folder, validation)
            record, score = eager.selection, eager.scores
        if record is None or not record.mean_auroc:
            print(f"weights_stability: {folder} has no statistic selection record", file=sys.stderr)
            return 2
        statistic = choose(record.mean_auroc)
        p_ref = np.sort(score(splits.calibration.images, statistic))
        p_p = {
            "selection": p_value(score(selection, statistic), p_ref),
            **{n: p_value(score(x, statistic), p_ref) for n, x in proxies.items()},
            "validation": p_value(score(validation, statistic), p_ref),
            **{f"near:{n}": p_value(score(x, statistic), p_ref) for n, x in near.items()},
        }
        both = {k: np.stack([e_p[k], p_p[k]]) for k in e_p}
        result = select_weights(names, both["selection"], {n: both[n] for n in proxies})
        chosen = result.chosen.replace("pixel", "pixel member")
        chosen_counts[chosen] = chosen_counts.get(chosen, 0) + 1
        worst = ", ".join(
            f"{c.replace('pixel', 'pixel member')} {v:.3f}" for c, v in result.worst_case_auroc.items()
        )
        print(f"{folder}: statistic {statistic} (mean proxy AUROC); weights {chosen} {result.weights}")
        print(f"  worst-case proxy AUROC of the combined score: {worst}")
        for label, weights in (("chosen", result.weights), ("equal", [1.0, 1.0])):
            vid = combine_p_values(both["validation"], "fisher", weights)
            row = {n: auroc(vid, combine_p_values(both[f"near:{n}"], "fisher", weights)) for n in near}
            print(
                f"  validation near-OOD, {label} weights: "
                + ", ".join(f"{n} {v:.3f}" for n, v in row.items())
            )
    print()
    print("weights chosen: " + ", ".join(f"{k} {v} of {len(args.pixel)}" for k, v in chosen_counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
