"""Embedding semantics: batch invariance, per-row adapters, instructions, matryoshka, multi-vector."""

import sys

import pytest
import torch

from nova.loading import load_model


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def mixed_items(image, make_image):
    return [
        {"task": "retrieval.query", "text": "what is the capital of France?"},
        {"task": "retrieval.passage", "text": "Paris is the capital and largest city of France. " * 3},
        {"task": "code.query", "text": "sort a list in python", "instructions": "Find code"},
        {"task": "code.passage", "text": "def sort(xs):\n    return sorted(xs)"},
        {"task": "text-matching", "text": "the cat sat on the mat"},
        {"image": image},
        {"image": make_image(60, 90, seed=3), "text": "a bar chart", "task": "retrieval.passage"},
        {"text": "no adapter here", "adapter": "none"},
        {"image": make_image(50, 50, seed=5), "instructions": "Represent this chart", "adapter": "code"},
    ]


def test_same_vector_alone_in_kind_and_in_mixed_batch(tiny_model, image, make_image):
    items = mixed_items(image, make_image)
    alone = [tiny_model.encode([item])[0] for item in items]
    mixed = tiny_model.encode(items, batch_size=len(items))
    shuffled = tiny_model.encode(list(reversed(items)), batch_size=4)[::-1]
    texts = [i for i, item in enumerate(items) if "image" not in item]
    same_kind = tiny_model.encode([items[i] for i in texts], batch_size=len(texts))
    for i, vector in enumerate(alone):
        assert vector.shape == (64,)
        assert abs(float(vector.norm()) - 1) < 1e-5
        assert cos(vector, mixed[i]) >= 0.9999, i
        assert cos(vector, shuffled[i]) >= 0.9999, i
    for j, i in enumerate(texts):
        assert cos(alone[i], same_kind[j]) >= 0.9999
    multi_alone = [tiny_model.encode([item], return_multivector=True)[0] for item in items]
    multi_mixed = tiny_model.encode(items, return_multivector=True, batch_size=len(items))
    for a, b in zip(multi_alone, multi_mixed, strict=True):
        assert a.shape == b.shape
        assert float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()) >= 0.9999


def test_padding_to_a_multiple_changes_no_vector(fresh_model, image, make_image):
    """Rounding a batch's padded length up (16 by default on CUDA, to keep the number of batch shapes small)
    only adds masked padding: pooled and multi-vector outputs stay those of the tightest padding, instructed
    rows served from the prefix cache included."""
    items = mixed_items(image, make_image) + [{"text": "a query", "instructions": "Find code"}]
    assert fresh_model.pad_to_multiple_of is None  # auto: 1 on this CPU
    tight = fresh_model.encode(items, batch_size=len(items))
    tight_multi = fresh_model.encode(items, return_multivector=True, batch_size=len(items))
    fresh_model.pad_to_multiple_of = 64
    collated = fresh_model.collate_rows([fresh_model.processor.prepare_item(item, index=i)
                                         for i, item in enumerate(items[:5])])
    assert collated.batch.input_ids.shape[1] == 64
    padded = fresh_model.encode(items, batch_size=len(items))
    padded_multi = fresh_model.encode(items, return_multivector=True, batch_size=len(items))
    for i, (a, b) in enumerate(zip(tight, padded, strict=True)):
        assert cos(a, b) >= 0.9999, i
    for a, b in zip(tight_multi, padded_multi, strict=True):
        assert a.shape == b.shape
        assert float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()) >= 0.9999
    assert fresh_model.prefix_cache.stats()["hits"] > 0


def test_image_row_pooling_is_per_row_not_row_zero(tiny_model, image):
    # Jina's code looks only at row 0 for an image; a text row first must not change an image row.
    text_first = tiny_model.encode(["plain text first", {"image": image}], batch_size=2)
    alone = tiny_model.encode([{"image": image}])[0]
    assert cos(text_first[1], alone) >= 0.9999


def test_per_row_adapters_equal_each_adapter_alone(tiny_model, tiny_dir):
    base = load_model(tiny_dir)
    for name in list(base.list_adapters()):
        base.unload_adapter(name)
    text = "a sentence routed through different adapters"
    items = [{"text": text, "task": "retrieval.query", "adapter": name}
             for name in ("retrieval", "text-matching", "code", "none")]
    together = tiny_model.encode(items, batch_size=4)
    alone = [tiny_model.encode([item])[0] for item in items]
    for a, b in zip(together, alone, strict=True):
        assert cos(a, b) >= 0.9999
    # adapters really differ from each other and from the base model
    assert max(cos(together[0], together[1]), cos(together[0], together[2]), cos(together[1], together[2])) < 0.999
    assert cos(together[3], base.encode([{"text": text, "task": "retrieval.query", "adapter": None}])[0]) >= 0.9999
    assert cos(together[0], together[3]) < 0.999


def test_unloading_one_adapter_leaves_the_others_unchanged(fresh_model):
    items = [{"text": "x y z", "adapter": name} for name in ("retrieval", "code")]
    before = fresh_model.encode(items)
    fresh_model.unload_adapter("text-matching")
    after = fresh_model.encode(items)
    assert all(cos(a, b) >= 0.99999 for a, b in zip(before, after, strict=True))
    # a task adapter unloaded at run time is an error, never a quiet fall-back to the base model
    with pytest.raises(ValueError, match="item 0: task 'text-matching' routes to adapter 'text-matching', which is not loaded"):
        fresh_model.encode([{"text": "x", "task": "text-matching"}])


def _prepared(model, index: int, **fields):
    return model.processor.prepare_item({"text": f"row number {index}", **fields}, index=index)


def test_embed_batches_launches_the_next_batch_before_reading_the_last(fresh_model):
    """On a GPU the host's work on a batch (taking it from the stream, collating, launching) overlaps the
    forward before it only if that forward's outputs are read after the next launch."""
    model, events = fresh_model, []
    launch = model.launch_prepared

    def recording_launch(rows, *args, **kwargs):
        ordinal = sum(kind == "launch" for kind, _ in events)
        pending = launch(rows, *args, **kwargs)
        events.append(("launch", ordinal))
        read = pending.result
        pending.result = lambda: (events.append(("read", ordinal)), read())[1]
        return pending

    model.launch_prepared = recording_launch
    items = [{"text": f"sentence {'word ' * i}"} for i in range(12)]
    got = model.encode(items, batch_size=4)
    assert events == [("launch", 0), ("launch", 1), ("read", 0), ("launch", 2), ("read", 1), ("read", 2)]
    del model.launch_prepared
    assert all(cos(a, b) >= 0.99999 for a, b in zip(got, model.encode(items, batch_size=4), strict=True))


@pytest.mark.parametrize("launches_ahead, events", [
    # a GPU's: windows of 2, 4, 8, 16, 32 and the last 2 rows; each window of n batches takes the next (2n
    # batches, 4n rows) in shares of 4 rows a launch
    (True, "PP" + "LPPPP" * (1 + 2 + 4 + 8) + "LP" * 2 + "L" * 14 + "L"),
    (False, "P" * 32 + "L" * 16 + "P" * 32 + "L" * 16),  # a CPU's: two windows of 32 rows, each prepared at once
], ids=["gpu", "cpu"])
def test_encode_prepares_the_next_window_between_this_window_s_launches(fresh_model, monkeypatch, launches_ahead,
                                                                         events, record_preparing_and_launching):
    """Rows are sorted by length within windows of 16 batches. Where launches return before their forwards end
    (a GPU), the first forward starts after one batch is prepared and the next window is prepared a share at a
    time between launches, so preparing rows overlaps forwards instead of leaving the device idle."""
    model = fresh_model
    monkeypatch.setattr(type(model), "launches_ahead", launches_ahead)  # the scheduling a GPU gets, on this CPU
    seen = record_preparing_and_launching(model)
    items = [{"text": "word " * (i % 7 + 1)} for i in range(64)]
    got = model.encode(items, batch_size=2)
    assert "".join(seen) == events
    assert all(cos(a, b) >= 0.99999 for a, b in zip(got, model.encode(items, batch_size=64), strict=True))


def test_on_a_gpu_the_first_windows_ramp_up_so_the_first_forward_starts_early(tiny_model):
    sort_windows = sys.modules[type(tiny_model).__module__].sort_windows
    assert sort_windows(64, 2) == [(0, 32), (32, 64)]
    assert sort_windows(70, 2, ramp=True) == [(0, 2), (2, 6), (6, 14), (14, 30), (30, 62), (62, 70)]
    assert sort_windows(5, 8, ramp=True) == [(0, 5)] and sort_windows(0, 8, ramp=True) == []


def test_a_failed_batch_is_handed_back_in_order_and_the_stream_goes_on(fresh_model):
    model = fresh_model
    batches = [[_prepared(model, 0), _prepared(model, 1)],
               [_prepared(model, 2, adapter="code"), _prepared(model, 3)],
               [_prepared(model, 4)]]
    model.unload_adapter("code")  # after its row was prepared: the second batch's launch fails
    got = list(model.embed_batches(batches))
    assert [rows for rows, _ in got] == batches
    assert isinstance(got[1][1], ValueError) and "item 2: adapter 'code' is not loaded" in str(got[1][1])
    for rows, outcomes in (got[0], got[2]):
        assert all(torch.equal(a, b) for a, b in zip(outcomes, model.embed_prepared(rows), strict=True))


def test_encode_raises_what_a_batch_s_launch_raised(fresh_model):
    model, launch, launches = fresh_model, fresh_model.launch_prepared, []

    def unloading_after_the_second_launch(rows, *args, **kwargs):
        pending = launch(rows, *args, **kwargs)
        launches.append([row.index for row in rows])
        if len(launches) == 2:
            model.unload_adapter("code")  # as another thread could, while encode() runs
        return pending

    model.launch_prepared = unloading_after_the_second_launch
    # batches of one, sorted by length: item 2, the longest, is launched last
    items = [{"text": "first"}, {"text": "fine"}, {"text": "routed, and longer than the others", "adapter": "code"}]
    with pytest.raises(ValueError, match="item 2: adapter 'code' is not loaded"):
        model.encode(items, batch_size=1)
    assert launches == [[0], [1]]


def test_instructions_change_the_vector_and_are_not_pooled(tiny_model, image):
    item = {"text": "contract termination clause", "task": "retrieval.query"}
    plain = tiny_model.encode([item])[0]
    legal = tiny_model.encode([item], instructions="Retrieve legal precedents")[0]
    medical = tiny_model.encode([item], instructions="Retrieve medical literature")[0]
    assert cos(plain, legal) < 0.9999 and cos(legal, medical) < 0.9999
    # per-item instructions override the request's
    override = tiny_model.encode([{**item, "instructions": "Retrieve medical literature"}],
                                 instructions="Retrieve legal precedents")[0]
    assert cos(override, medical) >= 0.9999
    # multi-vector rows: the item's own tokens, as many with instructions as without (markup-free pooling)
    processor = tiny_model.processor
    for it in (item, {"image": image}, {"image": image, "text": "chart"}):
        bare = processor.prepare_item(it)
        for instructions in (None, "Retrieve legal precedents"):
            row = processor.prepare_item(it, instructions=instructions)
            multi = tiny_model.encode([it], instructions=instructions, return_multivector=True)[0]
            assert multi.shape == (bare.num_tokens, 128) == (sum(row.multi_mask), 128)
            assert sum(row.pool_mask) == sum(bare.pool_mask)
            assert torch.allclose(multi.norm(dim=-1), torch.ones(len(multi)), atol=1e-5)


def test_multivector_without_instructions_is_every_attended_token(tiny_model, image):
    processor = tiny_model.processor
    row = processor.prepare_item({"image": image})
    multi = tiny_model.encode([{"image": image}], return_multivector=True)[0]
    assert multi.shape[0] == row.num_tokens  # template tokens included, as Jina V4 returns them
    text = tiny_model.encode(["hello world"], return_multivector=True)[0]
    assert text.shape == (4, 128)  # Query: hello world


def test_pooled_vector_is_masked_mean_of_last_hidden_state(tiny_model, image):
    processor = tiny_model.processor
    for item, instructions in (({"text": "abc"}, None), ({"text": "abc"}, "Inst"), ({"image": image}, None)):
        row = processor.prepare_item(item, instructions=instructions)
        batch = processor.collate([row])
        with torch.inference_mode():
            hidden, _ = tiny_model.forward_hidden(batch, [row.adapter], multivector=False)
        mask = batch.pool_mask[0]  # the row's pool_mask (collate leaves out never-used closing markup)
        assert mask.tolist() == row.pool_mask[: len(mask)] and not any(row.pool_mask[len(mask):])
        expected = torch.nn.functional.normalize(hidden[0][mask].mean(0), dim=-1)
        assert cos(expected, tiny_model.encode([item], instructions=instructions)[0]) >= 0.99999


def test_matryoshka_truncation_is_renormalized_prefix(tiny_model):
    full = tiny_model.encode(["matryoshka dolls"])[0]
    for dims in tiny_model.config.matryoshka_dims:
        short = tiny_model.encode(["matryoshka dolls"], dimensions=dims)[0]
        assert short.shape == (dims,)
        assert torch.allclose(short, torch.nn.functional.normalize(full[:dims], dim=0), atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dimensions": 17}, "dimensions must be one of"),
        ({"dimensions": "32"}, "dimensions must be one of"),
        ({"dimensions": 32, "return_multivector": True}, "'dimensions' applies to pooled vectors only"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_bad_arguments(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.encode(["x"], **kwargs)


def test_bad_item_names_its_index(tiny_model):
    with pytest.raises(ValueError, match="item 2: unknown task 'summarize'"):
        tiny_model.encode(["a", "b", {"text": "c", "task": "summarize"}])


def test_jina_compatible_encode_text_and_encode_image(tiny_model, image):
    q = tiny_model.encode_text(["hello"], task="retrieval", prompt_name="query")
    p = tiny_model.encode_text("hello", task="retrieval", prompt_name="passage", truncate_dim=32)
    assert cos(q[0], tiny_model.encode([{"text": "hello", "task": "retrieval.query"}])[0]) >= 0.99999
    assert p.shape == (32,)
    n = tiny_model.encode_text(["a", "b"], task="code", return_numpy=True)
    assert n.shape == (2, 64)
    imgs = tiny_model.encode_image([image], task="retrieval", return_multivector=True)
    assert imgs[0].shape[1] == 128
    single = tiny_model.encode_image(image, task="text-matching")
    assert cos(single, tiny_model.encode([{"image": image, "task": "text-matching"}])[0]) >= 0.99999
    with pytest.raises(ValueError, match="unknown task 'qa'"):
        tiny_model.encode_text(["x"], task="qa")


def test_image_embeds_item_equals_image_item(tiny_model, image):
    processor = tiny_model.processor
    row = processor.prepare_item({"image": image})
    with torch.inference_mode():
        feats = tiny_model.visual(row.pixel_values, grid_thw=row.image_grid_thw).pooler_output
    # rows without an adapter: the vision tower is not LoRA-routed by the tiny task adapters
    via_pixels = tiny_model.encode([{"image": image, "adapter": "none"}])[0]
    via_embeds = tiny_model.encode([{"image_embeds": feats, "image_grid_thw": row.image_grid_thw[0].tolist(),
                                     "adapter": "none"}])[0]
    assert cos(via_pixels, via_embeds) >= 0.9999


def test_matryoshka_truncation_beyond_the_vectors_size_is_an_error():
    """The one truncation (model, server, nova eval): never a silently full-size vector for a larger request."""
    from nova.repo import model_class

    truncate = model_class("matryoshka_truncate")
    vectors = torch.nn.functional.normalize(torch.randn(2, 64), dim=-1)
    assert torch.equal(truncate(vectors, 64), vectors)
    assert truncate(vectors, 16).shape == (2, 16)
    with pytest.raises(ValueError, match="dimensions 128 is larger than these 64-d vectors"):
        truncate(vectors, 128)
