"""Any dtype and device a user puts the model on: adapters follow every move, bf16 and fp16 agree with fp32
(fp16 loaded every way Jina V4's users load it), a row that overflows fp16 is its own error while the other rows
keep their vectors, and adapter matrices never leak into the base state dict."""

import pytest
import torch

from nova.loading import load_model


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def items(image, make_image):
    """Pooled and multi-vector work over a mixed batch: text with each adapter, the base model, an image,
    text+image and an instructed image."""
    return [
        {"task": "retrieval.query", "text": "what is the capital of France?"},
        {"task": "code.passage", "text": "def sort(xs):\n    return sorted(xs)"},
        {"task": "text-matching", "text": "the cat sat on the mat", "instructions": "Match paraphrases"},
        {"text": "no adapter here", "adapter": None},
        {"image": image},
        {"image": make_image(60, 90, seed=3), "text": "a bar chart", "task": "retrieval.passage"},
        {"image": make_image(50, 50, seed=5), "instructions": "Represent this chart", "adapter": "code"},
    ]


def assert_close_to(reference, model, batch, floor=0.98):
    pooled = model.encode(batch, batch_size=len(batch))
    multi = model.encode(batch, batch_size=len(batch), return_multivector=True)
    want_pooled = reference.encode(batch, batch_size=len(batch))
    want_multi = reference.encode(batch, batch_size=len(batch), return_multivector=True)
    for i in range(len(batch)):
        assert pooled[i].dtype == torch.float32 and torch.isfinite(pooled[i]).all()
        assert cos(pooled[i], want_pooled[i]) >= floor, (i, cos(pooled[i], want_pooled[i]))
        assert multi[i].shape == want_multi[i].shape
        per_token = torch.nn.functional.cosine_similarity(multi[i], want_multi[i], dim=-1)
        assert float(per_token.min()) >= floor - 0.03, (i, float(per_token.min()))
        assert float(per_token.mean()) >= floor, (i, float(per_token.mean()))


def test_loaded_in_bf16_matches_fp32(tiny_model, tiny_dir, image, make_image):
    bf16 = load_model(tiny_dir, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert_close_to(tiny_model, bf16, items(image, make_image))
    assert {b.dtype for b in bf16.lora.buffers()} == {torch.bfloat16}


def test_fp32_model_moved_to_bf16_and_adapter_loaded_after_the_move(tiny_model, tiny_dir, image, make_image):
    model = load_model(tiny_dir)
    model.to(torch.bfloat16)
    assert_close_to(tiny_model, model, items(image, make_image))
    model.unload_adapter("code")
    model.load_adapter("code", str(tiny_dir / "adapters" / "code"))  # arrives in the model's dtype
    assert_close_to(tiny_model, model, items(image, make_image))
    assert {b.dtype for b in model.lora.buffers()} == {torch.bfloat16}
    model.to(torch.float32)  # and back: exactly fp32 again up to bf16's rounding of the weights
    assert {b.dtype for b in model.lora.buffers()} == {torch.float32}
    assert_close_to(tiny_model, model, items(image, make_image))


def test_loaded_in_fp16_matches_fp32(tiny_model, tiny_dir, image, make_image):
    """Text, images, text+image, three adapters and the base model in one batch (`items`)."""
    fp16 = load_model(tiny_dir, dtype=torch.float16)
    assert fp16.dtype == torch.float16
    assert {b.dtype for b in fp16.lora.buffers()} == {torch.float16}
    assert_close_to(tiny_model, fp16, items(image, make_image), floor=0.99)


def test_fp16_the_ways_jina_v4_users_ask_for_it(tiny_model, tiny_dir):
    """Jina V4's card: `AutoModel.from_pretrained(..., trust_remote_code=True, torch_dtype=torch.float16)`;
    also `dtype="float16"` by name, and `.half()` on a loaded fp32 model (its adapters follow)."""
    from transformers import AutoModel

    batch = [{"task": "retrieval.query", "text": "what is the capital of France?"},
             {"task": "code.passage", "text": "def sort(xs):\n    return sorted(xs)"},
             {"text": "the base model", "adapter": None}]
    card = AutoModel.from_pretrained(str(tiny_dir), trust_remote_code=True, torch_dtype=torch.float16)
    named = load_model(tiny_dir, dtype="float16")
    halved = load_model(tiny_dir).half()
    want = tiny_model.encode(batch)
    for model in (card, named, halved):
        assert model.model.embed_tokens.weight.dtype == torch.float16
        assert {b.dtype for b in model.lora.buffers()} == {torch.float16}
        cosines = [cos(a, b) for a, b in zip(model.encode(batch), want, strict=True)]
        assert min(cosines) >= 0.99, cosines


def test_dtypes_the_backbone_cannot_run_are_refused(tiny_dir):
    with pytest.raises(ValueError, match="dtype int8 is not supported.*float16"):
        load_model(tiny_dir, dtype=torch.int8)
    from nova.repo import model_class

    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):  # (AutoModel's config fails on it first)
        model_class().from_pretrained(str(tiny_dir), dtype="fp8")
    model = load_model(tiny_dir)
    model.to(torch.float8_e4m3fn)  # a move cannot be refused, so encoding is: never a garbage vector
    with pytest.raises(ValueError, match="dtype float8_e4m3fn is not supported"):
        model.encode(["hello"])


def overflow_batch(image):
    """Row 1 overflows float16 (its adapter's LoRA, `float16_overflow_adapter`); the others are three adapters,
    the base model and an image, no longer than row 0 (so the batch pads the same without row 1)."""
    return [
        {"task": "retrieval.query", "text": "what is the capital of France and why?"},
        {"text": "an ordinary sentence", "adapter": "loud"},
        {"task": "code.query", "text": "def f(): return 1"},
        {"task": "text-matching", "text": "the cat sat"},
        {"text": "no adapter here", "adapter": None},
        {"image": image},
    ]


@pytest.mark.parametrize("multivector", [False, True], ids=["pooled", "multi-vector"])
def test_a_row_that_overflows_fp16_is_its_own_error(tiny_dir, float16_overflow_adapter, image, multivector):
    model = load_model(tiny_dir, dtype=torch.float16)
    model.load_adapter("loud", str(float16_overflow_adapter))
    batch = overflow_batch(image)
    rows = [model.processor.prepare_item(item, index=i) for i, item in enumerate(batch)]
    outcomes = model.embed_prepared(rows, multivector)
    error = outcomes[1]
    assert isinstance(error, ValueError) and error.index == 1 and error.code == "non_finite_embedding"
    assert str(error) == ("item 1: the float16 forward gave a non-finite vector (adapter 'loud'); "
                          "load the model in bfloat16 or float32")
    others = [i for i in range(len(rows)) if i != 1]
    without = model.embed_prepared([rows[i] for i in others], multivector)
    for i, alone in zip(others, without, strict=True):
        assert isinstance(outcomes[i], torch.Tensor) and torch.isfinite(outcomes[i]).all()
        torch.testing.assert_close(outcomes[i], alone, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="^item 1: the float16 forward gave a non-finite vector"):
        model.encode(batch, return_multivector=multivector, batch_size=len(batch))


def test_the_overflowing_row_is_finite_in_bf16_and_fp32(tiny_dir, float16_overflow_adapter):
    """The error is float16's range, not a broken adapter: wider dtypes give that row a vector."""
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(tiny_dir, dtype=dtype)
        model.load_adapter("loud", str(float16_overflow_adapter))
        assert torch.isfinite(model.encode([{"text": "an ordinary sentence", "adapter": "loud"}])[0]).all()


def test_adapters_are_module_state_outside_the_base_state_dict(fresh_model, tiny_dir, tmp_path):
    keys = set(fresh_model.state_dict())
    assert not any("lora" in key for key in keys)
    buffers = dict(fresh_model.named_buffers())
    assert "lora.layers.model__layers__0__self_attn__q_proj+k_proj+v_proj.A" in buffers
    fresh_model.save_pretrained(tmp_path / "saved")
    from safetensors import safe_open

    saved = set()
    for path in (tmp_path / "saved").glob("*.safetensors"):
        with safe_open(str(path), "pt") as fh:
            saved |= set(fh.keys())
    assert saved == keys


def test_device_map_loads_straight_to_the_device(tiny_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(tiny_dir), trust_remote_code=True, device_map="cpu")
    assert model.device.type == "cpu" and model.list_adapters()
    assert torch.isfinite(model.encode(["hello"])[0]).all()


def test_backbone_runs_without_a_kv_cache(fresh_model):
    seen = {}
    original = fresh_model.model.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    fresh_model.model.forward = spy
    fresh_model.encode(["hello"])
    assert seen["use_cache"] is False


def test_flash_attention_only_for_16_bit_cuda(tiny_model, monkeypatch):
    import importlib.util
    import sys

    modeling = sys.modules[type(tiny_model).__module__]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    cuda = torch.device("cuda")
    assert modeling._default_attention(cuda, torch.bfloat16) == "flash_attention_2"
    assert modeling._default_attention(cuda, torch.float32) == "sdpa"
    assert modeling._default_attention(torch.device("cpu"), torch.bfloat16) == "sdpa"
