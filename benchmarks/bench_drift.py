"""Drift detection benchmark with the real default models: run length to a false alarm and delay.

For each served model (and each ensemble in `<repository>/_ensembles/`) the real exported ONNX graph
scores the Fashion-MNIST *test* split (in-distribution, disjoint from training and calibration) and
each loadable OOD set: `mnist`, `sklearn-digits`, `photos` (scikit-image's bundled photos), uniform
noise and constant images (seeded, made here). The served p-values are then resampled into streams:

- **false alarms**: `--streams` in-distribution streams, each run until the online detector
  (`service.core.drift.OnlineDriftDetector`, configured for `--run-length` images) first alarms;
  the mean run length with its standard error, and the fraction of streams alarming before the
  configured run length. The streams resample one test split against one reference, so they
  measure the run length *conditional on the model's actual calibration* (the quantity a deployment
  sees), not its average over calibration draws.
- **detection delay**: each stream serves `--warmup` in-distribution images, then switches to a
  mixture with a fraction c of images from one OOD set (c = 100 %, 20 %, 5 %); the delay is the
  number of images after the switch until the alarm (streams that false-alarm before the switch
  are dropped and counted).
- **batch test**: the rejection rate at 5 % of `batch_drift_test` on batches of `--batch` images,
  in-distribution (the size) and with each OOD set at each fraction (the power).

Nothing is tuned here: the detector and the test use their defaults, fixed before any of these
figures existed. Prints Markdown tables; `--json FILE` writes every figure.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_drift.py                 # ./model-repository
    .venv/bin/python benchmarks/bench_drift.py --repository /tmp/repo --models fmnist-tiny --streams 100
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.artifact import find_ensembles, latest_version, load_ensemble  # noqa: E402
from models.scores import combined_verdict, p_value  # noqa: E402
from service.core import load_model  # noqa: E402
from service.core.drift import OnlineDriftDetector, batch_drift_test  # noqa: E402
from training.data import load_dataset  # noqa: E402

CONTAMINATIONS = (1.0, 0.2, 0.05)
OOD_SETS = ("mnist", "sklearn-digits", "photos", "noise", "constant")


@dataclass
class Scored:
    """One model's (or ensemble's) scores of one image set: `(N,)` each."""

    ood_score: np.ndarray
    p_value: np.ndarray
    is_ood: np.ndarray


def _images(name: str, shape: tuple[int, int, int], limit: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name == "noise":
        return rng.integers(0, 256, size=(limit, *shape), dtype=np.uint8)
    if name == "constant":
        levels = rng.integers(0, 256, size=limit, dtype=np.uint8)
        return np.broadcast_to(levels[:, None, None, None], (limit, *shape)).copy()
    spec = "fashion-mnist:test" if name == "in-distribution" else name
    return load_dataset(spec, shape=shape, limit=limit, seed=seed).images


def _version_dir(repository: Path, name: str) -> Path:
    version = latest_version(repository, name)
    if version is None:
        raise SystemExit(f"no version of model '{name}' under {repository}")
    return repository / name / str(version)


def _score_sets(
    repository: Path, names: list[str], limits: dict[str, int], seed: int, threads: int
) -> tuple[dict[str, dict[str, Scored]], dict[str, int]]:
    """model -> set -> Scored, and model -> reference size."""
    out: dict[str, dict[str, Scored]] = {}
    sizes: dict[str, int] = {}
    for name in names:
        model = load_model(_version_dir(repository, name), intra_op_threads=threads)
        shape = model.manifest.input.shape
        sizes[name] = int(model.reference_sorted.size)
        out[name] = {}
        for set_name in ("in-distribution", *OOD_SETS):
            start = time.perf_counter()
            images = _images(set_name, shape, limits.get(set_name, limits["ood"]), seed)
            s = model.score(images, batch_size=256)
            out[name][set_name] = Scored(s.ood_score, s.p_value, s.is_ood)
            print(
                f"  {name}: scored {len(images)} {set_name} images in {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
            )
    return out, sizes


def _save_cache(path: Path, scored: dict[str, dict[str, Scored]], sizes: dict[str, int]) -> None:
    arrays: dict[str, np.ndarray] = {f"size|{m}": np.array(n) for m, n in sizes.items()}
    for model, sets in scored.items():
        for set_name, s in sets.items():
            for field in ("ood_score", "p_value", "is_ood"):
                arrays[f"{model}|{set_name}|{field}"] = getattr(s, field)
    np.savez(path, **arrays)  # type: ignore[arg-type]


def _load_cache(path: Path) -> tuple[dict[str, dict[str, Scored]], dict[str, int]]:
    with np.load(path) as data:
        sizes = {k.split("|")[1]: int(data[k]) for k in data.files if k.startswith("size|")}
        scored: dict[str, dict[str, Scored]] = {}
        for key in data.files:
            if key.startswith("size|") or not key.endswith("|p_value"):
                continue
            model, set_name, _ = key.split("|")
            scored.setdefault(model, {})[set_name] = Scored(
                data[f"{model}|{set_name}|ood_score"], data[key], data[f"{model}|{set_name}|is_ood"]
            )
    return scored, sizes


def _ensembles(
    repository: Path, scored: dict[str, dict[str, Scored]], sizes: dict[str, int]
) -> tuple[dict[str, dict[str, Scored]], dict[str, np.ndarray]]:
    out: dict[str, dict[str, Scored]] = {}
    references: dict[str, np.ndarray] = {}
    for path in find_ensembles(repository):
        manifest = load_ensemble(path)
        members = [m.name for m in manifest.members]
        if not all(m in scored for m in members):
            continue
        reference = np.asarray(manifest.calibration.reference_scores, dtype=np.float64)
        key = f"ensemble:{manifest.name}"
        references[key] = reference
        sizes[key] = int(reference.size)
        out[key] = {}
        for set_name in scored[members[0]]:
            score, p, flags = combined_verdict(
                [scored[m][set_name].p_value for m in members],
                manifest.rule,
                manifest.calibration.threshold,
                reference,
                manifest.weights,
            )
            out[key][set_name] = Scored(score, p, flags)
    return out, references


def _resampled(rng: np.random.Generator, pool: np.ndarray, streams: int, chunk: int) -> Iterator[np.ndarray]:
    while True:
        yield pool[rng.integers(0, pool.size, size=(streams, chunk))]


def _run_lengths(
    detector: OnlineDriftDetector, pool: np.ndarray, streams: int, cap: int, seed: int
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    chunks = _resampled(rng, pool, streams, 5000)
    lengths = detector.run_lengths(next(chunks) for _ in range(math.ceil(cap / 5000)))
    alarmed = lengths > 0
    # Censored streams (no alarm within the cap) count at the cap: the mean is then a lower bound.
    values = np.where(alarmed, lengths, cap).astype(np.float64)
    configured = detector.design.expected_run_length
    return {
        "streams": streams,
        "mean": float(values.mean()),
        "se": float(values.std(ddof=1) / math.sqrt(streams)),
        "median": float(np.median(values)),
        "censored": int((~alarmed).sum()),
        "cap": cap,
        "alarm_before_configured": float(np.mean(alarmed & (lengths < configured))),
        "in_control_upper_rate": float(np.mean(detector.indicators(pool)[0])),
        "in_control_lower_rate": float(np.mean(detector.indicators(pool)[1])),
    }


def _split_reference_run_lengths(
    reference: np.ndarray, run_length: float, splits: int, streams: int, cap: int, seed: int
) -> dict[str, Any]:
    """Run length on data exchangeable with the calibration by construction: the model's own
    calibration scores are cut in two random halves, half A is the reference (a detector for
    n = |A|), half B is resampled into streams; `splits` cuts, `streams` streams each, so the
    figure averages over calibration draws as the configured run length does."""
    rng = np.random.default_rng(seed)
    half = reference.size // 2
    detector = OnlineDriftDetector(run_length, reference_size=half)
    pools = []
    for _ in range(splits):
        order = rng.permutation(reference.size)
        ref_a = np.sort(reference[order[:half]])
        pools.append(p_value(reference[order[half : 2 * half]], ref_a))
    pool = np.stack(pools)  # (splits, half)
    owner = np.repeat(np.arange(splits), streams)

    def chunks() -> Iterator[np.ndarray]:
        while True:
            yield pool[owner[:, None], rng.integers(0, half, size=(owner.size, 5000))]

    source = chunks()
    lengths = detector.run_lengths(next(source) for _ in range(math.ceil(cap / 5000)))
    values = np.where(lengths > 0, lengths, cap).astype(np.float64)
    return {
        "reference_size": half,
        "splits": splits,
        "streams": int(owner.size),
        "threshold_units": detector.design.threshold,
        "run_length_at_alpha": detector.design.run_length_at_alpha,
        "mean": float(values.mean()),
        "se": float(values.std(ddof=1) / math.sqrt(values.size)),
        "median": float(np.median(values)),
        "censored": int((lengths == 0).sum()),
        "alarm_before_configured": float(np.mean((lengths > 0) & (lengths < run_length))),
    }


def _delays(
    detector: OnlineDriftDetector,
    in_pool: np.ndarray,
    ood_pool: np.ndarray,
    fraction: float,
    streams: int,
    warmup: int,
    cap: int,
    seed: int,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    before = in_pool[rng.integers(0, in_pool.size, size=(streams, warmup))]
    after = in_pool[rng.integers(0, in_pool.size, size=(streams, cap))]
    swap = rng.random((streams, cap)) < fraction
    after[swap] = ood_pool[rng.integers(0, ood_pool.size, size=int(swap.sum()))]
    lengths = detector.run_lengths([before, after])
    early = (lengths > 0) & (lengths <= warmup)
    kept = lengths[~early]
    detected = kept > 0
    delay = kept[detected] - warmup
    return {
        "streams": streams,
        "false_alarms_before_switch": int(early.sum()),
        "detected": float(detected.mean()) if kept.size else float("nan"),
        "mean": float(delay.mean()) if delay.size else float("nan"),
        "median": float(np.median(delay)) if delay.size else float("nan"),
        "p90": float(np.quantile(delay, 0.9)) if delay.size else float("nan"),
    }


def _batch_power(
    pools: dict[str, Scored],
    reference: np.ndarray,
    set_name: str,
    fraction: float,
    batch: int,
    reps: int,
    seed: int,
) -> float:
    rng = np.random.default_rng(seed)
    inside, ood = pools["in-distribution"], pools[set_name]
    hits = 0
    for _ in range(reps):
        scores = inside.ood_score[rng.integers(0, inside.ood_score.size, size=batch)]
        if set_name != "in-distribution":
            swap = rng.random(batch) < fraction
            scores[swap] = ood.ood_score[rng.integers(0, ood.ood_score.size, size=int(swap.sum()))]
        hits += batch_drift_test(scores, reference).p_value <= 0.05
    return hits / reps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model-repository")
    parser.add_argument("--models", default="fmnist-pixel,fmnist-embedding")
    parser.add_argument("--run-length", type=float, default=10_000, help="configured images to a false alarm")
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=1000, help="in-distribution images before the switch")
    parser.add_argument("--id-images", type=int, default=10_000, help="Fashion-MNIST test images scored")
    parser.add_argument("--ood-images", type=int, default=2000, help="images scored per OOD set (at most)")
    parser.add_argument("--batch", type=int, default=100, help="images per batch for the batch test")
    parser.add_argument("--batch-reps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--cache", type=Path, default=None, help=".npz of the scores: written once, then reused"
    )
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    limits = {"in-distribution": args.id_images, "ood": args.ood_images}
    if args.cache is not None and args.cache.is_file():
        scored, sizes = _load_cache(args.cache)
    else:
        scored, sizes = _score_sets(args.repository, names, limits, args.seed, args.threads)
        if args.cache is not None:
            _save_cache(args.cache, scored, sizes)
    references = {n: load_model_reference(args.repository, n) for n in names}
    ens_scored, ens_refs = _ensembles(args.repository, scored, sizes)
    scored.update(ens_scored)
    references.update(ens_refs)

    report: dict[str, Any] = {"run_length": args.run_length, "models": {}}
    cap = int(20 * args.run_length)
    for name, pools in scored.items():
        detector = OnlineDriftDetector(args.run_length, reference_size=sizes[name])
        d = detector.design
        in_pool = pools["in-distribution"].p_value
        start = time.perf_counter()
        entry: dict[str, Any] = {
            "reference_size": sizes[name],
            "design": {
                "weight": d.weight,
                "threshold_units": d.threshold,
                "alpha": d.alpha,
                "design_rate": d.design_rate,
                "run_length_at_alpha": d.run_length_at_alpha,
                "run_length_at_design": d.run_length_at_design,
            },
            "false_alarm_run_length": _run_lengths(detector, in_pool, args.streams, cap, args.seed),
            "split_reference_run_length": _split_reference_run_lengths(
                references[name], args.run_length, 20, max(1, args.streams // 20), cap, args.seed
            ),
            "delay": {},
            "batch": {
                "images": args.batch,
                "size": _batch_power(
                    pools, references[name], "in-distribution", 0.0, args.batch, args.batch_reps, 1
                ),
                "power": {},
            },
        }
        for set_name in OOD_SETS:
            ood_pool = pools[set_name].p_value
            entry["delay"][set_name] = {
                f"{c:g}": _delays(
                    detector, in_pool, ood_pool, c, args.streams, args.warmup, 4000, args.seed + 1
                )
                for c in CONTAMINATIONS
            }
            entry["batch"]["power"][set_name] = {
                f"{c:g}": _batch_power(pools, references[name], set_name, c, args.batch, args.batch_reps, 2)
                for c in CONTAMINATIONS
            }
            entry.setdefault("median_p_value", {})[set_name] = float(np.median(ood_pool))
        entry["median_p_value"]["in-distribution"] = float(np.median(in_pool))
        entry["seconds"] = time.perf_counter() - start
        report["models"][name] = entry
    _print(report, args)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def load_model_reference(repository: Path, name: str) -> np.ndarray:
    from models.artifact import load_manifest

    manifest = load_manifest(_version_dir(repository, name))
    return np.asarray(manifest.calibration.reference_scores, dtype=np.float64)


def _print(report: dict[str, Any], args: argparse.Namespace) -> None:
    models = report["models"]
    print(
        f"\nRun length to a false alarm, configured {report['run_length']:,.0f} images ({args.streams} streams):\n"
    )
    print(
        "| model | reference n | r / h | in-control tail rates (upper, lower) | exact ARL at α | "
        "mean run length ± se | median | streams alarming before the configured run length |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, e in models.items():
        f, d = e["false_alarm_run_length"], e["design"]
        censored = f" ({f['censored']} censored at {f['cap']:,})" if f["censored"] else ""
        print(
            f"| {name} | {e['reference_size']:,} | {d['weight']} / {d['threshold_units']} | "
            f"{f['in_control_upper_rate']:.4f}, {f['in_control_lower_rate']:.4f} | "
            f"{d['run_length_at_alpha']:,.0f} | {f['mean']:,.0f} ± {f['se']:,.0f}{censored} | "
            f"{f['median']:,.0f} | {100 * f['alarm_before_configured']:.0f} % |"
        )
    print(
        "\nRun length on exchangeable data: each model's calibration scores cut in random halves, one the "
        "reference, the other resampled into streams (20 cuts):\n"
    )
    print(
        "| model | reference n | h | exact ARL at α | mean run length ± se | median | alarming before configured |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, e in models.items():
        f = e["split_reference_run_length"]
        censored = f" ({f['censored']} censored)" if f["censored"] else ""
        print(
            f"| {name} | {f['reference_size']:,} | {f['threshold_units']} | {f['run_length_at_alpha']:,.0f} | "
            f"{f['mean']:,.0f} ± {f['se']:,.0f}{censored} | {f['median']:,.0f} | "
            f"{100 * f['alarm_before_configured']:.0f} % |"
        )
    rows = {json.dumps(e["split_reference_run_length"], sort_keys=True) for e in models.values()}
    if len(models) > 1 and len(rows) == 1:
        print(
            "\n(Identical rows: a p-value is a rank, whose law does not depend on the model when scores do not tie.)"
        )
    print(
        "\nDetection delay, images after the switch until the alarm (median, 90th percentile in "
        f"brackets; each stream served {args.warmup:,} in-distribution images first):\n"
    )
    print("| model | OOD fraction | " + " | ".join(OOD_SETS) + " |")
    print("|---|---|" + "---|" * len(OOD_SETS))
    for name, e in models.items():
        for c in CONTAMINATIONS:
            cells = []
            for s in OOD_SETS:
                x = e["delay"][s][f"{c:g}"]
                if not x["detected"] > 0:
                    cells.append("not detected")
                    continue
                cell = f"{x['median']:.0f} ({x['p90']:.0f})"
                if x["detected"] < 0.995:
                    cell += f", {100 * x['detected']:.0f} % within 4,000"
                cells.append(cell)
            print(f"| {name} | {100 * c:g} % | " + " | ".join(cells) + " |")
    print(
        f"\nBatch test, {args.batch} images a batch, rejected at 5 % ({args.batch_reps} batches; "
        "in-distribution: the size):\n"
    )
    fractions = " / ".join(f"{100 * c:g}" for c in CONTAMINATIONS)
    print("| model | in-distribution | " + " | ".join(f"{s} {fractions} %" for s in OOD_SETS) + " |")
    print("|---|---|" + "---|" * len(OOD_SETS))
    for name, e in models.items():
        b = e["batch"]
        cells = [" / ".join(f"{100 * b['power'][s][f'{c:g}']:.0f}" for c in CONTAMINATIONS) for s in OOD_SETS]
        print(f"| {name} | {100 * b['size']:.1f} % | " + " | ".join(cells) + " |")
    print("\nMedian served p-value per set:")
    for name, e in models.items():
        print(f"- {name}: " + ", ".join(f"{k} {v:.2g}" for k, v in e["median_p_value"].items()))


if __name__ == "__main__":
    raise SystemExit(main())
