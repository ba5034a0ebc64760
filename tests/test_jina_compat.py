"""A Jina V4 directory loads as it is, `nova convert` turns it into a Nova directory, same vectors."""

import inspect

import torch

from nova.cli import main
from nova.loading import load_model, load_processor
from nova.tiny import write_checkpoint


def test_jina_layout_and_its_conversion_give_identical_vectors(tiny_model, tmp_path, make_image):
    jina_dir = write_checkpoint(tmp_path / "jina", layout="jina")
    assert not (jina_dir / "modeling_nova_embeddings_v1.py").exists()
    assert (jina_dir / "adapters" / "adapter_model.safetensors").exists()
    assert main(["convert", str(jina_dir), str(tmp_path / "nova")]) == 0
    jina = load_model(jina_dir)
    nova = load_model(tmp_path / "nova")
    assert sorted(jina.list_adapters()) == sorted(nova.list_adapters()) == ["code", "retrieval", "text-matching"]
    items = [
        {"text": "hello", "task": "retrieval.query"},
        {"text": "def f(): pass", "task": "code.passage", "instructions": "Find code"},
        {"image": make_image(), "task": "text-matching"},
    ]
    for model, directory in ((jina, jina_dir), (nova, tmp_path / "nova")):  # a processor without the weights
        alone = load_processor(directory)
        # the same code (this repository's, or the directory's own), if not the same module object
        assert inspect.getsource(type(alone)) == inspect.getsource(type(model.processor))
        for item in items:
            mine, theirs = alone.prepare_item(item), model.processor.prepare_item(item)
            assert mine.as_fields().keys() == theirs.as_fields().keys()
            assert list(mine.input_ids) == list(theirs.input_ids) and mine.adapter == theirs.adapter
            assert (mine.pixel_values is None) == (theirs.pixel_values is None)
            assert mine.pixel_values is None or torch.equal(mine.pixel_values, theirs.pixel_values)
    for multi in (False, True):
        a = jina.encode(items, return_multivector=multi)
        b = nova.encode(items, return_multivector=multi)
        c = tiny_model.encode(items, return_multivector=multi)  # the Nova-layout tiny: same seed, same weights
        for x, y, z in zip(a, b, c, strict=True):
            assert torch.allclose(x, y, atol=1e-6) and torch.allclose(x, z, atol=1e-6)


def test_convert_refuses_a_non_model_directory(tmp_path, capsys):
    assert main(["convert", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().out


def _rewrite_weights(src, dst, rename, drop=()):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(src / "model.safetensors"))
    save_file({rename(k): v for k, v in weights.items() if not any(k.startswith(d) for d in drop)},
              str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _newer_name(key: str) -> str:
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    if key.startswith("visual."):
        return "model.visual." + key[len("visual."):]
    return key


def test_newer_transformers_weight_names_load(tiny_model, tiny_dir, tmp_path, make_image):
    newer = _rewrite_weights(tiny_dir, tmp_path / "newer", _newer_name)
    model = load_model(newer)
    items = ["hello", {"image": make_image(), "text": "chart"}]
    for a, b in zip(model.encode(items), tiny_model.encode(items), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_missing_base_weights_are_a_load_error_naming_them(tiny_dir, tmp_path):
    import pytest

    broken = _rewrite_weights(tiny_dir, tmp_path / "broken", lambda k: k,
                              drop=("model.layers.1.mlp.down_proj", "visual.merger"))
    with pytest.raises(ValueError, match=r"base weight\(s\) missing.*model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(broken)
    # a checkpoint with an lm_head (Jina V4 ships none; Qwen does) loads: embeddings never use it
    with_head = tmp_path / "with_head"
    _rewrite_weights(tiny_dir, with_head, lambda k: k)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(with_head / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(with_head / "model.safetensors"), metadata={"format": "pt"})
    assert load_model(with_head).list_adapters()
