"""KServe v2 / Open Inference Protocol over real HTTP, by hand and with the real `tritonclient.http`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.service.helpers import GREY_MODEL, RGB_MODEL, Server, b64, encode
from tests.service.test_api import direct_scores

OUTPUTS = ["log_likelihood", "bits_per_dim", "ood_score", "p_value", "is_ood"]


def check_outputs(outputs: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    for name in ("log_likelihood", "bits_per_dim", "ood_score", "p_value"):
        assert outputs[name].dtype == np.float32, name
        np.testing.assert_allclose(outputs[name], expected[name].astype(np.float32), rtol=1e-6, err_msg=name)
    assert outputs["is_ood"].dtype == np.bool_
    assert outputs["is_ood"].tolist() == expected["is_ood"].tolist()


@pytest.fixture(scope="module")
def client(service: Server):  # type: ignore[no-untyped-def]
    with triton.InferenceServerClient(service.url.removeprefix("http://")) as c:
        yield c


def test_server_and_model_metadata(service: Server) -> None:
    meta = service.client.get("/v2").json()
    assert meta["name"] == "oodflow" and "binary_tensor_data" in meta["extensions"]
    assert service.client.get("/v2/health/live").json() == {"live": True}
    assert service.client.get("/v2/health/ready").status_code == 200
    model = service.client.get(f"/v2/models/{RGB_MODEL}").json()
    assert (
        model["name"] == RGB_MODEL and model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    )
    assert model["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    assert [o["name"] for o in model["outputs"]] == OUTPUTS
    assert service.client.get(f"/v2/models/{GREY_MODEL}").json()["inputs"][0]["shape"] == [-1, 28, 28]
    assert service.client.get(f"/v2/models/{GREY_MODEL}/ready").status_code == 200
    assert service.client.get(f"/v2/models/{GREY_MODEL}/versions/1/ready").status_code == 200
    assert service.client.get(f"/v2/models/{GREY_MODEL}/versions/7/ready").status_code == 404
    assert service.client.get("/v2/models/nope").status_code == 404


def test_json_uint8_and_bytes(service: Server, artifacts: dict[str, Path], grey_images: np.ndarray) -> None:
    expected = direct_scores(artifacts[GREY_MODEL], grey_images[:3, None])
    nested = {"name": "images", "shape": [3, 28, 28], "datatype": "UINT8", "data": grey_images[:3].tolist()}
    response = service.client.post(f"/v2/models/{GREY_MODEL}/infer", json={"id": "r1", "inputs": [nested]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == GREY_MODEL and body["model_version"] == "1" and body["id"] == "r1"
    outputs = {
        o["name"]: np.asarray(o["data"], dtype=np.bool_ if o["datatype"] == "BOOL" else np.float32)
        for o in body["outputs"]
    }
    assert [o["shape"] for o in body["outputs"]] == [[3]] * 5
    check_outputs(outputs, expected)
    encoded = {
        "name": "images",
        "shape": [3],
        "datatype": "BYTES",
        "data": [b64(encode(img)) for img in grey_images[:3]],
    }
    request = {"inputs": [encoded], "outputs": [{"name": "ood_score"}, {"name": "is_ood"}]}
    body = service.client.post(f"/v2/models/{GREY_MODEL}/versions/1/infer", json=request).json()
    assert [o["name"] for o in body["outputs"]] == ["ood_score", "is_ood"]
    np.testing.assert_allclose(body["outputs"][0]["data"], expected["ood_score"], rtol=1e-6)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_uint8(client, artifacts: dict[str, Path], rgb_images: np.ndarray, binary: bool) -> None:  # type: ignore[no-untyped-def]
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(RGB_MODEL)
    assert client.get_model_metadata(RGB_MODEL)["name"] == RGB_MODEL
    images = triton.InferInput("images", list(rgb_images.shape), "UINT8")
    images.set_data_from_numpy(rgb_images, binary_data=binary)
    requested = [triton.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]
    result = client.infer(RGB_MODEL, inputs=[images], outputs=requested, request_id="t1")
    outputs = {name: result.as_numpy(name) for name in OUTPUTS}
    check_outputs(outputs, direct_scores(artifacts[RGB_MODEL], rgb_images.transpose(0, 3, 1, 2)))
    assert result.get_response()["id"] == "t1"


def test_tritonclient_bytes_default_outputs(
    client, artifacts: dict[str, Path], grey_images: np.ndarray
) -> None:  # type: ignore[no-untyped-def]
    files = np.array([encode(img) for img in grey_images[:4]], dtype=np.object_)
    images = triton.InferInput("images", [4], "BYTES")
    images.set_data_from_numpy(files, binary_data=True)
    result = client.infer(GREY_MODEL, inputs=[images])  # no outputs named: all of them, binary by default
    outputs = {name: result.as_numpy(name) for name in OUTPUTS}
    check_outputs(outputs, direct_scores(artifacts[GREY_MODEL], grey_images[:4, None]))


def test_tritonclient_errors(client, grey_images: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    images = triton.InferInput("images", [1, 20, 20], "UINT8")
    images.set_data_from_numpy(np.zeros((1, 20, 20), np.uint8))
    with pytest.raises(InferenceServerException, match="takes 28×28"):
        client.infer(GREY_MODEL, inputs=[images])
    with pytest.raises(InferenceServerException, match="no model named"):
        client.infer("nope", inputs=[images])
    assert not client.is_model_ready("nope")
    # resize as a request parameter
    result = client.infer(GREY_MODEL, inputs=[images], parameters={"resize": True})
    assert result.get_response()["parameters"] == {"resized": [True]}


@pytest.mark.parametrize(
    ("request_body", "status"),
    [
        ({"inputs": [{"name": "pixels", "shape": [1], "datatype": "UINT8", "data": [0]}]}, 400),
        (
            {"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]},
            422,
        ),
        (
            {"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "data": [300] * 784}]},
            400,
        ),
        ({"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 5}]}, 400),
        ({"inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8"}]}, 400),
        ({"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES", "data": ["AAAA"]}]}, 400),
        ({"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["AAAA"]}]}, 400),
        ({"inputs": []}, 400),
        ({"inputs": "x"}, 422),
        (
            {
                "inputs": [{"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}],
                "outputs": [{"name": "logits"}],
            },
            400,
        ),
    ],
    ids=[
        "wrong-input",
        "wrong-datatype",
        "out-of-range",
        "short-data",
        "no-data",
        "bytes-count",
        "bytes-garbage",
        "no-inputs",
        "bad-schema",
        "unknown-output",
    ],
)
def test_v2_bad_requests(service: Server, request_body: dict, status: int) -> None:
    response = service.client.post(f"/v2/models/{GREY_MODEL}/infer", json=request_body)
    assert response.status_code == status, response.text
    body = response.json()  # the Open Inference Protocol's error shape: "error" is a string
    assert isinstance(body["error"], str) and isinstance(body["code"], str)


def test_v2_binary_header_length_checked(service: Server) -> None:
    response = service.client.post(
        f"/v2/models/{GREY_MODEL}/infer", content=b"{}", headers={"Inference-Header-Content-Length": "99"}
    )
    assert response.status_code == 400


def test_binary_outputs_requested_by_request_parameter(service: Server, grey_images: np.ndarray) -> None:
    request = {
        "parameters": {"binary_data_output": True},
        "inputs": [
            {"name": "images", "shape": [2, 28, 28], "datatype": "UINT8", "data": grey_images[:2].tolist()}
        ],
        "outputs": [{"name": "ood_score"}, {"name": "is_ood", "parameters": {"binary_data": False}}],
    }
    response = service.client.post(f"/v2/models/{GREY_MODEL}/infer", json=request)
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:length])
    score, flag = header["outputs"]
    assert score["parameters"] == {"binary_data_size": 8} and "data" not in score
    assert len(flag["data"]) == 2
    values = np.frombuffer(response.content[length:], dtype=np.float32)
    scores = service.client.post(
        f"/v1/models/{GREY_MODEL}/score",
        json={"array": {"b64": b64(grey_images[:2].tobytes()), "shape": [2, 28, 28]}},
    ).json()["results"]
    np.testing.assert_allclose(values, [r["ood_score"] for r in scores], rtol=1e-6)
