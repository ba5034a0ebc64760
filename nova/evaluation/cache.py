"""On-disk cache of corpus embeddings, keyed by (model identity, corpus, passage-side settings).

Variants that differ only on the query side (query instructions, query adapter, dimensions) share one
entry, so comparing five query-instruction variants embeds the corpus once. Dimensions are not part of
the key: full-size vectors are cached and truncated when scoring. Entries are written atomically
(temporary folder, then rename), so an interrupted run never leaves a half-written entry behind.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from .embedders import stable_hash

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    if os.environ.get("NOVA_EVAL_CACHE"):
        return Path(os.environ["NOVA_EVAL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nova" / "eval-embeddings"


def corpus_fingerprint(corpus_file: Path) -> dict:
    stat = corpus_file.stat()
    return {"path": str(corpus_file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class EmbeddingCache:
    def __init__(self, root: str | Path | None, enabled: bool = True):
        self.root = Path(root) if root else default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def key(self, identity: dict, corpus: dict, settings: dict) -> str:
        return stable_hash({"version": CACHE_VERSION, "model": identity, "corpus": corpus, "settings": settings})[:40]

    def load(self, key: str, ids: list[str]) -> list[np.ndarray] | None:
        if not self.enabled:
            return None
        folder = self.root / key
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if meta.get("ids") != ids:
                return None
            if meta["kind"] == "single":
                vectors = np.load(folder / "vectors.npy")
                result = list(vectors)
            else:
                tokens = np.load(folder / "tokens.npy")
                offsets = np.load(folder / "offsets.npy")
                result = [tokens[offsets[i] : offsets[i + 1]] for i in range(len(ids))]
        except (OSError, ValueError, KeyError):
            return None
        self.hits += 1
        return result

    def store(self, key: str, ids: list[str], vectors: list[np.ndarray], multivector: bool, info: dict) -> None:
        self.misses += 1
        if not self.enabled:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            if multivector:
                lengths = np.array([len(v) for v in vectors], dtype=np.int64)
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
                np.save(tmp / "tokens.npy", np.concatenate(vectors).astype(np.float32))
                np.save(tmp / "offsets.npy", offsets)
            else:
                np.save(tmp / "vectors.npy", np.stack(vectors).astype(np.float32))
            meta = {"kind": "multi" if multivector else "single", "ids": ids, "info": info}
            (tmp / "meta.json").write_text(json.dumps(meta))
            target = self.root / key
            if target.exists():
                shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
