"""A Jina V4 directory loads as it is, `nova convert` turns it into a Nova directory, same vectors."""

import torch

from nova.cli import main
from nova.loading import load_model
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
    for multi in (False, True):
        a = jina.encode(items, return_multivector=multi)
        b = nova.encode(items, return_multivector=multi)
        c = tiny_model.encode(items, return_multivector=multi)  # the Nova-layout tiny: same seed, same weights
        for x, y, z in zip(a, b, c, strict=True):
            assert torch.allclose(x, y, atol=1e-6) and torch.allclose(x, z, atol=1e-6)


def test_convert_refuses_a_non_model_directory(tmp_path, capsys):
    assert main(["convert", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().out
