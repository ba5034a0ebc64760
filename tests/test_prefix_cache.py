"""The instruction prefix cache: exact, LoRA-aware, one forward per batch, bounded, invalidated."""

import pickle
import shutil

import pytest
import torch

from nova.op_count import count_ops


def mixed(image, make_image):
    """Text, image and text+image rows; two instructions, none, and per-row adapters (three + base)."""
    legal, chart = "Retrieve legal precedents for this question", "Represent the chart for retrieval"
    return [
        {"text": "contract termination clause", "instructions": legal},
        {"text": "a longer query about breach of contract and damages", "instructions": legal, "adapter": "code"},
        {"text": "the same instruction, the base model", "instructions": legal, "adapter": None},
        {"text": "no instruction at all"},
        {"text": "text matching under an instruction", "task": "text-matching", "instructions": chart},
        {"image": image, "instructions": chart},
        {"image": make_image(60, 90, seed=3), "text": "sales chart", "task": "retrieval.passage", "instructions": legal},
        {"image": make_image(50, 50, seed=5), "adapter": "code"},
    ]


def encode_both(model, items):
    return (model.encode(items, batch_size=len(items)),
            model.encode(items, batch_size=len(items), return_multivector=True))


def assert_exact(got, want):
    for a, b in zip(got[0], want[0], strict=True):
        assert float(a @ b) >= 0.99999
    for a, b in zip(got[1], want[1], strict=True):
        assert a.shape == b.shape
        assert float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()) >= 0.99999


@pytest.fixture
def model(fresh_model):
    fresh_model.prefix_cache.configure(64 << 20)
    return fresh_model


def uncached(model, items):
    budget = model.prefix_cache.max_bytes
    model.prefix_cache.configure(0)
    try:
        return encode_both(model, items)
    finally:
        model.prefix_cache.configure(budget)


def test_cached_equals_uncached_and_rows_continue_after_the_prefix(model, image, make_image):
    items = mixed(image, make_image)
    want = uncached(model, items)
    cold = encode_both(model, items)
    warm = encode_both(model, items)
    assert_exact(cold, want)
    assert_exact(warm, want)
    stats = model.prefix_cache.stats()
    # distinct (prefix ids, adapter): text rows' prefixes end with the user-turn opener, image rows' do not:
    # legal-text x {retrieval, code, base}, chart-text x text-matching, chart-image and legal-image x retrieval
    assert stats["entries"] == 6 and stats["misses"] == 6 and stats["hits"] >= 18
    # positions continue: a row without its prefix starts at position prefix_len
    row = model.processor.prepare_item(items[0])
    batch = model.processor.collate([row], drop_prefix=True)
    assert batch.input_ids[0, 0].item() == row.input_ids[row.prefix_len]
    assert model.rope_positions(batch)[:, 0, 0].tolist() == [row.prefix_len] * 3
    # and the instruction still matters (through attention only): not the no-instruction vector
    plain = model.encode([{"text": "contract termination clause"}])[0]
    assert float(plain @ warm[0][0]) < 0.9999


def test_rows_unpacked_from_columns_share_the_cache_and_the_vectors(model, image, make_image):
    """A server's model process gets its rows unpacked from columns (numpy token fields): they find the prefixes
    rows from `prepare_item` stored, and their vectors are those rows' vectors, bit for bit."""
    processor = model.processor
    rows = [processor.prepare_item(item, index=i) for i, item in enumerate(mixed(image, make_image))]
    unpacked = pickle.loads(pickle.dumps(processor.pack(rows), protocol=pickle.HIGHEST_PROTOCOL)).unpack()
    wants = [i % 2 == 1 for i in range(len(rows))]  # pooled and multi-vector rows
    want = model.embed_prepared(rows, wants)
    before = model.prefix_cache.stats()
    got = model.embed_prepared(unpacked, wants)
    after = model.prefix_cache.stats()
    assert (after["entries"], after["misses"]) == (before["entries"], before["misses"]) == (6, 6)
    assert after["hits"] > before["hits"]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_one_backbone_forward_per_batch_with_mixed_rows(model, image, make_image):
    items = mixed(image, make_image)
    calls = []
    original = model.model.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["inputs_embeds"].shape[0])
        return original(*args, **kwargs)

    model.model.forward = counting
    model.encode(items, batch_size=len(items))
    assert calls == [6, len(items)]  # cold: the six missing prefixes together, then the batch
    calls.clear()
    model.encode(items, batch_size=len(items))
    assert calls == [len(items)]  # warm: one forward for rows with two instructions, none, four adapters


def test_lru_is_bounded_by_bytes_and_counts_evictions(model):
    model.encode([{"text": "q", "instructions": "first instruction"}])
    one_entry = model.prefix_cache.stats()["bytes"]
    assert one_entry > 0
    model.prefix_cache.configure(one_entry + one_entry // 2)  # room for one
    texts = ["second instruction", "third instruction", "first instruction"]
    for text in texts:
        model.encode([{"text": "q", "instructions": text}])
    stats = model.prefix_cache.stats()
    assert stats["entries"] == 1 and stats["bytes"] <= stats["max_bytes"] and stats["evictions"] == 3
    model.prefix_cache.configure(0)
    assert model.prefix_cache.stats()["entries"] == 0 and not model.prefix_cache.enabled
    model.encode([{"text": "q", "instructions": "first instruction"}])
    assert model.prefix_cache.stats()["entries"] == 0


def test_unloading_or_replacing_an_adapter_invalidates_its_prefixes(model, tiny_dir, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_dir / "adapters" / "code", folder)
    model.load_adapter("custom", str(folder))
    item = {"text": "q", "instructions": "Find code", "adapter": "custom"}
    before = model.encode([item, {"text": "q", "instructions": "Find code"}])
    assert model.prefix_cache.stats()["entries"] == 2
    model.unload_adapter("custom")
    assert model.prefix_cache.stats()["entries"] == 1  # the base-adapter prefix stays
    # same name, different weights: must not reuse the old prefix
    model.load_adapter("custom", str(tiny_dir / "adapters" / "text-matching"))
    after = model.encode([item])[0]
    want = uncached(model, [item])[0][0]
    assert float(after @ want) >= 0.99999 and float(after @ before[0]) < 0.9999


def test_dtype_move_and_weight_change_invalidate(model):
    item = {"text": "q", "instructions": "Find code"}
    model.encode([item])
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)  # an in-place change of a weight
    got = model.encode([item])[0]
    assert float(got @ uncached(model, [item])[0][0]) >= 0.99999
    model.to(torch.bfloat16)
    bf16 = model.encode([item])[0]
    assert model.prefix_cache.stats()["entries"] == 1  # only the bf16 entry
    assert float(bf16 @ uncached(model, [item])[0][0]) >= 0.999


def _assign_parameter(model, weight):
    model.model.layers[0].self_attn.k_proj.weight = torch.nn.Parameter(weight)


def _assign_data(model, weight):
    model.model.layers[0].self_attn.k_proj.weight.data = weight


def _load_assigned(model, weight):
    model.model.layers[0].self_attn.k_proj.load_state_dict({"weight": weight}, strict=False, assign=True)


@pytest.mark.parametrize("replace", [_assign_parameter, _assign_data, _load_assigned])
def test_a_replaced_weight_invalidates(model, replace):
    """A weight replaced by a new tensor (not edited in place) drops the prefixes computed with the old one."""
    item = {"text": "q", "instructions": "Find code"}
    before = model.encode([item])[0]
    with torch.no_grad():
        replace(model, model.model.layers[0].self_attn.k_proj.weight * 1.5)
    got = model.encode([item])[0]
    assert float(got @ before) < 0.99999  # the change shows in the vector
    assert float(got @ uncached(model, [item])[0][0]) >= 0.99999


def test_a_first_weight_swapped_in_without_registering_invalidates(model):
    """accelerate's loading helpers put tensors straight into `module._parameters` (no registration hook):
    the watch still notices when that tensor is the module's first."""
    item = {"text": "q", "instructions": "Find code"}
    before = model.encode([item])[0]
    embed = model.model.embed_tokens
    with torch.no_grad():
        embed._parameters["weight"] = torch.nn.Parameter(embed.weight * 1.5)
    got = model.encode([item])[0]
    assert float(got @ before) < 0.99999
    assert float(got @ uncached(model, [item])[0][0]) >= 0.99999


def test_the_weights_watch_keeps_its_list_across_batches(model, image):
    """Forwards register no parameter, buffer or module, so the staleness checks read the kept list of tensors
    rather than walk the module tree again on every batch."""
    items = [{"text": "q", "instructions": "Find code", "adapter": "code"}, {"text": "plain"}, {"image": image}]
    model.encode(items)
    kept = model.backbone_watch.tensors(model.model), model.adapters_watch.tensors(model.lora)
    for multivector in (False, True, False):
        model.encode(items, return_multivector=multivector)
    assert model.backbone_watch.tensors(model.model) is kept[0] and model.adapters_watch.tensors(model.lora) is kept[1]


def test_training_forward_bypasses_the_cache(model):
    rows = [model.processor.prepare_item({"text": "q", "instructions": "Find code"})]
    with torch.enable_grad():
        pooled, _, _ = model.forward_rows(rows)
    assert pooled.grad_fn is not None  # the full sequence ran with autograd, not the cached inference path
    assert model.prefix_cache.stats()["misses"] == 0


def test_server_uses_the_cache_and_exports_its_counters(serve_process, tiny_dir, tmp_path):
    import httpx

    server = serve_process(tiny_dir, tmp_path, extra=("--prefix-cache-mb", "8"))
    try:
        item = {"text": "contract termination clause", "instructions": "Retrieve legal precedents"}
        first = server.embed([item, dict(item, text="another query")])
        again = server.embed([item])
        assert float(first[0] @ again[0]) >= 0.99999
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("nova_prefix_cache_")}
        assert values["nova_prefix_cache_hits_total"] >= 1 and values["nova_prefix_cache_entries"] == 1
        assert 0 < values["nova_prefix_cache_bytes"] <= 8 << 20
    finally:
        server.stop()
    off = serve_process(tiny_dir, tmp_path, extra=("--prefix-cache-mb", "0"))
    try:
        assert float(off.embed([item])[0] @ again[0]) >= 0.99999
        metrics = httpx.get(off.url + "/metrics", timeout=10).text
        assert "nova_prefix_cache_entries 0.0" in metrics
    finally:
        off.stop()


def test_cached_prefixes_cost_operations_per_distinct_prefix_not_per_row(model):
    """On a GPU a forward of short rows is bound by kernel launches, so serving a cached prefix must not add
    operations per row (it once copied each row's prefix into place: 2 x rows x layers copies, which made a
    batch with one shared instruction slower with the cache than without on an H100). Counted, not timed."""
    def ops(n_rows, instructions):
        items = [{"text": f"query number {i} " * (1 + i % 3), "task": "retrieval.query",
                  **({"instructions": instructions[i % len(instructions)]} if instructions else {})}
                 for i in range(n_rows)]
        model.encode(items, batch_size=n_rows)  # fills the cache
        return sum(count_ops(lambda: model.encode(items, batch_size=n_rows)).values())

    per_row_plain = ops(16, None) - ops(4, None)  # what 12 more rows cost anyway (results split per row)
    assert ops(16, ["Find the passage"]) - ops(4, ["Find the passage"]) <= per_row_plain
    two = ["Find the passage", "Retrieve code for this"]
    assert ops(16, two) - ops(4, two) <= per_row_plain
