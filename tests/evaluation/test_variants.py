"""Variant definitions from files and flags; unknown keys are rejected with a clear message."""

from __future__ import annotations

import json

import pytest

from nova.evaluation.errors import UserInputError
from nova.evaluation.variants import Variant, build_variants, load_variants_file


def test_yaml_file(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text(
        "baseline: plain\n"
        "variants:\n"
        "  - name: plain\n"
        "  - name: q-instr\n"
        "    query_instructions: Find the answer.\n"
        "  - name: both\n"
        "    instructions: Domain is geography.\n"
        "  - name: code\n"
        "    task: code\n"
        "  - name: symmetric\n"
        "    task: text-matching\n"
        "    adapter: none\n"
        "  - name: mv\n"
        "    multivector: true\n"
        "  - name: d32\n"
        "    dimensions: 32\n"
    )
    variants, baseline = load_variants_file(path)
    by_name = {v.name: v for v in variants}
    assert baseline == "plain"
    assert by_name["plain"] == Variant(name="plain")
    assert by_name["q-instr"].query_instructions == "Find the answer." and by_name["q-instr"].passage_instructions is None
    assert by_name["both"].query_instructions == by_name["both"].passage_instructions == "Domain is geography."
    assert (by_name["code"].query_task, by_name["code"].passage_task) == ("code.query", "code.passage")
    assert (by_name["symmetric"].query_task, by_name["symmetric"].passage_task) == ("text-matching", "text-matching")
    assert by_name["symmetric"].query_adapter == "none"
    assert by_name["mv"].multivector and by_name["d32"].dimensions == 32
    # passage-side settings decide corpus sharing: query-only changes share the corpus
    assert by_name["plain"].passage_settings() == by_name["q-instr"].passage_settings() == by_name["d32"].passage_settings()
    assert by_name["plain"].passage_settings() != by_name["both"].passage_settings()


def test_json_file_and_list_form(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps([{"name": "a"}, {"name": "b", "query_adapter": "retrieval"}]))
    variants, baseline = load_variants_file(path)
    assert [v.name for v in variants] == ["a", "b"] and baseline is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("variants:\n  - name: a\n    instuctions: typo\n", r"variant 1 \('a'\): unknown key 'instuctions' \(known keys: name, "),
        ("variants:\n  - name: a\n  - name: b\n    colour: red\n    size: 3\n", r"variant 2 \('b'\): unknown keys 'colour', 'size'"),
        ("variant:\n  - name: a\n", r"unknown top-level key 'variant'"),
        ("variants:\n  - instructions: x\n", r"'name' is required"),
        ("variants:\n  - name: a b\n", r"'name' is required and must be"),
        ("variants:\n  - name: a\n    dimensions: -3\n", r"'dimensions' must be a positive integer"),
        ("variants:\n  - name: a\n    multivector: yes please\n", r"'multivector' must be true or false"),
        ("variants:\n  - name: a\n    multivector: true\n    dimensions: 64\n", r"multi-vectors are always 128-d"),
        ("variants: []\n", r"'variants' must be a non-empty list"),
        ("variants:\n  - name: a\n   bad: indent\n", r"line \d+: malformed YAML"),
        ("variants:\n  - name: a\n  - name: a\n", r"duplicate variant name: a"),
        ("baseline: zzz\nvariants:\n  - name: a\n", r"baseline 'zzz' is not one of the variants"),
    ],
)
def test_bad_variant_files(tmp_path, text, message):
    path = tmp_path / "v.yaml"
    path.write_text(text)
    with pytest.raises(UserInputError, match=message):
        build_variants(file=str(path))


def test_missing_variants_file(tmp_path):
    with pytest.raises(UserInputError, match="variants file not found"):
        build_variants(file=str(tmp_path / "nope.yaml"))


def test_command_line_variants():
    variants, baseline = build_variants(
        instructions=["Find it.", "Retrieve."], adapters=["none", "code"], dimensions=[32], multivector=True,
        tasks=["text-matching"],
    )
    assert baseline == "baseline"
    assert [v.name for v in variants] == ["baseline", "instructions-1", "instructions-2", "adapter-none", "adapter-code",
                                          "task-text-matching", "dim-32", "multivector"]
    assert variants[1].query_instructions == "Find it." and variants[1].passage_instructions is None
    passage, _ = build_variants(instructions=["Doc."], instructions_for="passage")
    assert passage[1].passage_instructions == "Doc." and passage[1].query_instructions is None


def test_command_line_defaults_apply_to_every_variant():
    variants, _ = build_variants(instructions=["x"], task="code", adapter="none")
    assert all(v.query_task == "code.query" and v.query_adapter == "none" for v in variants)


def test_unknown_key_through_cli(small_dataset, tmp_path, run_cli):
    path = tmp_path / "v.yaml"
    path.write_text("variants:\n  - name: a\n    instruction: typo\n")
    code, _, err = run_cli("eval", small_dataset, "--variants", path, "--out", tmp_path / "out")
    assert code == 2 and "Traceback" not in err
    assert "unknown key 'instruction'" in err and err.count("\n") == 1
