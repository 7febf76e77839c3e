"""Service settings: environment variables with the `OODFLOW_` prefix, or `oodflow serve` flags.

Lists (`OODFLOW_MODELS`, `OODFLOW_API_KEYS`, `OODFLOW_ADMIN_API_KEYS`) are comma-separated;
`OODFLOW_VERSION_POLICY` is `latest:N`, `specific:V[,V...]` or `all`. Every limit is enforced before
the work it bounds is done: request bytes before parsing, pixels before decoding, queued images
before inference.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from service.core.registry import VersionPolicy

__all__ = ["Settings"]


def _default_decode_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything the service can be told. Each field is also `OODFLOW_<FIELD>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="OODFLOW_", extra="ignore", validate_default=True)

    model_repository: Path = Field(
        default=Path("model-repository"), description="folder of <name>/<version>/ artifacts (DESIGN §3)"
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="models to serve, 'name' or 'name:version'; empty serves the highest version of each",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    runtime: Literal["onnx", "torchscript"] = Field(default="onnx", description="which exported graph runs")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: CUDA when visible, else CPU"
    )
    ort_allow_spinning: bool = Field(
        default=False,
        description="let idle ONNX Runtime threads spin (off: on a small CPU they starve the event loop)",
    )
    intra_op_threads: int = Field(
        default=0, ge=0, description="threads per inference call; 0: runtime default"
    )

    max_batch_images: int = Field(default=64, ge=1, description="largest batch the batcher runs")
    max_wait_ms: float = Field(
        default=1.0, ge=0.0, le=10_000.0, description="longest an image waits for a batch"
    )
    concurrent_batches: int = Field(
        default=1, ge=1, le=64, description="batches of one model run at once, each in its own thread"
    )
    max_queue_images: int = Field(default=4096, ge=1, description="images queued per model before 429")
    decode_workers: int = Field(default_factory=_default_decode_workers, ge=1)

    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="413 above")
    max_images_per_request: int = Field(default=512, ge=1, description="413 above")
    max_image_pixels: int = Field(
        default=4096 * 4096,
        ge=1,
        description="width × height of one decoded image; 413 above (decompression bombs)",
    )

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="accepted API keys; none configured: no authentication"
    )
    api_key_file: Path | None = Field(
        default=None, description="file with one API key per line ('#' comments)"
    )
    admin_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="keys for admin actions (drift reset), separate from the scoring keys; "
        "an admin key is also accepted wherever a scoring key is",
    )
    drift_run_length: float = Field(
        default=10_000.0,
        ge=100.0,
        description="online drift detectors: images to a false alarm without drift, on average",
    )
    drift_window: int = Field(
        default=1000, ge=1, description="images in the drift detectors' windowed OOD rate"
    )
    version_policy: str = Field(
        default="latest:1",
        description="which versions of each model serve: latest:N (the N highest), specific:V[,V...] or all",
    )
    poll_seconds: float = Field(
        default=0.0,
        ge=0.0,
        description="look for new, changed or removed version folders every N seconds and load or "
        "unload by the version policy; 0: only at start and on POST /v2/repository/models/{name}/load",
    )
    protect_health_and_metrics: bool = Field(
        default=False, description="require a key for /healthz, /readyz, /metrics and /v2/health too"
    )

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = Field(default=True, description="one JSON object per log line")
    shutdown_timeout_s: float = Field(
        default=30.0, gt=0.0, description="grace for in-flight requests on SIGTERM"
    )

    @field_validator("models", "api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("version_policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        from service.core.registry import VersionPolicy  # lazily: `oodflow --help` stays light

        return str(VersionPolicy.parse(value))

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_images_per_request > self.max_queue_images:
            raise ValueError(
                f"max_images_per_request ({self.max_images_per_request}) must not exceed "
                f"max_queue_images ({self.max_queue_images}): such a request could never be queued"
            )
        return self

    def resolved_api_keys(self) -> list[bytes]:
        """Every accepted key (settings and key file), as bytes for `hmac.compare_digest`."""
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_key_file is not None:
            for line in Path(self.api_key_file).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return [k.encode() for k in keys if k]

    def parsed_version_policy(self) -> VersionPolicy:
        from service.core.registry import VersionPolicy

        return VersionPolicy.parse(self.version_policy)

    def resolved_admin_api_keys(self) -> list[bytes]:
        """The admin keys, as bytes for `hmac.compare_digest`."""
        return [k.get_secret_value().encode() for k in self.admin_api_keys if k.get_secret_value()]
