"""Error codes are defined once (serve/error_codes.py): no call site spells one as a string, each call's status is
the one the code is defined with, and /openapi.json publishes the table."""

from __future__ import annotations

import ast
import pathlib

from serve import error_codes
from serve.config import Settings
from serve.openapi import document

SERVE = pathlib.Path(__file__).resolve().parents[2] / "serve"
STATUS_CALLS = {"ApiError": 0}  # the status is the call's first positional argument
BAD_REQUEST = {"bad_request"}  # always 400


def _calls():
    for path in sorted(SERVE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                yield path.relative_to(SERVE.parent), node


def _name(call: ast.Call) -> str:
    return call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", "")


def test_no_error_code_is_spelled_as_a_string_at_a_call_site():
    literal = [f"{path}:{call.lineno}" for path, call in _calls() for keyword in call.keywords
               if keyword.arg == "code" and isinstance(keyword.value, ast.Constant)
               and isinstance(keyword.value.value, str)]
    assert not literal, f"error codes written as strings (use serve.error_codes): {literal}"


def test_every_code_used_is_defined_with_the_status_it_is_raised_with():
    wrong = []
    for path, call in _calls():
        code = next((k.value for k in call.keywords if k.arg == "code"), None)
        if not (isinstance(code, ast.Attribute) and isinstance(code.value, ast.Name) and code.value.id == "codes"):
            continue
        value = getattr(error_codes, code.attr)
        assert value in error_codes.ERROR_CODES, f"{path}:{call.lineno}: {code.attr} has no entry in ERROR_CODES"
        defined = error_codes.ERROR_CODES[value].status
        name = _name(call)
        if name in BAD_REQUEST:
            status = 400
        elif name in STATUS_CALLS and call.args and isinstance(call.args[0], ast.Constant):
            status = call.args[0].value
        else:
            status = next((k.value.value for k in call.keywords if k.arg == "status"
                           and isinstance(k.value, ast.Constant)), None)
        if status is not None and status != defined:
            wrong.append(f"{path}:{call.lineno}: {value} raised with {status}, defined with {defined}")
    assert not wrong, "\n".join(wrong)


def test_openapi_publishes_every_code():
    schema = document(Settings())["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
    assert set(schema["enum"]) - {None} == set(error_codes.ERROR_CODES)
