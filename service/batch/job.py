"""`oodflow score-batch`: offline scoring of image folders, .npz arrays and Parquet files (DESIGN §5).

The scores are the HTTP service's, computed by the same code: each model is found, verified and
warmed by the service's `Registry`; each file is decoded by `service.decoding.decode_image`, fitted
to the model by `fit_to_model`, and its graph outputs turned into scores by
`service.scoring.compute_scores`. Only the engine that moves the images differs:

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
the reason; it never aborts the job.

Resuming: finished chunks are journalled to `<output>.partial/` as they arrive; the output file is
written (atomically) at the end from the journal and any earlier output. Re-running with the same
output skips every (source, index, model) already there, so an interrupted job picks up where it
stopped and a finished one only prints its summary.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # heavy imports stay inside the functions: `oodflow --help` must stay fast
    import numpy as np
    import pyarrow as pa

    from models.artifact import Manifest
    from service.decoding import DecodedBatch, ModelInput
    from service.runtime import Scorer

__all__ = [
    "IMAGE_EXTENSIONS",
    "BatchConfig",
    "BatchScorer",
    "RayBatchScorer",
    "add_score_batch_arguments",
    "enumerate_inputs",
    "input_schema",
    "main",
    "main_score_batch",
    "output_schema",
    "score_batch",
]

IMAGE_EXTENSIONS = frozenset(
    {
        ".png",
        ".jpg",
        ".jpeg",
        ".bmp",
        ".webp",
        ".gif",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
    }
)
_PARQUET_IMAGE_COLUMNS = ("image", "images", "bytes", "content")
_KEY = ("source", "index", "model")
Engine = Literal["local", "ray"]


def input_schema() -> pa.Schema:
    """One row per image to score: a file to read (`path`), encoded bytes, or raw `(H, W, C)` pixels."""
    import pyarrow as pa

    return pa.schema(
        [
            ("source", pa.string()),
            ("index", pa.int64()),
            ("path", pa.string()),  # an image file the worker reads; "" when `data` holds the image
            ("data", pa.binary()),  # encoded file bytes, or raw uint8 pixels when channels > 0
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("channels", pa.int32()),  # 0: `data`/`path` is an encoded file
            ("error", pa.string()),  # set when the source could not even be read
        ]
    )


def output_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            ("source", pa.string()),
            ("index", pa.int64()),
            ("model", pa.string()),
            ("version", pa.int64()),
            ("log_likelihood", pa.float64()),
            ("bits_per_dim", pa.float64()),
            ("ood_score", pa.float64()),
            ("threshold", pa.float64()),
            ("p_value", pa.float64()),
            ("is_ood", pa.bool_()),
            ("resized", pa.bool_()),
            ("error", pa.string()),
        ]
    )


@dataclass(frozen=True)
class BatchConfig:
    """What every engine worker needs to load the models (plain data: it travels to Ray actors)."""

    repository: Path
    models: tuple[str, ...]  # 'name' or 'name:version'
    runtime: Literal["onnx", "torchscript"] = "onnx"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resize: bool = False
    batch_size: int = 128
    intra_op_threads: int = 1
    max_image_pixels: int | None = None  # None: the service's default
    environment: dict[str, str] = field(default_factory=dict)  # OODFLOW_* seen by the driver

    def settings(self) -> Any:
        from service.settings import Settings

        values: dict[str, Any] = {
            "model_repository": self.repository,
            "models": list(self.models),
            "runtime": self.runtime,
            "device": self.device,
            "intra_op_threads": self.intra_op_threads,
            "max_batch_images": self.batch_size,
        }
        if self.max_image_pixels is not None:
            values["max_image_pixels"] = self.max_image_pixels
        return Settings(**values)


# --------------------------------------------------------------------------- enumeration


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _npz_rows(path: Path) -> list[dict[str, Any]]:
    """An .npz file -> one raw-pixel row per image, `(H, W, C)` with C 1 or 3 (alpha dropped)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as archive:
        keys = list(archive.files)
        if "images" in keys:
            array = archive["images"]
        elif len(keys) == 1:
            array = archive[keys[0]]
        else:
            raise ValueError(f"no 'images' array and more than one array (keys: {', '.join(keys) or 'none'})")
    if array.dtype != np.uint8:
        if not (np.issubdtype(array.dtype, np.number) and array.size and np.all(np.floor(array) == array)):
            raise ValueError(f"images must be uint8 (or integer values 0..255), got {array.dtype}")
        if array.min() < 0 or array.max() > 255:
            raise ValueError("images hold values outside 0..255")
        array = array.astype(np.uint8)
    if array.ndim == 3:
        array = array[..., None]
    elif array.ndim == 4:
        first, last = array.shape[1], array.shape[3]
        if not (last in (1, 2, 3, 4) and (first not in (1, 2, 3, 4) or last <= first)):
            if first not in (1, 2, 3, 4):
                raise ValueError(f"images shape {array.shape} has no channel axis of 1, 2, 3 or 4")
            array = array.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
    else:
        raise ValueError(f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got {array.shape}")
    array = array[..., :1] if array.shape[-1] in (1, 2) else array[..., :3]  # drop alpha, as the service
    array = np.ascontiguousarray(array)
    _, height, width, channels = array.shape
    return [
        _row(path, i, data=image.tobytes(), shape=(height, width, channels)) for i, image in enumerate(array)
    ]


def _parquet_rows(path: Path, column: str | None) -> list[dict[str, Any]]:
    """A Parquet file -> one encoded-file row per table row (null cells become error rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if column is None:
        found = [c for c in _PARQUET_IMAGE_COLUMNS if c in names]
        if not found:
            raise ValueError(
                f"no image column (looked for {', '.join(_PARQUET_IMAGE_COLUMNS)}; columns: "
                f"{', '.join(names)}); name it with --image-column"
            )
        column = found[0]
    elif column not in names:
        raise ValueError(f"no column '{column}' (columns: {', '.join(names)})")
    values = pq.read_table(path, columns=[column]).column(column).combine_chunks()
    if pa.types.is_struct(values.type):  # Hugging Face datasets' Image feature: {bytes, path}
        values = values.field("bytes")
    if not (pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type)):
        raise ValueError(f"column '{column}' holds {values.type}, not encoded image bytes")
    return [
        _row(path, i, data=data or b"", error="" if data else "empty or null image cell")
        for i, data in enumerate(values.to_pylist())
    ]


def _row(
    source: Path,
    index: int,
    *,
    path: Path | None = None,
    data: bytes = b"",
    shape: tuple[int, int, int] = (0, 0, 0),
    error: str = "",
) -> dict[str, Any]:
    """One row of `input_schema()`; `shape` (H, W, C) is set only for raw pixels."""
    height, width, channels = shape
    return {
        "source": str(source),
        "index": index,
        "path": "" if path is None else str(path),
        "data": data,
        "height": height,
        "width": width,
        "channels": channels,
        "error": error,
    }


def enumerate_inputs(inputs: Sequence[str | Path], image_column: str | None = None) -> pa.Table:
    """Every image to score, in a stable order (inputs in the order given, folders sorted), as a
    table of `input_schema()`. A missing input is a usage error (ValueError); an .npz or Parquet
    file that cannot be read becomes one error row (index -1)."""
    import pyarrow as pa

    rows: list[dict[str, Any]] = []
    for given in inputs:
        path = Path(given).expanduser()
        suffix = path.suffix.lower()
        if path.is_dir():
            rows.extend(
                _row(p, 0, path=p)
                for p in sorted(path.rglob("*"))
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not _is_hidden(p, path)
            )
        elif not path.is_file():
            raise ValueError(f"input {given} does not exist")
        elif suffix in (".npz", ".parquet", ".pq"):
            try:
                rows.extend(_npz_rows(path) if suffix == ".npz" else _parquet_rows(path, image_column))
            except Exception as exc:  # noqa: BLE001 - a bad file is an error row, not an aborted job
                reason = " ".join(str(exc).split()) or type(exc).__name__
                rows.append(_row(path, -1, error=f"unreadable: {reason}"))
        elif suffix in IMAGE_EXTENSIONS:
            rows.append(_row(path, 0, path=path))
        else:
            raise ValueError(f"input {given}: not a folder, image file, .npz or .parquet file")
    return pa.Table.from_pylist(rows, schema=input_schema())


# --------------------------------------------------------------------------- scoring


@dataclass
class _Loaded:
    manifest: Manifest
    scorer: Scorer
    reference_sorted: np.ndarray


class BatchScorer:
    """Every requested model, loaded by the service's Registry (manifest validated, sha256 verified,
    graph checked and warmed); `score(rows)` turns a table of `input_schema()` into output rows.
    `run` on one session is thread-safe (ONNX Runtime), so one BatchScorer serves many threads."""

    def __init__(self, config: BatchConfig) -> None:
        import numpy as np

        from service.registry import Registry

        self.config = config
        self.settings = config.settings()
        registry = Registry(self.settings)
        self.models: list[_Loaded] = []
        entries = registry.discover()
        if not entries:
            raise RuntimeError(f"no models found in {config.repository}")
        for entry in entries:
            if entry.status == "loading":
                registry.load(entry)
            if entry.status != "ready" or entry.manifest is None or entry.scorer is None:
                raise RuntimeError(f"model '{entry.name}' cannot be used: {entry.reason}")
            reference = np.asarray(entry.manifest.calibration.reference_scores, dtype=np.float64)
            self.models.append(_Loaded(entry.manifest, entry.scorer, reference))

    def _decode(self, row: dict[str, Any]) -> DecodedBatch | str:
        """One input row -> a `DecodedBatch` of one image, or the error message."""
        import numpy as np

        from service.decoding import DecodedBatch, decode_image
        from service.errors import ServiceError

        if row["error"]:
            return row["error"]
        if row["channels"]:
            shape = (1, row["height"], row["width"], row["channels"])
            return DecodedBatch(array=np.frombuffer(row["data"], dtype=np.uint8).reshape(shape))
        data = row["data"]
        if row["path"]:
            try:
                data = Path(row["path"]).read_bytes()
            except OSError as exc:
                return f"unreadable file: {exc.strerror or exc}"
        try:
            image = decode_image(data, 0, self.settings.max_image_pixels)
        except ServiceError as exc:
            return exc.message.removeprefix("images[0]: ")
        return DecodedBatch(images=(image,))

    def _fit(self, decoded: DecodedBatch, manifest: Manifest) -> ModelInput | str:
        from service.decoding import fit_to_model
        from service.errors import ServiceError

        try:
            return fit_to_model(decoded, manifest.input, self.config.resize, manifest.name)
        except ServiceError as exc:
            message = exc.message.removeprefix("images[0]: ")
            return message.replace("send resize=true to have the service resize it", "pass --resize")

    def score(self, rows: pa.Table) -> pa.Table:
        """`rows` (`input_schema()`) -> one output row per (row, model), in row-major order."""
        import numpy as np
        import pyarrow as pa

        from service.complexity import png_bits_per_dim
        from service.scoring import compute_scores

        items = rows.to_pylist()
        decoded = [self._decode(row) for row in items]
        columns: dict[str, list[Any]] = {name: [] for name in output_schema().names}
        per_model = []
        for loaded in self.models:
            manifest = loaded.manifest
            fitted = [d if isinstance(d, str) else self._fit(d, manifest) for d in decoded]
            good = [i for i, f in enumerate(fitted) if not isinstance(f, str)]
            fitted_images = [f.images for f in fitted if not isinstance(f, str)]
            scores = None
            if good:
                images = np.concatenate(fitted_images)
                step = self.config.batch_size
                parts = [loaded.scorer.run(images[s : s + step]) for s in range(0, len(images), step)]
                outputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                bits = png_bits_per_dim(images) if manifest.score.statistic == "complexity" else None
                scores = compute_scores(manifest, outputs, bits, loaded.reference_sorted)
            per_model.append((manifest, fitted, {i: k for k, i in enumerate(good)}, scores))
        for i, row in enumerate(items):
            for manifest, fitted, position, scores in per_model:
                k = position.get(i)
                columns["source"].append(row["source"])
                columns["index"].append(row["index"])
                columns["model"].append(manifest.name)
                columns["version"].append(manifest.version)
                columns["threshold"].append(float(manifest.calibration.threshold))
                if k is None or scores is None:
                    for name in ("log_likelihood", "bits_per_dim", "ood_score", "p_value"):
                        columns[name].append(None)
                    columns["is_ood"].append(None)
                    columns["resized"].append(None)
                    columns["error"].append(fitted[i])
                    continue
                columns["log_likelihood"].append(float(scores.log_likelihood[k]))
                columns["bits_per_dim"].append(float(scores.bits_per_dim[k]))
                columns["ood_score"].append(float(scores.ood_score[k]))
                columns["p_value"].append(float(scores.p_value[k]))
                columns["is_ood"].append(bool(scores.is_ood[k]))
                model_input = fitted[i]
                assert not isinstance(model_input, str)
                columns["resized"].append(bool(model_input.resized[0]))
                columns["error"].append("")
        return pa.Table.from_pydict(columns, schema=output_schema())


class RayBatchScorer:
    """The Ray Data actor: one `BatchScorer` (its own ONNX sessions) per actor, built once."""

    def __init__(self, config: BatchConfig) -> None:
        os.environ.update(config.environment)
        self._scorer = BatchScorer(config)

    def __call__(self, rows: pa.Table) -> pa.Table:
        return self._scorer.score(rows)


# --------------------------------------------------------------------------- engines


def _chunks(table: pa.Table, size: int) -> Iterator[pa.Table]:
    for start in range(0, table.num_rows, size):
        yield table.slice(start, size)


def _run_local(
    config: BatchConfig, pending: pa.Table, workers: int, sink: Callable[[pa.Table], None]
) -> None:
    scorer = BatchScorer(config)
    in_flight: deque[Future[pa.Table]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="score-batch") as pool:
        for chunk in _chunks(pending, config.batch_size):
            in_flight.append(pool.submit(scorer.score, chunk))
            while len(in_flight) > 2 * workers:  # bounded: memory stays flat on any input size
                sink(in_flight.popleft().result())
        while in_flight:
            sink(in_flight.popleft().result())


def _run_ray(
    config: BatchConfig,
    pending: pa.Table,
    workers: int | None,
    gpus_per_worker: float | None,
    address: str | None,
    sink: Callable[[pa.Table], None],
) -> None:
    import ray
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our progress bar and summary say enough
    owns_ray = not ray.is_initialized()
    if owns_ray:
        options: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": "WARNING",
            "log_to_driver": False,
        }
        if address:
            ray.init(address=address, **options)
        elif os.environ.get("RAY_ADDRESS"):
            ray.init(**options)  # inside a RayJob / `ray job submit`: join that cluster
        else:
            ray.init(num_cpus=max(1, workers or os.cpu_count() or 1), **options)
    try:
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0.0))
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if gpus >= 1 else 0.0
        if workers is None:
            workers = int(gpus // gpus_per_worker) if gpus_per_worker else int(resources.get("CPU", 1))
        workers = max(1, workers)
        device = config.device
        if device == "auto":
            device = "cuda" if gpus_per_worker else "cpu"
        actor_config = replace(config, device=device)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts images across both engines
        # One block per batch, so the actor pool shares the work out instead of one actor taking it all.
        dataset = ray.data.from_arrow(list(_chunks(pending, config.batch_size)))
        scored = dataset.map_batches(
            RayBatchScorer,
            fn_constructor_args=(actor_config,),
            batch_size=config.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=0 if gpus_per_worker else config.intra_op_threads,
            num_gpus=gpus_per_worker,
        )
        for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            sink(batch)
    finally:
        if owns_ray:
            ray.shutdown()


# --------------------------------------------------------------------------- output and resume


def _output_format(output: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    suffix = output.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ValueError(f"--output {output}: name it .csv or .parquet, or pass --format")


class _Journal:
    """Finished chunks in `<output>.partial/chunk-NNNNNN.parquet`, merged into the output at the end."""

    def __init__(self, output: Path, fmt: str) -> None:
        self.output, self.fmt = output, fmt
        self.partial = output.with_name(output.name + ".partial")
        self._next = 0

    def _read_output(self) -> pa.Table | None:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        if not self.output.exists():
            return None
        schema = output_schema()
        try:
            if self.fmt == "csv":
                options = pacsv.ConvertOptions(
                    column_types=schema, strings_can_be_null=False, quoted_strings_can_be_null=False
                )
                table = pacsv.read_csv(self.output, convert_options=options)
            else:
                table = pq.read_table(self.output)
            return table.select(schema.names).cast(schema)
        except (pa.ArrowInvalid, KeyError, OSError) as exc:
            raise ValueError(
                f"{self.output} exists but is not a score-batch output ({exc}); choose another --output"
            ) from None

    def existing(self) -> list[pa.Table]:
        import pyarrow.parquet as pq

        tables = []
        previous = self._read_output()
        if previous is not None:
            tables.append(previous)
        if self.partial.is_dir():
            for chunk in sorted(self.partial.glob("chunk-*.parquet")):
                tables.append(pq.read_table(chunk).cast(output_schema()))
                self._next = max(self._next, int(chunk.stem.split("-")[1]) + 1)
        return tables

    def write(self, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        self.partial.mkdir(parents=True, exist_ok=True)
        path = self.partial / f"chunk-{self._next:06d}.parquet"
        self._next += 1
        pq.write_table(table, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)  # a crash never leaves a half chunk behind

    def finish(self, order: dict[tuple[str, int, str], int]) -> pa.Table:
        """Merge output + chunks, keep the newest row per key, sort by input order, write atomically."""
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        tables = self.existing()
        merged = pa.concat_tables(tables) if tables else output_schema().empty_table()
        keys = list(zip(*(merged.column(k).to_pylist() for k in _KEY), strict=True))
        latest = {key: i for i, key in enumerate(keys)}
        unknown = len(order)
        chosen = sorted(latest.values(), key=lambda i: (order.get(keys[i], unknown), keys[i]))
        result = merged.take(pa.array(chosen, type=pa.int64()))
        self.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.output.with_name(f".{self.output.name}.tmp")
        if self.fmt == "csv":
            pacsv.write_csv(result, tmp)
        else:
            pq.write_table(result, tmp)
        os.replace(tmp, self.output)
        shutil.rmtree(self.partial, ignore_errors=True)
        return result


def _combined_order(
    combined: pa.Table, item_keys: list[tuple[str, int]], n_models: int
) -> dict[tuple[str, int, str], int]:
    """Place each combined row right after its image's member rows."""
    position = {key: i for i, key in enumerate(item_keys)}
    return {
        (s, k, m): position.get((s, k), len(item_keys)) * (n_models + 1) + n_models
        for s, k, m in zip(
            *(combined.column(c).to_pylist() for c in ("source", "index", "model")), strict=True
        )
    }


def _summary(table: pa.Table) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for model, error, is_ood in zip(
        table.column("model").to_pylist(),
        table.column("error").to_pylist(),
        table.column("is_ood").to_pylist(),
        strict=True,
    ):
        entry = out.setdefault(model, {"images": 0, "scored": 0, "errors": 0, "ood": 0})
        entry["images"] += 1
        if error:
            entry["errors"] += 1
        else:
            entry["scored"] += 1
            entry["ood"] += int(bool(is_ood))
    for entry in out.values():
        entry["ood_rate"] = entry["ood"] / entry["scored"] if entry["scored"] else 0.0
    return out


COMBINED_PREFIX = "combined:"


def combined_rows(result: pa.Table, repository: Path) -> pa.Table | None:
    """Rows `model="combined:<ensemble>"` for the first ensemble (by name) whose members were all
    scored at their versions: the members' p-values combined exactly as `POST /v1/score` does
    (`models.scores.combined_verdict`). An image with an error row for any member gets an error
    row here too. None when no ensemble applies."""
    import numpy as np
    import pyarrow as pa

    from models.artifact import ArtifactError, find_ensembles, load_ensemble
    from models.scores import combined_verdict

    rows = result.to_pylist()
    by_key: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault((row["source"], row["index"]), {})[row["model"]] = row
    versions = {row["model"]: row["version"] for row in rows if not row["error"]}
    for path in find_ensembles(repository):
        try:
            ens = load_ensemble(path)
        except ArtifactError:
            continue
        names = [m.name for m in ens.members]
        if not all(versions.get(m.name) == m.version for m in ens.members):
            continue
        keys = [k for k, per in by_key.items() if all(n in per for n in names)]
        ok = [k for k in keys if not any(by_key[k][n]["error"] for n in names)]
        reference = np.asarray(ens.calibration.reference_scores, dtype=np.float64)
        out: list[dict[str, Any]] = []
        if ok:
            ps = [np.array([by_key[k][n]["p_value"] for k in ok], dtype=np.float64) for n in names]
            score, p, flag = combined_verdict(ps, ens.rule, ens.calibration.threshold, reference)
            for k, sc, pv, fl in zip(ok, score.tolist(), p.tolist(), flag.tolist(), strict=True):
                out.append(
                    {"source": k[0], "index": k[1], "ood_score": sc, "p_value": pv, "is_ood": fl, "error": ""}
                )
        ok_set = set(ok)
        for k in keys:
            if k not in ok_set:
                errors = "; ".join(f"{n}: {by_key[k][n]['error']}" for n in names if by_key[k][n]["error"])
                out.append({"source": k[0], "index": k[1], "error": errors})
        model = f"{COMBINED_PREFIX}{ens.name}"
        full = [
            {
                **dict.fromkeys(output_schema().names),
                "model": model,
                "version": 0,
                "threshold": ens.calibration.threshold,
                "resized": False,
                **r,
            }
            for r in out
        ]
        return pa.Table.from_pylist(full, schema=output_schema())
    return None


def score_batch(
    inputs: Sequence[str | Path],
    output: str | Path,
    models: Sequence[str],
    *,
    repository: str | Path | None = None,
    engine: Engine = "local",
    output_format: Literal["csv", "parquet"] | None = None,
    runtime: Literal["onnx", "torchscript"] = "onnx",
    device: Literal["auto", "cpu", "cuda"] = "auto",
    resize: bool = False,
    batch_size: int = 128,
    workers: int | None = None,
    intra_op_threads: int = 1,
    gpus_per_worker: float | None = None,
    address: str | None = None,
    image_column: str | None = None,
    max_image_pixels: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every image of `inputs` with each model into `output`; resumes a previous run.

    Returns `{"output", "pending", "seconds", "images_per_s", "models": {name: {images, scored,
    errors, ood, ood_rate}}}` (`pending`: images scored by this run, the rest were already done).
    """
    import pyarrow as pa
    from tqdm import tqdm

    if not models:
        raise ValueError("name at least one model (--model NAME)")
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    output = Path(output)
    fmt = _output_format(output, output_format)
    if repository is None:
        repository = os.environ.get("OODFLOW_MODEL_REPOSITORY", "model-repository")
    config = BatchConfig(
        repository=Path(repository).resolve(),
        models=tuple(models),
        runtime=runtime,
        device=device,
        resize=resize,
        batch_size=batch_size,
        intra_op_threads=intra_op_threads,
        max_image_pixels=max_image_pixels,
        environment={k: v for k, v in os.environ.items() if k.startswith("OODFLOW_")},
    )
    items = enumerate_inputs(inputs, image_column)
    item_keys = list(zip(items.column("source").to_pylist(), items.column("index").to_pylist(), strict=True))
    journal = _Journal(output, fmt)
    done: set[tuple[str, int, str]] = set()
    for table in journal.existing():
        done.update(zip(*(table.column(k).to_pylist() for k in _KEY), strict=True))
    names = [spec.partition(":")[0] for spec in models]
    todo = [i for i, (s, k) in enumerate(item_keys) if any((s, k, m) not in done for m in names)]
    pending = items.take(pa.array(todo, type=pa.int64())) if len(todo) < items.num_rows else items

    start = time.perf_counter()
    if pending.num_rows:
        bar = tqdm(total=pending.num_rows, unit="img", desc=f"score-batch ({engine})", disable=not progress)

        def sink(table: pa.Table) -> None:
            journal.write(table)
            bar.update(table.num_rows // len(models))

        try:
            if engine == "local":
                local_workers = workers or max(1, min(4, os.cpu_count() or 1))
                _run_local(config, pending, local_workers, sink)
            elif engine == "ray":
                _run_ray(config, pending, workers, gpus_per_worker, address, sink)
            else:
                raise ValueError(f"unknown engine '{engine}' (local or ray)")
        finally:
            bar.close()
    seconds = time.perf_counter() - start
    order = {
        (s, k, m): i * (len(names) + 1) + j for i, (s, k) in enumerate(item_keys) for j, m in enumerate(names)
    }
    result = journal.finish(order)
    # The combined verdict is derived from the member rows, so it is recomputed on every run
    # (resumed runs included) rather than journaled.
    import pyarrow.compute as pc

    members_only = result.filter(pc.invert(pc.starts_with(result.column("model"), COMBINED_PREFIX)))
    combined = combined_rows(members_only, config.repository)
    if combined is not None:
        result = pa.concat_tables([members_only, combined])
        journal.write(combined)
        result = journal.finish({**order, **_combined_order(combined, item_keys, len(names))})
    return {
        "output": str(output),
        "pending": pending.num_rows,
        "seconds": seconds,
        "images_per_s": pending.num_rows / seconds if pending.num_rows and seconds > 0 else None,
        "models": _summary(result),
    }


# --------------------------------------------------------------------------- command line


def add_score_batch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `oodflow score-batch` flags (oodflow/cli.py holds the same lines; a test keeps them equal)."""
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image folders (recursive), image, .npz or .parquet files"
    )
    parser.add_argument(
        "--model", action="append", required=True, help="model name or name:version (repeatable)"
    )
    parser.add_argument(
        "--output", required=True, help="CSV or Parquet file (by suffix); re-running resumes it"
    )
    parser.add_argument(
        "--repository", help="model repository (OODFLOW_MODEL_REPOSITORY, ./model-repository)"
    )
    parser.add_argument("--engine", choices=["local", "ray"], default="local")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--workers", type=int, help="threads (local) or actors (ray); default: cores / GPUs")
    parser.add_argument(
        "--gpus-per-worker", type=float, help="Ray: GPUs per actor (default 1 when the cluster has GPUs)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="images per inference call")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per worker")
    parser.add_argument("--runtime", choices=["onnx", "torchscript"], default="onnx")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--resize", action="store_true", help="resize images to the model's size instead of error rows"
    )
    parser.add_argument("--format", choices=["csv", "parquet"], help="output format (default: by suffix)")
    parser.add_argument("--image-column", help="Parquet inputs: the column of encoded images")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main_score_batch(args: argparse.Namespace) -> int:
    """Run `score-batch` from parsed arguments; prints the summary, returns the exit status."""
    result = score_batch(
        args.inputs,
        args.output,
        args.model,
        repository=args.repository,
        engine=args.engine,
        output_format=args.format,
        runtime=args.runtime,
        device=args.device,
        resize=args.resize,
        batch_size=args.batch_size,
        workers=args.workers,
        intra_op_threads=args.threads,
        gpus_per_worker=args.gpus_per_worker,
        address=args.address,
        image_column=args.image_column,
        progress=not args.no_progress,
    )
    rate = f", {result['images_per_s']:.0f} images/s" if result["images_per_s"] else ""
    print(f"{result['output']}: {result['pending']} images scored in {result['seconds']:.1f} s{rate}")
    for model, s in result["models"].items():
        print(
            f"  {model}: {s['images']} images, {s['scored']} scored, {s['errors']} errors, "
            f"{s['ood']} OOD ({s['ood_rate']:.1%} of scored)"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m service.batch ...`, the same as `oodflow score-batch ...`."""
    parser = add_score_batch_arguments(
        argparse.ArgumentParser(prog="oodflow score-batch", description=__doc__)
    )
    try:
        return main_score_batch(parser.parse_args(argv))
    except (ValueError, RuntimeError) as exc:
        print(f"oodflow score-batch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
