"""The artifact format: the only thing that travels from training to serving (DESIGN.md §3).

    <repository>/<model-name>/<version>/
      manifest.json            this schema (pydantic), schema_version 1
      model.onnx               uint8 images [N, C, H, W] -> log_likelihood [N], bits_per_dim [N]
      model.torchscript.pt     the same graph as TorchScript
      weights.safetensors      for retraining / analysis only
      report/                  metrics.json, report.md, PNG figures

Every file but the manifest is listed in `files` with its sha256; `verify_artifact` refuses a
mismatch. Nothing here is pickled.

Ensembles (the combined verdict over several models) are one JSON file each:

    <repository>/_ensembles/<ensemble-name>.json      `EnsembleManifest`, schema_version 1

The leading underscore keeps the folder out of the model namespace (model names start with a
letter or digit).
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.scores import OodStatistic, combination_weights

__all__ = [
    "BACKGROUND_OUTPUT",
    "ENSEMBLES_DIR",
    "GRAPH_FILES",
    "GRAPH_INPUT",
    "GRAPH_OUTPUTS",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "ArtifactError",
    "BackgroundSpec",
    "Calibration",
    "ComplexitySpec",
    "DataSpec",
    "EnsembleManifest",
    "EnsembleMember",
    "EnsembleMetrics",
    "EnsembleWeightSelection",
    "SelectionImages",
    "FileEntry",
    "InputSpec",
    "Manifest",
    "OodMetrics",
    "ScoreSpec",
    "StatisticSelection",
    "artifact_files",
    "ensemble_path",
    "find_ensembles",
    "find_versions",
    "latest_version",
    "load_ensemble",
    "load_manifest",
    "sha256_file",
    "verify_artifact",
    "write_ensemble",
    "write_manifest",
    "DIR_MODE",
    "FILE_MODE",
    "mkdir_readable",
    "set_readable_modes",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ENSEMBLES_DIR = "_ensembles"

# The exported graph's I/O (DESIGN §3), named once for the exporter, the service and batch scoring.
GRAPH_INPUT = "images"  # uint8 [N, C, H, W]
GRAPH_OUTPUTS: tuple[str, str] = ("log_likelihood", "bits_per_dim")  # float32 [N] each, in this order
BACKGROUND_OUTPUT = "background_log_likelihood"  # third output of likelihood-ratio graphs (nats)
GRAPH_FILES: dict[str, str] = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class ArtifactError(RuntimeError):
    """An artifact that is missing, malformed or tampered with; the message says which file."""


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Schema):
    channels: int = Field(ge=1)
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    dtype: Literal["uint8"] = "uint8"
    layout: Literal["NCHW"] = "NCHW"
    colour: Literal["L", "RGB"] = Field(description="PIL mode the image is converted to before scoring")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


class ComplexitySpec(_Schema):
    """L(x) of the input-complexity score: `models.scores.png_bits_per_dim` of the uint8 image the
    graph receives (after colour conversion and resize), PNG at `compress_level`."""

    compressor: Literal["png"] = "png"
    compress_level: int = Field(9, ge=0, le=9)
    units: Literal["bits/dim"] = "bits/dim"
    canary: dict[str, Any] | None = Field(
        None,
        description="models.scores.complexity_canary() at calibration: PNG lengths of fixed images and the "
        "Pillow/zlib versions; a server whose encoder gives other lengths refuses the model",
    )


class BackgroundSpec(_Schema):
    """The background flow of the likelihood-ratio score (Ren et al. 2019): a second flow inside
    the same exported graph, whose log-likelihood is the extra output `output`."""

    output: str = Field(BACKGROUND_OUTPUT, pattern=f"^{BACKGROUND_OUTPUT}$")
    perturbation_rate: float = Field(gt=0.0, lt=1.0, description="μ: fraction of pixels replaced by noise")
    architecture: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)


class StatisticSelection(_Schema):
    """How `score.statistic` was chosen (`training.selection`), so a reader can check that no
    reported evaluation set took part.

    `by`: `selection` (the fixed rule over validation data and OOD proxies), `user`
    (`oodflow calibrate --statistic`) or `run config` (a statistic named in the config)."""

    chosen: OodStatistic
    by: Literal["selection", "user", "run config"]
    rule: str
    candidates: list[OodStatistic] = Field(default_factory=list)
    proxies: list[dict[str, Any]] = Field(
        default_factory=list, description="name, family, description, size of each OOD proxy"
    )
    auroc: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="candidate -> proxy -> AUROC (OOD positive) against validation"
    )
    worst_case_auroc: dict[str, float] = Field(default_factory=dict)
    mean_auroc: dict[str, float] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict, description="what the choice used and what it did not")


class ScoreSpec(_Schema):
    """How `ood_score` is computed from the graph outputs (higher = more OOD).

    - nll: `bits_per_dim`
    - typicality: `|bits_per_dim − reference_bits_per_dim|`
    - complexity: `bits_per_dim − png_bits_per_dim(image)` (see `complexity`)
    - likelihood_ratio: `bits_per_dim − bits_per_dim(background_log_likelihood)` (see `background`)
    """

    statistic: OodStatistic
    direction: Literal["higher_is_ood"] = "higher_is_ood"
    units: Literal["bits/dim"] = "bits/dim"
    reference_bits_per_dim: float | None = Field(
        None, description="mean in-distribution bits/dim (typicality centre)"
    )
    description: str
    complexity: ComplexitySpec | None = Field(None, description="statistic 'complexity' only")
    background: BackgroundSpec | None = Field(None, description="statistic 'likelihood_ratio' only")
    selection: StatisticSelection | None = Field(None, description="how the statistic was chosen")


class Calibration(_Schema):
    target_fpr: float = Field(gt=0.0, lt=1.0)
    threshold: float
    validation_set: str
    validation_size: int = Field(ge=1)
    validation_fpr: float = Field(description="fraction of the validation set above the threshold")
    reference_scores: list[float] = Field(
        description="sorted in-distribution validation ood_scores, for p-values (+1 smoothing)"
    )

    @field_validator("reference_scores")
    @classmethod
    def _sorted(cls, v: list[float]) -> list[float]:
        if any(b < a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError("reference_scores must be sorted ascending")
        return v


class OodMetrics(_Schema):
    """OpenOOD convention: OOD is the positive class for AUROC, AUPR-Out and FPR@95%TPR."""

    dataset: str
    size: int
    auroc: float
    aupr_in: float
    aupr_out: float
    fpr_at_95_tpr: float
    mean_bits_per_dim: float
    flagged_fraction: float


class DataSpec(_Schema):
    in_distribution: str
    fingerprint: str
    train_size: int
    calibration_size: int
    test_set: str | None = None


class FileEntry(_Schema):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Manifest(_Schema):
    schema_version: Literal[1] = 1
    name: str
    version: int = Field(ge=1)
    kind: Literal["pixel", "embedding"]
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    description: str = ""
    input: InputSpec
    num_dims: int = Field(ge=1, description="D in bits_per_dim = −log_likelihood / (D ln 2)")
    bits_per_dim_unit: Literal["pixel", "feature"] = Field(
        description="pixel: per image dimension; feature: per post-processed feature dimension"
    )
    log_likelihood_definition: str
    architecture: dict[str, Any]
    training: dict[str, Any] = Field(default_factory=dict)
    parameters: int = Field(ge=0)
    data: DataSpec
    score: ScoreSpec
    calibration: Calibration
    in_distribution_test: dict[str, float] = Field(default_factory=dict)
    metrics: list[OodMetrics] = Field(default_factory=list)
    baselines: dict[str, Any] = Field(default_factory=dict)
    export: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, FileEntry] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("name must be lowercase letters, digits, '.', '_' or '-' (max 63)")
        return v


class EnsembleMember(_Schema):
    name: str
    version: int = Field(ge=1)
    kind: Literal["pixel", "embedding"]
    statistic: OodStatistic


class EnsembleMetrics(_Schema):
    """Per OOD set: the combined verdict's metrics (OpenOOD convention) and each member's AUROC."""

    dataset: str
    size: int
    auroc: float
    aupr_in: float
    aupr_out: float
    fpr_at_95_tpr: float
    flagged_fraction: float
    member_auroc: dict[str, float] = Field(description="AUROC of each member's own ood_score")
    member_fpr_at_95_tpr: dict[str, float] = Field(default_factory=dict)


class SelectionImages(_Schema):
    """The in-distribution images an ensemble's weights were chosen on, and those they were not."""

    source: str = Field(
        description="where the images come from, e.g. 'combination split of fashion-mnist:train'"
    )
    split: str = Field(description="which part of them chose the weights, e.g. 'selection half'")
    size: int = Field(ge=0)
    fingerprint: str = Field(description="sha256 of the images' shape and pixels (training.data.ImageSet)")
    seed: int = Field(description="seed of the permutation that halved the images and of the proxies")
    calibration_split: str = Field(description="the other half, which set the ensemble's threshold")
    calibration_size: int = Field(ge=0)
    calibration_fingerprint: str
    not_used: str = Field(description="sets that played no part in the choice")


class EnsembleWeightSelection(_Schema):
    """How an ensemble's member `weights` were chosen (`training.ensemble.choose_weights`).

    `by`: `selection` (the fixed rule over held-out in-distribution images and OOD proxies made
    from them), `user` (`oodflow ensemble create --weights equal`, or a build asked for equal
    weights) or `rule` (`min_p` takes no weights)."""

    by: Literal["selection", "user", "rule"]
    chosen: str = Field(description="name of the chosen candidate ('equal' or '<member> 1/2', ...)")
    weights: list[float] = Field(description="the chosen weights, in member order")
    rule: str
    candidates: dict[str, list[float]] = Field(
        default_factory=dict, description="candidate name -> weights in member order, simplest first"
    )
    proxies: list[dict[str, Any]] = Field(
        default_factory=list, description="name, family, description, size of each OOD proxy"
    )
    auroc: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="candidate -> proxy -> AUROC of the combined score (OOD positive)"
    )
    worst_case_auroc: dict[str, float] = Field(default_factory=dict)
    mean_auroc: dict[str, float] = Field(default_factory=dict)
    images: SelectionImages | None = None


class EnsembleManifest(_Schema):
    """A combined verdict over several served models (`<repository>/_ensembles/<name>.json`).

    Per image: `p_k` = each member's p-value (`models.scores.p_value` of its ood_score against its own
    `calibration.reference_scores`); `combined_score = models.scores.combine_p_values(p, rule,
    weights)`, for `fisher` `−2 Σ_k w_k ln p_k` with `w_k = weights[k]` (every `w_k = 1` when
    `weights` is None, as in manifests written before weights existed); `is_ood = combined_score >
    calibration.threshold`; `p_value` = `models.scores.p_value` of the combined score against
    `calibration.reference_scores`. Valid only while every member is served at the listed version.
    `selection` records how the weights were chosen and on which images.
    """

    schema_version: Literal[1] = 1
    kind: Literal["ensemble"] = "ensemble"
    name: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    description: str = ""
    rule: Literal["fisher", "min_p"]
    rule_definition: str
    members: list[EnsembleMember] = Field(min_length=2)
    weights: list[float] | None = Field(
        None,
        description="member weights w_k of Fisher's method, in member order; None: all 1 (equal)",
    )
    selection: EnsembleWeightSelection | None = Field(None, description="how `weights` were chosen")
    calibration: Calibration
    calibration_images: dict[str, Any] = Field(
        default_factory=dict,
        description="the in-distribution images that set `calibration` (split, size, fingerprint) and "
        "the members' own calibration images they are disjoint from (fingerprints)",
    )
    in_distribution_test: dict[str, float] = Field(default_factory=dict)
    metrics: list[EnsembleMetrics] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("name must be lowercase letters, digits, '.', '_' or '-' (max 63)")
        return v

    @field_validator("members")
    @classmethod
    def _unique(cls, v: list[EnsembleMember]) -> list[EnsembleMember]:
        if len({m.name for m in v}) != len(v):
            raise ValueError("ensemble members must be distinct models")
        return v

    @model_validator(mode="after")
    def _weights(self) -> EnsembleManifest:
        # the scoring code's own check, so a manifest that loads is one that scores
        combination_weights(self.weights, len(self.members), self.rule)
        return self

    @property
    def member_weights(self) -> list[float]:
        """The weight of each member, in member order (1.0 each when `weights` is None)."""
        return list(self.weights) if self.weights is not None else [1.0] * len(self.members)


def ensemble_path(repository: Path, name: str) -> Path:
    return Path(repository) / ENSEMBLES_DIR / f"{name}.json"


def write_ensemble(repository: Path, ensemble: EnsembleManifest) -> Path:
    """Write atomically (a reader never sees half a file), mode 0644 in a 0755 folder."""
    path = ensemble_path(repository, ensemble.name)
    mkdir_readable(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(ensemble.model_dump_json(indent=2) + "\n")
    tmp.chmod(FILE_MODE)
    tmp.replace(path)
    return path


_SchemaT = TypeVar("_SchemaT", bound=BaseModel)


def _read_validated(path: Path, schema: type[_SchemaT], what: str) -> _SchemaT:
    """Parse and validate a JSON file; any problem is an ArtifactError naming the file."""
    try:
        return schema.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()
        raise ArtifactError(f"{path}: invalid {what}: {' '.join(first[:3])}") from None


def load_ensemble(path: Path) -> EnsembleManifest:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such ensemble manifest")
    return _read_validated(path, EnsembleManifest, "ensemble manifest")


def find_ensembles(repository: Path) -> list[Path]:
    """`<repository>/_ensembles/*.json`, sorted by name."""
    folder = Path(repository) / ENSEMBLES_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_files(directory: Path) -> dict[str, FileEntry]:
    """Hash every file below `directory` except the manifest (POSIX relative paths)."""
    entries: dict[str, FileEntry] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST_NAME:
            continue
        entries[rel] = FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)
    return entries


# Artifacts are read by other users than their writer: the service's uid in a container (10001 in
# deploy/) over a bind-mounted repository, a service account, a colleague. So folders are 0755 and
# files 0644 whatever the writer's umask and whatever the writing library chose
# (tempfile.mkdtemp makes 0700 folders, safetensors writes 0600 files).
DIR_MODE = 0o755
FILE_MODE = 0o644


def set_readable_modes(directory: Path) -> None:
    """`directory` and every folder below it 0755, every file 0644; symbolic links are left alone."""
    directory = Path(directory)
    directory.chmod(DIR_MODE)
    for path in directory.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)


def mkdir_readable(directory: Path) -> None:
    """`mkdir -p` whose new folders are 0755 whatever the umask (existing folders keep their mode)."""
    directory = Path(directory)
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    for path in missing:
        path.chmod(DIR_MODE)


def write_manifest(directory: Path, manifest: Manifest) -> Manifest:
    """Fill `files` from what is on disk, write `manifest.json`, and give the whole artifact
    readable modes (`set_readable_modes`): this is the step that seals a version folder."""
    manifest = manifest.model_copy(update={"files": artifact_files(directory)})
    (directory / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
    set_readable_modes(directory)
    return manifest


def load_manifest(directory: Path) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{path}: no manifest.json")
    return _read_validated(path, Manifest, "manifest")


def verify_artifact(directory: Path, required: tuple[str, ...] = ("model.onnx",)) -> Manifest:
    """Validate the manifest and check every listed file's size and sha256."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    if directory.name != str(manifest.version):
        raise ArtifactError(f"{directory}: folder name does not match manifest version {manifest.version}")
    for name in required:
        if name not in manifest.files:
            raise ArtifactError(f"{directory}: manifest does not list required file {name}")
    for rel, entry in manifest.files.items():
        path = directory / rel
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise ArtifactError(f"{path}: sha256 mismatch (file changed after export)")
    return manifest


def find_versions(repository: Path, name: str) -> list[int]:
    folder = Path(repository) / name
    if not folder.is_dir():
        return []
    return sorted(
        int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0
    )


def latest_version(repository: Path, name: str) -> int | None:
    versions = find_versions(repository, name)
    return versions[-1] if versions else None
