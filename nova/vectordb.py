"""`nova embed`'s Parquet output into vector databases, through their own clients: Qdrant (pooled vectors, or
multi-vectors compared by MaxSim) and LanceDB (a vector or multivector column). docs/reranking.md shows the
search side; the scores there equal `model.rerank()`'s.

Both need an extra: `pip install 'nova-embeddings[vectordb]'` (qdrant-client, lancedb).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from nova.embed.output import MANIFEST
from nova.evaluation.errors import UserInputError

# Qdrant point ids are unsigned integers or UUIDs: a row's id maps to the same UUID on every load, so loading
# a folder again (after a resumed `nova embed`) updates points instead of adding twins. The row id stays in
# the payload, under "id".
POINT_NAMESPACE = uuid.UUID("5b2f6a52-8c8e-4f0e-9d4a-6e6f76612d31")


@dataclass(frozen=True)
class EmbedOutput:
    """One `nova embed` folder, read: its rows as an Arrow table (`id` + `column`) and its vector shape."""

    table: object  # pyarrow.Table
    column: str  # "embedding" (pooled, one vector a row) or "multivector" (one 128-d row a token)
    width: int
    settings: dict

    @property
    def multivector(self) -> bool:
        return self.column == "multivector"


def read_embed_output(path: str | Path) -> EmbedOutput:
    """A `nova embed` output folder -> its rows; refuses a folder no run wrote, or one with no rows yet."""
    import pyarrow.parquet as pq

    folder = Path(path)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise UserInputError(f"{folder} is not a `nova embed` output folder (no {MANIFEST} in it)")
    if not any(folder.glob("part-*.parquet")):
        raise UserInputError(f"{folder} holds no Parquet part yet: the `nova embed` run has not finished a shard")
    settings = json.loads(manifest.read_text())
    table = pq.read_table(folder)
    column = "multivector" if "multivector" in table.column_names else "embedding"
    row_type = table.schema.field(column).type
    width = (row_type.value_type if column == "multivector" else row_type).list_size
    return EmbedOutput(table=table.select(["id", column]), column=column, width=width, settings=settings)


def point_id(row_id: str) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, row_id))


def to_qdrant(path: str | Path, client, collection: str, *, batch_size: int = 256) -> int:
    """Upsert a `nova embed` folder's rows into a Qdrant collection (created if missing): cosine distance, and
    for multi-vectors `MultiVectorConfig(comparator=MAX_SIM)`, so a search scores exactly as
    `model.rerank()` does (summed MaxSim; pooled cosine). -> rows loaded. An existing collection must have the
    same vector shape."""
    from qdrant_client import models

    output = read_embed_output(path)
    multivector = models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM) if output.multivector else None
    if client.collection_exists(collection):
        _check_qdrant_collection(client.get_collection(collection).config.params.vectors, collection, output)
    else:
        client.create_collection(collection, vectors_config=models.VectorParams(
            size=output.width, distance=models.Distance.COSINE, multivector_config=multivector))
    for batch in output.table.to_batches(max_chunksize=batch_size):
        ids, vectors = batch.column("id").to_pylist(), batch.column(output.column).to_pylist()
        client.upsert(collection, [models.PointStruct(id=point_id(row_id), vector=vector, payload={"id": row_id})
                                   for row_id, vector in zip(ids, vectors, strict=True)])
    return output.table.num_rows


def _check_qdrant_collection(params, collection: str, output: EmbedOutput) -> None:
    if not hasattr(params, "size"):  # named vectors: a collection set up by hand for something else
        raise UserInputError(f"Qdrant collection {collection!r} has named vectors; load into a new collection")
    is_multi = params.multivector_config is not None
    if params.size != output.width or is_multi != output.multivector:
        raise UserInputError(f"Qdrant collection {collection!r} holds {_shape(is_multi, params.size)} vectors, "
                             f"the folder {_shape(output.multivector, output.width)}; load into a new collection")


def _shape(multivector: bool, width: int) -> str:
    return f"{'multi-vector' if multivector else 'pooled'} {width}-d"


def to_lancedb(path: str | Path, db, table: str, *, mode: str = "create"):
    """Write a `nova embed` folder's rows as a LanceDB table (columns `id` and `embedding` or `multivector`,
    Nova's Arrow types as they are: LanceDB reads a `list<fixed_size_list<float32>[128]>` column as a
    multivector column). `mode`: "create" (refuse an existing table) or "overwrite". -> the table."""
    if mode not in ("create", "overwrite"):
        raise UserInputError(f"mode must be 'create' or 'overwrite', not {mode!r}")
    return db.create_table(table, data=read_embed_output(path).table, mode=mode)
