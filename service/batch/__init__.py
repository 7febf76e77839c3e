"""`oodflow score-batch`: offline scoring of image folders, .npz arrays and Parquet files (DESIGN §5).

The batch front door over the scoring core (`service.core`), beside the HTTP app: the scores are
the HTTP service's, computed by the same code. Each model is found, verified and warmed by the
core's `Registry`; each file is decoded by `models.images` and fitted to the model by the core;
ensembles are resolved and combined by the core's rules. Only the engine that moves the images
differs:

- `local`: a thread pool on this machine (decoding and ONNX Runtime both release the GIL), one
  shared session per model, one intra-op thread per worker;
- `ray`: Ray Data `map_batches` over an actor pool, each actor holding its own sessions (one GPU
  per actor when the cluster has GPUs); `ray.init()` locally, or `--address` / `RAY_ADDRESS` for a
  cluster (a KubeRay RayJob sets the latter).

Inputs (recursive): folders of image files, single image files, `.npz` files (`images` or the only
array; `(N, H, W)`, `(N, H, W, C)` or `(N, C, H, W)` uint8), Parquet files with a column of encoded
image files (`image`, `images`, `bytes`, `content`, or a Hugging Face `{bytes, path}` struct).

Output: CSV or Parquet (by suffix), one row per image and model: `source` (file path), `index`
(row inside an .npz/Parquet file, 0 for an image file, -1 for a whole file that cannot be read),
`model`, `version`, `log_likelihood` (nats), `bits_per_dim`, `ood_score`, `threshold`, `p_value`,
`is_ood`, `resized`, and `error` (empty when scored). An unreadable image becomes an error row with
the reason; it never aborts the job. Rows `model = combined:<ensemble>` carry the combined verdict
of the ensemble `POST /v1/score` would use; every ensemble's status is printed.

Resuming: finished chunks are journalled to `<output>.partial/` as they arrive; the output file is
written (atomically) at the end from the journal and any earlier output. Re-running with the same
output skips every (source, index, model) already there, so an interrupted job picks up where it
stopped and a finished one only prints its summary.

Modules: `inputs` (enumeration), `scorer` (rows -> scores over the core), `local` and
`ray_engine` (the engines), `output` (journal, combined rows, summary), `job` (`score_batch`),
`cli` (flags). The names below load lazily, so `oodflow --help` stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from service.batch.cli import add_score_batch_arguments, main, main_score_batch

if TYPE_CHECKING:
    from service.batch.inputs import enumerate_inputs, input_schema
    from service.batch.job import score_batch
    from service.batch.output import COMBINED_PREFIX, combined_rows
    from service.batch.ray_engine import RayBatchScorer
    from service.batch.scorer import BatchConfig, BatchScorer, output_schema

__all__ = [
    "COMBINED_PREFIX",
    "BatchConfig",
    "BatchScorer",
    "RayBatchScorer",
    "add_score_batch_arguments",
    "combined_rows",
    "enumerate_inputs",
    "input_schema",
    "main",
    "main_score_batch",
    "output_schema",
    "score_batch",
]

_LAZY = {
    "COMBINED_PREFIX": "output",
    "BatchConfig": "scorer",
    "BatchScorer": "scorer",
    "RayBatchScorer": "ray_engine",
    "combined_rows": "output",
    "enumerate_inputs": "inputs",
    "input_schema": "inputs",
    "output_schema": "scorer",
    "score_batch": "job",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"service.batch.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'service.batch' has no attribute '{name}'")
