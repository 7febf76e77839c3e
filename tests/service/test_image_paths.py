"""No train/serve skew: one file gives the same pixels through the training loader, the HTTP service
and `score-batch`, for every mode PIL can write into a format the pipeline decodes.

Real files (a real photo crop in each mode, saved in every format that takes that mode) go through
the three real paths: `training.data.load_dataset("folder:...")`, `POST /v1/score` (multipart, over
real HTTP) and `service.batch.score_batch` (local engine). The service and batch return scores,
not pixels, so each is compared with the scores of the training loader's array sent as a raw array
(HTTP) or an .npz (batch) through the same path, one image per call: equal scores for every file
and model, while one changed pixel changes them (checked). The decoding functions behind HTTP and
batch are also compared array for array.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pacsv
import pytest
from PIL import Image

from models.artifact import load_manifest
from models.images import DECODABLE_FORMATS, luma
from service.batch import output_schema, score_batch
from service.batch.scorer import BatchConfig, BatchScorer
from service.decoding import DecodedBatch, decode_image, fit_to_model
from tests.artifacts import photo_patches
from tests.service.helpers import GREY_MODEL, RGB_MODEL, Server
from training.data import load_dataset

SIZE = 32  # the RGB model's input; the grey model (28×28) resizes
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "WEBP": ".webp", "GIF": ".gif",
              "TIFF": ".tif", "PPM": ".ppm", "TGA": ".tga"}  # fmt: skip
# Every mode a decoder hands back for some file; each must be covered by at least one file below.
DECODED_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "I", "I;16", "I;16B", "F"}


def _sources() -> dict[str, Image.Image]:
    """The same real photo crop in every mode (grey and colour palettes, 8- and 16-bit, float)."""
    rgb = photo_patches(1, seed=4, size=SIZE)[0].transpose(1, 2, 0).copy()
    grey = luma(rgb)
    alpha = np.add.outer(np.arange(SIZE), np.arange(SIZE)).astype(np.uint8) * 4
    wide = grey.astype(np.uint16) * 257 + np.arange(SIZE, dtype=np.uint16)  # 16-bit, low byte busy
    colour_palette = Image.fromarray(rgb).quantize(64)
    return {
        "1": Image.fromarray(grey > 110),
        "L": Image.fromarray(grey),
        "LA": Image.fromarray(np.dstack([grey, alpha]), mode="LA"),
        "P-grey": Image.fromarray(grey).convert("P"),
        "P-colour": colour_palette,
        "PA-colour": colour_palette.convert("PA"),
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA"),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "YCbCr": Image.fromarray(rgb).convert("YCbCr"),
        "LAB": Image.fromarray(rgb).convert("LAB"),
        "I-16bit": Image.fromarray(wide.astype(np.int32), mode="I"),
        "I-8bit": Image.fromarray(grey.astype(np.int32), mode="I"),
        "I;16": Image.fromarray(wide),
        "I;16B": Image.frombytes("I;16B", (SIZE, SIZE), wide.astype(">u2").tobytes()),
        "F-16bit": Image.fromarray(wide.astype(np.float32), mode="F"),
        "F-8bit": Image.fromarray(grey.astype(np.float32), mode="F"),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each source saved in each format that accepts it (and reads back), one file each."""
    folder = tmp_path_factory.mktemp("image-paths") / "files"
    folder.mkdir()
    written: dict[str, bytes] = {}
    decoded_modes: dict[str, str] = {}
    for label, image in _sources().items():
        for fmt in DECODABLE_FORMATS:
            buffer = io.BytesIO()
            try:
                image.save(buffer, format=fmt)
                with Image.open(io.BytesIO(buffer.getvalue())) as check:
                    check.load()
                    mode = check.mode
            except (OSError, ValueError, KeyError, TypeError):
                continue  # this format cannot hold this mode
            name = f"{label}-{fmt.lower()}{EXTENSIONS[fmt]}"
            (folder / name).write_bytes(buffer.getvalue())
            written[name] = buffer.getvalue()
            decoded_modes[name] = mode
    return {"folder": folder, "bytes": written, "modes": decoded_modes}


def test_every_mode_is_covered(files: dict[str, Any]) -> None:
    assert set(files["modes"].values()) >= DECODED_MODES, DECODED_MODES - set(files["modes"].values())
    assert len(files["bytes"]) >= 40


def _training_arrays(folder: Path, shape: tuple[int, int, int], names: list[str]) -> dict[str, np.ndarray]:
    loaded = load_dataset(f"folder:{folder}", shape=shape)
    assert len(loaded) == len(names)
    return dict(zip(sorted(names), loaded.images, strict=True))  # the loader reads files sorted


@pytest.mark.parametrize("model", [GREY_MODEL, RGB_MODEL])
def test_decoders_give_the_training_array(
    files: dict[str, Any], artifacts: dict[str, Path], model: str
) -> None:
    manifest = load_manifest(artifacts[model])
    expected = _training_arrays(files["folder"], manifest.input.shape, list(files["bytes"]))
    repository = artifacts[model].parent.parent
    batch = BatchScorer(BatchConfig(repository=repository, models=(model,), resize=True, batch_size=1))
    for name, data in files["bytes"].items():
        # the HTTP service's decoding and fitting
        decoded = decode_image(data, 0, 1 << 20)
        http = fit_to_model(DecodedBatch(images=(decoded,)), manifest.input, resize=True, model=model).images[
            0
        ]
        # score-batch's (a file row)
        row = {"error": "", "channels": 0, "path": str(files["folder"] / name), "data": b""}
        one = batch._decode(row)
        assert not isinstance(one, str), one
        fitted = batch._fit(one, batch.models[0])
        assert not isinstance(fitted, str), fitted
        np.testing.assert_array_equal(http, expected[name], err_msg=f"HTTP vs training: {name}")
        np.testing.assert_array_equal(fitted.images[0], expected[name], err_msg=f"batch vs training: {name}")


def _http_score(service: Server, params: dict[str, str], **body: Any) -> dict[str, float]:
    response = service.client.post("/v1/score", params=params, **body)
    assert response.status_code == 200, response.text
    return {m["model"]: m["results"][0]["log_likelihood"] for m in response.json()["models"]}


def test_http_and_score_batch_score_the_training_array(
    files: dict[str, Any], artifacts: dict[str, Path], service: Server, repository: Path, tmp_path: Path
) -> None:
    names = sorted(files["bytes"])
    arrays = {
        model: _training_arrays(files["folder"], load_manifest(artifacts[model]).input.shape, names)
        for model in (GREY_MODEL, RGB_MODEL)
    }
    params = {"models": f"{GREY_MODEL},{RGB_MODEL}", "resize": "true"}
    # The training array of each model, one image per call, through the same service and batch job.
    from_array: dict[tuple[str, str], float] = {}
    for model, per_file in arrays.items():
        for name, image in per_file.items():
            pixels = np.ascontiguousarray(image.transpose(1, 2, 0))
            body = {
                "array": {"b64": base64.b64encode(pixels.tobytes()).decode(), "shape": [1, *pixels.shape]}
            }
            from_array[(name, model)] = _http_score(service, {"models": model}, json=body)[model]
    # the same files through HTTP
    for name in names:
        got = _http_score(service, params, files=[("images", (name, files["bytes"][name]))])
        for model in (GREY_MODEL, RGB_MODEL):
            assert got[model] == from_array[(name, model)], (name, model)
    # and through score-batch, batch size 1, against the training arrays as .npz rows
    for model, per_file in arrays.items():
        np.savez(tmp_path / f"{model}.npz", images=np.stack([per_file[n] for n in names]))
    common = {"repository": repository, "resize": True, "batch_size": 1, "workers": 1, "progress": False}
    score_batch([files["folder"]], tmp_path / "files.csv", [GREY_MODEL, RGB_MODEL], **common)
    options = pacsv.ConvertOptions(column_types=output_schema(), strings_can_be_null=False)
    rows = pacsv.read_csv(tmp_path / "files.csv", convert_options=options).to_pylist()
    by_file = {(Path(r["source"]).name, r["model"]): r for r in rows}
    for model in (GREY_MODEL, RGB_MODEL):
        score_batch([tmp_path / f"{model}.npz"], tmp_path / f"{model}.csv", [model], **common)
        npz_rows = pacsv.read_csv(tmp_path / f"{model}.csv", convert_options=options).to_pylist()
        for name, row in zip(names, npz_rows, strict=True):
            assert by_file[(name, model)]["error"] == "" and row["error"] == ""
            assert by_file[(name, model)]["log_likelihood"] == row["log_likelihood"], (name, model)
            assert row["log_likelihood"] == pytest.approx(from_array[(name, model)], rel=1e-6)
    # The comparison can fail: one pixel changed changes the score.
    name = names[0]
    changed = arrays[GREY_MODEL][name].transpose(1, 2, 0).copy()
    changed[5, 5, 0] ^= 0x40
    body = {"array": {"b64": base64.b64encode(changed.tobytes()).decode(), "shape": [1, *changed.shape]}}
    assert (
        _http_score(service, {"models": GREY_MODEL}, json=body)[GREY_MODEL] != from_array[(name, GREY_MODEL)]
    )
