"""BEIR-layout datasets: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.

Every problem is reported as a :class:`UserInputError` naming the file and, for line-oriented files,
the 1-based line number, so that ``nova eval`` can print one clear message instead of a traceback.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserInputError


@dataclass(frozen=True)
class Document:
    id: str
    title: str = ""
    text: str = ""
    image: str | None = None  # absolute path, resolved against the dataset folder

    def content(self) -> str:
        """Text that is embedded for the passage: BEIR's convention, title and text joined by a space."""
        return f"{self.title} {self.text}".strip() if self.title else self.text


@dataclass(frozen=True)
class Query:
    id: str
    text: str = ""
    image: str | None = None


@dataclass
class BeirDataset:
    path: Path
    split: str
    corpus: dict[str, Document]
    queries: dict[str, Query]  # only the queries that the split judges, in file order
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> relevance (> 0 only)
    skipped_queries: list[str] = field(default_factory=list)  # judged, but no relevant document

    @property
    def name(self) -> str:
        return self.path.name

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "name": self.name,
            "split": self.split,
            "num_corpus": len(self.corpus),
            "num_queries": len(self.queries),
            "num_qrels": sum(len(v) for v in self.qrels.values()),
            "skipped_queries_without_relevant_docs": len(self.skipped_queries),
        }


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line; malformed lines raise with their number."""
    try:
        handle = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise UserInputError(f"{path}: file not found") from None
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserInputError(f"{path} line {number}: malformed JSON: {exc.msg} (column {exc.colno})") from None
                if not isinstance(obj, dict):
                    raise UserInputError(f"{path} line {number}: expected a JSON object, got {type(obj).__name__}")
                yield number, obj
        except UnicodeDecodeError as exc:
            raise UserInputError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _string_field(path: Path, number: int, obj: dict, key: str, required: bool) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise UserInputError(f"{path} line {number}: missing required field '{key}'")
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key == "_id":
        value = str(value)
    if not isinstance(value, str):
        raise UserInputError(f"{path} line {number}: field '{key}' must be a string, got {type(value).__name__}")
    if key == "_id" and (not value or any(ch.isspace() for ch in value)):
        raise UserInputError(f"{path} line {number}: _id {value!r} must be non-empty without whitespace (TREC run files)")
    return value


def _image_field(root: Path, path: Path, number: int, obj: dict) -> str | None:
    image = _string_field(path, number, obj, "image", required=False)
    if not image:
        return None
    resolved = (root / image).resolve() if not Path(image).is_absolute() else Path(image)
    if not resolved.is_file():
        raise UserInputError(f"{path} line {number}: image file not found: {image}")
    return str(resolved)


def _records(path: Path):
    """(line number, object, _id) for each JSONL record, refusing a repeated _id with both line numbers."""
    first_line: dict[str, int] = {}
    for number, obj in iter_jsonl(path):
        record_id = _string_field(path, number, obj, "_id", required=True)
        if record_id in first_line:
            raise UserInputError(f"{path} line {number}: duplicate _id '{record_id}' (first on line {first_line[record_id]})")
        first_line[record_id] = number
        yield number, obj, record_id


def load_corpus(path: Path) -> dict[str, Document]:
    corpus: dict[str, Document] = {}
    for number, obj, doc_id in _records(path):
        title = _string_field(path, number, obj, "title", required=False) or ""
        text = _string_field(path, number, obj, "text", required=False) or ""
        image = _image_field(path.parent, path, number, obj)
        if not (title or text or image):
            raise UserInputError(f"{path} line {number}: document '{doc_id}' has no title, text or image")
        corpus[doc_id] = Document(doc_id, title, text, image)
    if not corpus:
        raise UserInputError(f"{path}: the corpus is empty")
    return corpus


def load_queries(path: Path) -> dict[str, Query]:
    queries: dict[str, Query] = {}
    for number, obj, query_id in _records(path):
        text = _string_field(path, number, obj, "text", required=False) or ""
        image = _image_field(path.parent, path, number, obj)
        if not (text or image):
            raise UserInputError(f"{path} line {number}: query '{query_id}' has no text or image")
        queries[query_id] = Query(query_id, text, image)
    if not queries:
        raise UserInputError(f"{path}: there are no queries")
    return queries


def load_qrels(path: Path, corpus: dict[str, Document], queries: dict[str, Query]) -> dict[str, dict[str, int]]:
    """Read a BEIR qrels TSV (``query-id  corpus-id  score``, optional header); ids must exist."""
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.tsv")) if path.parent.is_dir() else []
        hint = f" (available splits: {', '.join(available)})" if available else ""
        raise UserInputError(f"{path}: file not found{hint}")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if not row or not any(cell.strip() for cell in row):
                continue
            if number == 1 and row[0].strip().lower() in {"query-id", "query_id", "qid", "query"}:
                continue
            if len(row) == 4:  # TREC qrels: qid iteration docid rel
                row = [row[0], row[2], row[3]]
            if len(row) != 3:
                raise UserInputError(
                    f"{path} line {number}: expected 3 tab-separated columns (query-id, corpus-id, score), got {len(row)}"
                )
            query_id, doc_id, score = (cell.strip() for cell in row)
            try:
                relevance = int(float(score))
            except ValueError:
                raise UserInputError(f"{path} line {number}: score must be a number, got '{score}'") from None
            if query_id not in queries:
                raise UserInputError(f"{path} line {number}: query id '{query_id}' is not in queries.jsonl")
            if doc_id not in corpus:
                raise UserInputError(f"{path} line {number}: corpus id '{doc_id}' is not in corpus.jsonl")
            qrels.setdefault(query_id, {})[doc_id] = relevance
    if not qrels:
        raise UserInputError(f"{path}: no relevance judgements")
    return qrels


def load_beir(path: str | Path, split: str = "test") -> BeirDataset:
    root = Path(path)
    if not root.exists():
        raise UserInputError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise UserInputError(f"dataset path is not a folder: {root}")
    corpus = load_corpus(root / "corpus.jsonl")
    all_queries = load_queries(root / "queries.jsonl")
    qrels = load_qrels(root / "qrels" / f"{split}.tsv", corpus, all_queries)
    positive = {qid: {d: r for d, r in docs.items() if r > 0} for qid, docs in qrels.items()}
    skipped = [qid for qid, docs in positive.items() if not docs]
    positive = {qid: docs for qid, docs in positive.items() if docs}
    if not positive:
        raise UserInputError(f"{root / 'qrels' / (split + '.tsv')}: no query has a relevant document (score > 0)")
    queries = {qid: q for qid, q in all_queries.items() if qid in positive}
    return BeirDataset(root.resolve(), split, corpus, queries, positive, skipped)


def write_beir(
    path: str | Path,
    corpus: list[dict],
    queries: list[dict],
    qrels: dict[str, dict[str, int]],
    split: str = "test",
) -> Path:
    """Write a dataset in BEIR layout (used by the synthetic generator and tests)."""
    root = Path(path)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with (root / "corpus.jsonl").open("w", encoding="utf-8") as handle:
        for doc in corpus:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
    with (root / "queries.jsonl").open("w", encoding="utf-8") as handle:
        for query in queries:
            handle.write(json.dumps(query, ensure_ascii=False) + "\n")
    with (root / "qrels" / f"{split}.tsv").open("w", encoding="utf-8") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for query_id, docs in qrels.items():
            for doc_id, score in docs.items():
                handle.write(f"{query_id}\t{doc_id}\t{score}\n")
    return root
