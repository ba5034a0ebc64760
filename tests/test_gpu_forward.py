"""The forward written for a GPU, checked on the CPU: per-row LoRA routing in a fixed number of operations, a
text forward with no host sync or graph break, the CUDA-graph bucket path (its static buffers run eagerly
here), and cached prefixes that follow in-place adapter edits. Operation counts are machine-independent: on a
GPU each non-view operation is a kernel launch."""

import dataclasses

import pytest
import torch

from nova.op_count import count_ops

VIEWS = {"slice", "select", "view", "reshape", "numpy_T", "t", "transpose", "unsqueeze", "squeeze", "expand",
         "permute", "alias", "as_strided", "detach", "unbind", "split", "split_with_sizes", "_unsafe_view"}
TEXTS = ["a short query", "a much longer passage about adapters, padding and routing in one batch", "x = 1",
         "the cat sat on the mat", "where do rivers begin", "def parse(date): return iso(date)"]
ADAPTERS = ["retrieval", "text-matching", "code"]


def batch(adapters):
    return [{"text": TEXTS[i % len(TEXTS)], "adapter": adapters[i % len(adapters)]} for i in range(16)]


def ops(model, items):
    model.encode(items, batch_size=len(items))
    counts = count_ops(lambda: model.encode(items, batch_size=len(items)))
    return sum(counts.values()), sum(n for name, n in counts.items() if name not in VIEWS)


def test_mixed_adapters_cost_a_fixed_number_of_operations(tiny_model):
    """Three adapters mixed cost what one costs (no loop over adapters), at most 1.3x no adapter at all."""
    none = ops(tiny_model, batch([None]))
    one = ops(tiny_model, batch(["retrieval"]))
    three = ops(tiny_model, batch(ADAPTERS))
    mixed_with_base = ops(tiny_model, batch([*ADAPTERS, None]))
    assert one == three == mixed_with_base
    assert three[0] <= 1.3 * none[0] and three[1] <= 1.3 * none[1], (none, three)


def _text_inputs(model, items):
    rows = [model.processor.prepare_item(item, index=i) for i, item in enumerate(items)]
    collated = model.collate_rows(rows)
    batch_ = collated.batch
    attention = model.attention_masks(batch_, model.dtype, model.device)
    slots = torch.tensor(model.lora.slot_indices(collated.adapters))
    return batch_.input_ids, attention, batch_.position_ids, slots


def test_text_forward_with_mixed_adapters_traces_whole(tiny_model):
    """No graph break and no host sync (`.item()`, `.tolist()`, data-dependent shapes) anywhere in the text
    forward: torch.compile(fullgraph=True) refuses any of them."""
    inputs = _text_inputs(tiny_model, [{"text": t, "adapter": a} for t, a in
                                       zip(TEXTS, [*ADAPTERS, None, "code", None], strict=True)])
    torch._dynamo.reset()
    compiled = torch.compile(tiny_model.text_forward, fullgraph=True, backend="eager")
    with torch.inference_mode():
        want_hidden, want_projected = tiny_model.text_forward(*inputs, multivector=True)
        hidden, projected = compiled(*inputs, multivector=True)
    assert torch.equal(hidden, want_hidden) and torch.equal(projected, want_projected)


def test_text_forward_equals_the_routed_forward(tiny_model):
    items = [{"text": t, "adapter": a} for t, a in zip(TEXTS, [*ADAPTERS, None, "code", None], strict=True)]
    rows = [tiny_model.processor.prepare_item(item, index=i) for i, item in enumerate(items)]
    collated = tiny_model.collate_rows(rows)
    with torch.inference_mode():
        want, _ = tiny_model.forward_hidden(collated.batch, collated.adapters, multivector=False)
        got, _ = tiny_model.text_forward(*_text_inputs(tiny_model, items), multivector=False)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.fixture
def bucketed(fresh_model):
    """The CUDA-graph bucket path with its static buffers run eagerly (no capture on a CPU)."""
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device; it is on cpu"):
        fresh_model.configure_cuda_graphs(True)
    fresh_model.configure_cuda_graphs(True, capture=False)
    return fresh_model


def eager(model, fn):
    model.cuda_graphs.configure(enabled=False)
    try:
        return fn()
    finally:
        model.cuda_graphs.configure(enabled=True)


def test_bucket_path_is_exact_for_padded_rows_adapters_and_multivectors(bucketed, image):
    items = [{"text": t, "adapter": a} for t, a in zip(TEXTS[:5], [*ADAPTERS, None, "code"], strict=True)]
    for multivector in (False, True):
        got = bucketed.encode(items, batch_size=5, return_multivector=multivector)
        want = eager(bucketed, lambda multivector=multivector: bucketed.encode(items, batch_size=5,
                                                                               return_multivector=multivector))
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    stats = bucketed.cuda_graphs.stats
    assert stats.captured == 2 and stats.replays == 2  # 5 rows -> the 8-row bucket, pooled and multi-vector
    # a batch with an image runs eagerly, its instructed text row too, untouched by the buckets
    bucketed.encode([{"image": image}, {"text": "q", "instructions": "Find code"}], batch_size=2)
    assert stats.replays == 2


def test_bucket_graphs_follow_adapter_loads_and_in_place_edits(bucketed, tiny_dir):
    item = {"text": "a query routed to an adapter", "adapter": "code"}
    before = bucketed.encode([item])[0]
    bucketed.load_adapter("extra", str(tiny_dir / "adapters" / "retrieval"))  # rebuilds the stacks
    assert torch.allclose(bucketed.encode([item])[0], before, atol=1e-6)
    assert bucketed.cuda_graphs.stats.captured == 2 and len(bucketed.cuda_graphs.buckets) == 1  # dropped, redone
    _, b = bucketed.lora.weights("code")["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        b.mul_(3.0)  # an in-place edit of a resident adapter: the same buffers, so no graph is dropped
    edited = bucketed.encode([item])[0]
    assert float(edited @ before) < 0.99999
    assert torch.allclose(edited, eager(bucketed, lambda: bucketed.encode([item])[0]), atol=1e-6)


def test_bucket_graphs_follow_replaced_weights(bucketed):
    """A weight replaced by a new tensor (not edited in place) drops the graphs that read the old one."""
    item = {"text": "a query routed to an adapter", "adapter": "code"}
    before = bucketed.encode([item])[0]
    layer = bucketed.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.weight = torch.nn.Parameter(layer.weight * 1.5)
    got = bucketed.encode([item])[0]
    assert float(got @ before) < 0.99999
    assert bucketed.cuda_graphs.stats.captured == 2  # dropped and captured again
    assert torch.allclose(got, eager(bucketed, lambda: bucketed.encode([item])[0]), atol=1e-6)


INSTRUCTED = [
    {"text": TEXTS[0], "instructions": "Find Python code", "adapter": "code"},
    {"text": TEXTS[1], "instructions": "Find Python code", "adapter": "retrieval"},
    {"text": TEXTS[2]},  # no prefix in a batch of prefixes
    {"text": TEXTS[3], "instructions": "Given a question, retrieve passages that answer it", "adapter": "code"},
    {"text": TEXTS[4], "instructions": "Find Python code", "adapter": "code"},
]


def prefix_buckets(model):
    return [bucket for bucket in model.cuda_graphs.buckets if bucket.prefix]


def test_bucket_path_is_exact_for_cached_prefixes(bucketed):
    """Batches with cached instruction prefixes go through prefix buckets (the prefix's slots rounded up to a
    multiple of 16) and give the eager forward's vectors, with the cache and without it."""
    shared = [{"text": t, "instructions": "Find Python code", "adapter": "code"} for t in TEXTS[:4]]
    for items in (shared, INSTRUCTED):
        longest = max(len(bucketed.processor.prepare_item(item).prefix_ids) for item in items)
        for multivector in (False, True):
            replays = bucketed.cuda_graphs.stats.replays
            got = bucketed.encode(items, batch_size=len(items), return_multivector=multivector)
            assert bucketed.cuda_graphs.stats.replays == replays + 1
            assert [bucket.prefix for bucket in bucketed.cuda_graphs.buckets] == [16 * -(-longest // 16)]
            want = eager(bucketed, lambda items=items, mv=multivector: bucketed.encode(
                items, batch_size=len(items), return_multivector=mv))
            bucketed.prefix_cache.configure(0)
            uncached = eager(bucketed, lambda items=items, mv=multivector: bucketed.encode(
                items, batch_size=len(items), return_multivector=mv))
            bucketed.prefix_cache.configure(64 << 20)
            for a, b, c in zip(got, want, uncached, strict=True):
                assert a.shape == b.shape == c.shape
                assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)


def test_a_prefix_bucket_never_reads_another_batchs_slots(bucketed):
    """Slots that no row of the batch uses are zeroed: a non-finite value left in the static buffer (a
    previous batch's overflowed prefix, say) cannot reach the rows of the next."""
    bucketed.encode(INSTRUCTED, batch_size=len(INSTRUCTED))
    (bucket,) = prefix_buckets(bucketed)
    bucketed.cuda_graphs._forwards[bucket].prefix_kv.fill_(float("nan"))
    shorter = [dict(item, instructions="Find code") if item.get("instructions") == "Find Python code" else item
               for item in INSTRUCTED]
    got = bucketed.encode(shorter, batch_size=len(shorter))
    assert prefix_buckets(bucketed) == [bucket]  # the same bucket, its buffer reused
    want = eager(bucketed, lambda: bucketed.encode(shorter, batch_size=len(shorter)))
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_prefix_buckets_can_be_left_to_the_eager_forward(bucketed):
    bucketed.cuda_graphs.configure(prefixes=False)
    bucketed.encode(INSTRUCTED, batch_size=len(INSTRUCTED))
    assert bucketed.cuda_graphs.stats.replays == 0 and not bucketed.cuda_graphs.buckets
    bucketed.cuda_graphs.configure(prefixes=True)
    held = bucketed.cuda_graphs.prepare(bucketed, rows=(3,), lengths=(16,), adapters=(False,), prefixes=(0, 40))
    assert [dataclasses.astuple(bucket) for bucket in held] == [(4, 16, False, False, 0), (4, 16, False, False, 48)]
    with pytest.raises(ValueError, match="cuda graphs: prefixes must be True or False, got 'no'"):
        bucketed.cuda_graphs.configure(prefixes="no")


def test_a_prefix_bucket_forward_traces_whole(bucketed):
    """What a prefix bucket captures (the attention bias from its static lengths, the prefix key/values, the
    routed text forward) has no graph break and no host sync."""
    bucketed.encode(INSTRUCTED, batch_size=len(INSTRUCTED))
    (bucket,) = prefix_buckets(bucketed)
    forward = bucketed.cuda_graphs._forwards[bucket]
    torch._dynamo.reset()
    compiled = torch.compile(forward.forward, fullgraph=True, backend="eager")
    with torch.inference_mode():
        want_hidden, _ = forward.forward(bucketed)
        hidden, _ = compiled(bucketed)
    assert torch.equal(hidden, want_hidden)


def test_cached_prefixes_follow_in_place_adapter_edits(fresh_model):
    fresh_model.prefix_cache.configure(64 << 20)
    item = {"text": "parse ISO dates", "instructions": "Find Python code", "adapter": "code"}
    fresh_model.encode([item])  # fills the cache with the prefix through the current weights
    for a, _ in fresh_model.lora.weights("code").values():
        with torch.no_grad():
            a.mul_(2.0)
    cached = fresh_model.encode([item])[0]
    fresh_model.prefix_cache.configure(0)
    uncached = fresh_model.encode([item])[0]
    assert float(cached @ uncached) >= 0.99999
