"""Nothing in a request body is ignored: a field no request form has is a 400 in OpenAI's error shape naming it
(with "did you mean" for a near miss of Nova's own fields), on /v1/embeddings and the admin routes; what
OpenAI's SDK and Jina's API send is still accepted, with unchanged vectors; `dimensions` beyond the model's
size is refused naming the sizes; /openapi.json documents exactly the fields each route accepts."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
from serve_helpers import assert_close, assert_error, b64_png, decode_embedding, reference

ADMIN = {"Authorization": "Bearer admin-key"}


@pytest.fixture(scope="module")
def server(start_server, lora_root):
    return start_server(served_model_name=["nova-test"], enable_lora=True, lora_root=str(lora_root),
                        admin_api_key="admin-key", max_wait_ms=5)


def post(server, payload, path="/v1/embeddings", headers=None) -> httpx.Response:
    return httpx.post(server.url + path, json=payload, headers=headers, timeout=60)


TYPOS = [
    # (payload, param, the near miss named, or None)
    ({"input": "x", "instruction": "Find passages."}, "instruction", "instructions"),
    ({"input": "x", "dimension": 32}, "dimension", "dimensions"),
    ({"input": "x", "Dimensions": 32}, "Dimensions", "dimensions"),
    ({"input": "x", "encoding": "float"}, "encoding", "encoding_format"),
    ({"input": "x", "return_multivectors": True}, "return_multivectors", "return_multivector"),
    ({"input": "x", "colour": "blue"}, "colour", None),
    ({"input": ["ok", {"txt": "typo"}]}, "input[1].txt", "text"),
    ({"input": [{"text": "x", "instruction": "Find passages."}]}, "input[0].instruction", "instructions"),
    ({"input": [{"text": "x", "adaptor": "code"}]}, "input[0].adaptor", "adapter"),
]


@pytest.mark.parametrize("payload,param,near", TYPOS, ids=[t[1] for t in TYPOS])
def test_an_unknown_field_is_a_400_naming_it(server, tiny_model, payload, param, near):
    err = assert_error(post(server, payload), 400, "unknown_field", param)
    assert err["type"] == "invalid_request_error"
    field = param.rsplit(".", 1)[-1]
    assert f"unknown field '{field}'" in err["message"], err
    if near is None:
        assert "did you mean" not in err["message"], err
    else:
        assert f"did you mean '{near}'?" in err["message"], err
    response = post(server, {"input": ["still fine"]})
    assert response.status_code == 200
    assert_close(decode_embedding(response.json()["data"][0]), reference(tiny_model, {"task": "retrieval",
                                                                                     "text": "still fine"}))


def test_several_unknown_fields_are_all_named(server):
    err = assert_error(post(server, {"input": "x", "dimension": 32, "instruction": "y"}), 400, "unknown_field",
                       "dimension")
    assert "'dimension' (did you mean 'dimensions'?)" in err["message"]
    assert "'instruction' (did you mean 'instructions'?)" in err["message"]


def test_the_openai_sdk_sends_only_accepted_fields(server, tiny_model):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    result = client.embeddings.create(model="nova-test", input=["hello world"], dimensions=32,
                                      encoding_format="float", user="someone")
    assert_close(np.asarray(result.data[0].embedding, dtype=np.float32),
                 reference(tiny_model, {"task": "retrieval", "text": "hello world"}, dimensions=32))
    # Nova's own fields travel in extra_body; a typo there is refused, not ignored
    instructed = client.embeddings.create(model="nova-test", input=["hello world"],
                                          extra_body={"instructions": "Find greetings."})
    assert_close(np.asarray(instructed.data[0].embedding, dtype=np.float32),
                 reference(tiny_model, {"task": "retrieval", "text": "hello world"}, instructions="Find greetings."))
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="nova-test", input=["hello world"], extra_body={"instruction": "Find."})
    assert info.value.body["param"] == "instruction"
    assert "did you mean 'instructions'?" in info.value.body["message"]


def test_every_jina_api_field_is_accepted_with_unchanged_vectors(server, tiny_model):
    payload = {"model": "nova-test", "task": "retrieval.passage", "dimensions": 32, "late_chunking": False,
               "embedding_type": "float", "truncate": True, "normalized": True, "return_multivector": False,
               "input": [{"text": "a passage about cats"}, "a plain string"]}
    response = post(server, payload)
    assert response.status_code == 200, response.text
    for entry, text in zip(response.json()["data"], ["a passage about cats", "a plain string"], strict=True):
        assert_close(decode_embedding(entry), reference(tiny_model, {"task": "retrieval.passage", "text": text},
                                                        dimensions=32))


def test_what_the_server_cannot_do_is_refused_not_ignored(server):
    err = assert_error(post(server, {"input": "x", "normalized": False}), 400, None, "normalized")
    assert "always L2-normalized" in err["message"]
    assert_error(post(server, {"input": "x", "normalized": "yes"}), 400, None, "normalized")
    assert_error(post(server, {"input": "x", "late_chunking": True}), 400, None, "late_chunking")


def test_dimensions_beyond_the_model_name_the_sizes(server, tiny_model):
    sizes = tiny_model.config.matryoshka_dims
    full = tiny_model.config.text_config.hidden_size
    for dimensions in (full + 1, 2 * full, 4096):
        err = assert_error(post(server, {"input": "x", "dimensions": dimensions}), 400, None, "dimensions")
        assert f"one of {sizes}" in err["message"] and f"larger than this model's {full}-d vectors" in err["message"]
    assert len(decode_embedding(post(server, {"input": "x", "dimensions": full}).json()["data"][0])) == full


def test_admin_routes_refuse_unknown_fields(server, lora_root):
    err = assert_error(post(server, {"lora_nmae": "mine", "lora_path": "mine"}, "/v1/internal/lora/load", ADMIN),
                       400, "unknown_field", "lora_nmae")
    assert "did you mean 'lora_name'?" in err["message"]
    err = assert_error(post(server, {"lora_name": "mine", "path": "mine"}, "/v1/internal/lora/load", ADMIN),
                       400, "unknown_field", "path")
    assert "did you mean 'lora_path'?" in err["message"]
    assert "mine" not in [a["lora_name"] for a in httpx.get(server.url + "/v1/internal/lora", headers=ADMIN).json()
                          ["data"]]
    response = post(server, {"lora_name": "mine", "lora_path": "mine"}, "/v1/internal/lora/load", ADMIN)
    assert response.status_code == 200, response.text
    err = assert_error(post(server, {"lora_name": "mine", "lora_path": "mine"}, "/v1/internal/lora/unload", ADMIN),
                       400, "unknown_field", "lora_path")
    assert "accepted fields: lora_name" in err["message"]
    assert post(server, {"lora_name": "mine"}, "/v1/internal/lora/unload", ADMIN).status_code == 200


# ------------------------------------------------------------------ /openapi.json against what the parsers do

SCHEMA_REFS = "#/components/schemas/"


def resolve(doc: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].removeprefix(SCHEMA_REFS)]
    return schema


def conforms(doc: dict, value, schema: dict) -> bool:
    """`value` against the JSON-schema keywords the document uses (type, enum, const, oneOf, items, sizes)."""
    schema = resolve(doc, schema)
    if "oneOf" in schema:
        return sum(conforms(doc, value, option) for option in schema["oneOf"]) == 1
    if "const" in schema and value != schema["const"]:
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    kinds = {"string": str, "boolean": bool, "integer": int, "number": (int, float), "array": list, "object": dict,
             "null": type(None)}
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if types and not any(isinstance(value, kinds[t]) and not (t in ("integer", "number") and isinstance(value, bool))
                         for t in types):
        return False
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            return False
        return all(conforms(doc, v, schema["items"]) for v in value) if "items" in schema else True
    if isinstance(value, dict) and "properties" in schema:
        return all(k in schema["properties"] and conforms(doc, v, schema["properties"][k]) for k, v in value.items())
    return True


def request_schemas(doc: dict) -> dict[str, dict]:
    """Each POST route's request body schema, and the item schema inside /v1/embeddings' `input`."""
    found = {path: resolve(doc, ops["post"]["requestBody"]["content"]["application/json"]["schema"])
             for path, ops in doc["paths"].items() if "post" in ops}
    refs = [o for o in found["/v1/embeddings"]["properties"]["input"]["oneOf"] if "$ref" in o]
    found["item"] = resolve(doc, refs[0])
    return found


def accepted_fields(server, route: str) -> set[str]:
    """The fields a route's parser accepts, as its refusal of an unknown field lists them."""
    path, payload, headers = ("/v1/embeddings", {"input": [{"text": "x", "zz_probe": 1}]}, None) if route == "item" \
        else (route, {"zz_probe": 1}, ADMIN)
    err = assert_error(post(server, payload, path, headers), 400, "unknown_field")
    return set(err["message"].split("accepted fields: ", 1)[1].split(", "))


def field_examples(hidden: int) -> dict[str, dict]:
    """A value of every documented field, per route (the admin routes' load what they unload)."""
    return {
        "/v1/embeddings": {
            "input": "x", "model": "nova-test", "encoding_format": "base64", "dimensions": 32, "user": "someone",
            "task": "retrieval.query", "embedding_type": "base64", "truncate": True, "late_chunking": False,
            "normalized": True, "return_multivector": True, "instructions": "Find it.", "prompt_set": "descriptive",
        },
        "item": {
            "text": "x", "image": b64_png(seed=5), "task": "code.query", "adapter": "code",
            "instructions": "Find code.", "image_embeds": [[0.01] * hidden], "image_grid_thw": [1, 2, 2],
        },
        "/v1/rerank": {"model": "nova-test", "query": "x", "documents": ["a", {"text": "b"}], "top_n": 1,
                       "return_documents": True, "task": "code", "instructions": "Find code.", "adapter": "code",
                       "scoring": "cosine", "normalize": True, "truncate": True},
        "/v2/rerank": {"model": "nova-test", "query": "x", "documents": ["a", {"text": "b"}], "top_n": 1,
                       "return_documents": True, "task": "code", "instructions": "Find code.", "adapter": "code",
                       "scoring": "cosine", "normalize": True, "truncate": True},
        "/v1/internal/lora/load": {"lora_name": "docs-example", "lora_path": "mine"},
        "/v1/internal/lora/unload": {"lora_name": "docs-example"},
    }


COMPANIONS = {"image_embeds": "image_grid_thw", "image_grid_thw": "image_embeds"}  # one needs the other


def example_requests(route: str, examples: dict) -> list[tuple[str, dict]]:
    """(path, body) pairs that send every documented field of `route`: on /v1/embeddings and in its items one
    field at a time beside the required ones; the admin routes' bodies whole (every field is required)."""
    fields = examples[route]
    if route == "item":
        return [("/v1/embeddings", {"input": [{**({COMPANIONS[name]: fields[COMPANIONS[name]]} if name in COMPANIONS
                                                   else {"text": "x"}), name: value}]})
                for name, value in fields.items()]
    if route == "/v1/embeddings":
        return [(route, {"input": "x", name: value}) for name, value in fields.items()]
    return [(route, fields)]


def test_the_openapi_document_matches_what_the_parsers_accept(server, tiny_model):
    """/openapi.json is checked against the server's behaviour, not against the dicts it is built from: each
    route's documented fields are exactly the ones its parser accepts (as its unknown-field refusal lists
    them), bodies refuse other fields, and a value of each documented field, conforming to the documented
    schema, is accepted (the admin routes' examples load and unload an adapter)."""
    doc = httpx.get(server.url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    schemas = request_schemas(doc)
    hidden = tiny_model.config.text_config.hidden_size
    examples = field_examples(hidden)
    assert set(schemas) == set(examples)  # a new route with a body needs its examples here
    for route in examples:  # in order: the load route's example loads what the unload route's unloads
        schema = schemas[route]
        assert schema["additionalProperties"] is False, route
        documented = set(schema["properties"])
        assert documented == accepted_fields(server, route), route
        assert set(examples[route]) == documented, route
        assert set(schema.get("required", [])) <= documented, route
        for field, value in examples[route].items():
            assert conforms(doc, value, schema["properties"][field]), (route, field, value)
        for path, body in example_requests(route, examples):
            response = post(server, body, path, None if path == "/v1/embeddings" else ADMIN)
            assert response.status_code == 200, (route, body, response.text[:300])
    assert "docs-example" not in [a["lora_name"] for a in
                                  httpx.get(server.url + "/v1/internal/lora", headers=ADMIN).json()["data"]]


