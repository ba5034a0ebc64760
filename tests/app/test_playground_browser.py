"""The playground in a real headless Chromium: in-process model, then against a running `nova serve`.

Each flow loads the page, runs a pre-filled example, checks every variant's ranking and heatmap and that
the scores shown equal `encode()` computed here, ranks the candidates by cosine and MaxSim side by side, switches to multi-vector (MaxSim) and the token view,
uploads an image candidate, and triggers bad input (empty query, unreadable image) to see the message.
"""

from __future__ import annotations

import numpy as np
import pytest

from nova.playground.examples import ASSETS, EXAMPLES

ARTIFACTS = ASSETS.parent / "test-artifacts"


MEDICAL = next(ex for ex in EXAMPLES if ex.name == "Medical")
TIMEOUT = 90_000  # ms; the tiny model on two CPU cores answers in seconds, this is slack


def expected_scores(model, example, instructions, adapter=None, multivector=False, dimensions=None, images=()):
    """What the page must show, from the public API: model.encode() and cosine / MaxSim."""
    extra = {"adapter": adapter} if adapter else {}
    query = {"task": example.query_task, "text": example.query, **extra}
    if instructions:
        query["instructions"] = instructions
    items = [query] + [{"task": example.passage_task, "text": t, **extra} for t in example.candidates]
    items += [{"task": example.passage_task, "image": path.read_bytes(), **extra} for path in images]
    out = model.encode(items, return_multivector=multivector, dimensions=None if multivector else dimensions)
    vectors = [v.numpy().astype(np.float64) for v in out]
    q, cands = vectors[0], vectors[1:]
    if multivector:
        return [float((q @ c.T).max(axis=1).sum()) for c in cands]
    return [float(q @ c) for c in cands]


def choose(page, elem_id, option):
    """Pick an option of a Gradio dropdown."""
    page.click(f"#{elem_id} input")
    page.locator(f"#{elem_id}").get_by_role("option", name=option, exact=True).click()
    assert page.input_value(f"#{elem_id} input") == option


def shown_rows(page, slot):
    rows = page.locator(f"#nova-ranking-{slot} tr.nova-row")
    out = {}
    for i in range(rows.count()):
        row = rows.nth(i)
        out[row.get_attribute("data-candidate")] = {
            "score": float(row.get_attribute("data-score")),
            "shown": float(row.locator("td.nova-score").inner_text()),
            "rank": int(row.get_attribute("data-rank")),
            "movement": int(row.get_attribute("data-movement")),
            "text": row.inner_text(),
        }
    return out


def wait_status(page, text):
    page.locator("#nova-status").get_by_text(text).wait_for(timeout=TIMEOUT)


def check_panels(page, model, example, multivector=False, images=(), atol=1e-4, adapters=(), dimensions=None):
    variants = [None] + [v for v in example.variants if v]
    adapters = list(adapters) + [None] * (len(variants) - len(adapters))
    n = len(example.candidates) + len(images)
    baseline_ranks = None
    for slot, instructions in enumerate(variants):
        expected = expected_scores(model, example, instructions, adapters[slot], multivector, dimensions, images)
        rows = shown_rows(page, slot)
        assert len(rows) == n, f"panel {slot}: {len(rows)} rows"
        heatmap = page.locator(f"#nova-heatmap-{slot} img")
        heatmap.wait_for(timeout=TIMEOUT)
        assert heatmap.evaluate("img => img.complete && img.naturalWidth > 100"), f"panel {slot}: no heatmap image"
        ranks = {}
        for i, score in enumerate(expected):
            row = rows[f"C{i + 1}"]
            assert row["score"] == pytest.approx(score, abs=atol), (slot, i, row, score)
            assert row["shown"] == pytest.approx(score, abs=max(atol, 5e-5) + 5e-5)
            ranks[f"C{i + 1}"] = row["rank"]
        # the rank shown is the position of the expected score: 1 + the candidates scoring clearly higher,
        # at most n - the candidates scoring clearly lower (scores closer than the tolerance may go either way)
        assert sorted(ranks.values()) == list(range(1, n + 1)), (slot, ranks)
        for i, mine in enumerate(expected):
            higher = sum(other > mine + 2 * atol for other in expected)
            lower = sum(other < mine - 2 * atol for other in expected)
            assert higher + 1 <= ranks[f"C{i + 1}"] <= n - lower, (slot, i, ranks, expected)
        if slot == 0:
            baseline_ranks = ranks
            page.locator("#nova-panel-0").get_by_text("Baseline: no instructions").wait_for()
        else:
            for key, row in rows.items():
                assert row["movement"] == baseline_ranks[key] - row["rank"]
            assert page.locator(f"#nova-panel-{slot}").get_by_text(instructions).count() >= 1
    assert not page.locator("#nova-panel-4").count()


def playground_flow(page, url, model, tag, atol):
    page.goto(url)
    page.locator("#nova-run").wait_for(timeout=TIMEOUT)
    banner = page.locator("#nova-banner")
    banner.get_by_text("Random weights").wait_for(timeout=TIMEOUT)

    # 1. a pre-filled example, one click
    page.click("#nova-example-1")
    wait_status(page, f"Compared {len(MEDICAL.candidates)} candidates under 4 settings (cosine")
    check_panels(page, model, MEDICAL, atol=atol)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"playground-{tag}.png"), full_page=True)

    # 1b. the same candidates ranked by pooled cosine and by late interaction (MaxSim), side by side
    page.click("#nova-scorings-accordion")
    page.click("#nova-scorings-run")
    rows = page.locator("#nova-scorings tr.nova-row")
    rows.first.wait_for(timeout=TIMEOUT)
    assert rows.count() == len(MEDICAL.candidates)
    for kind, multivector in (("maxsim", True), ("cosine", False)):
        expected = expected_scores(model, MEDICAL, None, multivector=multivector)
        shown = {rows.nth(i).get_attribute("data-candidate"): float(rows.nth(i).get_attribute(f"data-{kind}"))
                 for i in range(rows.count())}
        assert [shown[f"C{i + 1}"] for i in range(len(expected))] == pytest.approx(expected, abs=max(atol, 1e-3))

    # 2. adapters: variant B on the base model (no adapter), variant C on an adapter loaded at run time
    #    (a copy of the code adapter, under a new name), and a matryoshka dimension when one is offered
    page.click("#nova-adapters-accordion")
    page.fill("#nova-lora-name input, #nova-lora-name textarea", "probe")  # outside the adapter root: refused
    page.fill("#nova-lora-path input, #nova-lora-path textarea", "/etc")
    page.click("#nova-lora-load")
    wait_status(page, "must be inside")
    page.fill("#nova-lora-name input, #nova-lora-name textarea", "runtime-code")
    page.fill("#nova-lora-path input, #nova-lora-path textarea", str(model.list_adapters()["code"]["path"]))
    page.click("#nova-lora-load")
    wait_status(page, "Loaded adapter")
    choose(page, "nova-variant-adapter-1", "none (base model)")
    choose(page, "nova-variant-adapter-2", "runtime-code")
    page.click("#nova-dimension input")
    options = page.locator("#nova-dimension").get_by_role("option")
    options.first.wait_for()
    dims = [o.replace("✓", "").strip() for o in options.all_inner_texts()]
    dimension = next((d for d in dims if d.isdigit()), None)
    options.filter(has_text=dimension or "full").first.click()
    assert page.input_value("#nova-dimension input") == (dimension or "full")
    page.click("#nova-run")
    page.locator("#nova-panel-3").get_by_text("runtime-code").wait_for(timeout=TIMEOUT)
    wait_status(page, f"(cosine, {dimension or 'full'} dimensions)")
    settings = {"adapters": (None, None, "none", "code"), "dimensions": int(dimension) if dimension else None}
    check_panels(page, model, MEDICAL, atol=atol, **settings)

    # 3. multi-vector scoring (MaxSim) and the token view
    page.locator("#nova-scoring").get_by_text("multi-vector (MaxSim)").click()
    page.click("#nova-run")
    wait_status(page, "(MaxSim)")
    check_panels(page, model, MEDICAL, multivector=True, atol=max(atol, 1e-3), **settings)
    view = page.locator("#nova-token-view .nova-tokens")
    view.wait_for(timeout=TIMEOUT)
    top = [k for k, r in shown_rows(page, 1).items() if r["rank"] == 1][0]
    assert float(view.get_attribute("data-maxsim")) == pytest.approx(shown_rows(page, 1)[top]["score"], abs=1e-3)
    n_query_tokens = view.locator("tr.nova-match").count()
    assert n_query_tokens >= 5
    assert view.locator(".nova-hit").count() >= 1
    page.screenshot(path=str(ARTIFACTS / f"playground-{tag}-maxsim.png"), full_page=True)

    # 4. an uploaded image candidate (pooled again)
    page.locator("#nova-scoring").get_by_text("pooled (cosine)").click()
    chart = ASSETS / "chart_revenue.png"
    page.set_input_files("#nova-images input[type=file]", str(chart))
    page.locator(f'#nova-images a[download="{chart.name}"]').first.wait_for(timeout=TIMEOUT)
    page.click("#nova-run")
    wait_status(page, f"Compared {len(MEDICAL.candidates) + 1} candidates")
    check_panels(page, model, MEDICAL, images=[chart], atol=atol, **settings)
    image_row = shown_rows(page, 0)[f"C{len(MEDICAL.candidates) + 1}"]
    assert chart.name in image_row["text"]

    # 5. bad input: an empty query, then an unreadable image
    page.fill("#nova-query textarea", "")
    page.click("#nova-run")
    wait_status(page, "the query box is empty")
    assert not page.locator("#nova-panel-0").is_visible()
    page.fill("#nova-query textarea", MEDICAL.query)
    broken = ARTIFACTS / "broken-image.png"
    broken.write_bytes(b"this is not a PNG")
    page.set_input_files("#nova-images input[type=file]", str(broken))
    page.locator(f'#nova-images a[download="{broken.name}"]').first.wait_for(timeout=TIMEOUT)
    page.click("#nova-run")
    wait_status(page, "Could not read image")
    page.screenshot(path=str(ARTIFACTS / f"playground-{tag}-error.png"), full_page=True)
    assert "Traceback" not in page.content()

    # 6. what the playground loaded, it can unload: the adapter leaves the menus
    page.fill("#nova-lora-name input, #nova-lora-name textarea", "runtime-code")
    page.click("#nova-lora-unload")
    wait_status(page, "Unloaded adapter")
    page.click("#nova-adapter input")
    options = page.locator("#nova-adapter").get_by_role("option")
    options.first.wait_for()
    shown = [o.replace("✓", "").strip() for o in options.all_inner_texts()]
    assert "code" in shown and "runtime-code" not in shown, shown
    page.keyboard.press("Escape")
    assert page.outside_requests == [], f"the page reached outside loopback: {page.outside_requests}"


def test_playground_in_process(page, app_url, tiny_model):
    playground_flow(page, app_url, tiny_model, "inprocess", atol=1e-4)


def test_playground_against_nova_serve(page, app_server_url, tiny_model):
    # the server batches rows with other rows: equal within float tolerance
    playground_flow(page, app_server_url, tiny_model, "server", atol=1e-3)
