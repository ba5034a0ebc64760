"""Rendering and tokenization: without instructions the ids are exactly Jina V4's."""

import base64
import io
import json
import zlib

import pytest

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


def test_instructions_are_a_pure_prefix_and_excluded_from_pooling(tiny_model, image):
    processor = tiny_model.processor
    plain = processor.prepare_item({"text": "hello", "task": "retrieval.query"})
    row = processor.prepare_item({"text": "hello", "task": "retrieval.query"}, instructions="Find legal cases")
    prefix = tok(processor, "<|im_start|>system\nFind legal cases<|im_end|>\n")
    assert row.input_ids[: len(prefix)] == prefix and row.instruction_len == len(prefix)
    assert row.input_ids[len(prefix):] == tok(processor, "<|im_start|>user\nQuery: hello<|im_end|>\n")
    assert not any(row.pool_mask[: len(prefix)]) and all(row.pool_mask[len(prefix):])
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
    assert plain.input_ids == tok(processor, "Query: " + long_text)[:20] or plain.num_tokens <= 20
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
        ({"image": "bm90IGFuIGltYWdl"}, "item 4: image could not be decoded"),
        ({"image": "%%%"}, "item 4: image is not an existing file, a data: URL or valid base64"),
        ({"image": "http://example.com/a.png"}, "item 4: image URLs are not fetched"),
        ({"text": "a <|image_pad|> b"}, "item 4: 'text' contains a reserved vision token"),
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
    import processing_nova_embeddings_v1 as processing

    data = json.loads(repo_file("chat_template.json").read_text())
    assert data == {"instruction_template": processing.DEFAULT_INSTRUCTION_TEMPLATE,
                    "chat_template": processing.DEFAULT_ITEM_TEMPLATE}
