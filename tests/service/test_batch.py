"""`oodflow score-batch` on real small artifacts and real Fashion-MNIST / photo images: the local
engine, Ray Data on a local Ray, and the HTTP service give identical scores for the same images;
bad images become error rows; an interrupted job resumes."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from service.batch import enumerate_inputs, main, output_schema, score_batch
from service.batch import output as batch_output
from tests.artifacts import GREY_MODEL, RGB_MODEL, fashion_mnist_images, photo_patches
from tests.service.helpers import Server

MODELS = [GREY_MODEL, RGB_MODEL]
SCORE_COLUMNS = ["log_likelihood", "bits_per_dim", "ood_score", "p_value", "is_ood", "resized", "threshold"]


def _png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """300 real Fashion-MNIST test images (200 PNG files in nested folders, 100 in an .npz) and 20
    real photo crops as JPEG files, plus two broken files."""
    root = tmp_path_factory.mktemp("batch-inputs")
    grey = fashion_mnist_images(300, seed=3, split="test")[:, 0]
    rgb = photo_patches(20, seed=5).transpose(0, 2, 3, 1).copy()
    files: dict[str, bytes] = {}
    for i, image in enumerate(grey[:200]):
        files[f"images/class{i % 3}/fm{i:03d}.png"] = _png(image)
    for i, image in enumerate(rgb):
        files[f"images/photos/photo{i:02d}.jpg"] = _png(image, "JPEG")
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "images/broken/garbage.png").parent.mkdir(parents=True)
    (root / "images/broken/garbage.png").write_bytes(b"not an image at all")
    (root / "images/broken/truncated.png").write_bytes(files["images/class0/fm000.png"][:60])
    (root / "images/.hidden/skip.png").parent.mkdir(parents=True)
    (root / "images/.hidden/skip.png").write_bytes(files["images/class0/fm000.png"])
    np.savez(root / "fm.npz", images=grey[200:])
    return {"root": root, "files": files, "array": grey[200:]}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray  # a test dependency (pyproject `test` extra): missing, the Ray engine test fails

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        logging_level="WARNING",
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


def _read(path: Path) -> pa.Table:
    if path.suffix == ".csv":
        options = pacsv.ConvertOptions(
            column_types=output_schema(), strings_can_be_null=False, quoted_strings_can_be_null=False
        )
        return pacsv.read_csv(path, convert_options=options).cast(output_schema())
    return pq.read_table(path)


def _run(inputs: dict[str, Any], repository: Path, output: Path, **kwargs: Any) -> dict[str, Any]:
    root = inputs["root"]
    return score_batch(
        [root / "images", root / "fm.npz"],
        output,
        MODELS,
        repository=repository,
        resize=True,
        batch_size=64,
        progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def local_result(
    inputs: dict[str, Any], repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> pa.Table:
    output = tmp_path_factory.mktemp("local") / "scores.csv"
    summary = _run(inputs, repository, output, engine="local", workers=2)
    assert summary["pending"] == 200 + 20 + 2 + 100
    return _read(output)


def _http_rows(service: Server, inputs: dict[str, Any]) -> dict[tuple[str, int, str], dict[str, Any]]:
    """The same images through `POST /v1/score` (files as multipart, the .npz as a raw array)."""
    root = inputs["root"]
    rows: dict[tuple[str, int, str], dict[str, Any]] = {}
    params = {"models": ",".join(MODELS), "resize": "true"}
    names = sorted(inputs["files"])
    for start in range(0, len(names), 50):
        chunk = names[start : start + 50]
        response = service.client.post(
            "/v1/score", params=params, files=[("images", (n, inputs["files"][n])) for n in chunk]
        )
        assert response.status_code == 200, response.text
        for outcome in response.json()["models"]:
            for name, result in zip(chunk, outcome["results"], strict=True):
                rows[(str(root / name), 0, outcome["model"])] = result
    array = inputs["array"]
    for start in range(0, len(array), 50):
        part = np.ascontiguousarray(array[start : start + 50])
        body = {"array": {"b64": base64.b64encode(part.tobytes()).decode(), "shape": list(part.shape)}}
        response = service.client.post("/v1/score", params=params, json=body)
        assert response.status_code == 200, response.text
        for outcome in response.json()["models"]:
            for k, result in enumerate(outcome["results"]):
                rows[(str(root / "fm.npz"), start + k, outcome["model"])] = result
    return rows


def test_local_matches_the_http_service_exactly(
    local_result: pa.Table, service: Server, inputs: dict[str, Any]
) -> None:
    http = _http_rows(service, inputs)
    scored = [r for r in local_result.to_pylist() if not r["error"]]
    assert len(scored) == len(http) == (200 + 20 + 100) * len(MODELS)
    for row in scored:
        expected = http[(row["source"], row["index"], row["model"])]
        for name in SCORE_COLUMNS:
            assert row[name] == expected[name], (row["source"], row["model"], name, row[name], expected[name])
    # Both models really scored: grey Fashion-MNIST on the grey model, resized to RGB on the other.
    assert {r["model"] for r in scored} == set(MODELS)
    for r in scored:
        photo = "/photos/" in r["source"]  # 32×32 RGB crops; the Fashion-MNIST images are 28×28
        assert r["resized"] == (photo if r["model"] == GREY_MODEL else not photo), r


def test_ray_engine_matches_local_exactly(
    local_ray: None, local_result: pa.Table, inputs: dict[str, Any], repository: Path, tmp_path: Path
) -> None:
    output = tmp_path / "scores.parquet"
    summary = _run(inputs, repository, output, engine="ray", workers=2)
    assert summary["pending"] == 322
    assert _read(output).equals(local_result)  # same rows, same order, bit-identical floats


def test_error_rows_and_summary(local_result: pa.Table, inputs: dict[str, Any]) -> None:
    rows = local_result.to_pylist()
    assert not any(".hidden" in r["source"] for r in rows)
    errors = {(Path(r["source"]).name, r["model"]): r["error"] for r in rows if r["error"]}
    assert set(errors) == {(f, m) for f in ("garbage.png", "truncated.png") for m in MODELS}
    assert "not a decodable image" in errors[("garbage.png", GREY_MODEL)]
    assert (
        "truncated" in errors[("truncated.png", GREY_MODEL)]
        or "corrupt" in errors[("truncated.png", GREY_MODEL)]
    )
    for r in rows:
        if r["error"]:
            assert r["log_likelihood"] is None and r["is_ood"] is None
    # Rows follow the input order: the folder (sorted), then the .npz by index.
    sources = [r["source"] for r in rows[:: len(MODELS)]]
    folder = [s for s in sources if not s.endswith(".npz")]
    assert folder == sorted(folder) and sources[-100:] == [str(inputs["root"] / "fm.npz")] * 100


def test_wrong_size_without_resize_and_unreadable_npz(repository: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    image = fashion_mnist_images(1, seed=0, split="test")[0, 0]
    (tmp_path / "in" / "ok.png").write_bytes(_png(image))
    (tmp_path / "in" / "big.png").write_bytes(_png(np.zeros((40, 40), np.uint8)))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    result = score_batch(
        [tmp_path / "in", tmp_path / "broken.npz"],
        tmp_path / "out.parquet",
        [GREY_MODEL],
        repository=repository,
        progress=False,
    )
    rows = {
        (Path(r["source"]).name, r["index"]): r for r in pq.read_table(tmp_path / "out.parquet").to_pylist()
    }
    assert rows[("ok.png", 0)]["error"] == ""
    assert "40×40" in rows[("big.png", 0)]["error"] and "--resize" in rows[("big.png", 0)]["error"]
    assert rows[("broken.npz", -1)]["error"].startswith("unreadable")
    assert result["models"][GREY_MODEL] == {
        "images": 3,
        "scored": 1,
        "errors": 2,
        "ood": int(rows[("ok.png", 0)]["is_ood"]),
        "ood_rate": float(rows[("ok.png", 0)]["is_ood"]),
    }


def test_interrupted_job_resumes(
    local_result: pa.Table,
    inputs: dict[str, Any],
    repository: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    output = tmp_path / "scores.csv"
    original = batch_output.Journal.write
    written: list[int] = []

    def crash_after_two(self: Any, table: pa.Table) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt("simulated crash")
        written.append(table.num_rows)
        original(self, table)

    monkeypatch.setattr(batch_output.Journal, "write", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        _run(inputs, repository, output, engine="local", workers=1)
    monkeypatch.setattr(batch_output.Journal, "write", original)
    assert (
        not output.exists() and len(list(output.with_name("scores.csv.partial").glob("chunk-*.parquet"))) == 2
    )

    resumed = _run(inputs, repository, output, engine="local", workers=2)
    assert resumed["pending"] == 322 - 2 * 64  # the journalled chunks were not scored again
    assert _read(output).equals(local_result)
    assert not output.with_name("scores.csv.partial").exists()

    again = _run(inputs, repository, output, engine="local")
    assert again["pending"] == 0 and _read(output).equals(local_result)


def test_parquet_inputs(inputs: dict[str, Any], repository: Path, tmp_path: Path) -> None:
    """A Parquet column of encoded files (plain binary, or Hugging Face's {bytes, path} struct)
    scores exactly like the same files in a folder."""
    names = sorted(n for n in inputs["files"] if n.endswith(".png"))[:40]
    data = [inputs["files"][n] for n in names]
    pq.write_table(pa.table({"id": names, "image": data}), tmp_path / "plain.parquet")
    struct = pa.StructArray.from_arrays(
        [pa.array(data, pa.binary()), pa.array(names)], names=["bytes", "path"]
    )
    pq.write_table(pa.table({"img": struct}), tmp_path / "hf.parquet")
    folder = tmp_path / "folder"
    for n, d in zip(names, data, strict=True):
        (folder / Path(n).name).parent.mkdir(parents=True, exist_ok=True)
        (folder / Path(n).name).write_bytes(d)
    tables = {}
    for name, sources, column in (
        ("plain", [tmp_path / "plain.parquet"], None),
        ("hf", [tmp_path / "hf.parquet"], "img"),
        ("folder", [folder], None),
    ):
        out = tmp_path / "out" / f"{name}.parquet"
        score_batch(sources, out, [GREY_MODEL], repository=repository, image_column=column, progress=False)
        tables[name] = pq.read_table(out).select(SCORE_COLUMNS)
    assert tables["plain"].equals(tables["folder"]) and tables["hf"].equals(tables["folder"])
    # Without --image-column the struct column named `img` is not found: one error row, no abort.
    (error,) = enumerate_inputs([tmp_path / "hf.parquet"]).column("error").to_pylist()
    assert "no image column" in error and "--image-column" in error


def test_usage_errors(repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing"), "--model", GREY_MODEL, "--output", str(tmp_path / "o.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "a.png").write_bytes(_png(np.zeros((28, 28), np.uint8)))
    args = [str(tmp_path / "a.png"), "--model", GREY_MODEL, "--repository", str(repository)]
    assert main([*args, "--output", str(tmp_path / "o.txt")]) == 2
    assert main([*args, "--model", "nope", "--output", str(tmp_path / "o.csv")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "o.csv"), "--no-progress"]) == 0
    assert f"{GREY_MODEL}: 1 images, 1 scored, 0 errors" in capsys.readouterr().out


def test_service_batch_does_not_import_training_or_flows() -> None:
    """The batch front door stands on the core alone: no training, no flow classes, no HTTP."""
    code = (
        "import sys, service.batch.job, service.batch.ray_engine, service.core; "
        "bad = [m for m in sys.modules if m.startswith(('training', 'fastapi', 'starlette', 'uvicorn')) "
        "or m in ('models.flows', 'models.transforms', 'service.settings')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_combined_rows_match_the_service_rule(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    """Batch scoring adds `combined:<ensemble>` rows computed exactly like POST /v1/score's block;
    an image that failed for any member gets an error row, and a stale ensemble is ignored."""
    from types import SimpleNamespace

    import numpy as np
    import pyarrow as pa

    from models.artifact import Calibration, EnsembleManifest, EnsembleMember, load_manifest, write_ensemble
    from models.scores import combined_verdict
    from service.batch import combined_rows, output_schema
    from service.core.ensembles import discover_ensembles, resolve_ensembles

    reference = sorted(np.random.default_rng(0).chisquare(4, 200).tolist())
    calibration = Calibration(
        target_fpr=0.05,
        threshold=float(np.quantile(reference, 0.95)),
        validation_set="t",
        validation_size=200,
        validation_fpr=0.05,
        reference_scores=reference,
    )
    members = [
        EnsembleMember(name="a", version=1, kind="pixel", statistic="complexity"),
        EnsembleMember(name="b", version=2, kind="embedding", statistic="nll"),
    ]
    write_ensemble(
        tmp_path,
        EnsembleManifest(
            name="ab", rule="fisher", rule_definition="fisher", members=members, calibration=calibration
        ),
    )
    p = {("x", 0): (0.5, 0.4), ("y", 0): (0.001, 0.9), ("z", 0): (0.02, 0.003)}
    rows = []
    for (source, index), (pa_, pb) in p.items():
        for name, version, pv in (("a", 1, pa_), ("b", 2, pb)):
            rows.append(
                {
                    **dict.fromkeys(output_schema().names),
                    "source": source,
                    "index": index,
                    "model": name,
                    "version": version,
                    "p_value": pv,
                    "error": "",
                }
            )
    rows.append(
        {
            **dict.fromkeys(output_schema().names),
            "source": "bad",
            "index": 0,
            "model": "a",
            "version": 1,
            "error": "not a decodable image",
        }
    )
    rows.append(
        {
            **dict.fromkeys(output_schema().names),
            "source": "bad",
            "index": 0,
            "model": "b",
            "version": 2,
            "error": "not a decodable image",
        }
    )
    table = pa.Table.from_pylist(rows, schema=output_schema())
    # The members as the core's registry would hold them once loaded: ready, at the listed versions.
    real = load_manifest(artifacts[GREY_MODEL])
    loaded = {
        m.name: SimpleNamespace(
            status="ready",
            manifest=real.model_copy(
                update={
                    "name": m.name,
                    "version": m.version,
                    "kind": m.kind,
                    "score": real.score.model_copy(update={"statistic": m.statistic}),
                }
            ),
        )
        for m in members
    }
    ensembles = discover_ensembles(tmp_path)
    resolve_ensembles(ensembles, loaded)
    assert [e.status for e in ensembles] == ["valid"]
    combined = combined_rows(table, ensembles)
    assert combined is not None
    got = {(r["source"], r["index"]): r for r in combined.to_pylist()}
    assert set(got) == {("x", 0), ("y", 0), ("z", 0), ("bad", 0)}
    assert all(r["model"] == "combined:ab" for r in got.values())
    keys = [("x", 0), ("y", 0), ("z", 0)]
    score, pv, flag = combined_verdict(
        [np.array([p[k][0] for k in keys]), np.array([p[k][1] for k in keys])],
        "fisher",
        calibration.threshold,
        np.asarray(reference),
    )
    for k, s, q, f in zip(keys, score, pv, flag, strict=True):
        assert got[k]["ood_score"] == pytest.approx(s) and got[k]["p_value"] == pytest.approx(q)
        assert got[k]["is_ood"] == bool(f)
    assert got[("y", 0)]["is_ood"] and got[("z", 0)]["is_ood"] and not got[("x", 0)]["is_ood"]
    assert "not a decodable image" in got[("bad", 0)]["error"]
    # members scored at another version: the ensemble no longer applies
    stale = table.set_column(3, "version", pa.array([1] * table.num_rows, type=pa.int64()))
    assert combined_rows(stale, ensembles) is None
    # a member of another statistic than the manifest lists: stale, for batch as for HTTP
    loaded["b"].manifest = loaded["b"].manifest.model_copy(
        update={"score": real.score.model_copy(update={"statistic": "typicality"})}
    )
    resolve_ensembles(ensembles, loaded)
    assert ensembles[0].status == "stale" and "embedding/nll" in (ensembles[0].reason or "")
    assert combined_rows(table, ensembles) is None


def test_ensembles_resolved_and_reported_like_the_service(
    ens_repository: Path, inputs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """score-batch reads the repository's ensembles by the service's rules (`service.core.ensembles`):
    the valid one gives combined rows, a stale one and an unreadable one are reported with their
    reasons, never skipped silently."""
    photos = str(inputs["root"] / "images" / "photos")
    common = ["--repository", str(ens_repository), "--resize", "--no-progress"]
    assert (
        main(
            [
                photos,
                "--model",
                GREY_MODEL,
                "--model",
                RGB_MODEL,
                "--output",
                str(tmp_path / "a.csv"),
                *common,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "ensemble both: valid" in out
    assert (
        f"ensemble a-stale: stale: member '{GREY_MODEL}' is served at version 1, the ensemble needs version 7"
        in out
    )
    assert "ensemble broken: failed:" in out and "invalid ensemble manifest" in out
    rows = _read(tmp_path / "a.csv").to_pylist()
    combined = [r for r in rows if r["model"] == "combined:both"]
    assert len(combined) == 20 and all(r["error"] == "" for r in combined)
    # Without one member the valid ensemble is not used (nothing is wrong with it), and says why.
    assert main([photos, "--model", GREY_MODEL, "--output", str(tmp_path / "b.csv"), *common]) == 0
    assert f"ensemble both: not used: members not requested: {RGB_MODEL} (--model)" in capsys.readouterr().out
    assert not [r for r in _read(tmp_path / "b.csv").to_pylist() if r["model"].startswith("combined:")]


def test_built_in_dataset_specs_are_scored_like_files(repository: Path, tmp_path: Path) -> None:
    """`oodflow score-batch sklearn-digits photos ...` (issue 10 §4): the built-in sets are written
    beside the output with the loader's pixels, scored, and found again by a re-run (resume)."""
    from oodflow.cli import main as oodflow_main
    from training.data import load_dataset

    output = tmp_path / "builtin.csv"
    argv = ["score-batch", "sklearn-digits", "photos", "--model", GREY_MODEL, "--resize"]
    argv += ["--output", str(output), "--repository", str(repository), "--no-progress"]
    assert oodflow_main(argv) == 0
    table = pacsv.read_csv(output).to_pylist()
    digits = [r for r in table if r["source"].endswith("sklearn-digits.npz")]
    photos = [r for r in table if "/photos/" in r["source"]]
    assert len(digits) == 1797 and not any(r["error"] for r in digits if isinstance(r["error"], str))
    assert len(photos) == len(list((tmp_path / "builtin.csv.datasets" / "photos").glob("*.png"))) > 10
    with np.load(tmp_path / "builtin.csv.datasets" / "sklearn-digits.npz") as saved:
        np.testing.assert_array_equal(saved["images"], load_dataset("sklearn-digits").images)
    assert oodflow_main(argv) == 0  # nothing left to score: same files, same keys
    assert len(pacsv.read_csv(output).to_pylist()) == len(table)
