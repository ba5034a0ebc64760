"""Run-time adapters: PEFT folders in, validated completely, all-or-nothing; merger-targeting adapters."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nova.tiny import write_peft_folder


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def copy_adapter(tiny_dir, tmp_path, name="retrieval"):
    dest = tmp_path / f"copy-{name}"
    shutil.copytree(tiny_dir / "adapters" / name, dest)
    return dest


def test_load_copy_under_new_name_gives_same_vectors(fresh_model, tiny_dir, tmp_path):
    path = copy_adapter(tiny_dir, tmp_path)
    assert fresh_model.load_adapter("legal", str(path)) == ["legal"]
    a = fresh_model.encode([{"text": "x", "adapter": "legal"}, {"text": "x", "adapter": "retrieval"}])
    assert cos(a[0], a[1]) >= 0.99999
    assert fresh_model.list_adapters()["legal"]["rank"] == 4


def test_routed_adapters_equal_their_weights_merged_into_the_base(fresh_model, tiny_dir):
    """The per-row LoRA delta against its textbook definition, W + (alpha/r)·B·A merged into a second copy of
    the base weights: one mixed batch (three adapters, a base row, rows of different lengths) row by row."""
    from nova.loading import load_model

    texts = ["a short query", "a much longer passage about adapters, padding and routing in one batch", "x = 1",
             "the cat sat on the mat"]
    items = [{"text": text, "adapter": name} for text, name in
             zip(texts, ["retrieval", "code", None, "text-matching"], strict=True)]
    routed = fresh_model.encode(items, batch_size=len(items))
    for item, got in zip(items, routed, strict=True):
        merged = load_model(tiny_dir)
        if item["adapter"]:
            scaling = merged.lora.adapters[item["adapter"]].scaling
            with torch.no_grad():
                for module, (a, b) in merged.lora.weights(item["adapter"]).items():
                    merged.lora.model.get_submodule(module).weight += scaling * (b @ a)
        want = merged.encode([{"text": item["text"], "adapter": None}])[0]
        assert torch.allclose(got, want, atol=1e-5), (item, float((got - want).abs().max()))


def assert_unchanged(model, before, reference):
    assert set(model.list_adapters()) == before
    now = model.encode([{"text": "probe", "adapter": name} for name in sorted(before)])
    assert all(cos(a, b) >= 0.99999 for a, b in zip(now, reference, strict=True))


def test_bad_adapters_are_refused_and_change_nothing(fresh_model, tiny_dir, tmp_path):
    before = set(fresh_model.list_adapters())
    reference = fresh_model.encode([{"text": "probe", "adapter": name} for name in sorted(before)])
    good = tiny_dir / "adapters" / "code"
    weights = load_file(str(good / "adapter_model.safetensors"))
    config = json.loads((good / "adapter_config.json").read_text())

    def folder(name, tensors, cfg):
        path = tmp_path / name
        path.mkdir()
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(cfg))
        return path

    no_config = folder("no-config", weights, config)
    (no_config / "adapter_config.json").unlink()
    # rank above max_lora_rank
    big = {k: (torch.zeros(128, v.shape[1]) if ".lora_A." in k else torch.zeros(v.shape[0], 128)) for k, v in weights.items()}
    cases = {
        "rank": (folder("rank", big, {**config, "r": 128}), "rank 128 exceeds max_lora_rank 64"),
        "target": (folder("target", {k.replace("q_proj", "zz_proj"): v for k, v in weights.items()}, {**config, "target_modules": ["zz_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "multi_vector_projector"]}),
                   "target module 'model.layers.0.self_attn.zz_proj' does not exist"),
        "shape": (folder("shape", {k: (v[:, :10].contiguous() if ".lora_A." in k else v) for k, v in weights.items()}, config),
                  "expects lora_A"),
        "missing": (tmp_path / "nowhere", "nowhere: does not exist"),
        "missing-file": (tmp_path / "nowhere" / "adapter_model.safetensors", "does not exist"),
        "not-weights": (good / "adapter_config.json", "not a PEFT folder nor the adapter_model.safetensors of one"),
        "no-config": (no_config / "adapter_model.safetensors", "no-config: no adapter_config.json"),
        "dora": (folder("dora", weights, {**config, "use_dora": True}), "use_dora=true is not supported"),
        "undeclared": (folder("undeclared", weights, {**config, "target_modules": ["q_proj"]}),
                       "which target_modules"),
        "exists": (good, "adapter 'code' is already loaded"),
    }
    for name, (path, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            fresh_model.load_adapter("code" if name == "exists" else f"bad-{name}", str(path))
        assert_unchanged(fresh_model, before, reference)


def test_max_loras_is_enforced_atomically(tiny_dir, tmp_path):
    from nova.loading import load_model

    model = load_model(tiny_dir, max_loras=4)
    path = copy_adapter(tiny_dir, tmp_path)
    model.load_adapter("fourth", str(path))
    with pytest.raises(ValueError, match="would exceed max_loras=4"):
        model.load_adapter("fifth", str(path))
    assert "fifth" not in model.list_adapters()
    model.unload_adapter("fourth")
    model.load_adapter("fifth", str(path))
    with pytest.raises(ValueError, match="unknown adapter 'ghost'"):
        model.unload_adapter("ghost")


def test_adapter_on_the_vision_merger_routes_per_image(fresh_model, tmp_path, make_image):
    """A user adapter on the vision-language merger ("projector"): applies to its rows' images only."""
    generator = torch.Generator().manual_seed(7)
    pairs = {}
    for name in ("visual.merger.mlp.0", "visual.merger.mlp.2"):
        module = fresh_model.get_submodule(name)
        pairs[name] = (torch.randn(2, module.in_features, generator=generator),
                       torch.randn(module.out_features, 2, generator=generator))
    write_peft_folder(tmp_path / "merger", pairs, {"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                   "target_modules": ["mlp.0", "mlp.2"]})
    fresh_model.load_adapter("charts", str(tmp_path / "merger"))
    image = make_image(seed=9)
    other = make_image(70, 70, seed=2)
    items = [{"image": image, "adapter": "charts"}, {"image": other, "adapter": "none"}, {"image": image, "adapter": "none"}]
    together = fresh_model.encode(items, batch_size=3)
    alone = [fresh_model.encode([item])[0] for item in items]
    assert all(cos(a, b) >= 0.9999 for a, b in zip(together, alone, strict=True))
    assert cos(together[0], together[2]) < 0.999  # the adapter changed its row's image only


def test_an_adapter_loads_by_its_weights_file_as_by_its_folder(fresh_model, tiny_dir, tmp_path):
    """Jina V4's card and vLLM name an adapter by `.../adapter_model.safetensors`: in process as in the server."""
    folder = copy_adapter(tiny_dir, tmp_path, "code")
    assert fresh_model.load_adapter("by-file", str(folder / "adapter_model.safetensors")) == ["by-file"]
    assert fresh_model.list_adapters()["by-file"]["path"] == str(folder)
    got = fresh_model.encode([{"text": "def f(): pass", "adapter": name} for name in ("by-file", "code")])
    assert cos(got[0], got[1]) >= 0.99999


def test_the_server_resolves_adapter_paths_by_the_models_rule(tiny_dir, tmp_path):
    """The admin route and `--load-lora` take exactly what `load_adapter` takes (one function), inside the root."""
    from serve.adapters import resolve_lora_path
    from serve.errors import ApiError

    root = tmp_path / "root"
    folder = copy_adapter(tiny_dir, root, "code")
    assert resolve_lora_path(str(root), f"{folder.name}/adapter_model.safetensors") == str(folder.resolve())
    assert resolve_lora_path(str(root), folder.name) == str(folder.resolve())
    for given, reason in ((f"{folder.name}/adapter_config.json", "not a PEFT folder nor"), ("nowhere", "does not exist")):
        with pytest.raises(ApiError) as caught:
            resolve_lora_path(str(root), given)
        assert caught.value.code == "lora_path_not_found"
        assert caught.value.message.startswith(f"'lora_path' {given!r} under --lora-root: {reason}")
        assert str(root) not in caught.value.message  # the server's own paths stay its own


def test_rows_collated_for_an_adapter_unloaded_since_name_the_first_such_item(fresh_model):
    """A server collates a batch before its forward; an adapter unloaded in between fails the batch with the
    first row that needs it, and changes nothing else."""
    items = [{"text": "a", "adapter": "retrieval"}, {"text": "b", "adapter": "code"}, {"text": "c", "adapter": "code"}]
    rows = [fresh_model.processor.prepare_item(item, index=i) for i, item in enumerate(items)]
    collated = fresh_model.collate_rows(rows)
    fresh_model.unload_adapter("code")
    with pytest.raises(ValueError, match=r"^item 1: adapter 'code' is not loaded$"):
        fresh_model.embed_prepared(rows, collated=collated)
    assert fresh_model.embed_prepared(rows[:1], collated=fresh_model.collate_rows(rows[:1]))[0].shape == (64,)
