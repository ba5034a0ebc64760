"""One comparison: a query, candidates, a baseline and instruction/adapter variants -> scores and ranks."""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Backend, PlaygroundError, PlaygroundItemError
from .scoring import rank_movement, ranks, score

AUTO = "auto (task routing)"
NO_ADAPTER = "none (base model)"
SAME_AS_BASELINE = "same as baseline"
SEPARATOR = re.compile(r"^\s*-{3,}\s*$", re.MULTILINE)
MAX_CANDIDATES = 32
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass
class Candidate:
    label: str
    text: str | None = None
    image: bytes | None = None  # the uploaded file's bytes
    image_name: str | None = None
    digest: str = ""

    @property
    def preview(self) -> str:
        if self.image is not None:
            return f"[image] {self.image_name}"
        text = " ".join((self.text or "").split())
        return text if len(text) <= 90 else text[:87] + "…"


@dataclass
class Variant:
    name: str
    instructions: str | None = None
    adapter: str = SAME_AS_BASELINE


@dataclass
class Settings:
    query_task: str = "retrieval.query"
    passage_task: str = "retrieval.passage"
    adapter: str = AUTO
    multivector: bool = False
    dimensions: int | None = None
    instruct_candidates: bool = False


@dataclass
class VariantResult:
    variant: Variant
    adapter: str
    query_item: dict
    candidate_items: list[dict]
    query_vector: np.ndarray
    candidate_vectors: list[np.ndarray]
    scores: list[float]
    ranks: list[int]
    movement: list[int] = field(default_factory=list)


@dataclass
class Comparison:
    query: str
    candidates: list[Candidate]
    settings: Settings
    results: list[VariantResult]  # results[0] is the baseline


def parse_candidates(text: str | None, image_paths: list[str] | None) -> list[Candidate]:
    """Text candidates are separated by lines of `---`; images come from uploaded files."""
    from PIL import Image, UnidentifiedImageError

    blocks = [b.strip() for b in SEPARATOR.split(text or "")]
    candidates = [Candidate(label="", text=b, digest=_digest(b.encode())) for b in blocks if b]
    for path in image_paths or []:
        path = str(getattr(path, "name", path))
        name = Path(path).name
        try:
            data = Path(path).read_bytes()
            with Image.open(io.BytesIO(data)) as probe:
                if probe.width * probe.height > MAX_IMAGE_PIXELS:
                    raise PlaygroundError(f"Image '{name}' is too large ({probe.width}×{probe.height} pixels).")
                probe.load()
        except PlaygroundError:
            raise
        except UnidentifiedImageError as exc:
            raise PlaygroundError(f"Could not read image '{name}': it is not an image file this app can decode.") from exc
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise PlaygroundError(f"Could not read image '{name}': {exc}.") from exc
        # The model gets the file's own bytes, exactly as a client of the API would send them.
        candidates.append(Candidate(label="", image=data, image_name=name, digest=_digest(data)))
    if len(candidates) > MAX_CANDIDATES:
        raise PlaygroundError(f"Too many candidates ({len(candidates)}); the playground takes at most {MAX_CANDIDATES}.")
    for i, candidate in enumerate(candidates, start=1):
        candidate.label = f"C{i}"
    return candidates


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def adapter_field(choice: str | None) -> str | None:
    """UI adapter choice -> the item's `adapter` field (None: leave it to the task routing)."""
    if not choice or choice == AUTO:
        return None
    if choice == NO_ADAPTER:
        return "none"
    return choice


def make_item(task: str, candidate: Candidate | None = None, text: str | None = None,
              adapter: str | None = None, instructions: str | None = None) -> dict:
    item: dict[str, Any] = {"task": task}
    if candidate is not None and candidate.image is not None:
        item["image"] = candidate.image
    else:
        item["text"] = candidate.text if candidate is not None else text
    if adapter is not None:
        item["adapter"] = adapter
    if instructions:
        item["instructions"] = instructions
    return item


def item_key(item: dict, candidate: Candidate | None, multivector: bool, dimensions: int | None) -> str:
    plain = {k: v for k, v in item.items() if k != "image"}
    if "image" in item:
        plain["image"] = candidate.digest if candidate is not None else id(item["image"])
    return json.dumps([plain, multivector, None if multivector else dimensions], sort_keys=True)


class ItemError(PlaygroundError):
    def __init__(self, position: int, message: str):
        super().__init__(message)
        self.position = position
        self.message = message


class CachedEncoder:
    """Encodes each distinct item once (across variants and across runs), in one backend call per run.

    An LRU cache bounded in bytes (multi-vector embeddings of images are large); safe across the
    Gradio worker threads.
    """

    def __init__(self, backend: Backend, max_bytes: int = 256 * 2**20):
        self.backend = backend
        self.max_bytes = max_bytes
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def encode(self, keyed_items: list[tuple[str, dict]], multivector: bool, dimensions: int | None) -> list[np.ndarray]:
        found: dict[str, np.ndarray] = {}
        missing: dict[str, dict] = {}
        with self._lock:
            for key, item in keyed_items:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    found[key] = self._cache[key]
                elif key not in missing:
                    missing[key] = item
        if missing:
            try:
                vectors = self.backend.encode(list(missing.values()), multivector=multivector, dimensions=dimensions)
            except PlaygroundItemError as exc:
                # The backend names the failing item by its index in the batch; map it back to ours.
                if exc.index >= len(missing):
                    raise
                key = list(missing)[exc.index]
                position = next(i for i, (k, _) in enumerate(keyed_items) if k == key)
                raise ItemError(position, exc.message) from exc
            found.update(zip(missing, vectors, strict=True))
            with self._lock:
                for key, vector in zip(missing, vectors, strict=True):
                    if key not in self._cache:
                        self._cache[key] = vector
                        self._bytes += vector.nbytes
                while self._bytes > self.max_bytes and self._cache:
                    self._bytes -= self._cache.popitem(last=False)[1].nbytes
        return [found[key] for key, _ in keyed_items]


def run_comparison(encoder: CachedEncoder, query: str | None, candidates: list[Candidate],
                   variants: list[Variant], settings: Settings) -> Comparison:
    query = (query or "").strip()
    if not query:
        raise PlaygroundError("Enter a query first: the query box is empty.")
    if not candidates:
        raise PlaygroundError("Add at least one candidate: type passages (separated by `---` lines) or upload images.")
    baseline = Variant(name="Baseline (no instructions)", instructions=None, adapter=settings.adapter)
    all_variants = [baseline] + [v for v in variants if (v.instructions or "").strip() or v.adapter != SAME_AS_BASELINE]

    plans = []
    keyed: list[tuple[str, dict]] = []
    for variant in all_variants:
        adapter_choice = settings.adapter if variant.adapter == SAME_AS_BASELINE else variant.adapter
        adapter = adapter_field(adapter_choice)
        instructions = (variant.instructions or "").strip() or None
        q_item = make_item(settings.query_task, text=query, adapter=adapter, instructions=instructions)
        c_items = [
            make_item(settings.passage_task, c, adapter=adapter,
                      instructions=instructions if settings.instruct_candidates else None)
            for c in candidates
        ]
        start = len(keyed)
        keyed.append((item_key(q_item, None, settings.multivector, settings.dimensions), q_item))
        keyed.extend((item_key(it, c, settings.multivector, settings.dimensions), it) for it, c in zip(c_items, candidates, strict=True))
        plans.append((variant, adapter_choice, q_item, c_items, start))

    try:
        vectors = encoder.encode(keyed, settings.multivector, settings.dimensions)
    except ItemError as exc:
        position = exc.position % (len(candidates) + 1)
        what = "the query" if position == 0 else f"candidate {candidates[position - 1].label}"
        raise PlaygroundError(f"Problem with {what}: {exc.message}") from exc

    results = []
    for variant, adapter_choice, q_item, c_items, start in plans:
        q_vec = vectors[start]
        c_vecs = vectors[start + 1 : start + 1 + len(c_items)]
        scores = [score(q_vec, c, settings.multivector) for c in c_vecs]
        results.append(VariantResult(variant, adapter_choice, q_item, c_items, q_vec, c_vecs, scores, ranks(scores)))
    for result in results:
        result.movement = rank_movement(results[0].ranks, result.ranks)
    return Comparison(query=query, candidates=candidates, settings=settings, results=results)


@dataclass
class ScoringComparison:
    """The baseline (no instructions) ranked both ways: pooled cosine and late interaction (MaxSim)."""

    query: str
    candidates: list[Candidate]
    cosine: VariantResult
    maxsim: VariantResult

    @property
    def query_tokens(self) -> int:
        """n_q: the query's multi-vector rows (MaxSim sums one best match per row, so it lies in [-n_q, n_q])."""
        return len(self.maxsim.query_vector)

    @property
    def movement(self) -> list[int]:
        """Positive: the candidate ranks higher by MaxSim than by cosine."""
        return rank_movement(self.cosine.ranks, self.maxsim.ranks)


def compare_scorings(encoder: CachedEncoder, query: str | None, candidates: list[Candidate],
                     settings: Settings) -> ScoringComparison:
    """One query against the candidates under the baseline settings, scored by pooled cosine (at the
    settings' Matryoshka dimension) and by MaxSim, side by side."""
    pooled = run_comparison(encoder, query, candidates, [], replace(settings, multivector=False))
    late = run_comparison(encoder, query, candidates, [], replace(settings, multivector=True))
    return ScoringComparison(pooled.query, candidates, pooled.results[0], late.results[0])


def token_pair(encoder: CachedEncoder, comparison: Comparison, variant_index: int,
               candidate_index: int) -> tuple[VariantResult, np.ndarray, np.ndarray, dict, dict]:
    """Multi-vector embeddings of one query/candidate pair of a comparison (computed if pooled)."""
    result = comparison.results[variant_index]
    candidate = comparison.candidates[candidate_index]
    q_item, c_item = result.query_item, result.candidate_items[candidate_index]
    if comparison.settings.multivector:
        return result, result.query_vector, result.candidate_vectors[candidate_index], q_item, c_item
    keyed = [(item_key(q_item, None, True, None), q_item), (item_key(c_item, candidate, True, None), c_item)]
    q_vec, c_vec = encoder.encode(keyed, True, None)
    return result, q_vec, c_vec, q_item, c_item
