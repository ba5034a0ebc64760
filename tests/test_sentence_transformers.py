"""The repository is a sentence-transformers model: `SentenceTransformer(<dir>, trust_remote_code=True)` gives
Nova's own vectors, Jina V4's calls run unchanged, and Nova's instructions, adapters and multi-vectors are
reachable."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sentence_transformers")

from sentence_transformers import SentenceTransformer  # noqa: E402

from nova.repo import REMOTE_CODE_FILES, REPO_ROOT  # noqa: E402

TEXTS = ["What is the capital of France?", "Paris is the capital of France.", "a"]
INSTRUCTION = "Given a question, retrieve passages that answer it."


def cosines(got, want) -> list[float]:
    got = torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got
    return [float(torch.nn.functional.cosine_similarity(g.float(), w.float(), dim=0)) for g, w in zip(got, want, strict=True)]


def assert_same(got, want):
    assert len(got) == len(want)
    assert min(cosines(got, want)) >= 0.9999, cosines(got, want)


@pytest.fixture(scope="module")
def st_model(tiny_dir):
    return SentenceTransformer(str(tiny_dir), trust_remote_code=True, device="cpu",
                               model_kwargs={"default_task": "retrieval"})


def test_fresh_process_with_an_empty_modules_cache(tiny_dir, tiny_model, tmp_path, image):
    """The done-when check: a new process, nothing in the modules cache, only the model directory."""
    image_path = tmp_path / "picture.png"
    image.save(image_path)
    script = f"""
import json, sys
import numpy as np
from sentence_transformers import SentenceTransformer
m = SentenceTransformer({str(tiny_dir)!r}, trust_remote_code=True, device="cpu",
                        model_kwargs={{"default_task": "retrieval"}})
assert "nova" not in sys.modules and "serve" not in sys.modules
texts = {TEXTS!r}
out = {{
    "query": m.encode(texts, task="retrieval", prompt_name="query"),
    "passage": m.encode(texts, task="retrieval", prompt_name="passage"),
    "code": m.encode(texts, task="code", prompt_name="passage"),
    "matching": m.encode(texts, task="text-matching"),
    "images": m.encode([{str(image_path)!r}], task="retrieval"),
    "instructed": m.encode(texts, instructions={INSTRUCTION!r}),
    "tokens": m.encode(texts[:1], output_value="token_embeddings", instructions={INSTRUCTION!r})[0].numpy(),
}}
np.savez({str(tmp_path / "vectors.npz")!r}, **out)
"""
    modules = tmp_path / "modules"
    env = {**os.environ, "HF_MODULES_CACHE": str(modules), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    copied = {p.name for p in modules.rglob("*.py") if p.name != "__init__.py"}
    assert copied == set(REMOTE_CODE_FILES)

    got = np.load(tmp_path / "vectors.npz")
    assert_same(got["query"], tiny_model.encode_text(TEXTS, task="retrieval", prompt_name="query"))
    assert_same(got["passage"], tiny_model.encode_text(TEXTS, task="retrieval", prompt_name="passage"))
    assert_same(got["code"], tiny_model.encode_text(TEXTS, task="code", prompt_name="passage"))
    assert_same(got["matching"], tiny_model.encode_text(TEXTS, task="text-matching"))
    assert_same(got["images"], tiny_model.encode_image([image], task="retrieval"))
    instructed = tiny_model.encode([{"text": t, "task": "retrieval.query"} for t in TEXTS], instructions=INSTRUCTION)
    assert_same(got["instructed"], instructed)
    tokens = tiny_model.encode([{"text": TEXTS[0], "task": "retrieval.query"}], instructions=INSTRUCTION,
                               return_multivector=True)[0]
    assert got["tokens"].shape == tuple(tokens.shape)
    assert_same(got["tokens"], tokens)
    # instructions changed the vectors (else the comparison above proves nothing)
    assert max(cosines(got["instructed"], torch.as_tensor(got["query"]))) < 0.9999


def test_jina_v4_calls(st_model, tiny_model, image, tmp_path):
    nova = tiny_model
    assert sorted(st_model.get_model_kwargs()) == ["adapter", "instructions", "task"]
    assert st_model.get_embedding_dimension() == nova.config.text_config.hidden_size
    # numpy by default, a tensor on request
    vectors = st_model.encode(TEXTS, task="retrieval", prompt_name="query")
    assert isinstance(vectors, np.ndarray) and vectors.shape == (3, nova.config.text_config.hidden_size)
    tensor = st_model.encode(TEXTS, task="retrieval", prompt_name="query", convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and torch.allclose(tensor, torch.as_tensor(vectors), atol=1e-6)
    single = st_model.encode(TEXTS[0], task="retrieval", prompt_name="query")
    assert single.shape == (nova.config.text_config.hidden_size,)
    # no task: model_kwargs' default_task; no prompt_name: the query side (encode_text's default)
    assert_same(st_model.encode(TEXTS), nova.encode_text(TEXTS, task="retrieval"))
    # truncate_dim + normalize_embeddings = Nova's matryoshka vector, values included
    small = st_model.encode(TEXTS, task="code", prompt_name="query", truncate_dim=32, normalize_embeddings=True)
    want = nova.encode_text(TEXTS, task="code", truncate_dim=32)
    assert small.shape == (3, 32) and np.allclose(small, torch.stack(want).numpy(), atol=1e-5)
    # images: PIL and paths, alone or mixed with text in one call
    path = tmp_path / "img.png"
    image.save(path)
    mixed = st_model.encode([image, TEXTS[0], str(path)], task="retrieval")
    assert_same(mixed[[0, 2]], nova.encode_image([image, image], task="retrieval"))
    assert_same(mixed[[1]], nova.encode_text([TEXTS[0]], task="retrieval"))
    # similarity: cosine, as Jina's config says
    queries = st_model.encode(TEXTS[:1], task="retrieval", prompt_name="query")
    passages = st_model.encode(TEXTS, task="retrieval", prompt_name="passage")
    scores = st_model.similarity(queries, passages)
    assert scores.shape == (1, 3)
    assert torch.allclose(scores[0], torch.as_tensor(passages) @ torch.as_tensor(queries[0]), atol=1e-5)


def test_default_task_from_model_kwargs(tiny_dir, tiny_model):
    code = SentenceTransformer(str(tiny_dir), trust_remote_code=True, device="cpu", model_kwargs={"default_task": "code"})
    assert_same(code.encode(TEXTS, prompt_name="passage"), tiny_model.encode_text(TEXTS, task="code", prompt_name="passage"))
    with pytest.raises(ValueError, match="default_task 'search'"):
        SentenceTransformer(str(tiny_dir), trust_remote_code=True, device="cpu", model_kwargs={"default_task": "search"})


def test_encode_query_and_encode_document(st_model, tiny_model):
    assert_same(st_model.encode_query(TEXTS), tiny_model.encode_text(TEXTS, task="retrieval", prompt_name="query"))
    assert_same(st_model.encode_document(TEXTS), tiny_model.encode_text(TEXTS, task="retrieval", prompt_name="passage"))
    instructed = st_model.encode_query(TEXTS, instructions=INSTRUCTION)
    assert_same(instructed, tiny_model.encode([{"text": t, "task": "retrieval.query"} for t in TEXTS],
                                              instructions=INSTRUCTION))
    document = st_model.encode_document(TEXTS, instructions=INSTRUCTION)
    assert_same(document, tiny_model.encode([{"text": t, "task": "retrieval.passage"} for t in TEXTS],
                                            instructions=INSTRUCTION))
    # the query and passage sides really differ (prompt), so the mapping above is observable
    assert max(cosines(st_model.encode_query(TEXTS), torch.as_tensor(st_model.encode_document(TEXTS)))) < 0.9999


def test_multivector_rows_equal_encode_return_multivector(st_model, tiny_model, image):
    inputs = [TEXTS[0], TEXTS[2], image]
    rows = st_model.encode(inputs, task="retrieval", prompt_name="passage", output_value="token_embeddings",
                           instructions=INSTRUCTION)
    items = [{"text": TEXTS[0]}, {"text": TEXTS[2]}, {"image": image}]
    want = tiny_model.encode([{**i, "task": "retrieval.passage"} for i in items], instructions=INSTRUCTION,
                             return_multivector=True)
    for got, ref in zip(rows, want, strict=True):
        assert got.shape == ref.shape and got.shape[1] == 128
        assert torch.allclose(got, ref, atol=1e-5)


def test_per_item_adapters_and_nova_items(st_model, tiny_model):
    items = [{"text": TEXTS[0], "adapter": "code"}, {"text": TEXTS[0], "adapter": None},
             {"text": TEXTS[1], "task": "code.passage", "instructions": "Find code."}, TEXTS[1]]
    got = st_model.encode(items, task="retrieval", prompt_name="query", instructions=INSTRUCTION)
    want = tiny_model.encode([
        {"text": TEXTS[0], "task": "retrieval.query", "adapter": "code"},
        {"text": TEXTS[0], "task": "retrieval.query", "adapter": None},
        {"text": TEXTS[1], "task": "code.passage", "instructions": "Find code."},
        {"text": TEXTS[1], "task": "retrieval.query"},
    ], instructions=INSTRUCTION)
    assert_same(got, want)
    assert cosines(got[:1], torch.as_tensor(got[1:2]))[0] < 0.9999  # the adapter mattered
    request_adapter = st_model.encode(TEXTS[:1], adapter="code", instructions=INSTRUCTION)
    assert_same(request_adapter, want[:1])


def test_bad_calls_are_clear_errors(st_model, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'search'"):
        st_model.encode(TEXTS, task="search")
    with pytest.raises(ValueError, match="not one of Nova's trained prompts"):
        st_model.encode(TEXTS, prompt="Represent this: ")
    with pytest.raises(ValueError, match="is the passage side, but the prompt asks for the query side"):
        st_model.encode(TEXTS, task="code.passage", prompt_name="query")
    with pytest.raises(ValueError, match=r"input 'x': unknown adapter 'nope'"):
        st_model.encode(["x"], adapter="nope")
    with pytest.raises(ValueError, match="chat messages are not supported"):
        st_model.encode([[{"role": "user", "content": "hi"}]])
    with pytest.raises(ValueError, match="does not use"):
        st_model.encode(TEXTS, return_multivector=True)
    with pytest.raises(NotImplementedError, match="already is the saved model"):
        st_model.save(str(tmp_path / "never-written"))


def test_truncate_dim_beyond_the_model_is_an_error_everywhere(st_model, tiny_dir, tiny_model):
    """sentence-transformers slices `[..., :truncate_dim]`, which beyond the vectors returns them full-size as if
    truncated: refused instead, naming the sizes, as Nova's own encode refuses `dimensions` beyond them."""
    full = tiny_model.config.text_config.hidden_size
    sizes = ", ".join(str(d) for d in tiny_model.config.matryoshka_dims)
    too_large = f"larger than this model's {full}-d vectors (its trained matryoshka sizes: {sizes})"
    with pytest.raises(ValueError, match=re.escape(too_large)):
        st_model.encode(TEXTS, truncate_dim=full * 2)
    with pytest.raises(ValueError, match=re.escape(too_large)):
        st_model.encode_document(TEXTS, truncate_dim=full + 1)
    with pytest.raises(ValueError, match=re.escape(too_large)), st_model.truncate_embeddings(full * 4):
        st_model.encode(TEXTS)
    with pytest.raises(ValueError, match=re.escape(too_large)):
        SentenceTransformer(str(tiny_dir), trust_remote_code=True, device="cpu", truncate_dim=full * 4)
    with pytest.raises(ValueError, match="truncate_dim must be from 1 to"):
        st_model.encode(TEXTS, truncate_dim=0)
    # every size up to the model's is sentence-transformers' slice, unchanged
    assert st_model.encode(TEXTS, truncate_dim=full).shape == (3, full)
    assert np.array_equal(st_model.encode(TEXTS, truncate_dim=20), st_model.encode(TEXTS)[:, :20])
    # and Nova's own calls refuse such sizes too
    for call in (lambda: tiny_model.encode(TEXTS, dimensions=full * 2),
                 lambda: tiny_model.encode_text(TEXTS, truncate_dim=full * 2)):
        with pytest.raises(ValueError, match=rf"one of \[{sizes}\], got {full * 2}: larger than this model's {full}-d"):
            call()


def test_repository_files_agree():
    """modules.json points at the module; the ST prompts are the routing's trained prompts."""
    modules = json.loads((REPO_ROOT / "modules.json").read_text())
    assert modules == [{"idx": 0, "name": "nova", "path": "",
                        "type": "sentence_transformers_nova_embeddings_v1.NovaEmbeddingsV1STModule"}]
    config = json.loads((REPO_ROOT / "config_sentence_transformers.json").read_text())
    routing = json.loads((REPO_ROOT / "config.json").read_text())["task_routing"]
    assert config["prompts"] == {"query": routing["retrieval.query"]["prompt"],
                                 "passage": routing["retrieval.passage"]["prompt"],
                                 "document": routing["retrieval.passage"]["prompt"]}
    assert config["similarity_fn_name"] == "cosine" and config["default_prompt_name"] is None


def test_a_converted_jina_directory_loads_in_sentence_transformers(tiny_model, tmp_path):
    from nova.cli import main
    from nova.tiny import write_checkpoint

    jina_dir = write_checkpoint(tmp_path / "jina", layout="jina")
    assert main(["convert", str(jina_dir), str(tmp_path / "nova")]) == 0
    model = SentenceTransformer(str(tmp_path / "nova"), trust_remote_code=True, device="cpu")
    assert_same(model.encode(TEXTS, task="code", prompt_name="passage"),
                tiny_model.encode_text(TEXTS, task="code", prompt_name="passage"))


def test_a_float16_row_that_overflows_is_an_error_naming_it(tiny_dir, float16_overflow_adapter):
    """In float16, a row whose activations pass 65504 is a loud error naming that input, never a NaN vector;
    the same call without it gives finite vectors."""
    model = SentenceTransformer(str(tiny_dir), trust_remote_code=True, device="cpu",
                                model_kwargs={"default_task": "retrieval", "dtype": torch.float16})
    model[0].model.load_adapter("loud", str(float16_overflow_adapter))
    fine = model.encode([TEXTS[0], {"text": TEXTS[1], "adapter": "code"}], convert_to_tensor=True)
    assert bool(torch.isfinite(fine).all())
    with pytest.raises(ValueError, match=r"input .*the float16 forward gave a non-finite vector \(adapter 'loud'\)"):
        model.encode([TEXTS[0], {"text": "an overflowing row", "adapter": "loud"}])
