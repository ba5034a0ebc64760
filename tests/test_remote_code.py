"""The repository works as a Hugging Face remote-code model repository, offline."""

import ast
import os
import shutil
import subprocess
import sys

from nova.repo import (
    MODEL_CODE_FILES,
    REMOTE_CODE_FILES,
    REPO_ROOT,
    SENTENCE_TRANSFORMERS_CODE_FILE,
    TOKENIZER_FILES,
)

ALLOWED_IMPORTS = {"torch", "transformers", "peft", "PIL", "jinja2", "numpy", "safetensors", "huggingface_hub", "tqdm"}
# The sentence-transformers module runs inside sentence-transformers; the model code never imports it.
EXTRA_IMPORTS = {SENTENCE_TRANSFORMERS_CODE_FILE: {"sentence_transformers"}}


def test_remote_code_imports_only_each_other_and_allowed_libraries():
    stdlib = set(sys.stdlib_module_names)
    for name in REMOTE_CODE_FILES:
        tree = ast.parse((REPO_ROOT / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert f"{node.module}.py" in REMOTE_CODE_FILES, (name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for module in modules:
                    top = module.split(".")[0]
                    allowed = stdlib | ALLOWED_IMPORTS | EXTRA_IMPORTS.get(name, set())
                    assert top in allowed, (name, module)


def test_automodel_from_a_plain_copy_of_the_repo(tiny_dir, tmp_path):
    """Copy the repo's files (as a hub repo holds them) plus tiny weights; load in a fresh process with an
    empty modules cache, so transformers copies the remote-code files alone."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in MODEL_CODE_FILES + TOKENIZER_FILES + ("chat_template.json", "preprocessor_config.json"):
        shutil.copyfile(REPO_ROOT / name, repo / name)
    shutil.copyfile(tiny_dir / "config.json", repo / "config.json")
    shutil.copyfile(tiny_dir / "model.safetensors", repo / "model.safetensors")
    shutil.copytree(tiny_dir / "adapters", repo / "adapters")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModel, AutoProcessor\n"
        f"p = AutoProcessor.from_pretrained({str(repo)!r}, trust_remote_code=True)\n"
        "assert p.prepare_item('hello world').input_ids == [2859, 25, 23811, 1879]\n"
        f"m = AutoModel.from_pretrained({str(repo)!r}, trust_remote_code=True)\n"
        "assert 'serve' not in sys.modules and 'nova' not in sys.modules\n"
        "v = m.encode(['hello', {'text': 'x', 'task': 'code.passage', 'instructions': 'Find code'}])\n"
        "print(sorted(m.list_adapters()), [round(float(x.norm()), 4) for x in v])\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "['code', 'retrieval', 'text-matching'] [1.0, 1.0]" in out.stdout
    copied = {p.name for p in (tmp_path / "modules").rglob("*.py") if p.name != "__init__.py"}
    assert copied == set(MODEL_CODE_FILES)


def test_root_config_is_the_full_size_jina_v4_shape():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(REPO_ROOT), trust_remote_code=True)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (2048, 36, 16, 2, 11008, 151936)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and text.rope_parameters["rope_theta"] == 1e6
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size, vision.out_hidden_size,
            vision.window_size, list(vision.fullatt_block_indexes)) == (32, 1280, 16, 3420, 2048, 112, [7, 15, 23, 31])
    assert config.matryoshka_dims == [128, 256, 512, 1024, 2048] and config.multi_vector_projector_dim == 128
    assert config.task_routing["retrieval.passage"] == {"adapter": "retrieval", "prompt": "Passage: "}
    # one source for the prompts: the shipped config.json holds exactly the configuration class's defaults
    # (and config_sentence_transformers.json holds the routing's, tests/test_sentence_transformers.py)
    module = sys.modules[type(config).__module__]
    assert config.task_routing == module.DEFAULT_TASK_ROUTING
    assert config.prompt_sets == {"descriptive": module.DESCRIPTIVE_PROMPTS}
    assert not config.nova_random_weights
