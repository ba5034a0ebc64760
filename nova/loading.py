"""One way in for every caller (server, playground, training, evaluation): `load_model()`."""

from __future__ import annotations

import os

from nova.repo import model_class
from nova.tiny import ensure_tiny_checkpoint


def load_model(model: str | os.PathLike | None = None, *, device: str | None = None, dtype=None,
               chat_template: str | None = None, max_loras: int | None = None, max_lora_rank: int | None = None,
               trust_remote_code: bool = True):
    """Load a Nova directory, a Jina V4 directory or a hub id; None means the bundled tiny checkpoint.

    A Nova directory is loaded through `AutoModel(trust_remote_code=True)` with its own remote code, exactly
    as a Hugging Face user would; anything else (a Jina V4 checkpoint) through this repository's classes.
    """
    path = str(ensure_tiny_checkpoint() if model is None else model)
    kwargs = {"chat_template": chat_template, "max_loras": max_loras, "max_lora_rank": max_lora_rank,
              "device": device, "dtype": dtype}
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    if os.path.isfile(os.path.join(path, "modeling_nova_embeddings_v1.py")):
        if not trust_remote_code:
            raise ValueError(f"{path} carries remote code; pass trust_remote_code=True (--trust-remote-code) to run it")
        from transformers import AutoModel

        return AutoModel.from_pretrained(path, trust_remote_code=True, **kwargs)
    return model_class().from_pretrained(path, **kwargs)
