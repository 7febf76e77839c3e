"""Every error status of DESIGN §6, each reached by a real bad request over HTTP."""

from __future__ import annotations

import numpy as np
import pytest

from tests.service.helpers import GREY_MODEL, Server, b64, encode

URL = f"/v1/models/{GREY_MODEL}/score"


def error(response, status: int, code: str | None = None) -> str:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"error"} and set(body["error"]) == {"code", "message"}
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]["message"]


def test_garbage_bytes_are_400_naming_the_file(service: Server, grey_images: np.ndarray) -> None:
    files = [
        ("images", ("ok.png", encode(grey_images[0]))),
        ("images", ("junk.png", b"\x89PNG not really" * 20)),
    ]
    message = error(service.client.post(URL, files=files), 400, "invalid_image")
    assert message.startswith("images[1]:")
    message = error(
        service.client.post(URL, json={"images": [{"b64": b64(b"hello world")}]}), 400, "invalid_image"
    )
    assert "images[0]" in message


def test_truncated_png_is_400(service: Server, grey_images: np.ndarray) -> None:
    data = encode(grey_images[0])
    message = error(service.client.post(URL, files=[("images", ("t.png", data[: len(data) // 2]))]), 400)
    assert "images[0]" in message


def test_wrong_size_is_422(service: Server) -> None:
    message = error(
        service.client.post(URL, files=[("images", ("s.png", encode(np.zeros((20, 30), np.uint8))))]),
        422,
        "wrong_image_size",
    )
    assert "30×20" in message
    array = {"array": {"b64": b64(bytes(2 * 20 * 30)), "shape": [2, 20, 30]}}
    error(service.client.post(URL, json=array), 422, "wrong_image_size")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"json": {"images": []}},
        {"content": b"", "headers": {"content-type": "application/json"}},
        {"files": [("other", ("x.png", b"abc"))]},
        {"json": {"array": {"b64": "", "shape": [0, 28, 28]}}},
    ],
    ids=["json-empty-list", "empty-body", "multipart-without-images", "zero-images-array"],
)
def test_empty_request_is_400(service: Server, kwargs) -> None:  # type: ignore[no-untyped-def]
    error(service.client.post(URL, **kwargs), 400, "empty_request")


def test_too_many_images_is_413_naming_the_limit(service: Server, grey_images: np.ndarray) -> None:
    limit = service.state.settings.max_images_per_request
    one = b64(encode(grey_images[0]))
    message = error(service.client.post(URL, json={"images": [{"b64": one}] * (limit + 1)}), 413)
    assert "max_images_per_request" in message
    files = [("images", (f"{i}.png", encode(grey_images[0]))) for i in range(limit + 5)]
    assert "max_images_per_request" in error(service.client.post(URL, files=files), 413)
    array = {"array": {"b64": b64(bytes((limit + 1) * 784)), "shape": [limit + 1, 28, 28]}}
    assert "max_images_per_request" in error(service.client.post(URL, json=array), 413)


def test_request_too_large_is_413(service: Server) -> None:
    limit = service.state.settings.max_request_bytes
    message = error(
        service.client.post(URL, content=b"x" * (limit + 1), headers={"content-type": "application/json"}),
        413,
    )
    assert "max_request_bytes" in message


def test_decompression_bomb_is_413(service: Server) -> None:
    # 3000×3000 = 9 Mpx of zeros: a ~9 KB PNG that would decode to 9 MB; the limit is 1 Mpx.
    bomb = encode(np.zeros((3000, 3000), np.uint8), optimize=True)
    assert len(bomb) < 64 * 1024
    message = error(
        service.client.post(URL, files=[("images", ("bomb.png", bomb))], params={"resize": True}), 413
    )
    assert "max_image_pixels" in message and "images[0]" in message
    array = {"array": {"b64": b64(b"\0"), "shape": [1, 3000, 3000]}}
    assert "max_image_pixels" in error(service.client.post(URL, json=array), 413)


def test_unknown_model_is_404(service: Server, grey_images: np.ndarray) -> None:
    body = {"images": [{"b64": b64(encode(grey_images[0]))}]}
    message = error(service.client.post("/v1/models/nope/score", json=body), 404, "model_not_found")
    assert "nope" in message and GREY_MODEL in message
    error(service.client.get("/no/such/route"), 404, "not_found")


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
        ({"json": {"images": [{"b64": "@@@ not base64 @@@"}]}}, 400, "invalid_base64"),
        ({"json": {"array": {"b64": b64(b"\0" * 10), "shape": [1, 28, 28]}}}, 400, "bad_array"),
        ({"json": {"array": {"b64": b64(b"\0" * 10), "shape": [1, 28]}}}, 422, None),
        ({"json": {"array": {"b64": b64(b"\0" * 10), "shape": [1, 28, 28, 2]}}}, 422, None),
        ({"json": {"images": "not a list"}}, 422, "invalid_request"),
        ({"json": [1, 2, 3]}, 422, "invalid_request"),
        ({"json": {"images": [{"b64": "AAAA", "extra": 1}]}}, 422, "invalid_request"),
        ({"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, 400, "bad_multipart"),
        ({"files": [("images", ("a.png", b"x"))], "params": {"resize": "maybe"}}, 422, "invalid_request"),
    ],
    ids=[
        "invalid-json",
        "invalid-base64",
        "array-bytes-mismatch",
        "array-bad-rank",
        "array-bad-channels",
        "images-not-list",
        "json-not-object",
        "extra-field",
        "wrong-content-type",
        "multipart-without-boundary",
        "bad-query",
    ],
)
def test_malformed_requests(service: Server, kwargs, status: int, code: str | None) -> None:  # type: ignore[no-untyped-def]
    error(service.client.post(URL, **kwargs), status, code)


def test_method_not_allowed_is_json(service: Server) -> None:
    error(service.client.get(URL), 405, "method_not_allowed")
