"""Training data: JSONL triplets, one object per line.

    {"query": "how do I ...", "positive": "You can ...", "negatives": ["...", "..."]}
    {"query": {"text": "a red car"}, "positive": {"image": "images/car.jpg"}, "instructions": "..."}

- ``query``, ``positive``: a string (text) or an object with ``text`` and/or ``image`` (a path relative to
  the JSONL file) and optionally ``instructions`` (overrides the line's instructions for that item).
- ``negatives``: optional list of hard negatives in the same form.
- ``instructions`` (both sides), ``query_instructions``, ``passage_instructions``: optional strings,
  the same keys as an evaluation variant.
- ``id`` and ``meta`` are allowed and ignored; any other key is an error (typos must not be silent).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from nova.evaluation.dataset import iter_jsonl
from nova.evaluation.errors import UserInputError

LINE_KEYS = {"query", "positive", "negatives", "instructions", "query_instructions", "passage_instructions", "id", "meta"}
ITEM_KEYS = {"text", "image", "instructions"}
HINTS = {"negative": "negatives", "pos": "positive", "neg": "negatives", "positives": "positive", "anchor": "query"}


@dataclass
class Triplet:
    line: int
    query: dict
    positive: dict
    negatives: list[dict] = field(default_factory=list)


def _item(path: Path, line: int, where: str, value, instructions: str | None, task: str) -> dict:
    if isinstance(value, str):
        if not value.strip():
            raise UserInputError(f"{path} line {line}: '{where}' is an empty string")
        item: dict = {"text": value}
    elif isinstance(value, dict):
        unknown = sorted(set(value) - ITEM_KEYS)
        if unknown:
            raise UserInputError(f"{path} line {line}: '{where}' has unknown key(s) {unknown}; allowed: {sorted(ITEM_KEYS)}")
        item = {}
        text = value.get("text")
        if text is not None:
            if not isinstance(text, str):
                raise UserInputError(f"{path} line {line}: '{where}.text' must be a string")
            item["text"] = text
        image = value.get("image")
        if image is not None:
            if not isinstance(image, str) or not image:
                raise UserInputError(f"{path} line {line}: '{where}.image' must be a file path")
            resolved = Path(image) if Path(image).is_absolute() else (path.parent / image)
            if not resolved.is_file():
                raise UserInputError(f"{path} line {line}: '{where}' image not found: {image}")
            item["image"] = str(resolved.resolve())
        if not item:
            raise UserInputError(f"{path} line {line}: '{where}' needs 'text' and/or 'image'")
        own = value.get("instructions")
        if own is not None:
            if not isinstance(own, str):
                raise UserInputError(f"{path} line {line}: '{where}.instructions' must be a string")
            instructions = own or None
    else:
        raise UserInputError(f"{path} line {line}: '{where}' must be a string or an object with text/image, "
                             f"got {type(value).__name__}")
    item["task"] = task
    item["adapter"] = "none"  # training runs the base weights plus the adapter being trained
    if instructions:
        item["instructions"] = instructions
    return item


def _instructions(path: Path, line: int, obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserInputError(f"{path} line {line}: '{key}' must be a string")
    return value.strip() or None


def load_triplets(path: str | Path, query_task: str = "retrieval.query", passage_task: str = "retrieval.passage",
                  max_negatives: int | None = None) -> list[Triplet]:
    path = Path(path)
    triplets: list[Triplet] = []
    for line, obj in iter_jsonl(path):
        unknown = sorted(set(obj) - LINE_KEYS)
        if unknown:
            hint = "".join(f" (did you mean '{HINTS[k]}'?)" for k in unknown if k in HINTS)
            raise UserInputError(f"{path} line {line}: unknown key(s) {unknown}{hint}; allowed: {sorted(LINE_KEYS)}")
        for key in ("query", "positive"):
            if key not in obj:
                raise UserInputError(f"{path} line {line}: missing required key '{key}'")
        both = _instructions(path, line, obj, "instructions")
        q_instr = _instructions(path, line, obj, "query_instructions") or both
        p_instr = _instructions(path, line, obj, "passage_instructions") or both
        negatives = obj.get("negatives") or []
        if isinstance(negatives, (str, dict)):
            negatives = [negatives]
        if not isinstance(negatives, list):
            raise UserInputError(f"{path} line {line}: 'negatives' must be a list")
        if max_negatives is not None:
            negatives = negatives[:max_negatives]
        triplets.append(Triplet(
            line=line,
            query=_item(path, line, "query", obj["query"], q_instr, query_task),
            positive=_item(path, line, "positive", obj["positive"], p_instr, passage_task),
            negatives=[_item(path, line, f"negatives[{i}]", n, p_instr, passage_task) for i, n in enumerate(negatives)],
        ))
    if not triplets:
        raise UserInputError(f"{path}: no training examples")
    return triplets


def item_key(item: dict) -> tuple:
    """Identity of a passage, to mask false negatives (the same passage as another row's positive)."""
    return (item.get("text"), item.get("image"), item.get("instructions"))


@dataclass
class BatchOrder:
    """Which triplets form contrastive batch number `index`: a function of the seed and the index alone (the
    epoch's shuffle), never of the number of processes, so a run resumes on any number of them."""

    count: int
    batch_size: int
    seed: int

    @property
    def per_epoch(self) -> int:
        return max(1, self.count // self.batch_size) if self.count >= self.batch_size else 1

    def indices(self, index: int) -> list[int]:
        if self.count < self.batch_size:
            return list(range(self.count))
        epoch, position = divmod(index, self.per_epoch)
        order = list(range(self.count))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order[position * self.batch_size : (position + 1) * self.batch_size]
