"""Short real runs end to end: train → calibrate → evaluate → export → reload and score."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from models.artifact import ArtifactError, verify_artifact
from models.config import PixelFlowConfig
from models.flows import PixelFlow
from models.scores import ood_score, p_value
from oodflow.cli import main
from training.calibrate import read_calibration
from training.config import apply_overrides, load_run_config
from training.data import load_dataset
from training.export import ExportError, check_parity, export_onnx, export_torchscript
from training.runs import Run
from training.train import train

PRESETS = ["fmnist-pixel-realnvp-quick", "fmnist-embedding-quick"]


@pytest.mark.parametrize("preset", PRESETS)
def test_artifact_layout_and_manifest(quick_repository: dict[str, Path], preset: str) -> None:
    path = quick_repository[preset]
    manifest = verify_artifact(path)
    assert path.name == "1" and manifest.version == 1
    for name in (
        "model.onnx",
        "model.torchscript.pt",
        "weights.safetensors",
        "report/metrics.json",
        "report/report.md",
        "report/histogram_bits_per_dim.png",
        "report/roc.png",
    ):
        assert name in manifest.files, name
    assert manifest.kind == ("pixel" if "pixel" in preset else "embedding")
    assert manifest.calibration.target_fpr == 0.05
    assert manifest.calibration.validation_size == len(manifest.calibration.reference_scores)
    assert [m.dataset for m in manifest.metrics] == ["mnist"]
    assert manifest.export["parity_max_rel_error"]["onnxruntime"] < 1e-3
    assert manifest.data.fingerprint and len(manifest.data.fingerprint) == 64
    # no pickles anywhere in the artifact
    assert not list(path.rglob("*.pkl")) and not list(path.rglob("*.pickle"))


@pytest.mark.parametrize("preset", PRESETS)
def test_exported_graph_reloads_and_scores_like_the_run(
    quick_repository: dict[str, Path], preset: str
) -> None:
    path = quick_repository[preset]
    manifest = verify_artifact(path)
    run = Run(quick_repository[preset + ":run"])
    model = run.load_model("cpu")
    images = load_dataset("fashion-mnist:test", limit=7, seed=5).images
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    ll, bpd = session.run(["log_likelihood", "bits_per_dim"], {"images": images})
    assert ll.dtype == np.float32 and ll.shape == (7,)
    with torch.no_grad():
        eager = model.log_likelihood(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(ll, eager, rtol=1e-3)
    np.testing.assert_allclose(bpd, -ll / (manifest.num_dims * np.log(2)), rtol=1e-5)
    # weights.safetensors reloads into the architecture recorded in the manifest
    state = load_file(str(path / "weights.safetensors"))
    assert set(state) == set(model.state_dict())
    # the manifest's calibration reproduces the threshold on its own reference scores
    ref = np.array(manifest.calibration.reference_scores)
    assert np.mean(ref > manifest.calibration.threshold) <= 0.05 + 1e-9
    scores = ood_score(manifest.score.statistic, ll, num_dims=manifest.num_dims)
    assert np.all((p_value(scores, ref) > 0) & (p_value(scores, ref) <= 1))


def test_pixel_report_states_the_likelihood_failure(quick_repository: dict[str, Path]) -> None:
    report = (quick_repository["fmnist-pixel-realnvp-quick"] / "report" / "report.md").read_text()
    metrics = json.loads(
        (quick_repository["fmnist-pixel-realnvp-quick"] / "report" / "metrics.json").read_text()
    )
    assert "OOD is the positive class" in report
    mnist = metrics["ood"][0]
    # Even a tiny flow gives MNIST digits higher likelihood than Fashion-MNIST (Nalisnick et al.).
    assert mnist["auroc"] < 0.5
    assert "likelihood failure is reproduced" in report


def test_embedding_report_shows_gaussian_baseline(quick_repository: dict[str, Path]) -> None:
    report = (quick_repository["fmnist-embedding-quick"] / "report" / "report.md").read_text()
    assert "Gaussian AUROC" in report
    metrics = json.loads((quick_repository["fmnist-embedding-quick"] / "report" / "metrics.json").read_text())
    assert "mnist" in metrics["baselines"]["gaussian_full_covariance"]


def test_tampered_artifact_is_refused(quick_repository: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "m" / "1"
    shutil.copytree(quick_repository["fmnist-pixel-realnvp-quick"], copy)
    verify_artifact(copy)
    with open(copy / "model.onnx", "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        verify_artifact(copy)


def test_parity_check_refuses_a_graph_that_disagrees(tmp_path: Path) -> None:
    cfg = PixelFlowConfig(
        width=4, depth=1, num_scales=2, couplings_per_scale=1, channel_couplings=1, final_couplings=1
    )
    model = PixelFlow(cfg).eval()
    other = PixelFlow(cfg).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3)
    images = torch.from_numpy(load_dataset("fashion-mnist:test", limit=8).images)
    export_onnx(other, images[:2], tmp_path / "m.onnx")
    export_torchscript(model, images[:2], tmp_path / "m.pt")
    with pytest.raises(ExportError, match="parity failed"):
        check_parity(model, tmp_path / "m.onnx", tmp_path / "m.pt", images)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def test_resume_after_kill_minus_9_ends_where_an_uninterrupted_run_would(tmp_path: Path) -> None:
    overrides = ["train.max_steps=30", "train.checkpoint_every=5", "train.log_every=5"]
    config = load_run_config("fmnist-pixel-realnvp-quick", overrides)
    train(config, tmp_path / "straight", progress=False)

    cmd = [
        sys.executable,
        "-m",
        "oodflow",
        "train",
        "fmnist-pixel-realnvp-quick",
        "--run-dir",
        str(tmp_path / "killed"),
        "--no-progress",
        *sum((["--set", o] for o in overrides), []),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "the run wrote no checkpoint before it was killed"
    killed_step = torch.load(checkpoint, weights_only=False)["step"]
    assert killed_step < 30, "the run finished before it could be killed; nothing was tested"
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    assert main(cmd[3:] + ["--resume"]) == 0
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)


def test_max_minutes_stops_cleanly_and_resume_finishes(tmp_path: Path) -> None:
    config = load_run_config("fmnist-pixel-realnvp-quick")
    result = train(config, tmp_path / "r", progress=False, max_minutes=0.0)
    assert not result.completed and result.steps == 0
    assert (tmp_path / "r" / "checkpoints" / "last.pt").exists()
    result = train(config, tmp_path / "r", progress=False, resume=True)
    assert result.completed and result.steps == config.train.max_steps
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == config.train.max_steps


def test_same_seed_same_weights(tmp_path: Path) -> None:
    config = load_run_config("fmnist-pixel-glow-quick", ["train.max_steps=6"])
    train(config, tmp_path / "a", progress=False)
    train(config, tmp_path / "b", progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_overrides_and_files(tmp_path: Path) -> None:
    base = load_run_config("fmnist-pixel-realnvp-quick")
    assert apply_overrides(base, ["model.mask=cycle"]).model.mask == "cycle"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="unknown key"):
        apply_overrides(base, ["train.nope=1"])
    with pytest.raises(ValueError):
        apply_overrides(base, ["model.mask=diagonal"])
    toml = tmp_path / "c.toml"
    toml.write_text('base = "fmnist-pixel-realnvp-quick"\nname = "mine"\n[train]\nmax_steps = 7\n')
    config = load_run_config(str(toml))
    assert config.name == "mine" and config.train.max_steps == 7 and config.train.batch_size == 32


def test_cli_errors_are_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OODFLOW_DATA_DIR", str(tmp_path))
    assert (
        main(["train", "fmnist-pixel-realnvp-quick", "--run-dir", str(tmp_path / "x"), "--no-progress"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dataset-fashion-mnist" in err and "OODFLOW_DATA_DIR" in err
    monkeypatch.delenv("OODFLOW_DATA_DIR")
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((3, 5), dtype=np.uint8))
    assert (
        main(
            [
                "train",
                "fmnist-pixel-realnvp-quick",
                "--run-dir",
                str(tmp_path / "y"),
                "--no-progress",
                "--set",
                "train.max_steps=2",
            ]
        )
        == 0
    )
    assert main(["calibrate", str(tmp_path / "y")]) == 0
    assert main(["evaluate", str(tmp_path / "y"), "--ood", f"npz:{bad}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(bad) in err
    assert main(["calibrate", str(tmp_path / "missing")]) == 2


def test_calibration_json_reads_back_typed_and_a_bad_one_is_a_one_line_error(
    quick_repository: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(quick_repository["fmnist-embedding-quick:run"], run_dir)
    record = read_calibration(Run(run_dir))
    manifest = verify_artifact(quick_repository["fmnist-embedding-quick"])
    assert record.calibration_spec() == manifest.calibration
    assert record.statistic == manifest.score.statistic and record.selection == manifest.score.selection
    path = run_dir / "calibration.json"
    raw = json.loads(path.read_text())
    # the keys calibration.json had when it was written from a plain dict
    assert set(raw) == {
        "statistic",
        "selection",
        "num_dims",
        "reference_bits_per_dim",
        "target_fpr",
        "validation_set",
        "validation_size",
        "threshold",
        "validation_fpr",
        "calibration_mean_bits_per_dim",
        "reference_scores",
        "combination_size",
    }
    # a record from before statistic selection and the ensemble's combination split still reads
    older = {k: v for k, v in raw.items() if k not in ("selection", "combination_size")}
    path.write_text(json.dumps(older))
    assert read_calibration(Run(run_dir)).selection is None
    path.write_text(json.dumps({**raw, "threshold": "high"}))
    assert main(["evaluate", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibration.json" in err[0] and "threshold" in err[0], err
    path.unlink()
    assert main(["export", str(run_dir), "--repository", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibration.json missing" in err[0], err


def test_every_dataset_spec_works_as_ood_on_an_embedding_run(
    quick_repository: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--ood folder:DIR` and `--ood npz:FILE` on an embedding run: the spec must not end up in a
    feature-cache file name (issue 10 §4), and the same folder and npz score in score-batch."""
    import shutil

    from PIL import Image

    run = tmp_path / "run"
    shutil.copytree(quick_repository["fmnist-embedding-quick:run"], run)
    digits = load_dataset("mnist", limit=40, seed=3).images
    folder = tmp_path / "some dir" / "digits"
    for i, image in enumerate(digits[:20]):
        (folder / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(folder / str(i % 2) / f"{i}.png")
    npz = tmp_path / "digits.npz"
    np.savez(npz, images=digits[20:, 0])
    specs = [f"folder:{folder}", f"npz:{npz}", "sklearn-digits"]
    assert main(["evaluate", str(run), *sum((["--ood", s] for s in specs), [])]) == 0
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert [m["dataset"] for m in metrics["ood"]] == specs
    assert [m["size"] for m in metrics["ood"]][:2] == [20, 20]
    names = [p.name for p in (run / "features").iterdir()]
    assert all(":" not in n and "/" not in n for n in names) and len(names) >= 5
    # the same specs in score-batch
    out = tmp_path / "scores.csv"
    model = verify_artifact(quick_repository["fmnist-embedding-quick"]).name
    code = main(
        [
            "score-batch",
            f"folder:{folder}",
            f"npz:{npz}",
            "--model",
            model,
            "--repository",
            str(quick_repository["repository"]),
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    assert len(out.read_text().strip().splitlines()) == 1 + 40


@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        (".toml", 'base = "fmnist-pixel-realnvp-quick"\n[data]\ntest_set = "held-out"\n'),
        (".yaml", "base: fmnist-pixel-realnvp-quick\ndata:\n  test_set: null\n"),
        (".yaml", "base: fmnist-pixel-realnvp-quick\ndata:\n  test_set: held-out\n"),
    ],
)
def test_test_set_is_optional_in_config_files(tmp_path: Path, suffix: str, text: str) -> None:
    from training.runs import load_splits

    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    config = load_run_config(str(path))
    assert config.data.test_set is None
    splits = load_splits(config)
    assert splits.test is not None and splits.combination is not None
    # held-out test, calibration and combination splits: disjoint from each other and from training
    names = ("train", "validation", "calibration", "combination", "test")
    pixels = {n: {image.tobytes() for image in getattr(splits, n).images} for n in names}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not pixels[a] & pixels[b], (a, b)
    assert len(splits.calibration) + len(splits.combination) == config.data.calibration_size
    assert len(splits.test) == config.data.calibration_size
