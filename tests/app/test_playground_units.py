"""Playground logic without a browser: scoring, candidates, the comparison, backend errors, the CLI."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pytest

from nova.playground.backends import Backend, PlaygroundError, PlaygroundItemError, ServerBackend
from nova.playground.compare import (
    NO_ADAPTER,
    CachedEncoder,
    Settings,
    Variant,
    parse_candidates,
    run_comparison,
)
from nova.playground.scoring import best_matches, maxsim, movement_label, rank_movement, ranks


class FakeBackend(Backend):
    """Deterministic vectors from the item's text/instructions/adapter; records what it was asked."""

    def __init__(self):
        self.calls = []

    def encode(self, items, *, multivector, dimensions):
        self.calls.append(list(items))
        out = []
        for i, item in enumerate(items):
            if item.get("text") == "BROKEN":
                raise PlaygroundItemError(i, "text is broken")
            key = repr((item.get("text"), item.get("instructions"), item.get("adapter"), item.get("image")))
            rng = np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
            v = rng.standard_normal((3, 8) if multivector else 8)
            out.append(v / np.linalg.norm(v, axis=-1, keepdims=True))
        return out

    def list_adapters(self):
        return ["retrieval"]


def test_scoring():
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    d = np.array([[0.6, 0.8], [1.0, 0.0]])
    assert maxsim(q, d) == pytest.approx(1.0 + 0.8)
    assert [(m.candidate_index, round(m.similarity, 3)) for m in best_matches(q, d)] == [(1, 1.0), (0, 0.8)]
    assert ranks([0.1, 0.9, 0.5]) == [3, 1, 2]
    assert rank_movement([3, 1, 2], [1, 2, 3]) == [2, -1, -1]
    assert [movement_label(x) for x in (2, -1, 0)] == ["▲2", "▼1", "="]


def test_parse_candidates(tmp_path):
    png = tmp_path / "ok.png"
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(png)
    cands = parse_candidates("first\n---\n\ndef f():\n\n    return 1\n-----\n", [str(png)])
    assert [c.label for c in cands] == ["C1", "C2", "C3"]
    assert cands[1].text == "def f():\n\n    return 1"
    assert cands[2].image == png.read_bytes() and cands[2].image_name == "ok.png"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(PlaygroundError, match="Could not read image 'bad.png'"):
        parse_candidates("x", [str(bad)])


def test_comparison_encodes_each_item_once_and_names_bad_items():
    backend = FakeBackend()
    encoder = CachedEncoder(backend)
    cands = parse_candidates("a\n---\nb\n---\nc", None)
    variants = [Variant("Variant A", "be legal"), Variant("Variant B", "", NO_ADAPTER), Variant("Variant C", "")]
    comparison = run_comparison(encoder, "query", cands, variants, Settings())
    assert [r.variant.name for r in comparison.results][1:] == ["Variant A", "Variant B"]  # C is off
    # baseline: 1+3; A: its query only (candidates carry no instructions); B: adapter none, 1+3
    assert len(backend.calls) == 1 and len(backend.calls[0]) == 4 + 1 + 4
    assert comparison.results[1].candidate_items[0] == {"task": "retrieval.passage", "text": "a"}
    assert comparison.results[1].query_item["instructions"] == "be legal"
    assert comparison.results[2].query_item["adapter"] == "none"
    # scores, ranks and rank movement, recomputed here from the vectors the backend returned
    baseline_ranks = None
    for result in comparison.results:
        q = result.query_vector
        scores = [float(q @ c) for c in result.candidate_vectors]
        assert result.scores == pytest.approx(scores, abs=1e-12)
        want_ranks = [1 + sum(other > mine for other in scores) for mine in scores]
        assert result.ranks == want_ranks
        baseline_ranks = baseline_ranks or want_ranks
        assert result.movement == [before - now for before, now in zip(baseline_ranks, want_ranks, strict=True)]
    assert any(any(result.movement) for result in comparison.results[1:])  # something did move
    run_comparison(encoder, "query", cands, variants, Settings())
    assert len(backend.calls) == 1  # cached
    with pytest.raises(PlaygroundError, match="Problem with candidate C2: text is broken"):
        run_comparison(encoder, "query", parse_candidates("a\n---\nBROKEN", None), [], Settings())
    with pytest.raises(PlaygroundError, match="query box is empty"):
        run_comparison(encoder, "  ", cands, [], Settings())
    with pytest.raises(PlaygroundError, match="at least one candidate"):
        run_comparison(encoder, "q", [], [], Settings())


def test_unreachable_server_is_a_message():
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = ServerBackend(f"http://127.0.0.1:{port}", timeout=2.0)
    assert backend.refresh().startswith("Cannot reach the embedding server")
    with pytest.raises(PlaygroundError, match="Cannot reach the embedding server"):
        backend.encode([{"text": "x"}], multivector=False, dimensions=None)


def test_cli_arguments(monkeypatch):
    import app

    monkeypatch.setenv("NOVA_PLAYGROUND_SERVER", "http://127.0.0.1:9")
    parser = argparse.ArgumentParser()
    app.add_arguments(parser)
    args = parser.parse_args(["--port", "7999"])
    assert args.server == "http://127.0.0.1:9" and args.port == 7999 and args.model is None
    from nova.cli import build_parser

    args = build_parser("playground").parse_args(["playground", "some/model", "--host", "0.0.0.0"])
    assert args.model == "some/model" and args.host == "0.0.0.0"


def test_in_process_backend_runtime_adapter_and_token_labels(fresh_model):
    from nova.playground.backends import InProcessBackend

    path = Path(fresh_model.list_adapters()["code"]["path"])
    closed = InProcessBackend(fresh_model)  # no --adapter-root: run-time loading is off (a public Space)
    assert not closed.can_load_adapters
    with pytest.raises(PlaygroundError, match="off: start the playground with --adapter-root"):
        closed.load_adapter("my-code", str(path))
    assert "my-code" not in fresh_model.list_adapters()

    backend = InProcessBackend(fresh_model, adapter_root=str(path.parent))
    assert backend.random_weights
    assert backend.dimension_choices()[-1] == backend.full_dim()
    backend.load_adapter("my-code", str(path / "adapter_model.safetensors"))  # the weights file names its folder
    try:
        assert "my-code" in backend.list_adapters()
        a, b = backend.encode([{"task": "retrieval.query", "text": "x", "adapter": "my-code"},
                               {"task": "retrieval.query", "text": "x", "adapter": "code"}],
                              multivector=False, dimensions=None)
        assert np.allclose(a, b, atol=1e-5)
        with pytest.raises(PlaygroundError, match="only adapters loaded here can be unloaded"):
            backend.unload_adapter("code")  # the checkpoint's own task adapter stays
    finally:
        backend.unload_adapter("my-code")
    assert "my-code" not in fresh_model.list_adapters() and "code" in fresh_model.list_adapters()
    for bad_path, message in [("/etc", "must be inside --adapter-root"), ("../..", "must be inside --adapter-root"),
                              ("nonexistent", "does not exist")]:
        with pytest.raises(PlaygroundError, match=message):
            backend.load_adapter("bad", bad_path)
    with pytest.raises(PlaygroundError, match="lora_name"):
        backend.load_adapter("none", "code")
    assert "bad" not in fresh_model.list_adapters()

    item = {"task": "retrieval.query", "text": "hello world", "instructions": "be brief"}
    rows = backend.encode([item], multivector=True, dimensions=None)[0]
    labels = backend.token_labels(item, len(rows))
    assert "".join(labels) == "Query: hello world"  # the item's own tokens: no user-turn markup
    # the rendering a server-backed playground uses gives the same tokens as the processor
    assert Backend.token_labels(backend, item, len(rows)) == labels
    plain = {"task": "retrieval.passage", "text": "hello world"}
    rows = backend.encode([plain], multivector=True, dimensions=None)[0]
    assert "".join(backend.token_labels(plain, len(rows))) == "Passage: hello world"


def test_token_view_draws_image_patches_as_a_grid():
    import io

    from PIL import Image

    from nova.playground import views
    from nova.playground.scoring import Match

    assert views._grid_shape(12, 4 / 3) == (3, 4)
    assert views._grid_shape(7, 1.0) in ((1, 7), (7, 1))
    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), "blue").save(buffer, format="PNG")
    labels = ["<|vision_start|>"] + [views.IMAGE_PAD] * 12 + ["<|vision_end|>", "Describe"]
    matches = [Match(0, 5, 0.9), Match(1, 13, 0.5)]
    page = views.token_view_html(["a", "b"], labels, matches, "C1", 1.4, image_bytes=buffer.getvalue())
    assert "grid-template-columns:repeat(4,1fr);grid-template-rows:repeat(3,1fr)" in page
    assert page.count('class="nova-patch nova-hit"') == 1 and "patch 4:" in page
    assert "&lt;|image_pad|&gt;</span>" not in page  # the patches are cells, not 12 text tokens


def test_server_backend_takes_its_routing_from_the_server(serve_url, tiny_model):
    """The playground keeps no task table of its own: against `nova serve` the prompts come from /v1/models."""
    backend = ServerBackend(serve_url, api_key="test-key")  # the key tests/app/conftest.py starts it with
    routing = tiny_model.config.task_routing
    assert backend.task_prompts == {task: route["prompt"] for task, route in routing.items()}
    assert backend.tasks() == list(routing)
    assert not backend.can_load_adapters  # no admin key: run-time loading is off
    with pytest.raises(PlaygroundError, match="off"):
        backend.load_adapter("x", "code")
    item = {"task": "code.passage", "text": "def f(): pass"}
    rows = backend.encode([item], multivector=True, dimensions=None)[0]
    assert "".join(backend.token_labels(item, len(rows))) == "Passage: def f(): pass"


def test_late_interaction_and_cosine_side_by_side_equal_model_rerank(tiny_model):
    """The view's two rankings are `model.rerank()`'s (MaxSim and cosine) on the same query and candidates."""
    import re

    from nova.playground import views
    from nova.playground.backends import InProcessBackend
    from nova.playground.compare import compare_scorings

    texts = ["revenue grew in the third quarter", "a recipe for apple pie", "headcount by team"]
    chart = Path(__file__).resolve().parents[2] / "assets" / "chart_revenue.png"
    candidates = parse_candidates("\n---\n".join(texts), [str(chart)])
    comparison = compare_scorings(CachedEncoder(InProcessBackend(tiny_model)), "revenue by quarter", candidates,
                                  Settings(multivector=False))
    documents = [*texts, {"image": chart.read_bytes()}]
    for result, scoring in ((comparison.maxsim, "maxsim"), (comparison.cosine, "cosine")):
        want = tiny_model.rerank("revenue by quarter", documents, scoring=scoring)
        assert [result.ranks.index(rank) for rank in range(1, len(texts) + 2)] == [r.index for r in want]
        assert [result.scores[r.index] for r in want] == pytest.approx([r.score for r in want], rel=1e-5)
    n_q = len(tiny_model.encode([{"task": "retrieval.query", "text": "revenue by quarter"}], return_multivector=True)[0])
    assert comparison.query_tokens == n_q
    assert comparison.movement == rank_movement(comparison.cosine.ranks, comparison.maxsim.ranks)

    page = views.scorings_html(comparison)
    rows = re.findall(r'data-candidate="(C\d)" data-maxsim-rank="(\d)" data-maxsim="([^"]+)" '
                      r'data-cosine-rank="(\d)" data-cosine="([^"]+)" data-movement="(-?\d)"', page)
    assert [int(r[1]) for r in rows] == [1, 2, 3, 4]  # MaxSim's order
    for label, maxsim_rank, maxsim_score, cosine_rank, cosine_score, movement in rows:
        i = int(label[1:]) - 1
        assert (int(maxsim_rank), int(cosine_rank), int(movement)) == (
            comparison.maxsim.ranks[i], comparison.cosine.ranks[i], comparison.movement[i])
        assert float(maxsim_score) == pytest.approx(comparison.maxsim.scores[i], rel=1e-8)
        assert float(cosine_score) == pytest.approx(comparison.cosine.scores[i], rel=1e-8)
        assert f"{comparison.maxsim.scores[i] / n_q:.4f}" in page
    assert f"MaxSim lies in [-{n_q}, {n_q}]" in page
    with pytest.raises(PlaygroundError, match="the query box is empty"):
        compare_scorings(CachedEncoder(InProcessBackend(tiny_model)), " ", candidates, Settings())
