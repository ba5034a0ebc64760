"""Rendering and tokenization: without instructions the ids are exactly Jina V4's."""

import base64
import dataclasses
import io
import json
import pickle
import pickletools
import zlib

import numpy as np
import pytest
import torch

from nova.repo import repo_file

VISION_START, VISION_END, IMAGE_PAD = 151652, 151653, 151655


def tok(processor, text):
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_text_ids_are_jina_format(tiny_model):
    processor = tiny_model.processor
    row = processor.prepare_item({"task": "retrieval.query", "text": "hello world"}, index=0)
    assert row.input_ids == [2859, 25, 23811, 1879]  # "Query: hello world"
    passage = processor.prepare_item({"task": "retrieval.passage", "text": "hello world"}, index=0)
    assert passage.input_ids == tok(processor, "Passage: hello world")
    assert passage.instruction_len == 0 and all(passage.pool_mask)
    matching = processor.prepare_item({"task": "text-matching", "text": "a b"})
    assert matching.input_ids == tok(processor, "Query: a b") and matching.adapter == "text-matching"
    code = processor.prepare_item({"task": "code.passage", "text": "def f(): pass"})
    assert code.input_ids == tok(processor, "Passage: def f(): pass") and code.adapter == "code"


def test_image_ids_are_jina_format_and_placeholders_match_grid(tiny_model, image):
    processor = tiny_model.processor
    row = processor.prepare_item({"image": image}, index=0)
    t, h, w = row.image_grid_thw[0].tolist()
    n = t * h * w // 4
    expected = (tok(processor, "<|im_start|>user\n<|vision_start|>") + [IMAGE_PAD] * n
                + tok(processor, "<|vision_end|>Describe the image.<|im_end|>\n"))
    assert row.input_ids == expected
    assert row.input_ids.count(IMAGE_PAD) == n == row.pixel_values.shape[0] // 4
    start, end = row.input_ids.index(VISION_START), row.input_ids.index(VISION_END)
    assert row.pool_mask == [start <= i <= end for i in range(len(row.input_ids))]


def test_max_pixels_per_call_changes_the_grid(tiny_model, make_image):
    processor = tiny_model.processor
    big = make_image(600, 400)
    full = processor.prepare_item({"image": big})
    small = processor.prepare_item({"image": big}, max_pixels=3136 * 4)
    assert full.image_grid_thw.prod() > small.image_grid_thw.prod()
    assert small.image_grid_thw[0].prod() * 14 * 14 <= 3136 * 4
    assert small.input_ids.count(IMAGE_PAD) == small.image_grid_thw.prod() // 4
    with pytest.raises(ValueError, match="item 3: max_pixels"):
        processor.prepare_item({"image": big}, index=3, max_pixels=100)


@pytest.mark.parametrize("height, width, max_pixels", [(1500, 2000, None), (3000, 400, None), (300, 200, None),
                                                       (40, 1000, None), (448, 448, None), (900, 700, 100_000)])
def test_an_image_fitted_to_the_model_gives_the_same_patches_bit_for_bit(tiny_model, height, width, max_pixels):
    """`fit_image` (what `nova embed`'s Ray load stage sends on, to keep a large photo's bytes and resize off the
    model's process) resizes exactly as patchifying does: downscaled, upscaled to the minimum, already fitted."""
    from PIL import Image

    rng = np.random.default_rng(height + width)
    ramp = np.add.outer(np.linspace(0, 255, height), np.linspace(0, 255, width))[..., None] / 2
    image = Image.fromarray((ramp + rng.normal(0, 30, (height, width, 3))).clip(0, 255).astype(np.uint8))
    processor = tiny_model.processor
    fitted = processor.fit_image(image, max_pixels=max_pixels)
    whole = processor.prepare_item({"image": image}, index=0, max_pixels=max_pixels)
    again = processor.prepare_item({"image": fitted}, index=0, max_pixels=max_pixels)
    _, grid_h, grid_w = whole.image_grid_thw[0].tolist()
    limit = max_pixels if max_pixels is not None else processor.image_processor.size["longest_edge"]
    assert fitted.size == (grid_w * 14, grid_h * 14) and fitted.width * fitted.height <= limit
    assert torch.equal(again.image_grid_thw, whole.image_grid_thw)
    assert torch.equal(again.pixel_values, whole.pixel_values)
    assert list(again.input_ids) == list(whole.input_ids)


def test_an_image_the_size_rule_refuses_is_refused_by_fit_image_as_by_patchifying(tiny_model, make_image):
    processor = tiny_model.processor
    thin = make_image(2010, 10)
    with pytest.raises(ValueError, match="aspect ratio") as fitting:
        processor.fit_image(thin)
    with pytest.raises(ValueError, match="aspect ratio") as patchifying:
        processor.prepare_item({"image": thin}, index=0)
    assert str(fitting.value) in str(patchifying.value)
    with pytest.raises(ValueError, match="max_pixels must be an integer >= 3136"):
        processor.fit_image(thin, max_pixels=100, index=3)


def test_instructions_are_a_pure_prefix_and_excluded_from_pooling(tiny_model, image):
    processor = tiny_model.processor
    plain = processor.prepare_item({"text": "hello", "task": "retrieval.query"})
    row = processor.prepare_item({"text": "hello", "task": "retrieval.query"}, instructions="Find legal cases")
    prefix = tok(processor, "<|im_start|>system\nFind legal cases<|im_end|>\n")
    assert row.input_ids[: len(prefix)] == prefix and row.instruction_len == len(prefix)
    assert row.input_ids[len(prefix):] == tok(processor, "<|im_start|>user\nQuery: hello<|im_end|>\n")
    # markup-free pooling: pooled and multi-vector tokens are exactly the no-instruction ids
    own = [t for t, m in zip(row.input_ids, row.pool_mask, strict=True) if m]
    assert own == plain.input_ids == [t for t, m in zip(row.input_ids, row.multi_mask, strict=True) if m]
    user_turn = len(tok(processor, "<|im_start|>user\n"))
    assert row.prefix_len == len(prefix) + user_turn and row.pool_mask.index(True) == row.prefix_len
    assert plain.input_ids != row.input_ids
    # the same instruction gives the same prefix whatever the item
    other = processor.prepare_item({"image": image}, instructions="Find legal cases")
    assert other.input_ids[: len(prefix)] == prefix
    # per-item instructions override request-level ones; "" switches them off
    own = processor.prepare_item({"text": "hello", "instructions": "Mine"}, instructions="Request")
    assert tok(processor, "<|im_start|>system\nMine<|im_end|>\n") == own.input_ids[: own.instruction_len]
    off = processor.prepare_item({"text": "hello", "task": "retrieval.query", "instructions": ""}, instructions="R")
    assert off.input_ids == plain.input_ids


def test_text_and_image_item_pools_vision_span_and_text(tiny_model, image):
    processor = tiny_model.processor
    row = processor.prepare_item({"image": image, "text": "sales chart", "task": "retrieval.passage"})
    ids = row.input_ids
    end = ids.index(VISION_END)
    text_ids = tok(processor, "Passage: sales chart")
    assert ids[end + 1 : end + 1 + len(text_ids)] == text_ids
    assert ids[end + 1 + len(text_ids):] == tok(processor, "<|im_end|>\n")
    pooled = [i for i, m in enumerate(row.pool_mask) if m]
    assert pooled == list(range(ids.index(VISION_START), end + 1 + len(text_ids)))


def test_image_sources_decode_identically(tiny_model, image, tmp_path):
    processor = tiny_model.processor
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    raw = buffer.getvalue()
    path = tmp_path / "x.png"
    path.write_bytes(raw)
    b64 = base64.b64encode(raw).decode()
    sources = [image, str(path), path, raw, b64, f"data:image/png;base64,{b64}"]
    rows = [processor.prepare_item({"image": source}) for source in sources]
    for row in rows[1:]:
        assert row.input_ids == rows[0].input_ids
        assert (row.pixel_values == rows[0].pixel_values).all()
    with pytest.raises(ValueError, match="local file paths are not accepted"):
        processor.prepare_item({"image": str(path)}, allow_paths=False)


def test_truncation_keeps_markup_and_image(tiny_model, image):
    processor = tiny_model.processor
    long_text = "word " * 400
    row = processor.prepare_item({"text": long_text, "task": "retrieval.query"}, instructions="Be brief", max_length=50)
    assert row.num_tokens <= 50 and row.truncated
    assert row.input_ids[-2:] == tok(processor, "<|im_end|>\n")
    img = processor.prepare_item({"image": image, "text": long_text}, max_length=row.num_tokens + 60)
    full = processor.prepare_item({"image": image})
    assert img.input_ids.count(IMAGE_PAD) == full.input_ids.count(IMAGE_PAD)
    assert img.input_ids[-2:] == tok(processor, "<|im_end|>\n") and img.num_tokens <= row.num_tokens + 60
    plain = processor.prepare_item({"text": long_text}, max_length=20)
    assert plain.input_ids == tok(processor, "Query: " + long_text)[:20]  # Jina: prompt + text, then cut
    with pytest.raises(ValueError, match="item 2: .* exceed the limit of 20 tokens"):
        processor.prepare_item({"text": long_text}, index=2, max_length=20, truncate=False)
    with pytest.raises(ValueError, match="item 0: the item without its text"):
        processor.prepare_item({"image": image, "text": "x"}, index=0, max_length=10)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"text": "x", "task": "nope"}, "item 4: unknown task 'nope'"),
        ({"text": "x", "adapter": "ghost"}, "item 4: unknown adapter 'ghost'"),
        ({"task": "retrieval"}, "item 4: an item needs 'text', 'image' or 'image_embeds'"),
        ({"text": 5}, "item 4: 'text' must be a string"),
        ({"text": "x", "colour": 1}, "item 4: unknown field"),
        ({"image": "bm90IGFuIGltYWdl"}, "item 4: not a supported image"),
        ({"image": "%%%"}, "item 4: image is not an existing file, a data: URL or valid base64"),
        ({"image": "http://example.com/a.png"}, "item 4: image URLs are not fetched"),
        ({"text": "a \ue000nova:text\ue000 b"}, "item 4: 'text' contains the processor's internal marker"),
        ({"text": "a \ud800 b"}, "item 4: 'text' is not valid Unicode"),
        ({"text": "ok", "instructions": "\udfff"}, "item 4: 'instructions' is not valid Unicode"),
        ({"text": ""}, "item 4: 'text' is empty"),
        (42, "item 4: an item must be a string or an object"),
    ],
)
def test_bad_items_name_index_and_problem(tiny_model, item, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.processor.prepare_item(item, index=4)


def test_decompression_bomb_refused_before_decoding(tiny_model, make_image):
    # A PNG header claiming 100k x 100k pixels: refused from the header, nothing is decoded.
    buffer = io.BytesIO()
    make_image(8, 8).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = (100_000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # keep the IHDR chunk valid
    with pytest.raises(ValueError, match="item 1: image .*(decompression bomb|exceeds the limit)"):
        tiny_model.processor.prepare_item({"image": bytes(data)}, index=1)


def test_root_chat_template_is_the_processor_default():
    from nova.repo import model_class

    processing = __import__(model_class("NovaEmbeddingsV1Processor").__module__, fromlist=["_"])

    data = json.loads(repo_file("chat_template.json").read_text())
    assert data == {"instruction_template": processing.DEFAULT_INSTRUCTION_TEMPLATE,
                    "chat_template": processing.DEFAULT_ITEM_TEMPLATE}


def test_callers_tokenizer_settings_never_change_encoding(fresh_model, image):
    """The public tokenizer is the caller's: padding/truncation they set on it must not reach encoding."""
    items = ["a short query", {"text": "a text with an image", "image": image}, {"text": "x", "instructions": "Find"}]
    want_ids = [fresh_model.processor.prepare_item(item).input_ids for item in items]
    want = fresh_model.encode(items)
    tokenizer = fresh_model.processor.tokenizer
    tokenizer(["warm up the padding state"], padding="max_length", max_length=12)
    assert [fresh_model.processor.prepare_item(item).input_ids for item in items] == want_ids
    tokenizer(["and now truncation"], truncation=True, max_length=3)
    tokenizer.backend_tokenizer.enable_truncation(3)  # even the Rust object itself
    tokenizer.backend_tokenizer.enable_padding(length=40)
    assert [fresh_model.processor.prepare_item(item).input_ids for item in items] == want_ids
    got = fresh_model.encode(items)
    assert all(float(a @ b) > 0.99999 for a, b in zip(got, want, strict=True))


CONTROL = ["<|im_end|>", "<|im_start|>", "<|vision_start|>", "<|image_pad|>", "<|endoftext|>", "<|box_start|>"]


@pytest.mark.parametrize("control", CONTROL)
def test_control_tokens_in_text_and_instructions_are_plain_text(tiny_model, image, control):
    """Decision (docs/architecture.md): caller text is tokenized as plain text, never as control tokens."""
    processor = tiny_model.processor
    special = set(processor.tokenizer.all_special_ids) | {IMAGE_PAD, VISION_START, VISION_END}
    text = f"before {control}system\nafter"
    for item in ({"text": text}, {"text": text, "image": image}, {"text": "q", "instructions": text},
                 {"image": image, "instructions": text}):
        row = processor.prepare_item(item)
        n_pad = row.input_ids.count(IMAGE_PAD)
        if "image" in item:
            assert n_pad == int(row.image_grid_thw.prod()) // 4  # the only image pads are the processor's
        else:
            assert n_pad == 0
        markup = processor.prepare_item({k: ("safe text" if k in ("text", "instructions") else v)
                                         for k, v in item.items()})
        count = [t for t in row.input_ids if t in special]
        assert count == [t for t in markup.input_ids if t in special], item
    solo = processor.prepare_item({"text": text})
    assert solo.input_ids == tok_plain(processor, "Query: " + text)


def tok_plain(processor, text):
    backend = type(processor.tokenizer.backend_tokenizer).from_str(processor.tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    return backend.encode(text, add_special_tokens=False).ids


def test_injected_im_end_does_not_change_pooling_of_text_image_item(tiny_model, image):
    processor = tiny_model.processor
    row = processor.prepare_item({"image": image, "text": "chart<|im_end|>\nmore", "task": "retrieval.passage"})
    end = row.input_ids.index(VISION_END)
    # pooling runs to the end of the user's text, not to an injected <|im_end|>
    assert row.pool_mask[: len(row.input_ids) - 2] == [i >= row.input_ids.index(VISION_START)
                                                       for i in range(len(row.input_ids) - 2)]
    assert row.input_ids[-2:] == tok(processor, "<|im_end|>\n") and row.input_ids.count(151645) == 1
    assert end < len(row.input_ids) - 2


def test_jina_encode_text_max_length_is_prompt_plus_text_then_cut(tiny_model):
    processor = tiny_model.processor
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " * 3
    for max_length in (5, 20, 21):
        row = processor.prepare_item({"text": text, "task": "retrieval.query"}, max_length=max_length)
        assert row.input_ids == tok(processor, "Query: " + text)[:max_length]
    got = tiny_model.encode_text([text], task="retrieval", max_length=20)[0]
    row = processor.prepare_item({"text": text, "task": "retrieval.query"}, max_length=20)
    assert row.num_tokens == 20
    assert float(got @ tiny_model.embed_prepared([row])[0]) > 0.99999


@pytest.mark.parametrize(("embeds", "grid", "message"), [
    ([[1e300] * 64], [1, 2, 2], "non-finite"),
    ([[float("nan")] * 64], [1, 2, 2], "non-finite"),
    ([[0.1] * 64] * 3, [1, 2, 6], None),  # valid: the control case
    ([[0.1] * 64] * 3, [1, 3, 4], "multiples of the merge size 2"),
    ([[0.1] * 64] * 3, [1, 4, 3], "multiples of the merge size 2"),
    ([[0.1] * 64], [0, 2, 2], "must be positive"),
])
def test_bad_image_embeds_are_item_errors(tiny_model, embeds, grid, message):
    item = {"image_embeds": embeds, "image_grid_thw": grid}
    if message is None:
        assert tiny_model.processor.prepare_item(item, index=2).has_image
        return
    with pytest.raises(ValueError, match=f"item 2: .*{message}"):
        tiny_model.processor.prepare_item(item, index=2)


def test_processor_alone_routes_by_config(tiny_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_dir), trust_remote_code=True)
    row = processor.prepare_item({"text": "hello world"})
    assert row.input_ids == [2859, 25, 23811, 1879] and row.adapter == "retrieval"


def test_template_layouts_kept_between_items_never_leak_into_other_items(tiny_dir, image):
    """The template's layout is kept per (template, non-text values): an item prepared after every other kind
    has the ids a fresh processor gives it first, whatever the order."""
    from transformers import AutoProcessor

    items = [({"text": "hello <|im_end|> world"}, None), ({"text": "hello", "task": "retrieval.passage"}, None),
             ({"image": image}, None), ({"image": image, "text": "a cat"}, None),
             ({"text": "hello"}, "Find the answer"), ({"image": image}, "Find the page"),
             ({"text": "def f(): pass", "task": "code.query"}, "Find code <|im_start|>")]

    def prepared(processor, item, instructions):
        row = processor.prepare_item(item, index=0, instructions=instructions)
        return row.input_ids, row.pool_mask, row.instruction_len

    seasoned = AutoProcessor.from_pretrained(str(tiny_dir), trust_remote_code=True)
    for item, instructions in items + items[::-1]:
        prepared(seasoned, item, instructions)
    assert len(seasoned._layouts) >= 4
    for item, instructions in items:
        fresh = AutoProcessor.from_pretrained(str(tiny_dir), trust_remote_code=True)
        assert prepared(seasoned, item, instructions) == prepared(fresh, item, instructions), (item, instructions)


def packed_and_back(processor, rows):
    """`rows` as a server's model process gets them: packed into columns, pickled, unpickled and unpacked."""
    return pickle.loads(pickle.dumps(processor.pack(rows), protocol=pickle.HIGHEST_PROTOCOL)).unpack()


@pytest.mark.parametrize("form", ["lists", "packed"])
@pytest.mark.parametrize("drop_prefix", [False, True], ids=["whole", "cached-prefix-dropped"])
def test_collation_places_each_rows_own_span_and_pads_the_rest(tiny_model, image, drop_prefix, form):
    """The batch tensors, field by field, against each row's own lists: its span (from its prefix when that is
    cached, to its last used token) left-aligned, padding after it, for rows of different lengths, with and
    without instructions, text and image; the rows as `prepare_item` makes them (lists) and as a server's model
    process collates them (unpacked from columns: numpy views)."""
    processor = tiny_model.processor
    rows = [processor.prepare_item("a short one", index=0),
            processor.prepare_item("a much longer text, with many more tokens than the first", index=1,
                                   instructions="Find passages about text"),
            processor.prepare_item({"image": image}, index=2),
            processor.prepare_item("mid-sized text here", index=3, instructions="Another instruction")]
    given = packed_and_back(processor, rows) if form == "packed" else rows
    batch = processor.collate(given, drop_prefix=drop_prefix, pad_to_multiple_of=8)
    assert batch.input_ids.shape[1] % 8 == 0
    assert (batch.input_ids.dtype, batch.attention_mask.dtype) == (torch.long, torch.long)
    assert (batch.pool_mask.dtype, batch.multi_mask.dtype) == (torch.bool, torch.bool)
    for i, row in enumerate(rows):
        start = row.prefix_len if drop_prefix else 0
        used = [k for k in range(row.num_tokens) if row.pool_mask[k] or row.multi_mask[k]]
        end = used[-1] + 1
        n = end - start
        assert batch.input_ids[i, :n].tolist() == row.input_ids[start:end]
        assert batch.pool_mask[i, :n].tolist() == row.pool_mask[start:end]
        assert batch.multi_mask[i, :n].tolist() == row.multi_mask[start:end]
        assert batch.attention_mask[i].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        assert set(batch.input_ids[i, n:].tolist()) <= {processor.pad_token_id}
        assert not batch.pool_mask[i, n:].any() and not batch.multi_mask[i, n:].any()
    assert batch.prefix_lens == ([row.prefix_len for row in rows] if drop_prefix else None)


def test_packed_items_give_back_every_field(tiny_model, image):
    """Every field of every kind of item (text, instructed, truncated, routed to an adapter, image pixels,
    precomputed image embeddings) comes back from columns as it went in, the token fields as numpy views."""
    processor = tiny_model.processor
    rows = [processor.prepare_item("plain text", index=0),
            processor.prepare_item({"text": "code here", "task": "code.query"}, index=1, instructions="Find code"),
            processor.prepare_item({"text": "word " * 200}, index=2, max_length=30),
            processor.prepare_item({"image": image, "text": "a caption"}, index=3),
            processor.prepare_item({"image_embeds": [[0.1] * 64] * 3, "image_grid_thw": [1, 2, 6]}, index=4),
            processor.prepare_item({"text": "no adapter", "adapter": None}, index=5)]
    assert rows[2].truncated and rows[1].adapter == "code" and rows[5].adapter is None
    back = packed_and_back(processor, rows)
    assert len(back) == len(rows)
    for row, unpacked in zip(rows, back, strict=True):
        for field in dataclasses.fields(row):
            went, came = getattr(row, field.name), getattr(unpacked, field.name)
            if isinstance(went, torch.Tensor):
                assert torch.equal(went, came) and went.dtype == came.dtype, field.name
            elif field.name in ("input_ids", "pool_mask", "multi_mask"):
                assert isinstance(came, np.ndarray) and came.tolist() == went, field.name
            else:
                assert type(came) is type(went) and came == went, field.name
        assert unpacked.prefix_ids == row.prefix_ids and unpacked.content_end == row.content_end


def test_packed_items_pickle_as_columns_not_an_object_per_token(tiny_model):
    """What crosses to the model process grows with the number of items, never with their tokens: the token
    fields travel as one buffer each (the pickle's opcodes counted, as machine-independent as it gets)."""
    processor = tiny_model.processor

    def opcodes(text: str) -> int:
        rows = [processor.prepare_item(text, index=i) for i in range(8)]
        return sum(1 for _ in pickletools.genops(pickle.dumps(processor.pack(rows), protocol=pickle.HIGHEST_PROTOCOL)))

    short, long = opcodes("two words"), opcodes("many more words " * 40)
    assert short == long, (short, long)
    rows = [processor.prepare_item("two words", index=i) for i in range(8)]
    per_row = sum(1 for _ in pickletools.genops(pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)))
    assert per_row > short  # the same rows as objects: opcodes for every token


def test_a_row_whose_masks_do_not_match_its_tokens_is_refused_by_name(tiny_model):
    from dataclasses import replace

    row = tiny_model.processor.prepare_item("hello world", index=3)
    broken = replace(row, pool_mask=row.pool_mask[:-1])
    with pytest.raises(ValueError, match=rf"item 3: {row.num_tokens} tokens, but a pool mask of {row.num_tokens - 1}"):
        tiny_model.processor.collate([broken])
    with pytest.raises(ValueError, match=rf"item 3: {row.num_tokens} tokens, but a pool mask of {row.num_tokens - 1}"):
        tiny_model.processor.pack([row, broken])  # never packed into the next row's span
