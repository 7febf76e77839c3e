"""The HTTP-free scoring core under the FastAPI app and the batch engines (DESIGN §7).

Artifact loading with sha256 verification and warm-up, graph runtimes (ONNX Runtime; TorchScript
optional), fitting decoded images to a model's input spec (`models.images` underneath), scores
(`ood_score`, p-value, threshold, `is_ood`) and the ensembles' combined verdicts. Nothing under
`service.core` imports fastapi, starlette or uvicorn, or any `service` module outside it (an
import-linter contract in pyproject.toml). Errors are plain exceptions; each front door words them.

    model = load_model("model-repository/fmnist-pixel/1")
    scores = model.score(images)            # images: (N, C, H, W) uint8 at the model's shape
    scores.ood_score, scores.p_value, scores.is_ood
"""

from service.core import ensembles
from service.core.ensembles import CombinedScores, ServedEnsemble
from service.core.inputs import DecodedBatch, ModelInput, UnsupportedInput, fit_to_model
from service.core.model import (
    LoadedModel,
    ModelLoadError,
    ScorerWrapper,
    Scores,
    compute_scores,
    load_model,
)
from service.core.registry import LoadOptions, Registry, ServedModel, UnknownModel
from service.core.runtime import Device, RuntimeName, Scorer

__all__ = [
    "CombinedScores",
    "DecodedBatch",
    "Device",
    "LoadOptions",
    "LoadedModel",
    "ModelInput",
    "ModelLoadError",
    "Registry",
    "RuntimeName",
    "Scorer",
    "ScorerWrapper",
    "Scores",
    "ServedEnsemble",
    "ServedModel",
    "UnknownModel",
    "UnsupportedInput",
    "compute_scores",
    "ensembles",
    "fit_to_model",
    "load_model",
]
