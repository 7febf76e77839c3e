"""Request and response bodies (pydantic), with examples for the OpenAPI document."""

from __future__ import annotations

import base64
import io
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from models.scores import OOD_STATISTICS, CombinationRule

__all__ = [
    "EXAMPLE_ARRAY_B64",
    "EXAMPLE_PNG_B64",
    "ArrayBody",
    "ArrayPayload",
    "CombinedResult",
    "CombinedVerdict",
    "EnsembleMemberRef",
    "EnsembleSummary",
    "ErrorBody",
    "ErrorDetail",
    "EncodedImage",
    "Health",
    "ImagesBody",
    "InferInput",
    "InferOutput",
    "InferRequest",
    "InferRequestedOutput",
    "InferResponse",
    "ModelList",
    "ModelScores",
    "MultiModelScores",
    "Readiness",
    "ScoreResult",
    "V2ModelMetadata",
    "V2ServerMetadata",
    "V2TensorMetadata",
]


def _example_png() -> str:
    """A 28×28 grey gradient as a base64 PNG (what a Fashion-MNIST model takes)."""
    pixels = (np.add.outer(np.arange(28), np.arange(28)) * 4).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


EXAMPLE_PNG_B64 = _example_png()
EXAMPLE_ARRAY_B64 = base64.b64encode((np.arange(28 * 28) % 256).astype(np.uint8).tobytes()).decode()


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EncodedImage(_Body):
    b64: str = Field(description="a base64-encoded image file (PNG, JPEG, BMP, WebP, GIF, TIFF, PPM, TGA)")


class ImagesBody(_Body):
    """Encoded image files, base64 in JSON."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"images": [{"b64": EXAMPLE_PNG_B64}]}]}
    )
    images: list[EncodedImage] = Field(description="scored in this order")


class ArrayPayload(_Body):
    b64: str = Field(description="base64 of the raw uint8 pixels, C-order, length N·H·W·C")
    shape: list[int] = Field(description="[N, H, W] (grey) or [N, H, W, C] with C 1, 3 or 4 (alpha dropped)")


class ArrayBody(_Body):
    """Raw uint8 pixels, base64 in JSON: the cheapest body to parse."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"array": {"b64": EXAMPLE_ARRAY_B64, "shape": [1, 28, 28]}}]},
    )
    array: ArrayPayload


class ScoreResult(BaseModel):
    log_likelihood: float = Field(
        description="log P(image) in nats (embedding models: of the feature vector)"
    )
    bits_per_dim: float = Field(description="-log_likelihood / (D ln 2)")
    ood_score: float = Field(
        description="higher = more out-of-distribution; statistic in the model's manifest"
    )
    threshold: float = Field(description="calibrated on in-distribution data at the model's target FPR")
    p_value: float = Field(
        description="fraction of in-distribution validation scores at least as large (+1 smoothing)"
    )
    is_ood: bool = Field(description="ood_score > threshold")
    resized: bool = Field(False, description="true when the service resized this image (resize=true)")


class ModelScores(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "fmnist-pixel",
                    "version": 1,
                    "kind": "pixel",
                    "statistic": "nll",
                    "results": [
                        {
                            "log_likelihood": -1742.3,
                            "bits_per_dim": 3.206,
                            "ood_score": 3.206,
                            "threshold": 3.871,
                            "p_value": 0.412,
                            "is_ood": False,
                            "resized": False,
                        }
                    ],
                }
            ]
        }
    )
    model: str
    version: int
    kind: Literal["pixel", "embedding"]
    statistic: str = Field(description=f"the manifest's OOD statistic ({', '.join(OOD_STATISTICS)})")
    results: list[ScoreResult] = Field(description="one per input image, in input order")


class EnsembleMemberRef(BaseModel):
    name: str
    version: int


class CombinedResult(BaseModel):
    combined_score: float = Field(
        description="the members' p-values combined by the ensemble's rule (higher = more OOD)"
    )
    p_value: float = Field(
        description="fraction of the ensemble's in-distribution reference scores at least as large "
        "(+1 smoothing)"
    )
    is_ood: bool = Field(description="combined_score > threshold")


class CombinedVerdict(BaseModel):
    """One verdict over several models: the first valid ensemble (by name) whose members were all scored."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "ensemble": "fmnist",
                    "rule": "fisher",
                    "members": [
                        {"name": "fmnist-pixel", "version": 1},
                        {"name": "fmnist-embedding", "version": 1},
                    ],
                    "weights": [0.5, 1.0],
                    "threshold": 9.21,
                    "target_fpr": 0.05,
                    "results": [{"combined_score": 2.31, "p_value": 0.48, "is_ood": False}],
                }
            ]
        }
    )
    ensemble: str
    rule: CombinationRule = Field(
        description="fisher: -2 Σ w_k ln p_k; min_p: -ln min(1, K·min p_k), over the members' p_values"
    )
    members: list[EnsembleMemberRef] = Field(description="in the order their p-values are combined")
    weights: list[float] = Field(
        default_factory=list, description="the members' weights w_k in member order (1 each: equal)"
    )
    threshold: float = Field(description="calibrated on in-distribution data at target_fpr")
    target_fpr: float
    results: list[CombinedResult] = Field(description="one per input image, in input order")


class MultiModelScores(BaseModel):
    models: list[ModelScores] = Field(description="results grouped per model")
    combined: CombinedVerdict | None = Field(
        None, description="the combined verdict, or null when no valid ensemble's members were all scored"
    )


class EnsembleSummary(BaseModel):
    name: str
    status: Literal["loading", "valid", "stale", "failed"] = Field(
        description="valid: every member serves at the listed version; stale: not (never used); "
        "failed: unreadable manifest"
    )
    reason: str | None = None
    rule: CombinationRule | None = None
    members: list[EnsembleMemberRef] = Field(default_factory=list)
    weights: list[float] | None = Field(
        None, description="fisher member weights w_k in member order (1 each: equal); null when unreadable"
    )
    threshold: float | None = None
    target_fpr: float | None = None
    description: str = ""


class ModelList(BaseModel):
    models: list[dict[str, Any]] = Field(
        description="per model: name, version, status (loading|ready|failed), reason, manifest summary, "
        "calibration and metrics"
    )
    ensembles: list[EnsembleSummary] = Field(
        default_factory=list, description="ensembles under <repository>/_ensembles, by name"
    )


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_image"])
    message: str = Field(examples=["images[0]: not a decodable image"])


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str = Field(examples=["alive"])


class Readiness(BaseModel):
    ready: bool
    models: dict[str, str] = Field(description="status per model: loading, ready or failed (with reason)")


# ---------------------------------------------------------------- KServe v2 / Open Inference Protocol


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferRequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "request-1",
                    "inputs": [
                        {"name": "images", "shape": [1, 2, 2], "datatype": "UINT8", "data": [0, 64, 128, 255]}
                    ],
                    "outputs": [{"name": "ood_score"}, {"name": "is_ood"}],
                }
            ]
        }
    )
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="`resize` (bool): resize images to the model's size; `binary_data_output` (bool)"
    )
    inputs: list[InferInput]
    outputs: list[InferRequestedOutput] | None = None


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[InferOutput]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]
    parameters: dict[str, Any] | None = None


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]
