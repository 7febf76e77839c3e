"""What `score-batch` reads: folders of image files, image files, .npz and Parquet files, as rows.

Each image to score becomes one row of `input_schema()`: a file the worker reads (`path`), encoded
bytes (`data`, Parquet cells), or raw pixels (`data` with `height`, `width`, `channels` set, .npz
images after `models.images.npz_layout`). A source that cannot be read at all becomes one error
row (index -1); a missing input is a usage error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.images import IMAGE_EXTENSIONS, npz_images

__all__ = ["PARQUET_IMAGE_COLUMNS", "enumerate_inputs", "input_schema"]

PARQUET_IMAGE_COLUMNS = ("image", "images", "bytes", "content")


def input_schema() -> pa.Schema:
    """One row per image to score: a file to read (`path`), encoded bytes, or raw `(H, W, C)` pixels."""
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


def _npz_rows(path: Path) -> list[dict[str, Any]]:
    """An .npz file -> one raw-pixel row per image, `(H, W, C)` with C 1 or 3 (alpha dropped)."""
    images, _ = npz_images(path)  # (N, C, H, W), the training loader's layout rules
    pixels = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    _, height, width, channels = pixels.shape
    return [
        _row(path, i, data=image.tobytes(), shape=(height, width, channels)) for i, image in enumerate(pixels)
    ]


def _parquet_rows(path: Path, column: str | None) -> list[dict[str, Any]]:
    """A Parquet file -> one encoded-file row per table row (null cells become error rows)."""
    names = pq.read_schema(path).names
    if column is None:
        found = [c for c in PARQUET_IMAGE_COLUMNS if c in names]
        if not found:
            raise ValueError(
                f"no image column (looked for {', '.join(PARQUET_IMAGE_COLUMNS)}; columns: "
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


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def enumerate_inputs(inputs: Sequence[str | Path], image_column: str | None = None) -> pa.Table:
    """Every image to score, in a stable order (inputs in the order given, folders sorted), as a
    table of `input_schema()`. A missing input is a usage error (ValueError); an .npz or Parquet
    file that cannot be read becomes one error row (index -1)."""
    rows: list[dict[str, Any]] = []
    for given in inputs:
        # The training dataset specs `folder:DIR` and `npz:FILE` name the same files (issue 10 §4).
        kind, sep, rest = str(given).partition(":")
        path = Path(rest if sep and kind in ("folder", "npz") and rest else given).expanduser()
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
