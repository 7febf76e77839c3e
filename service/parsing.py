"""Request bodies -> payloads (encoded files or one raw array), with every size limit enforced early.

v1 bodies (DESIGN §6): `multipart/form-data` with `images` files; JSON `{"images": [{"b64": ...}]}`;
JSON `{"array": {"b64": ..., "shape": [N, H, W] | [N, H, W, C]}}`.
v2 bodies: the Open Inference Protocol's JSON, optionally followed by binary tensor data
(`Inference-Header-Content-Length`), with input `images` as UINT8 `[N, H, W(, C)]` or BYTES `[N]`.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from service.errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from service.schemas import ArrayBody, ImagesBody, InferRequest
from service.settings import Settings

__all__ = [
    "EncodedFiles",
    "Payload",
    "RawArray",
    "parse_infer_body",
    "parse_score_body",
    "read_body",
]


@dataclass(frozen=True)
class EncodedFiles:
    files: tuple[bytes, ...]

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class RawArray:
    array: np.ndarray  # (N, H, W, C) uint8, C 1 or 3

    def __len__(self) -> int:
        return int(self.array.shape[0])


Payload = EncodedFiles | RawArray


async def read_body(request: Request, settings: Settings) -> bytes:
    """The whole body, refusing (413) more than `max_request_bytes` before reading it if declared."""
    limit = settings.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds max_request_bytes={limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"request body exceeds max_request_bytes={limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_count(n: int, settings: Settings) -> None:
    if n == 0:
        raise BadRequest("the request holds no images", code="empty_request")
    if n > settings.max_images_per_request:
        raise PayloadTooLarge(
            f"{n} images in one request exceeds max_images_per_request={settings.max_images_per_request}"
        )


def decode_b64(text: str, what: str) -> bytes:
    """Standard base64 (a `data:...;base64,` prefix and line breaks are tolerated)."""
    if text.startswith("data:") and "," in text[:200]:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64", code="invalid_base64") from None


def array_from_bytes(data: bytes, shape: list[int], settings: Settings, what: str = "array") -> RawArray:
    """Raw uint8 pixels `[N, H, W]` or `[N, H, W, C]` (C 1, 3 or 4; alpha dropped) -> RawArray."""
    if len(shape) not in (3, 4):
        raise Unprocessable(f"{what} shape must be [N, H, W] or [N, H, W, C], got {shape}")
    if shape[0] == 0:
        _check_count(0, settings)
    if any(d < 1 for d in shape):
        raise Unprocessable(f"{what} shape must hold positive sizes, got {shape}")
    n, height, width = shape[:3]
    channels = shape[3] if len(shape) == 4 else 1
    if channels not in (1, 3, 4):
        raise Unprocessable(f"{what} channels must be 1, 3 or 4, got {channels}")
    _check_count(n, settings)
    if height * width > settings.max_image_pixels:
        raise PayloadTooLarge(
            f"{what} images of {width}×{height} = {width * height} pixels exceed "
            f"max_image_pixels={settings.max_image_pixels}"
        )
    needed = math.prod(shape)
    if len(data) != needed:
        raise BadRequest(f"{what} holds {len(data)} bytes but shape {shape} needs {needed}", code="bad_array")
    array = np.frombuffer(data, dtype=np.uint8).reshape(n, height, width, channels)
    if channels == 4:
        array = array[..., :3]
    return RawArray(array)


def _validate(model: type[BaseModel], obj: Any, what: str) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ())) or what
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        raise Unprocessable("; ".join(parts), code="invalid_request") from None


def _load_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON ({exc})", code="invalid_json") from None


async def _single(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


async def _parse_multipart(request: Request, body: bytes, settings: Settings) -> EncodedFiles:
    parser = MultiPartParser(
        Headers(raw=request.headers.raw),
        _single(body),
        max_files=settings.max_images_per_request + 1,
        max_fields=64,
        max_part_size=1024 * 1024,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise PayloadTooLarge(
                f"more than max_images_per_request={settings.max_images_per_request} files"
            ) from None
        raise BadRequest(f"malformed multipart body: {exc.message}", code="bad_multipart") from None
    except Exception as exc:  # noqa: BLE001 - e.g. a Content-Type without a boundary
        raise BadRequest(
            f"malformed multipart body ({type(exc).__name__}: {exc})", code="bad_multipart"
        ) from None
    try:
        files: list[bytes] = []
        for key, value in form.multi_items():
            if key != "images":
                continue
            if not isinstance(value, UploadFile):
                raise BadRequest(
                    "multipart field 'images' must be a file, not a text value", code="bad_multipart"
                )
            files.append(await value.read())
    finally:
        await form.close()
    if not files:
        raise BadRequest("the multipart body has no 'images' file", code="empty_request")
    _check_count(len(files), settings)
    return EncodedFiles(tuple(files))


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("", "application/json", "text/json") or media.endswith("+json")


async def parse_score_body(request: Request, settings: Settings) -> Payload:
    """A v1 score request's body -> payload. 400/413/415/422 on anything malformed."""
    content_type = request.headers.get("content-type", "")
    body = await read_body(request, settings)
    if content_type.lower().startswith("multipart/form-data"):
        return await _parse_multipart(request, body, settings)
    if not _is_json(content_type):
        raise UnsupportedMediaType(
            f"content type '{content_type}' not supported: send multipart/form-data or application/json"
        )
    if not body:
        raise BadRequest("empty body: send images", code="empty_request")
    obj = _load_json(body)
    if not isinstance(obj, dict) or not ({"images", "array"} & obj.keys()):
        raise Unprocessable(
            'JSON body must be {"images": [{"b64": ...}]} or {"array": {"b64": ..., "shape": ...}}',
            code="invalid_request",
        )
    if "array" in obj:
        parsed = _validate(ArrayBody, obj, "array")
        raw = decode_b64(parsed.array.b64, "array.b64")
        return array_from_bytes(raw, parsed.array.shape, settings)
    images = _validate(ImagesBody, obj, "images").images
    _check_count(len(images), settings)
    return EncodedFiles(tuple(decode_b64(im.b64, f"images[{i}].b64") for i, im in enumerate(images)))


# ---------------------------------------------------------------- KServe v2


def _split_bytes_tensor(data: bytes, count: int, what: str) -> list[bytes]:
    """Triton's BYTES serialisation: per element a 4-byte little-endian length, then the bytes."""
    items: list[bytes] = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise BadRequest(f"{what}: truncated BYTES element header", code="bad_tensor")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise BadRequest(f"{what}: BYTES element {len(items)} runs past the data", code="bad_tensor")
        items.append(data[offset : offset + length])
        offset += length
    if len(items) != count:
        raise BadRequest(
            f"{what}: shape says {count} elements but the data holds {len(items)}", code="bad_tensor"
        )
    return items


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def parse_infer_body(body: bytes, headers: Headers, settings: Settings) -> tuple[InferRequest, Payload]:
    """A v2 infer request (JSON, or JSON + binary tensor data) -> (request header, payload)."""
    header_length = headers.get("inference-header-content-length")
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length {header_length!r} does not fit a {len(body)}-byte body",
                code="bad_request",
            )
        body, binary = body[: int(header_length)], body[int(header_length) :]
    if not body:
        raise BadRequest("empty body: send an inference request", code="empty_request")
    request = _validate(InferRequest, _load_json(body), "request")
    if len(request.inputs) != 1 or request.inputs[0].name != "images":
        names = [i.name for i in request.inputs]
        raise BadRequest(f"expected exactly one input named 'images', got {names}", code="bad_tensor")
    tensor = request.inputs[0]
    shape = tensor.shape
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise Unprocessable(f"input 'images' shape must be non-negative sizes, got {shape}")
    size = (tensor.parameters or {}).get("binary_data_size")
    raw: bytes | None = None
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise BadRequest(
                f"input 'images' binary_data_size {size!r} does not fit {len(binary)} bytes of binary data",
                code="bad_tensor",
            )
        raw = binary[:size]
    elif tensor.data is None:
        raise BadRequest("input 'images' has neither data nor binary_data_size", code="bad_tensor")
    datatype = tensor.datatype.upper()
    if datatype == "UINT8":
        if raw is None:
            values = _flatten(tensor.data or [])
            if not all(type(v) is int and 0 <= v <= 255 for v in values):
                raise BadRequest("UINT8 input 'images' must hold integers 0..255", code="bad_tensor")
            raw = bytes(values)
        return request, array_from_bytes(raw, shape, settings, what="input 'images'")
    if datatype == "BYTES":
        count = math.prod(shape) if shape else 0
        _check_count(count, settings)
        if raw is not None:
            files = _split_bytes_tensor(raw, count, "input 'images'")
        else:
            values = _flatten(tensor.data or [])
            if len(values) != count or not all(isinstance(v, str) for v in values):
                raise BadRequest(
                    f"BYTES input 'images' must hold {count} base64 strings (shape {shape})",
                    code="bad_tensor",
                )
            files = [decode_b64(v, f"images[{i}]") for i, v in enumerate(values)]
        return request, EncodedFiles(tuple(files))
    raise Unprocessable(f"input 'images' datatype must be UINT8 or BYTES, got {tensor.datatype}")
