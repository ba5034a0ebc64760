"""Where the model repository's own files are: the remote code and data that every Nova directory carries."""

from __future__ import annotations

import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# What `AutoModel.from_pretrained(..., trust_remote_code=True)` copies into the modules cache.
MODEL_CODE_FILES = (
    "configuration_nova_embeddings_v1.py",
    "processing_nova_embeddings_v1.py",
    "lora_nova_embeddings_v1.py",
    "fetching_nova_embeddings_v1.py",
    "inputs_nova_embeddings_v1.py",
    "caching_nova_embeddings_v1.py",
    "vision_nova_embeddings_v1.py",
    "graphs_nova_embeddings_v1.py",
    "scoring_nova_embeddings_v1.py",
    "jina_nova_embeddings_v1.py",
    "modeling_nova_embeddings_v1.py",
)
# The sentence-transformers module (modules.json points at it); it imports the model code above.
SENTENCE_TRANSFORMERS_CODE_FILE = "sentence_transformers_nova_embeddings_v1.py"
REMOTE_CODE_FILES = MODEL_CODE_FILES + (SENTENCE_TRANSFORMERS_CODE_FILE,)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json")
DATA_FILES = ("chat_template.json", "preprocessor_config.json") + SENTENCE_TRANSFORMERS_FILES
AUTO_MAP = {
    "AutoConfig": "configuration_nova_embeddings_v1.NovaEmbeddingsV1Config",
    "AutoModel": "modeling_nova_embeddings_v1.NovaEmbeddingsV1Model",
    "AutoProcessor": "processing_nova_embeddings_v1.NovaEmbeddingsV1Processor",
}


def repo_file(name: str) -> pathlib.Path:
    path = REPO_ROOT / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: nova needs the model repository checkout (install it with `pip install -e .`)"
        )
    return path


def model_class(name: str = "NovaEmbeddingsV1Model"):
    """A class (or function) of the remote code, imported the way transformers imports it (as a dynamic module)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    module = {
        "NovaEmbeddingsV1Model": "modeling_nova_embeddings_v1",
        "NovaEmbeddingsV1Config": "configuration_nova_embeddings_v1",
        "NovaEmbeddingsV1Processor": "processing_nova_embeddings_v1",
        "read_peft_folder": "lora_nova_embeddings_v1",
        "peft_folder": "lora_nova_embeddings_v1",
        "NO_ADAPTER": "processing_nova_embeddings_v1",
        "decode_image": "processing_nova_embeddings_v1",
        "matryoshka_truncate": "processing_nova_embeddings_v1",
        **dict.fromkeys(("maxsim_scores", "padded", "maxsim", "score_documents", "ranked", "rerank_tasks",
                         "RerankResult", "SCORINGS"), "scoring_nova_embeddings_v1"),
    }[name]
    repo_file(f"{module}.py")
    return get_class_from_dynamic_module(f"{module}.{name}", str(REPO_ROOT))


def is_base_model_name(adapter: str | None) -> bool:
    """Whether an adapter name means "no adapter" (`none`/`base`), by the model's own list (the remote code's
    `NO_ADAPTER`), so that the tooling keeps no copy of it."""
    return isinstance(adapter, str) and adapter.lower() in model_class("NO_ADAPTER")
