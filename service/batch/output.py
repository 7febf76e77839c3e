"""`score-batch` output: the resumable journal, the combined-verdict rows, the summary.

Finished chunks are journalled to `<output>.partial/` as they arrive; the output file is written
(atomically) at the end from the journal and any earlier output, so re-running with the same output
skips every (source, index, model) already there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from service.batch.scorer import output_schema
from service.core.ensembles import ServedEnsemble, combine, select_ensemble

__all__ = [
    "COMBINED_PREFIX",
    "KEY",
    "Journal",
    "combined_order",
    "combined_rows",
    "output_format",
    "summarise",
]

KEY = ("source", "index", "model")
COMBINED_PREFIX = "combined:"


def output_format(output: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    suffix = output.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ValueError(f"--output {output}: name it .csv or .parquet, or pass --format")


class Journal:
    """Finished chunks in `<output>.partial/chunk-NNNNNN.parquet`, merged into the output at the end."""

    def __init__(self, output: Path, fmt: str) -> None:
        self.output, self.fmt = output, fmt
        self.partial = output.with_name(output.name + ".partial")
        self._next = 0

    def _read_output(self) -> pa.Table | None:

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

        self.partial.mkdir(parents=True, exist_ok=True)
        path = self.partial / f"chunk-{self._next:06d}.parquet"
        self._next += 1
        pq.write_table(table, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)  # a crash never leaves a half chunk behind

    def finish(self, order: dict[tuple[str, int, str], int]) -> pa.Table:
        """Merge output + chunks, keep the newest row per key, sort by input order, write atomically."""

        tables = self.existing()
        merged = pa.concat_tables(tables) if tables else output_schema().empty_table()
        keys = list(zip(*(merged.column(k).to_pylist() for k in KEY), strict=True))
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


def combined_order(
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


def summarise(table: pa.Table) -> dict[str, dict[str, Any]]:
    """Per model (and `combined:<ensemble>`): images, scored, errors, ood, ood_rate."""
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


def combined_rows(result: pa.Table, ensembles: Iterable[ServedEnsemble]) -> pa.Table | None:
    """Rows `model="combined:<ensemble>"` for the ensemble `POST /v1/score` would use: the first
    valid one (by name, resolved by the core against the loaded models) whose members were all
    scored at their versions (`service.core.ensembles.select_ensemble`), combined by the core's
    `combine`. An image with an error row for any member gets an error row here too. None when no
    ensemble applies."""
    rows = result.to_pylist()
    by_key: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault((row["source"], row["index"]), {})[row["model"]] = row
    versions = {row["model"]: row["version"] for row in rows if not row["error"]}
    ens = select_ensemble(ensembles, versions)
    if ens is None or ens.manifest is None:
        return None
    names = [m.name for m in ens.manifest.members]
    keys = [k for k, per in by_key.items() if all(n in per for n in names)]
    ok = [k for k in keys if not any(by_key[k][n]["error"] for n in names)]
    out: list[dict[str, Any]] = []
    if ok:
        verdict = combine(
            ens, {n: np.array([by_key[k][n]["p_value"] for k in ok], dtype=np.float64) for n in names}
        )
        columns = (verdict.combined_score.tolist(), verdict.p_value.tolist(), verdict.is_ood.tolist())
        for k, sc, pv, fl in zip(ok, *columns, strict=True):
            out.append(
                {"source": k[0], "index": k[1], "ood_score": sc, "p_value": pv, "is_ood": fl, "error": ""}
            )
    ok_set = set(ok)
    for k in keys:
        if k not in ok_set:
            errors = "; ".join(f"{n}: {by_key[k][n]['error']}" for n in names if by_key[k][n]["error"])
            out.append({"source": k[0], "index": k[1], "error": errors})
    full = [
        {
            **dict.fromkeys(output_schema().names),
            "model": f"{COMBINED_PREFIX}{ens.name}",
            "version": 0,
            "threshold": ens.manifest.calibration.threshold,
            "resized": False,
            **r,
        }
        for r in out
    ]
    return pa.Table.from_pylist(full, schema=output_schema())
