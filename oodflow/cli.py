"""The `oodflow` command line (DESIGN.md §5). One console script, one verb per step."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main"]

DEFAULT_REPOSITORY = "./model-repository"


def _repository(value: str | None) -> Path:
    return Path(value or os.environ.get("OODFLOW_MODEL_REPOSITORY") or DEFAULT_REPOSITORY)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a preset name (see `oodflow presets`) or a TOML/YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.max_steps=500 (repeatable)",
    )


def _run_dir(args: argparse.Namespace, name: str) -> Path:
    return Path(args.run_dir) if args.run_dir else Path("runs") / name


def _cmd_presets(args: argparse.Namespace) -> int:
    from training.config import PRESETS

    for name, cfg in PRESETS.items():
        print(f"{name:28s} {cfg.model.kind:9s} {cfg.description}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from training.config import load_run_config
    from training.runs import load_splits
    from training.train import train

    config = load_run_config(args.config, args.overrides)
    run_dir = _run_dir(args, config.name)
    if args.resume and (run_dir / "config.json").is_file():
        from training.runs import Run

        saved = Run(run_dir).config
        if saved != config:
            raise ValueError(f"{run_dir}: --resume with a different config than the run was started with")
    splits = load_splits(config, with_eval_sets=False)
    from training.runs import Run

    Run(run_dir, config).dir.mkdir(parents=True, exist_ok=True)
    Run(run_dir, config).write_json(
        "splits.json",
        {
            "train_fingerprint": splits.fingerprint,
            "train_size": len(splits.train),
            "validation_size": len(splits.validation),
            "calibration_size": len(splits.calibration),
        },
    )
    result = train(
        config,
        run_dir,
        resume=args.resume,
        max_minutes=args.max_minutes,
        device=args.device,
        progress=not args.no_progress,
        splits=splits,
    )
    state = "finished" if result.completed else "stopped at the time budget (resume with --resume)"
    print(
        f"{config.name}: {state} after {result.steps} steps; train {result.final_bits_per_dim:.4f} bits/dim, "
        f"validation {result.validation_bits_per_dim:.4f} bits/dim; run folder {run_dir}"
    )
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from training.calibrate import calibrate

    c = calibrate(args.run_dir, device=args.device, statistic=args.statistic)
    print(
        f"threshold {c.threshold:.5f} ({c.statistic}) at target FPR {c.target_fpr:.1%} on "
        f"{c.validation_size} held-out images; observed FPR {c.validation_fpr:.2%}"
    )
    if c.selection is not None and c.selection.by == "selection":
        mean = ", ".join(f"{k} {v:.3f}" for k, v in c.selection.mean_auroc.items())
        print(f"statistic chosen on validation data and OOD proxies; mean proxy AUROC: {mean}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate
    from training.runs import Run

    if args.ood:
        run = Run(Path(args.run_dir))
        updated = run.config.model_copy(
            update={"data": run.config.data.model_copy(update={"ood_sets": args.ood})}
        )
        Run(run.dir, updated).write_config()
    r = evaluate(args.run_dir, device=args.device)
    idd = r["in_distribution"]
    print(
        f"in-distribution {idd['dataset']}: {idd['mean_bits_per_dim']:.4f} bits/dim, "
        f"{idd['flagged_fraction']:.1%} flagged"
    )
    for m in r["ood"]:
        print(
            f"{m['dataset']:>20s}: AUROC {m['auroc']:.4f}  AUPR-In {m['aupr_in']:.4f}  AUPR-Out {m['aupr_out']:.4f}"
            f"  FPR@95TPR {m['fpr_at_95_tpr']:.4f}  {m['mean_bits_per_dim']:.4f} bits/dim  "
            f"{m['flagged_fraction']:.1%} flagged"
        )
    print(f"report: {Path(args.run_dir) / 'report' / 'report.md'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from training.pipeline import export_run

    path = export_run(Path(args.run_dir), _repository(args.repository), name=args.name, version=args.version)
    print(f"exported {path}")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from training.build import DEFAULT_MINUTES, build

    build(
        args.data,
        repository=_repository(args.repository),
        name=args.name,
        test=args.test,
        ood=args.ood or [],
        minutes=DEFAULT_MINUTES if args.minutes is None else args.minutes,
        device=args.device,
        pixel=not args.no_pixel,
        runs_dir=Path(args.runs_dir),
        force=args.force,
        progress=not args.no_progress,
        profile=args.profile,
        symmetries=args.symmetry,
    )
    return 0


def _cmd_build_defaults(args: argparse.Namespace) -> int:
    from training.defaults import DEFAULT_BUILD_MINUTES, build_defaults

    result = build_defaults(
        _repository(args.repository),
        runs_dir=Path(args.runs_dir),
        device=args.device,
        progress=not args.no_progress,
        force=args.force,
        minutes=DEFAULT_BUILD_MINUTES if args.minutes is None else args.minutes,
    )
    if result.skipped:
        print(
            f"{', '.join(result.models)} and ensemble {result.name}: already built and verified in "
            f"{result.repository} (--force rebuilds)"
        )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    # Flags override OODFLOW_* variables, which override the built-in defaults.
    from service.app import run
    from service.cli import settings_from_args

    run(settings_from_args(args))
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from training.reproduce import reproduce

    reproduce(
        args.budget,
        output=Path(args.output),
        figures_dir=Path(args.figures_dir) if args.figures_dir else None,
        runs_dir=Path(args.runs_dir) if args.runs_dir else None,
        device=args.device,
        progress=not args.no_progress,
        variants=args.variant,
        with_embedding=not args.no_embedding,
        analysis=not args.no_analysis,
    )
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from training.analyze import analyze

    output = Path(args.output)
    grids = analyze(
        Path(args.model),
        output,
        in_distribution=args.in_distribution,
        ood=args.ood,
        count=args.count,
        seed=args.seed,
        markdown=Path(args.markdown) if args.markdown else None,
    )
    for name, (rows, cols) in grids.items():
        print(f"{output / name}: {rows} x {cols} panels")
    return 0


_BUILTIN_DATASETS = ("fashion-mnist:train", "fashion-mnist:test", "mnist", "sklearn-digits", "photos")


def _builtin_inputs(inputs: list[str], output: str) -> list[str]:
    """Built-in dataset specs among score-batch's inputs -> files it can read (issue 10 §4: every
    dataset spec works everywhere).

    The batch engines read files only (the service never imports `training`), so each built-in set
    is written once beside the output, `<output>.datasets/<spec>.npz` (`photos`, of mixed sizes: a
    folder of PNGs), with the same pixels `training.data.load_dataset` gives; the paths are stable,
    so a re-run resumes. Needs the training install, which holds the loaders."""
    wanted = [i for i in inputs if i in _BUILTIN_DATASETS]
    if not wanted:
        return inputs
    try:
        import numpy as np

        from training.data import PHOTO_NAMES, load_dataset
    except ImportError as exc:
        raise ValueError(
            f"input {wanted[0]} is a built-in dataset, which needs the training install "
            f"(pip install 'oodflow[train]'; missing {exc.name}); or pass a folder or .npz file"
        ) from None
    folder = Path(output).with_name(Path(output).name + ".datasets")
    folder.mkdir(parents=True, exist_ok=True)
    resolved = []
    for spec in inputs:
        if spec not in _BUILTIN_DATASETS:
            resolved.append(spec)
            continue
        target = folder / spec.replace(":", "-")
        if spec == "photos":
            if not target.is_dir():
                _write_photos(folder / ".photos.tmp", PHOTO_NAMES)
                (folder / ".photos.tmp").rename(target)
        else:
            target = target.with_suffix(".npz")
            if not target.is_file():
                dataset = load_dataset(spec)
                staging = folder / f".{target.name}.tmp.npz"
                np.savez(staging, images=dataset.images)
                staging.rename(target)
        resolved.append(str(target))
    return resolved


def _write_photos(folder: Path, names: tuple[str, ...]) -> None:
    """scikit-image's bundled photos as PNG files, decoded as `training.data` decodes them."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from models.images import hwc_to_chw, to_uint8

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            pixels = np.asarray(getattr(skimage.data, name)())
        except (AttributeError, ImportError, OSError, ValueError):
            continue  # a photo a scikit-image release moved to its download registry
        plane = hwc_to_chw(to_uint8(pixels))
        image = plane[0] if plane.shape[0] == 1 else plane.transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(image)).save(folder / f"{name}.png")


def _cmd_score_batch(args: argparse.Namespace) -> int:
    # Imported here: the service (FastAPI, ONNX Runtime, pyarrow) costs a second at start-up.
    from service.batch import main_score_batch

    args.inputs = _builtin_inputs(list(args.inputs), args.output)
    return main_score_batch(args)


def _cmd_ensemble_create(args: argparse.Namespace) -> int:
    from oodflow.ensemble import create_ensemble
    from training.ensemble import weights_line

    path, manifest = create_ensemble(
        _repository(args.repository),
        args.name,
        args.member,
        data=args.data,
        rule=args.rule,
        weights=args.weights,
        target_fpr=args.target_fpr,
        limit=args.limit,
        seed=args.seed,
        description=args.description or "",
        force=args.force,
        device=args.device,
    )
    cal = manifest.calibration
    members = ", ".join(f"{m.name} v{m.version} ({m.kind}/{m.statistic})" for m in manifest.members)
    print(f"{path}: {manifest.rule} over {members}")
    print(
        f"  threshold {cal.threshold:.4f} at target FPR {cal.target_fpr:.1%} on {cal.validation_size} "
        f"in-distribution images (observed {cal.validation_fpr:.2%}); data: {cal.validation_set}"
    )
    print(f"  {weights_line(manifest)}")
    return 0


def _cmd_ensemble_list(args: argparse.Namespace) -> int:
    from oodflow.ensemble import list_ensembles

    repository = _repository(args.repository)
    ensembles = list_ensembles(repository, device=args.device)
    if not ensembles:
        print(f"no ensembles under {repository / '_ensembles'}")
    for ens in ensembles:
        m = ens.manifest
        members = "" if m is None else ", ".join(f"{k.name} v{k.version}" for k in m.members)
        detail = "" if m is None else f" {m.rule} over {members}; threshold {m.calibration.threshold:.4f}"
        reason = f" ({ens.reason})" if ens.reason else ""
        print(f"{ens.name}: {ens.status}{reason}{detail}")
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from training.benchmark import run_benchmark
    from training.benchmark.compare import goal_lines, load_baseline
    from training.benchmark.report import write_report

    # A bad baseline is a one-line error before any model is loaded or any image scored.
    baseline = load_baseline(args.baseline) if args.baseline is not None else None
    if baseline is not None and args.output is not None:
        written = Path(args.output) / "benchmark.json"
        if written.exists() and written.resolve() == Path(args.baseline).resolve():
            raise ValueError(
                f"baseline {args.baseline} is the file this run writes (--output {args.output}); "
                "copy it elsewhere first, so the report's 'before' stays readable"
            )
    words = [args.target]
    for flag in ("far", "near", "symmetries"):
        words += [f"--{flag} {v}" for v in getattr(args, flag) or []]
    for flag in ("test", "output", "limit", "baseline"):
        if getattr(args, flag) is not None:
            words.append(f"--{flag} {getattr(args, flag)}")
    words += [f"--seed {args.seed}", f"--resamples {args.resamples}"]
    command = "oodflow benchmark " + " ".join(words)
    result = run_benchmark(
        args.target,
        _repository(args.repository),
        far=args.far,
        near=args.near,
        symmetries=args.symmetries,
        test=args.test,
        limit=args.limit,
        seed=args.seed,
        resamples=args.resamples,
        device=args.device,
        progress=not args.no_progress,
        command=command,
        baseline=baseline,
    )
    output = Path(args.output) if args.output else Path("benchmark") / result["benchmark"]
    path = write_report(result, output)
    rows = {(r["set"], r["score"]): r for r in result["results"]}
    headline = result["headline"]
    print(f"{result['benchmark']}: AUROC of {headline} (95% bootstrap interval), OOD positive")
    for s in result["sets"]:
        if s["family"] == "symmetry":
            checks = [
                c for c in result["symmetry_checks"] if c["set"] == s["name"] and c["score"] == headline
            ]
            for c in checks:
                if "flagged_fraction" in c:
                    print(
                        f"  symmetry {s['name']:>14s}: {c['flagged_fraction']:.1%} flagged "
                        f"({c['flagged_ci'][0]:.1%}-{c['flagged_ci'][1]:.1%}), target {c['target_fpr']:.0%}"
                    )
            continue
        r = rows[(s["name"], headline)]
        print(
            f"  {s['family']:>4s} {s['name']:>18s}: {r['auroc']:.4f} ({r['auroc_ci'][0]:.4f}-{r['auroc_ci'][1]:.4f})"
            f"  FPR@95TPR {r['fpr_at_95_tpr']:.4f}  n={s['size']}"
        )
    if baseline is not None:
        table = result["comparison"]["tables"][0]
        print(
            f"before ({result['baseline']['path']}, {result['baseline']['created_at']}: "
            f"{table['before_score']}) -> after ({table['after_score']}), AUROC:"
        )
        for row in table["rows"]:
            if row["status"] == "both":
                overlap = {True: "intervals overlap", False: "intervals disjoint", None: "no intervals"}
                print(
                    f"  {row['set']:>18s}: {row['auroc_before']:.4f} -> {row['auroc_after']:.4f} "
                    f"({row['difference']:+.4f}, {overlap[row['intervals_overlap']]})"
                )
            else:
                where = "the baseline" if row["status"] == "only_before" else "this run"
                print(f"  {row['set']:>18s}: only in {where}")
        print(f"goal (issue 12) on {result['goal']['score']}:")
        for line in goal_lines(result["goal"], result["goal"]["score"]):
            print(f"  {line}")
    print(f"report: {path}")
    return 0


def _add_build_args(p: argparse.ArgumentParser, minutes: str) -> None:
    p.add_argument(
        "--repository", help="model repository (default: $OODFLOW_MODEL_REPOSITORY or ./model-repository)"
    )
    p.add_argument("--minutes", type=float, help=f"time budget for the whole build (default {minutes})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--runs-dir", default="runs", help="run folders (checkpoints, scores, build report)")
    p.add_argument("--force", action="store_true", help="build new versions even if the models exist")
    p.add_argument("--no-progress", action="store_true", help="plain stage lines instead of a progress bar")


def build_parser() -> argparse.ArgumentParser:
    # from models.scores, not training.config: building the parser imports nothing of training
    from models.scores import OOD_STATISTICS

    parser = argparse.ArgumentParser(prog="oodflow", description="OOD scoring with normalizing flows")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list the named training presets")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("train", help="train a flow from a preset or config file")
    _add_config_args(p)
    p.add_argument("--run-dir", help="run folder (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--max-minutes", type=float, help="stop cleanly after this many minutes")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)

    for verb, fn, text in (
        ("calibrate", _cmd_calibrate, "set the OOD threshold on held-out in-distribution data"),
        ("evaluate", _cmd_evaluate, "AUROC/AUPR/FPR@95 against OOD sets; writes the report"),
    ):
        p = sub.add_parser(verb, help=text)
        p.add_argument("run_dir", help="a run folder made by `oodflow train`")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        if verb == "evaluate":
            p.add_argument(
                "--ood", action="append", help="OOD dataset spec (repeatable; default from the config)"
            )
        else:
            p.add_argument(
                "--statistic",
                choices=[*OOD_STATISTICS, "auto"],
                help="OOD statistic (default: the run config's); auto: chosen on validation data and "
                "OOD proxies only (training.selection); a named one is recorded as chosen by the user",
            )
        p.set_defaults(func=fn)

    p = sub.add_parser("export", help="write a run as a verified artifact version")
    p.add_argument("run_dir")
    p.add_argument("--repository")
    p.add_argument("--name", help="model name (default: the run config's name)")
    p.add_argument("--version", type=int, help="version number (default: next free)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "build",
        help="any dataset spec -> pixel + embedding flows and their ensemble, calibrated, evaluated, exported",
        description="Build a served OOD detector from your images: infers the input spec, splits the data, "
        "trains an embedding flow and a pixel flow within --minutes, calibrates, evaluates on --ood sets, "
        "exports both into the repository with their ensemble, and prints the curl line that scores an image.",
    )
    p.add_argument(
        "data", help="in-distribution images: folder:DIR, npz:FILE, a bare path, or a built-in set"
    )
    p.add_argument(
        "--name", help="model name prefix: NAME-pixel, NAME-embedding, ensemble NAME (default: from DATA)"
    )
    p.add_argument("--test", help="test set spec (default: a test split held out of DATA)")
    p.add_argument(
        "--ood", action="append", metavar="SPEC", help="OOD set to evaluate on (repeatable; optional)"
    )
    _add_build_args(p, "8")
    p.add_argument("--no-pixel", action="store_true", help="only the embedding flow (no ensemble)")
    p.add_argument(
        "--symmetry",
        action="append",
        default=[],
        metavar="T",
        help="a transform that keeps your images in-distribution (hflip, vflip, rot90, rot180, rot270, "
        "transpose, invert, jigsaw; repeatable or comma-separated): the embedding flow trains on it and "
        "the benchmark reports it as a false-positive check. Default: none",
    )
    # Tiny models for tests and smoke runs: the same code path, smaller configs.
    p.add_argument("--profile", choices=["default", "tiny"], default="default", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser(
        "build-defaults",
        help="`oodflow build` on Fashion-MNIST: fmnist-pixel, fmnist-embedding, ensemble fmnist (test "
        "fashion-mnist:test, OOD mnist); skips them when already built",
    )
    _add_build_args(p, "14")
    p.set_defaults(func=_cmd_build_defaults)

    p = sub.add_parser(
        "reproduce",
        help="the paper's §4, §7 and §8 experiments (likelihood failure, masks, bottleneck, embeddings) on five OOD families",
    )
    p.add_argument("--budget", default="cpu", choices=["tiny", "cpu", "gpu"])
    p.add_argument(
        "--output", default="docs/reproduction.md", help="the Markdown report (analysis.md goes beside it)"
    )
    p.add_argument("--figures-dir", help="default: <output folder>/figures/reproduction")
    p.add_argument("--runs-dir", help="default: runs/reproduce-<budget>; finished trainings are reused")
    p.add_argument(
        "--variant", action="append", help="only this variant, e.g. realnvp-horizontal (repeatable)"
    )
    p.add_argument("--no-embedding", action="store_true")
    p.add_argument("--no-analysis", action="store_true", help="do not regenerate analysis.md")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("analyze", help="PNG grids of a pixel flow's latents, s/t maps and coupling outputs")
    p.add_argument("model", help="a pixel run folder or an artifact version folder")
    p.add_argument("--output", default="analysis", help="folder for the PNGs (and analysis.md)")
    p.add_argument("--in-distribution", default="fashion-mnist:test")
    p.add_argument("--ood", default="mnist")
    p.add_argument("--count", type=int, default=3, help="images per set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", help="page to write (default <output>/analysis.md)")
    p.set_defaults(func=_cmd_analyze)

    from service.batch import add_score_batch_arguments

    p = add_score_batch_arguments(
        sub.add_parser(
            "score-batch", help="score image folders, .npz and Parquet files offline to CSV or Parquet"
        )
    )
    p.set_defaults(func=_cmd_score_batch)

    p = sub.add_parser(
        "benchmark",
        help="near-OOD (transforms of the test split) and far-OOD table for a model or ensemble",
        description="OpenOOD-style table (AUROC, AUPR-In, AUPR-Out, FPR@95%%TPR with bootstrap intervals; "
        "OOD positive) per OOD set and per score, through the exported graphs. Writes "
        "<output>/benchmark.md, benchmark.json and figures/benchmark/*.png.",
    )
    p.add_argument(
        "target",
        help="a model name, an ensemble name (<repository>/_ensembles/<name>.json), "
        "model:<name> / ensemble:<name>, or an artifact version folder",
    )
    p.add_argument(
        "--repository", help="model repository (default: $OODFLOW_MODEL_REPOSITORY or ./model-repository)"
    )
    p.add_argument(
        "--far",
        action="append",
        metavar="SPEC",
        help="far-OOD set: a dataset spec, noise or constant (repeatable; default: every built-in "
        "source outside the in-distribution data's family)",
    )
    p.add_argument(
        "--near",
        action="append",
        metavar="TRANSFORM",
        help="near-OOD transform of the test split: vflip, hflip, rot90, rot180, rot270, transpose, "
        "invert, jigsaw (repeatable or comma-separated; default: all but the symmetries)",
    )
    p.add_argument(
        "--symmetries",
        action="append",
        metavar="TRANSFORM",
        help="transforms that are symmetries of the data, reported as a false-positive check "
        "(default: hflip for Fashion-MNIST, none otherwise; 'none' for none)",
    )
    p.add_argument(
        "--test", metavar="SPEC", help="in-distribution test set (default: the one in the manifest)"
    )
    p.add_argument(
        "--output", help="report folder (default benchmark/<name>; `--output docs` writes docs/benchmark.md)"
    )
    p.add_argument("--limit", type=int, help="at most N images per set (seeded sample)")
    p.add_argument(
        "--seed", type=int, default=0, help="seeds samples, synthetic images, jigsaw and the bootstrap"
    )
    p.add_argument("--resamples", type=int, default=500, help="bootstrap resamples (default 500)")
    p.add_argument(
        "--baseline",
        metavar="PATH",
        help="benchmark.json of an earlier run on the same in-distribution test set: the report adds "
        "AUROC before/after per set and score, and the issue-12 goal checked on this run",
    )
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_benchmark)

    from service.cli import add_serve_arguments

    p = add_serve_arguments(sub.add_parser("serve", help="serve the model repository over HTTP"))
    p.set_defaults(func=_cmd_serve)

    ensemble = sub.add_parser(
        "ensemble", help="combined verdicts over served models that share an input (create, list)"
    )
    verbs = ensemble.add_subparsers(dest="ensemble_command", required=True)
    p = verbs.add_parser(
        "create",
        help="calibrate a combined verdict over two or more served models",
        description="Combine served models that take the same input into <repository>/_ensembles/NAME.json. "
        "The threshold is set on in-distribution images disjoint from every member's calibration images: "
        "by default the members' combination split (rebuilt from their manifests and checked pixel for "
        "pixel); --data is required when a member's calibration images cannot be rebuilt.",
    )
    p.add_argument("name", help="ensemble name (lowercase letters, digits, '.', '_', '-')")
    p.add_argument(
        "--member", action="append", required=True, help="served model, 'name' or 'name:version' (repeat)"
    )
    p.add_argument(
        "--data",
        help="dataset spec of in-distribution calibration images (default: the members' combination split); "
        "images equal to one of a member's calibration, training or validation images are dropped",
    )
    p.add_argument("--rule", choices=["fisher", "min_p"], default="fisher", help="p-value combination rule")
    p.add_argument(
        "--weights",
        choices=["auto", "equal"],
        default="auto",
        help="fisher member weights: auto (default) chooses them on OOD proxies of half the calibration "
        "images, the other half sets the threshold; equal: every weight 1, all images set the threshold "
        "(min_p: always equal)",
    )
    p.add_argument(
        "--target-fpr", type=float, default=0.05, help="in-distribution images flagged (default 0.05)"
    )
    p.add_argument("--limit", type=int, help="use a seeded random sample of this many calibration images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--description")
    p.add_argument("--force", action="store_true", help="replace an existing ensemble of that name")
    p.add_argument("--repository", help="model repository (OODFLOW_MODEL_REPOSITORY, ./model-repository)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_cmd_ensemble_create)
    p = verbs.add_parser("list", help="every ensemble, its members and status (valid / stale + reason)")
    p.add_argument("--repository", help="model repository (OODFLOW_MODEL_REPOSITORY, ./model-repository)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_cmd_ensemble_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        # A serving install (oodflow[serve]) has no training stack: say which extra brings it.
        print(
            f"oodflow: error: `oodflow {args.command}` needs the module '{exc.name}', which this install "
            "lacks; training verbs need: pip install 'oodflow[train]'",
            file=sys.stderr,
        )
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        # Dataset, config and artifact errors carry one-line messages meant for the user.
        print(f"oodflow: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
