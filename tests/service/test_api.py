"""v1 and health over real HTTP on real artifacts: every body type, scores equal to ONNX Runtime run
directly, colour conversion, resize, multi-model, batching."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from models.artifact import load_manifest
from models.scores import ood_score, p_value
from tests.service.helpers import GREY_MODEL, RGB_MODEL, Server, b64, encode

RESULT_KEYS = {"log_likelihood", "bits_per_dim", "ood_score", "threshold", "p_value", "is_ood", "resized"}


def direct_scores(version_dir: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """What the service must answer: ONNX Runtime on the uint8 batch + DESIGN §4 from the manifest."""
    manifest = load_manifest(version_dir)
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    log_likelihood, bits = session.run(["log_likelihood", "bits_per_dim"], {"images": images})
    score = ood_score(
        manifest.score.statistic,
        log_likelihood.astype(np.float64),
        num_dims=manifest.num_dims,
        reference_nll_mean=manifest.score.reference_bits_per_dim,
    )
    return {
        "log_likelihood": log_likelihood.astype(np.float64),
        "bits_per_dim": bits.astype(np.float64),
        "ood_score": score,
        "p_value": p_value(score, np.asarray(manifest.calibration.reference_scores)),
        "is_ood": score > manifest.calibration.threshold,
        "threshold": np.full(len(images), manifest.calibration.threshold),
    }


def column(results: list[dict], key: str) -> np.ndarray:
    return np.asarray([r[key] for r in results])


def assert_matches(results: list[dict], expected: dict[str, np.ndarray], rtol: float = 1e-6) -> None:
    assert len(results) == len(expected["ood_score"])
    for key, values in expected.items():
        if key == "is_ood":
            assert column(results, key).tolist() == values.tolist()
        else:
            np.testing.assert_allclose(column(results, key), values, rtol=rtol, atol=1e-9, err_msg=key)


def score(server: Server, model: str, **kwargs) -> list[dict]:  # type: ignore[no-untyped-def]
    response = server.client.post(f"/v1/models/{model}/score", **kwargs)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model and body["version"] == 1 and body["kind"] == "pixel"
    for result in body["results"]:
        assert set(result) == RESULT_KEYS
    return body["results"]


# ---------------------------------------------------------------- health and listing


def test_health_and_readiness(service: Server) -> None:
    assert service.client.get("/healthz").json() == {"status": "alive"}
    ready = service.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "models": {GREY_MODEL: "ready", RGB_MODEL: "ready"}}


def test_model_listing(service: Server, artifacts: dict[str, Path]) -> None:
    models = {m["name"]: m for m in service.client.get("/v1/models").json()["models"]}
    assert set(models) == {GREY_MODEL, RGB_MODEL}
    grey = models[GREY_MODEL]
    manifest = load_manifest(artifacts[GREY_MODEL])
    assert grey["status"] == "ready" and grey["reason"] is None and grey["version"] == 1
    assert grey["input"]["colour"] == "L" and grey["score"]["statistic"] == "nll"
    assert grey["calibration"]["threshold"] == manifest.calibration.threshold
    assert grey["calibration"]["target_fpr"] == 0.05
    assert grey["runtime"] == {"name": "onnx", "device": "cpu"}
    detail = service.client.get(f"/v1/models/{RGB_MODEL}").json()
    assert detail["score"]["statistic"] == "typicality" and detail["architecture"]["width"] == 8
    missing = service.client.get("/v1/models/no-such-model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_request_id_is_echoed_or_generated(service: Server) -> None:
    assert (
        service.client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"]
        == "abc-123"
    )
    first, second = (service.client.get("/healthz").headers["x-request-id"] for _ in range(2))
    assert first != second and first.split("-")[0] == second.split("-")[0]  # process prefix + counter


# ---------------------------------------------------------------- body types


def test_every_body_type_scores_like_onnxruntime(
    service: Server, artifacts: dict[str, Path], grey_images: np.ndarray
) -> None:
    expected = direct_scores(artifacts[GREY_MODEL], grey_images[:, None])
    files = [("images", (f"{i}.png", encode(img), "image/png")) for i, img in enumerate(grey_images)]
    multipart = score(service, GREY_MODEL, files=files)
    encoded = score(service, GREY_MODEL, json={"images": [{"b64": b64(encode(img))} for img in grey_images]})
    array = score(
        service,
        GREY_MODEL,
        json={"array": {"b64": b64(grey_images.tobytes()), "shape": list(grey_images.shape)}},
    )
    array_hwc = score(
        service, GREY_MODEL, json={"array": {"b64": b64(grey_images.tobytes()), "shape": [8, 28, 28, 1]}}
    )
    for results in (multipart, encoded, array, array_hwc):
        assert_matches(results, expected)
    assert multipart == encoded == array == array_hwc  # bit-identical across body types


def test_same_image_twice_gives_identical_scores(service: Server, grey_images: np.ndarray) -> None:
    body = {"images": [{"b64": b64(encode(grey_images[0]))}] * 2}
    first = score(service, GREY_MODEL, json=body)
    second = score(service, GREY_MODEL, json=body)
    assert first[0] == first[1] == second[0] == second[1]


@pytest.mark.parametrize(
    ("fmt", "save"), [("JPEG", {"quality": 90}), ("BMP", {}), ("WEBP", {"lossless": True})]
)
def test_other_formats_decode(
    service: Server, artifacts: dict[str, Path], grey_images: np.ndarray, fmt, save
) -> None:  # type: ignore[no-untyped-def]
    data = encode(grey_images[0], fmt, **save)
    decoded = np.asarray(Image.open(__import__("io").BytesIO(data)).convert("L"))
    results = score(service, GREY_MODEL, files=[("images", (f"x.{fmt.lower()}", data))])
    assert_matches(results, direct_scores(artifacts[GREY_MODEL], decoded[None, None]))


def test_colour_conversion_both_ways(
    service: Server, artifacts: dict[str, Path], rgb_images: np.ndarray, grey_images: np.ndarray
) -> None:
    # RGB photo -> grey model: PIL's ITU-R 601-2 luma, then 32x32 -> 28x28 only with resize=true
    rgb28 = np.stack(
        [np.asarray(Image.fromarray(im).resize((28, 28), Image.Resampling.BILINEAR)) for im in rgb_images]
    )
    luma = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in rgb28])
    results = score(service, GREY_MODEL, json={"images": [{"b64": b64(encode(im))} for im in rgb28]})
    assert_matches(results, direct_scores(artifacts[GREY_MODEL], luma[:, None]))
    array = score(
        service, GREY_MODEL, json={"array": {"b64": b64(rgb28.tobytes()), "shape": list(rgb28.shape)}}
    )
    assert array == results
    # grey image -> RGB model: channel replication
    grey32 = np.stack(
        [np.asarray(Image.fromarray(im).resize((32, 32), Image.Resampling.BILINEAR)) for im in grey_images]
    )
    results = score(service, RGB_MODEL, files=[("images", ("g.png", encode(im))) for im in grey32])
    assert_matches(results, direct_scores(artifacts[RGB_MODEL], np.repeat(grey32[:, None], 3, axis=1)))


def test_resize_on_request_says_so(
    service: Server, artifacts: dict[str, Path], grey_images: np.ndarray
) -> None:
    big = np.asarray(Image.fromarray(grey_images[0]).resize((56, 40)))
    refused = service.client.post(
        f"/v1/models/{GREY_MODEL}/score", files=[("images", ("b.png", encode(big)))]
    )
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "wrong_image_size"
    assert (
        "56×40" in refused.json()["error"]["message"] and "resize=true" in refused.json()["error"]["message"]
    )
    body = {"images": [{"b64": b64(encode(big))}, {"b64": b64(encode(grey_images[1]))}]}
    results = score(service, GREY_MODEL, json=body, params={"resize": "true"})
    assert [r["resized"] for r in results] == [True, False]
    resized = np.asarray(Image.fromarray(big).resize((28, 28), Image.Resampling.BILINEAR))
    assert_matches(
        results, direct_scores(artifacts[GREY_MODEL], np.stack([resized, grey_images[1]])[:, None])
    )
    arrays = score(
        service,
        GREY_MODEL,
        json={"array": {"b64": b64(big.tobytes()), "shape": [1, 40, 56]}},
        params={"resize": True},
    )
    assert arrays[0] == results[0]


def test_multi_model_route(service: Server, artifacts: dict[str, Path], rgb_images: np.ndarray) -> None:
    body = {"images": [{"b64": b64(encode(im))} for im in rgb_images[:3]]}
    response = service.client.post(
        "/v1/score", json=body, params={"models": f"{RGB_MODEL},{GREY_MODEL}", "resize": True}
    )
    assert response.status_code == 200, response.text
    groups = response.json()["models"]
    assert [g["model"] for g in groups] == [RGB_MODEL, GREY_MODEL]
    assert_matches(
        groups[0]["results"], direct_scores(artifacts[RGB_MODEL], rgb_images[:3].transpose(0, 3, 1, 2))
    )
    assert all(r["resized"] for r in groups[1]["results"])
    every = service.client.post("/v1/score", json=body, params={"resize": True}).json()["models"]
    assert sorted(g["model"] for g in every) == [GREY_MODEL, RGB_MODEL]
    unknown = service.client.post("/v1/score", json=body, params={"models": f"{GREY_MODEL},nope"})
    assert unknown.status_code == 404


# ---------------------------------------------------------------- batching and metrics


def test_concurrent_requests_are_batched_with_identical_results(
    service: Server, grey_images: np.ndarray
) -> None:
    bodies = [{"array": {"b64": b64(img.tobytes()), "shape": [1, 28, 28]}} for img in grey_images]
    alone = [score(service, GREY_MODEL, json=body)[0] for body in bodies]

    def histogram() -> tuple[float, float]:
        text = service.client.get("/metrics").text
        values = {}
        for line in text.splitlines():
            if line.startswith("oodflow_batch_images_") and f'model="{GREY_MODEL}"' in line:
                values[line.split(" ")[0]] = float(line.split(" ")[1])
        ones = values[f'oodflow_batch_images_bucket{{le="1.0",model="{GREY_MODEL}",version="1"}}']
        return ones, values[f'oodflow_batch_images_count{{model="{GREY_MODEL}",version="1"}}']

    ones_before, count_before = histogram()
    with ThreadPoolExecutor(len(bodies) * 2) as pool:
        together = list(pool.map(lambda body: score(service, GREY_MODEL, json=body)[0], bodies * 2))
    ones_after, count_after = histogram()
    batches, single = count_after - count_before, ones_after - ones_before
    assert batches < 2 * len(bodies), "16 concurrent requests should share batches"
    assert single < batches, "at least one batch held more than one image"
    assert together == alone * 2  # identical, not merely close: batching never changes a score


def test_metrics_exposition(service: Server, grey_images: np.ndarray) -> None:
    score(service, GREY_MODEL, files=[("images", ("a.png", encode(grey_images[0])))])
    text = service.client.get("/metrics").text
    for needle in (
        'oodflow_http_requests_total{method="POST",route="/v1/models/{name}/score",status="200"}',
        'oodflow_stage_seconds_count{model="",stage="decode",version=""}',
        f'oodflow_stage_seconds_count{{model="{GREY_MODEL}",stage="queue_wait",version="1"}}',
        f'oodflow_stage_seconds_count{{model="{GREY_MODEL}",stage="inference",version="1"}}',
        f'oodflow_queue_images{{model="{GREY_MODEL}",version="1"}}',
        f'oodflow_bits_per_dim_count{{model="{GREY_MODEL}",version="1"}}',
        f'oodflow_verdicts_total{{model="{GREY_MODEL}",verdict=',
        f'oodflow_model_ready{{model="{GREY_MODEL}",version="1"}} 1.0',
        f'oodflow_model_version{{model="{GREY_MODEL}"}} 1.0',
    ):
        assert needle in text, needle


def test_openapi_documents_every_route_and_body(service: Server) -> None:
    schema = service.client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/v1/models/{name}/score",
        "/v1/score",
        "/v1/models",
        "/v1/models/{name}",
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/infer",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
    content = paths["/v1/models/{name}/score"]["post"]["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}
    assert set(content["application/json"]["examples"]) == {"encoded_files", "raw_array"}
    assert {"ImagesBody", "ArrayBody", "InferRequest", "ErrorBody"} <= set(schema["components"]["schemas"])
    json.dumps(schema)
