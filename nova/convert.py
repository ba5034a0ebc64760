"""`nova convert JINA_DIR OUT_DIR`: a Jina Embeddings V4 directory -> a Nova directory.

Base weights keep their names (Nova uses Jina's module names), so they are copied byte for byte; the
combined task adapter is split into one standard PEFT folder per task; Nova's config, template, remote
code and sentence-transformers files are added.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

from nova.repo import (
    AUTO_MAP,
    REMOTE_CODE_FILES,
    SENTENCE_TRANSFORMERS_FILES,
    TOKENIZER_FILES,
    model_class,
    repo_file,
)
from nova.tiny import write_peft_folder


def _read_adapters(folder: pathlib.Path) -> dict:
    return model_class("read_peft_folder")(str(folder))


def convert(jina_dir, out_dir) -> pathlib.Path:
    src, out = pathlib.Path(jina_dir), pathlib.Path(out_dir)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src}: no config.json; not a model directory")
    weights = sorted(src.glob("*.safetensors")) + sorted(src.glob("*.safetensors.index.json"))
    if not weights:
        raise ValueError(f"{src}: no *.safetensors weights")
    out.mkdir(parents=True, exist_ok=True)
    config = model_class("NovaEmbeddingsV1Config").from_pretrained(str(src))
    config.architectures = ["NovaEmbeddingsV1Model"]
    config.auto_map = dict(AUTO_MAP)
    config.save_pretrained(str(out))
    for path in weights:
        shutil.copyfile(path, out / path.name)
    for name in TOKENIZER_FILES + ("preprocessor_config.json",):
        shutil.copyfile(src / name if (src / name).is_file() else repo_file(name), out / name)
    # Nova's own sentence-transformers files replace Jina's (its modules.json names Jina's custom_st module)
    for name in REMOTE_CODE_FILES + SENTENCE_TRANSFORMERS_FILES + ("chat_template.json",):
        shutil.copyfile(repo_file(name), out / name)
    adapters = src / "adapters"
    if (adapters / "adapter_model.safetensors").is_file():
        for task, (adapter_config, pairs) in _read_adapters(adapters).items():
            write_peft_folder(out / "adapters" / (task or "default"), pairs, adapter_config)
    elif adapters.is_dir():
        shutil.copytree(adapters, out / "adapters", dirs_exist_ok=True)
    (out / "CONVERTED_FROM.json").write_text(json.dumps({"source": str(src.resolve())}, indent=2))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("jina_dir", help="a Jina Embeddings V4 checkpoint directory")
    parser.add_argument("out_dir", help="where to write the Nova directory")


def run(args) -> int:
    try:
        out = convert(args.jina_dir, args.out_dir)
    except (ValueError, OSError) as exc:
        print(f"nova convert: {exc}")
        return 2
    print(f"wrote a Nova directory to {out}")
    return 0
