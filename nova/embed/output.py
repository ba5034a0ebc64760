"""The output folder: a settings manifest, one Parquet part per shard, one errors file per shard.

    OUT_DIR/_nova_embed.json        the run's settings and model identity; a run with other settings refuses
    OUT_DIR/part-00000.parquet      columns `id` + `embedding` (fixed-size float32 list) or `multivector`
    OUT_DIR/_errors/part-00000.jsonl  that shard's bad rows: {"id", "position", "reason"}
    OUT_DIR/_errors.jsonl           all bad rows, rebuilt at the end of every run

A shard is committed by renaming its finished Parquet file into place (after its errors file), so a part
file exists only when the whole shard is done: a resumed run skips exactly the committed shards, and a
crash leaves at most a hidden temporary file. `pyarrow.parquet.read_table(OUT_DIR)` reads the parts and
ignores the `_`/`.` files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from nova.evaluation.errors import UserInputError

MANIFEST = "_nova_embed.json"
ERRORS_DIR = "_errors"
ERRORS_FILE = "_errors.jsonl"
# Everything a run writes into its folder (globs), temporary files included: what `--overwrite` deletes.
RUN_FILES = (MANIFEST, "part-*.parquet", ERRORS_DIR, ERRORS_FILE, ".*.tmp")
METADATA_KEY = b"nova.embed"
FORMAT_VERSION = 1


class SettingsMismatch(UserInputError):
    """The folder holds output of a run with other settings; mixing them would give an inconsistent index."""


def model_identity(model_ref: str | None) -> dict:
    """Which model made the vectors (and the vector widths), read from config.json alone: cheap on the driver."""
    from nova.tiny import ensure_tiny_checkpoint

    path = str(ensure_tiny_checkpoint()) if model_ref is None else model_ref
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        from huggingface_hub import hf_hub_download

        config_path = hf_hub_download(path, "config.json")
    raw = Path(config_path).read_bytes()
    config = json.loads(raw)
    hidden = (config.get("text_config") or {}).get("hidden_size") or config.get("hidden_size")
    return {
        "model": model_ref or "nova-embeddings-v1-tiny",
        "config_sha256": hashlib.sha256(raw).hexdigest(),
        "random_weights": bool(config.get("nova_random_weights", False)),
        "hidden_size": int(hidden),
        "multi_vector_dim": int(config.get("multi_vector_projector_dim", 128)),
        "max_image_pixels": int(config.get("max_image_pixels", 40_000_000)),
    }


class OutputFolder:
    def __init__(self, path: str | os.PathLike, settings: dict):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))  # as the manifest will read back (tuples -> lists)
        model = settings["model"]
        options = settings["options"]
        self.multivector = bool(options["multivector"])
        self.width = model["multi_vector_dim"] if self.multivector else (options["dimensions"] or model["hidden_size"])

    # ---- manifest ------------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the folder, or check that what it holds was made with the same settings."""
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.path / MANIFEST
        if manifest.is_file():
            previous = json.loads(manifest.read_text())
            different = _differences(previous, self.settings)
            if different:
                raise SettingsMismatch(
                    f"{self.path} holds output made with other settings ({'; '.join(different)}); "
                    "use another folder, or --overwrite to start over"
                )
            return
        if any(self.path.glob("*.parquet")):
            raise SettingsMismatch(f"{self.path} holds Parquet files that no `nova embed` run recorded; "
                                   "use another folder")
        tmp = self.path / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(self.settings, indent=2, sort_keys=True))
        os.replace(tmp, manifest)

    def done_shards(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in self.path.glob("part-*.parquet")}

    # ---- commit --------------------------------------------------------------------------------------

    def commit(self, shard, results: list[dict]) -> tuple[int, int]:
        """Write one shard atomically; -> (rows embedded, rows in error). Refuses a shard that does not hold
        each of its rows exactly once (nothing is written then)."""
        positions = sorted(r["position"] for r in results)
        if positions != list(range(shard.start, shard.stop)):
            missing = sorted(set(range(shard.start, shard.stop)) - set(positions))
            raise RuntimeError(f"shard {shard.index}: rows not exactly once (missing {missing[:5]}, "
                               f"{len(positions)} results for {shard.rows} rows)")
        results = sorted(results, key=lambda r: r["position"])
        errors = [r for r in results if "error" in r]
        good = [r for r in results if "error" not in r]
        errors_dir = self.path / ERRORS_DIR
        errors_dir.mkdir(exist_ok=True)
        name = f"part-{shard.index:05d}"
        _atomic_write(errors_dir / f"{name}.jsonl", "".join(
            json.dumps({"id": r["id"], "position": r["position"], "reason": r["error"]}) + "\n" for r in errors
        ).encode())
        import pyarrow.parquet as pq

        table = self._table(good)
        tmp = self.path / f".{name}.parquet.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.path / f"{name}.parquet")
        return len(good), len(errors)

    def _table(self, rows: list[dict]):
        import pyarrow as pa

        ids = pa.array([r["id"] for r in rows], pa.string())
        vectors = [np.asarray(r["vector"], dtype=np.float32) for r in rows]
        for r, v in zip(rows, vectors, strict=True):
            if v.shape[-1] != self.width:
                raise RuntimeError(f"row {r['id']!r}: a {v.shape[-1]}-d vector, the output holds {self.width}-d")
        row_type = pa.list_(pa.float32(), self.width)
        flat = pa.array(np.concatenate([v.reshape(-1) for v in vectors]) if vectors else np.zeros(0, np.float32))
        if self.multivector:
            rows_per_item = np.cumsum([0] + [v.shape[0] for v in vectors]).astype(np.int32)
            tokens = pa.FixedSizeListArray.from_arrays(flat, self.width)
            column, name = pa.ListArray.from_arrays(pa.array(rows_per_item), tokens), "multivector"
            field_type = pa.list_(row_type)
        else:
            column, name, field_type = pa.FixedSizeListArray.from_arrays(flat, self.width), "embedding", row_type
        schema = pa.schema([("id", pa.string()), (name, field_type)],
                           metadata={METADATA_KEY: json.dumps(self.settings, sort_keys=True).encode()})
        return pa.Table.from_arrays([ids, column], schema=schema)

    # ---- summary -------------------------------------------------------------------------------------

    def finish(self) -> dict:
        """Rebuild `_errors.jsonl` from the shards' error files; -> totals over the whole folder."""
        import pyarrow.parquet as pq

        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(self.path.glob("part-*.parquet")))
        lines = b"".join(p.read_bytes() for p in sorted((self.path / ERRORS_DIR).glob("part-*.jsonl")))
        _atomic_write(self.path / ERRORS_FILE, lines)
        return {"rows": rows, "errors": lines.count(b"\n"), "errors_file": str(self.path / ERRORS_FILE)}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} before, {b!r} now")
    return out
