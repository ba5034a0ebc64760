"""Input rows and shards: JSONL, Parquet, or a BEIR folder's corpus.jsonl.

A run is cut into shards of consecutive rows (`--shard-rows`). A shard is what gets committed and what a
resumed run skips, so shard boundaries depend only on the input and `--shard-rows`, never on the number of
workers. Reading a shard is cheap anywhere: JSONL shards carry their byte offset, Parquet shards read only
the row groups they overlap.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from inputs_nova_embeddings_v1 import ITEM_FIELDS as MODEL_ITEM_FIELDS
from nova.evaluation.errors import UserInputError

# The columns an input row's item is read from: the model's item fields, less the precomputed image embeddings
# (a corpus carries images, not vision-tower outputs).
ITEM_FIELDS = tuple(key for key in MODEL_ITEM_FIELDS if key not in ("image_embeds", "image_grid_thw"))


class InputError(UserInputError):
    """The input as a whole cannot be read (missing file, unknown format): the run stops before starting."""


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # position of its first row in the input
    stop: int
    offset: int = 0  # JSONL: byte offset of its first row

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class InputPlan:
    path: str  # the file actually read (corpus.jsonl for a BEIR folder)
    format: str  # "jsonl" | "parquet" | "beir"
    num_rows: int
    size_bytes: int
    shards: tuple[Shard, ...]
    id_field: str | None  # None: "id", else "_id"

    def identity(self) -> dict:
        """What the output folder remembers about its input: another input must not mix into it."""
        return {"path": os.path.abspath(self.path), "format": self.format, "rows": self.num_rows,
                "bytes": self.size_bytes}


def plan_input(path: str | os.PathLike, shard_rows: int, id_field: str | None = None) -> InputPlan:
    path = Path(path)
    if shard_rows < 1:
        raise InputError(f"--shard-rows must be positive, got {shard_rows}")
    fmt = "jsonl"
    if path.is_dir():
        corpus = path / "corpus.jsonl"
        if not corpus.is_file():
            raise InputError(f"{path} is a folder without corpus.jsonl (a BEIR folder is expected)")
        path, fmt = corpus, "beir"
    elif not path.is_file():
        raise InputError(f"{path}: no such file or folder")
    elif path.suffix.lower() == ".parquet":
        fmt = "parquet"
    elif path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise InputError(f"{path}: unknown input format (expected .jsonl, .parquet or a BEIR folder)")
    size = path.stat().st_size
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            num_rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise InputError(f"{path}: not a readable Parquet file: {exc}") from None
        shards = tuple(Shard(k, start, min(start + shard_rows, num_rows))
                       for k, start in enumerate(range(0, num_rows, shard_rows)))
    else:
        num_rows, shards = _plan_jsonl(path, shard_rows)
    return InputPlan(str(path), fmt, num_rows, size, shards, id_field)


def _plan_jsonl(path: Path, shard_rows: int) -> tuple[int, tuple[Shard, ...]]:
    starts: list[tuple[int, int]] = []  # (row position, byte offset) of each shard's first row
    position = offset = 0
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                if position % shard_rows == 0:
                    starts.append((position, offset))
                position += 1
            offset += len(line)
    shards = tuple(Shard(k, start, min(start + shard_rows, position), byte)
                   for k, (start, byte) in enumerate(starts))
    return position, shards


def read_shard(plan: InputPlan, shard: Shard) -> list[dict]:
    """The shard's rows as records `{position, id, item}` or `{position, id, error}` (a row that is not an
    object, or has no usable id, is an error record: it goes to the errors file and the run goes on)."""
    raw = _parquet_rows(plan, shard) if plan.format == "parquet" else _jsonl_rows(plan, shard)
    base_dir = os.path.dirname(os.path.abspath(plan.path))
    return [_record(plan, shard.start + i, row, base_dir) for i, row in enumerate(raw)]


def _jsonl_rows(plan: InputPlan, shard: Shard) -> list:
    rows: list = []
    with open(plan.path, "rb") as handle:
        handle.seek(shard.offset)
        for line in handle:
            if len(rows) == shard.rows:
                break
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except (ValueError, UnicodeDecodeError) as exc:
                rows.append(InputError(f"not valid JSON: {exc}"))
    if len(rows) != shard.rows:
        raise InputError(f"{plan.path} changed while embedding: shard {shard.index} expected {shard.rows} rows")
    return rows


def _parquet_rows(plan: InputPlan, shard: Shard) -> list:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(plan.path)
    tables, first = [], 0
    for group in range(parquet.num_row_groups):
        n = parquet.metadata.row_group(group).num_rows
        if first < shard.stop and first + n > shard.start:
            lo, hi = max(shard.start - first, 0), min(shard.stop - first, n)
            tables.append(parquet.read_row_group(group).slice(lo, hi - lo))
        first += n
    return pa.concat_tables(tables).to_pylist() if tables else []


def _record(plan: InputPlan, position: int, row, base_dir: str) -> dict:
    if isinstance(row, Exception):
        return {"position": position, "id": None, "error": f"row {position}: {row}"}
    if not isinstance(row, dict):
        return {"position": position, "id": None,
                "error": f"row {position}: expected a JSON object, got {type(row).__name__}"}
    id_field = plan.id_field or ("_id" if plan.format == "beir" or ("id" not in row and "_id" in row) else "id")
    row_id = row.get(id_field)
    if isinstance(row_id, int) and not isinstance(row_id, bool):
        row_id = str(row_id)
    if not isinstance(row_id, str) or not row_id:
        return {"position": position, "id": None,
                "error": f"row {position}: no '{id_field}' (a non-empty string or integer id is required)"}
    item = {key: row[key] for key in ITEM_FIELDS if row.get(key) is not None}
    if plan.format == "beir" and row.get("title"):
        from nova.evaluation.dataset import Document

        item["text"] = Document(row_id, row["title"], row.get("text") or "").content()
    image = item.get("image")
    if isinstance(image, str) and _is_relative_path(image):
        item["image"] = os.path.join(base_dir, image)  # image paths are relative to the input file
    elif isinstance(image, dict) and "bytes" in image:  # a Parquet image struct {bytes, path} (HF datasets)
        item["image"] = image["bytes"]
    return {"position": position, "id": row_id, "item": item}


def _is_relative_path(value: str) -> bool:
    """Image strings are file paths (relative to the input file) unless they are URLs or data: URLs."""
    return not (value[:8].lower().startswith(("data:", "http://", "https://")) or os.path.isabs(value))
