"""The ``--out`` file: one row per photo, JSON Lines (``.jsonl``, any other name) or Parquet
(``.parquet``; needs pyarrow: ``pip install 'phototag[parquet]'``), written whole through a
temp file and a rename, from the journal's latest rows.

A row: ``path``, ``size`` (bytes), ``mtime`` (UTC, ISO 8601) and ``mtime_ns``, ``sha256`` (of the
file's bytes), ``status`` (``tagged``, ``error`` or ``removed``), ``model`` (``id``, ``name``,
``version``, as ``POST /v1/tags`` names it), ``tags`` (``label``, ``probability``, ``path``, most
probable first; ``label`` is in the ``--lang`` language and ``path_labels`` holds the path's
labels in it, while ``path`` stays the English id), ``error`` (``code``, ``message``: why
the photo was not tagged, or null) and ``xmp`` (``path`` and ``action``, or ``error``, where the
tags were written; null with ``--xmp none``). With ``--names on`` a tagged row also has
``faces`` (each face's ``box``, x0, y0, x1, y1 in the photo's pixels, ``score``, ``name`` or
null, and the name's ``probability``; never a face descriptor) and ``dimensions`` (the photo's
width and height).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

PARQUET_ROW_GROUP = 10_000


def out_format(path: str | Path) -> str:
    return "parquet" if str(path).lower().endswith(".parquet") else "jsonl"


def write_rows(rows: Iterable[dict], path: str | Path) -> int:
    """Write every row to ``path`` atomically; returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if out_format(path) == "parquet":
            count = _write_parquet(rows, tmp)
        else:
            count = _write_jsonl(rows, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def _write_jsonl(rows: Iterable[dict], tmp: str) -> int:
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
        f.flush()
        os.fsync(f.fileno())
    return count


def parquet_schema():
    import pyarrow as pa

    error = pa.struct([("code", pa.string()), ("message", pa.string())])
    tag = pa.struct(
        [
            ("label", pa.string()),
            ("probability", pa.float64()),
            ("path", pa.list_(pa.string())),
            ("path_labels", pa.list_(pa.string())),  # null in rows of older runs
        ]
    )
    return pa.schema(
        [
            ("path", pa.string()),
            ("size", pa.int64()),
            ("mtime", pa.string()),
            ("mtime_ns", pa.int64()),
            ("sha256", pa.string()),
            ("status", pa.string()),
            (
                "model",
                pa.struct([("id", pa.string()), ("name", pa.string()), ("version", pa.string())]),
            ),
            ("tags", pa.list_(tag)),
            ("error", error),
            ("xmp", pa.struct([("path", pa.string()), ("action", pa.string()), ("error", error)])),
        ]
    )


def _write_parquet(rows: Iterable[dict], tmp: str) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError(
            "writing Parquet needs pyarrow: pip install 'phototag[parquet]' (or use .jsonl)"
        ) from None
    schema = parquet_schema()
    count = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        chunk: list[dict] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == PARQUET_ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                count, chunk = count + len(chunk), []
        if chunk or not count:
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
            count += len(chunk)
    return count
