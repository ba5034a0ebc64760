"""The tiny random-weight checkpoint: the real tokenizer, image processor and chat template around a
2-layer backbone, written deterministically. Tests and the offline default (`nova serve` with no model)
use it; its config says `nova_random_weights: true` so every surface can warn that vectors are noise.

`layout="jina"` writes the same weights the way Jina Embeddings V4 ships them (its config style and one
combined adapter folder), to test Jina compatibility and `nova convert` without downloading anything.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import pathlib
import shutil

import torch
from safetensors.torch import save_file

from nova.repo import AUTO_MAP, DATA_FILES, REMOTE_CODE_FILES, TOKENIZER_FILES, repo_file

GENERATOR_VERSION = 1
TASKS = ("retrieval", "text-matching", "code")
# Jina V4's adapter target regex: every language-model projection and the multi-vector projector.
JINA_TARGET_MODULES = (
    r"(.*(model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$"
    r"|.*(single_vector_projector|multi_vector_projector).*$)"
)
SIZES = {
    # text hidden <= 128, two layers, a two-block vision tower; vocab is the real one (the real tokenizer).
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, v_hidden=32, v_depth=2, v_heads=2,
                 v_intermediate=64, mrope=[2, 3, 3], dims=[16, 32, 64]),
    # a mid-size random config for benchmarks: big enough that batching, not Python, dominates.
    "small": dict(hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1376, v_hidden=256, v_depth=4,
                  v_heads=4, v_intermediate=512, mrope=[8, 12, 12], dims=[128, 256, 512]),
}
# "full": the shape in this repository's config.json (Jina V4's 3B), random bf16 weights, for GPU benchmarks.
FULL = "full"
# (rank, scale) of the random adapters: large enough on the small shapes that routing is observable; at the full
# shape Jina's rank and a small scale, so 36 layers of random deltas stay finite in bf16.
LORA_SHAPE = {"tiny": (4, 0.2), "small": (4, 0.2), FULL: (32, 0.01)}


def tiny_config_dict(size: str = "tiny") -> dict:
    if size == FULL:
        config = json.loads(repo_file("config.json").read_text())
        return {**config, "nova_random_weights": True}
    s = SIZES[size]
    return {
        "architectures": ["NovaEmbeddingsV1Model"],
        "auto_map": AUTO_MAP,
        "model_type": "nova_embeddings_v1",
        "nova_random_weights": True,
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "hidden_size": s["hidden"],
            "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv_heads"],
            "intermediate_size": s["intermediate"],
            "vocab_size": 151936,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": s["mrope"]},
            "hidden_act": "silu",
            "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": s["v_depth"],
            "hidden_size": s["v_hidden"],
            "num_heads": s["v_heads"],
            "intermediate_size": s["v_intermediate"],
            "out_hidden_size": s["hidden"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [s["v_depth"] - 1],
            "tokens_per_second": 2,
            "hidden_act": "silu",
        },
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "matryoshka_dims": s["dims"],
        "multi_vector_projector_dim": 128,
    }


def default_dir(size: str = "tiny") -> pathlib.Path:
    home = os.environ.get("NOVA_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "nova")
    return pathlib.Path(home) / f"{size}-random-v{GENERATOR_VERSION}"


def copy_repo_files(out: pathlib.Path, *, remote_code: bool = True) -> None:
    """The files every Nova directory carries besides weights: tokenizer, templates, remote code."""
    names = TOKENIZER_FILES + DATA_FILES + (REMOTE_CODE_FILES if remote_code else ())
    for name in names:
        shutil.copyfile(repo_file(name), out / name)


def random_lora(model, generator: torch.Generator, task_index: int, rank: int, scale: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Non-zero LoRA weights on Jina's text targets, on the generator's device in each target's dtype; different
    per task so routing is observable. ({module: (A, B)}, the form `model.lora.build` takes.)"""
    import re

    pattern = re.compile(JINA_TARGET_MODULES)
    pairs = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name) and not name.startswith("visual."):
            like = {"generator": generator, "device": generator.device, "dtype": module.weight.dtype}
            a = torch.randn(rank, module.in_features, **like) * scale
            b = torch.randn(module.out_features, rank, **like) * scale * (1 + task_index)
            pairs[name] = (a, b)
    return pairs


def _adapter_config(base: str, rank: int) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "FEATURE_EXTRACTION",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": JINA_TARGET_MODULES,
        "inference_mode": True,
    }


def write_checkpoint(out_dir, *, size: str = "tiny", layout: str = "nova", seed: int = 0,
                     device: str = "cpu") -> pathlib.Path:
    """Write a random-weight checkpoint. Same seed, same bytes (on the same device: the full shape is built on
    a GPU when one is given, minutes faster than on a CPU)."""
    from transformers import AutoConfig, AutoModel

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_dict = tiny_config_dict(size)
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    copy_repo_files(out)
    config = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    torch.manual_seed(seed)  # seeds every device's generator
    dtype = torch.bfloat16 if size == FULL else torch.float32  # 7.5 GB instead of 15 at the full shape
    with torch.device(device):
        model = AutoModel.from_config(config, trust_remote_code=True, dtype=dtype)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})

    generator = torch.Generator(device=device).manual_seed(seed + 1)
    adapters = {task: random_lora(model, generator, i, *LORA_SHAPE[size]) for i, task in enumerate(TASKS)}
    if layout == "nova":
        for task, pairs in adapters.items():
            write_peft_folder(out / "adapters" / task, pairs, _adapter_config(str(out), LORA_SHAPE[size][0]))
    elif layout == "jina":
        _write_jina_layout(out, config_dict, adapters, LORA_SHAPE[size][0])
    else:
        raise ValueError(f"unknown layout {layout!r}; use 'nova' or 'jina'")
    (out / "GENERATED.txt").write_text(
        f"Random weights (seed {seed}, size {size}, layout {layout}); generator v{GENERATOR_VERSION}. "
        "Vectors from this checkpoint carry no meaning.\n"
    )
    return out


def write_peft_folder(folder: pathlib.Path, pairs: dict, config: dict) -> None:
    """A standard PEFT LoRA folder: `base_model.model.<module>.lora_A.weight` keys."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in pairs.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": next(iter(pairs.values()))[0].shape[0]}, indent=2))


def jina_adapter_key(module: str, ab: str, task: str) -> str:
    """Jina V4's combined-adapter key, with transformers>=4.52 language-model naming."""
    if module.startswith("model."):
        module = "model.language_model." + module[len("model.") :]
    return f"base_model.model.{module}.lora_{ab}.{task}.weight"


def _write_jina_layout(out: pathlib.Path, config_dict: dict, adapters: dict, rank: int) -> None:
    """Jina V4's directory: flat Qwen2.5-VL config of its own class, one combined adapter, no Nova code."""
    for name in REMOTE_CODE_FILES + ("chat_template.json",):
        (out / name).unlink(missing_ok=True)
    text = config_dict.pop("text_config")
    flat = {k: v for k, v in text.items() if k not in ("model_type", "rope_parameters")}
    flat["rope_theta"] = text["rope_parameters"]["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": text["rope_parameters"]["mrope_section"]}
    jina = {
        **{k: v for k, v in config_dict.items() if k not in ("auto_map", "architectures", "model_type")},
        **flat,
        "architectures": ["JinaEmbeddingsV4Model"],
        "auto_map": {"AutoConfig": "configuration_jina_embeddings_v4.JinaEmbeddingsV4Config",
                     "AutoModel": "modeling_jina_embeddings_v4.JinaEmbeddingsV4Model"},
        "model_type": "qwen2_5_vl",
        "task_names": list(TASKS),
        "single_vector_pool_strategy": "mean",
    }
    (out / "config.json").write_text(json.dumps(jina, indent=2))
    folder = out / "adapters"
    folder.mkdir(exist_ok=True)
    tensors = {}
    for task, pairs in adapters.items():
        for module, (a, b) in pairs.items():
            tensors[jina_adapter_key(module, "A", task)] = a.contiguous()
            tensors[jina_adapter_key(module, "B", task)] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(_adapter_config("jinaai/jina-embeddings-v4", rank), indent=2))


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for name in REMOTE_CODE_FILES + DATA_FILES:
        digest.update(repo_file(name).read_bytes())
    return digest.hexdigest()[:16]


def ensure_tiny_checkpoint(path=None, size: str = "tiny") -> pathlib.Path:
    """The bundled tiny checkpoint, generated on first use and refreshed when the remote code changes."""
    out = pathlib.Path(path) if path else default_dir(size)
    stamp = out / ".nova-fingerprint"
    fingerprint = _fingerprint()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:  # several processes may start at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == fingerprint and (out / "model.safetensors").is_file():
            return out
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_checkpoint(tmp, size=size)
        (tmp / ".nova-fingerprint").write_text(fingerprint)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", nargs="?", help="where to write it (default: the cache folder used by `nova serve`)")
    parser.add_argument("--size", choices=[*SIZES, FULL], default="tiny",
                        help="tiny (tests), small (CPU benchmarks) or full (the 3B shape of config.json, random bf16 "
                             "weights, 7.5 GB: GPU benchmarks)")
    parser.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda: much faster at "
                                                        "the full shape) (default: %(default)s)")
    parser.add_argument("--layout", choices=["nova", "jina"], default="nova", help="directory layout to write")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    if args.out_dir is None and args.layout == "nova" and args.seed == 0:
        out = ensure_tiny_checkpoint(size=args.size)
    else:
        out = write_checkpoint(args.out_dir or default_dir(args.size), size=args.size, layout=args.layout,
                               seed=args.seed, device=args.device)
    print(f"wrote a RANDOM-WEIGHT {args.size} checkpoint to {out}")
    return 0
