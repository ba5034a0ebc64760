"""Evaluation variants: what changes between two rows of the results table.

A variant fixes, for each side (queries, passages), the task, the adapter and the instructions, plus
whether scoring uses single vectors (cosine) or multi-vectors (MaxSim), and the output dimensions.

Variant file (YAML or JSON)::

    baseline: no-instructions        # optional; default: the first variant
    variants:
      - name: no-instructions
      - name: short-instruction
        query_instructions: "Given a question, retrieve passages that answer it."
      - name: both-sides
        instructions: "Domain: biomedical literature."   # both queries and passages
      - name: code-adapter
        task: code                   # code.query / code.passage (prompts and default adapter)
      - name: my-adapter
        adapter: my-adapter          # both sides; query_adapter / passage_adapter for one side
      - name: maxsim
        multivector: true
      - name: dim-256
        dimensions: 256

A top-level list is accepted as ``variants``. Unknown keys are rejected with the list of known keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from nova.repo import is_base_model_name

from .errors import Problems, UserInputError

# tasks with distinct query / passage prompts; others (text-matching) are symmetric
SIDED_TASKS = ("retrieval", "code")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}$")
VARIANT_KEYS = {
    "name": "variant name (letters, digits, . _ + = -), used for runs/<name>.trec",
    "instructions": "instructions for queries and passages",
    "query_instructions": "instructions for queries only",
    "passage_instructions": "instructions for passages only",
    "task": "task for both sides (retrieval -> retrieval.query / retrieval.passage)",
    "query_task": "task for queries",
    "passage_task": "task for passages",
    "adapter": "adapter for both sides ('none' = base model without adapter)",
    "query_adapter": "adapter for queries",
    "passage_adapter": "adapter for passages",
    "multivector": "score with multi-vectors (MaxSim) instead of single vectors (cosine)",
    "dimensions": "truncate single vectors to this many dimensions (matryoshka)",
    "description": "free text, copied to results.json",
}
FILE_KEYS = {"variants", "baseline"}


@dataclass(frozen=True)
class Variant:
    name: str
    query_task: str = "retrieval.query"
    passage_task: str = "retrieval.passage"
    query_adapter: str | None = None  # None: the task's adapter; "none": no adapter
    passage_adapter: str | None = None
    query_instructions: str | None = None
    passage_instructions: str | None = None
    multivector: bool = False
    dimensions: int | None = None
    description: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def passage_settings(self) -> dict:
        """What the corpus embeddings depend on (dimensions are applied afterwards, not cached)."""
        return {
            "task": self.passage_task,
            "adapter": self.passage_adapter,
            "instructions": self.passage_instructions,
            "multivector": self.multivector,
        }

    def query_settings(self) -> dict:
        return {
            "task": self.query_task,
            "adapter": self.query_adapter,
            "instructions": self.query_instructions,
            "multivector": self.multivector,
        }


def split_task(task: str) -> tuple[str, str]:
    """``retrieval`` -> (``retrieval.query``, ``retrieval.passage``); a sided or symmetric task is kept."""
    if task in SIDED_TASKS:
        return f"{task}.query", f"{task}.passage"
    return task, task


def _text(where: str, key: str, value, problems: list[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        problems.append(f"{where}: '{key}' must be a string, got {type(value).__name__}")
        return None
    value = value.strip()
    return value or None


def variant_from_dict(data: dict, where: str, defaults: Variant | None = None) -> Variant:
    """One variant; every problem it has is reported together (a UserInputError with one line each)."""
    if not isinstance(data, dict):
        raise UserInputError(f"{where}: a variant must be a mapping of keys to values, got {type(data).__name__}")
    if isinstance(data.get("name"), str):
        where = f"{where} ('{data['name']}')"
    problems: list[str] = []
    unknown = sorted(set(data) - set(VARIANT_KEYS))
    if unknown:
        problems.append(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)} "
            f"(known keys: {', '.join(VARIANT_KEYS)})"
        )
    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        problems.append(
            f"{where}: 'name' is required and must be 1-100 characters of letters, digits, '.', '_', '+', '=', '-' "
            f"(got {name!r})"
        )
        name = "invalid"
    base = defaults or Variant(name=name)
    values: dict = {"name": name}
    if "task" in data:
        task = _text(where, "task", data["task"], problems)
        if task:
            values["query_task"], values["passage_task"] = split_task(task)
    for side in ("query", "passage"):
        key = f"{side}_task"
        if key in data:
            task = _text(where, key, data[key], problems)
            if task:
                values[key] = task
    if "instructions" in data:
        text = _text(where, "instructions", data["instructions"], problems)
        values["query_instructions"] = values["passage_instructions"] = text
    if "adapter" in data:
        adapter = _text(where, "adapter", data["adapter"], problems)
        values["query_adapter"] = values["passage_adapter"] = adapter
    for side in ("query", "passage"):
        for field in ("instructions", "adapter"):
            key = f"{side}_{field}"
            if key in data:
                values[key] = _text(where, key, data[key], problems)
    if "multivector" in data:
        if not isinstance(data["multivector"], bool):
            problems.append(f"{where}: 'multivector' must be true or false")
        else:
            values["multivector"] = data["multivector"]
    if "dimensions" in data and data["dimensions"] is not None:
        dims = data["dimensions"]
        if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
            problems.append(f"{where}: 'dimensions' must be a positive integer, got {dims!r}")
        else:
            values["dimensions"] = dims
    if "description" in data:
        values["description"] = _text(where, "description", data["description"], problems)
    variant = replace(base, **values)
    if variant.multivector and variant.dimensions:
        problems.append(f"{where}: 'dimensions' applies to single vectors; multi-vectors are always 128-d")
    if problems:
        raise UserInputError(*problems)
    return variant


def load_variants_file(path: str | Path, problems: Problems | None = None) -> tuple[list[Variant], str | None]:
    """Parse a YAML or JSON variants file -> (variants, baseline name or None). With `problems`, the problems of
    single variants are added to it and the variants that parsed are returned; without, they are raised together."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"variants file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path} line {exc.lineno}: malformed JSON: {exc.msg}") from None
    else:
        try:
            import yaml
        except ImportError:  # pragma: no cover - pyyaml is in the eval extra
            raise UserInputError(f"{path}: reading YAML needs pyyaml (pip install 'nova-embeddings[eval]')") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise UserInputError(f"{path}{where}: malformed YAML: {getattr(exc, 'problem', None) or exc}") from None
    baseline = None
    if isinstance(data, list):
        entries = data
    elif isinstance(data, dict):
        unknown = sorted(set(data) - FILE_KEYS)
        if unknown:
            raise UserInputError(
                f"{path}: unknown top-level key{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)} "
                f"(known keys: {', '.join(sorted(FILE_KEYS))})"
            )
        entries = data.get("variants")
        baseline = data.get("baseline")
        if baseline is not None and not isinstance(baseline, str):
            raise UserInputError(f"{path}: 'baseline' must be a variant name")
    else:
        raise UserInputError(f"{path}: expected a mapping with 'variants' or a list of variants")
    if not isinstance(entries, list) or not entries:
        raise UserInputError(f"{path}: 'variants' must be a non-empty list")
    collected = problems is not None
    problems = problems if collected else Problems()
    variants = [problems.attempt(variant_from_dict, entry, f"{path}: variant {i + 1}") for i, entry in enumerate(entries)]
    if not collected:
        problems.raise_any()
    return [v for v in variants if v is not None], baseline


def build_variants(
    file: str | None = None,
    instructions: list[str] | None = None,
    instructions_for: str = "query",
    adapters: list[str] | None = None,
    tasks: list[str] | None = None,
    dimensions: list[int] | None = None,
    multivector: bool = False,
    baseline: str | None = None,
    task: str | None = None,
    adapter: str | None = None,
    problems: Problems | None = None,
) -> tuple[list[Variant], str | None]:
    """Variants from a file and/or command-line flags -> (variants, baseline name).

    With `problems`, every problem is added to it and the variants that parsed are returned (so that the caller
    can check them against the model too); without, the problems are raised together.

    Without a file, the first variant is ``baseline`': no instructions, the default task and adapter
    (``task``/``adapter`` override them for every command-line variant). Each flag value adds one variant.
    """
    base_values: dict = {"name": "baseline"}
    if task:
        base_values["task"] = task
    if adapter:
        base_values["adapter"] = adapter
    collected = problems is not None
    problems = problems if collected else Problems()
    template = problems.attempt(variant_from_dict, base_values, "command line")
    if template is None:  # every command-line variant derives from it
        if not collected:
            problems.raise_any()
        return [], None
    variants: list[Variant | None] = []
    file_baseline = None
    if file:
        variants, file_baseline = problems.attempt(load_variants_file, file, problems) or ([], None)
    else:
        variants.append(template)
    if instructions and instructions_for not in ("query", "passage", "both"):
        problems.add("--instructions-for must be query, passage or both")
        instructions = []
    key = "instructions" if instructions_for == "both" else f"{instructions_for}_instructions"
    for i, text in enumerate(instructions or [], start=1):
        variants.append(problems.attempt(variant_from_dict, {"name": f"instructions-{i}", key: text}, "--instructions",
                                         template))
    for name in adapters or []:
        safe = re.sub(r"[^A-Za-z0-9._+=-]", "_", name)
        variants.append(problems.attempt(variant_from_dict, {"name": f"adapter-{safe}", "adapter": name}, "--adapters",
                                         template))
    for name in tasks or []:
        safe = re.sub(r"[^A-Za-z0-9._+=-]", "_", name)
        variants.append(problems.attempt(variant_from_dict, {"name": f"task-{safe}", "task": name}, "--tasks",
                                         template))
    for dims in dimensions or []:
        variants.append(problems.attempt(variant_from_dict, {"name": f"dim-{dims}", "dimensions": dims},
                                         "--dimensions", template))
    if multivector:
        variants.append(problems.attempt(variant_from_dict, {"name": "multivector", "multivector": True},
                                         "--multivector", template))
    parsed = [v for v in variants if v is not None]
    names = [v.name for v in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.add(f"duplicate variant name{'s' if len(duplicates) > 1 else ''}: {', '.join(duplicates)}")
    chosen = baseline or file_baseline or (names[0] if names else None)
    if chosen is not None and chosen not in names and not problems.errors:
        problems.add(f"baseline '{chosen}' is not one of the variants: {', '.join(names)}")
    if not collected:
        problems.raise_any()
    return parsed, chosen


def check_against_model(variants: list[Variant], *, adapters, tasks, dimensions) -> None:
    """Refuse, before any embedding work, variants the model cannot run (unknown adapter, task or size), all of
    them in one error."""
    problems = model_problems(variants, adapters=adapters, tasks=tasks, dimensions=dimensions)
    if problems:
        raise UserInputError(*problems)


def model_problems(variants: list[Variant], *, adapters, tasks, dimensions) -> list[str]:
    """What the model cannot run: unknown tasks and adapters on either side, sizes that are not its own."""
    problems = []
    for v in variants:
        unknown: dict[tuple[str, str], list[str]] = {}  # (kind, name) -> sides, so a shared name is said once
        for side in ("query", "passage"):
            task, adapter = getattr(v, f"{side}_task"), getattr(v, f"{side}_adapter")
            if task not in tasks:
                unknown.setdefault(("task", task), []).append(side)
            if adapter is not None and not is_base_model_name(adapter) and adapter not in adapters:
                unknown.setdefault(("adapter", adapter), []).append(side)
        for (kind, name), sides in unknown.items():
            known = f"known: {', '.join(sorted(tasks))}" if kind == "task" else \
                f"loaded: {', '.join(sorted(adapters)) or 'none'}"
            problems.append(f"variant {v.name!r}: unknown {' and '.join(sides)} {kind} {name!r}; {known}")
        if v.dimensions is not None and v.dimensions not in dimensions:
            problems.append(f"variant {v.name!r}: dimensions {v.dimensions} is not one of the model's "
                            f"matryoshka sizes {sorted(dimensions)}")
    return problems
