"""One way in for every caller (server, playground, training, evaluation): `load_model()`, and
`check_model_source()`, the checks a caller can run before paying for a model load (or a process to load it in)."""

from __future__ import annotations

import os

from nova.repo import model_class

REMOTE_CODE_MARKER = "modeling_nova_embeddings_v1.py"  # a Nova directory carries its own code


class RemoteCodeNotTrusted(ValueError):
    """A model directory carries its own Python code and the caller did not agree to run it."""


def _is_local_path(model: str) -> bool:
    """A model reference that can only mean a local path: absolute, relative with a leading dot or tilde, or
    with more than one '/' (a hub id is 'name' or 'org/name')."""
    return (os.path.isabs(model) or model.startswith((".", "~")) or "\\" in model or model.count("/") > 1
            or os.path.exists(model))


def check_model_source(model: str | os.PathLike | None, *, trust_remote_code: bool) -> None:
    """Raise ValueError, naming the fix, for a model that cannot load: a local path that is not a directory, or a
    Nova directory with its own code that the caller has not trusted (`RemoteCodeNotTrusted`). None (the bundled
    tiny checkpoint) and hub ids pass."""
    if model is None:
        return
    path = os.fspath(model)
    if _is_local_path(path) and not os.path.isdir(path):
        what = "a file, not a model directory" if os.path.exists(path) else "not found"
        raise ValueError(f"model {path}: {what} (give a Nova or Jina V4 directory, or a hub id 'org/name')")
    if not trust_remote_code and os.path.isfile(os.path.join(path, REMOTE_CODE_MARKER)):
        raise RemoteCodeNotTrusted(
            f"{path} carries its own code (*_nova_embeddings_v1.py); to run it, pass --trust-remote-code "
            "(in Python: trust_remote_code=True)"
        )


def _checked_source(model: str | os.PathLike | None, trust_remote_code: bool) -> tuple[str, bool]:
    """(the path or hub id to load, whether it is a Nova directory that carries its own code), after
    `check_model_source`; None is the bundled tiny checkpoint."""
    from nova.tiny import ensure_tiny_checkpoint  # imports torch: not needed by check_model_source's callers

    check_model_source(model, trust_remote_code=trust_remote_code)
    path = str(ensure_tiny_checkpoint() if model is None else model)
    return path, os.path.isfile(os.path.join(path, REMOTE_CODE_MARKER))


def load_model(model: str | os.PathLike | None = None, *, device: str | None = None, dtype=None,
               chat_template: str | None = None, max_loras: int | None = None, max_lora_rank: int | None = None,
               trust_remote_code: bool = True):
    """Load a Nova directory, a Jina V4 directory or a hub id; None means the bundled tiny checkpoint.

    A Nova directory is loaded through `AutoModel(trust_remote_code=True)` with its own remote code, exactly
    as a Hugging Face user would; anything else (a Jina V4 checkpoint) through this repository's classes.
    """
    path, own_code = _checked_source(model, trust_remote_code)
    kwargs = {"chat_template": chat_template, "max_loras": max_loras, "max_lora_rank": max_lora_rank,
              "device": device, "dtype": dtype}
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    if own_code:
        from transformers import AutoModel

        return AutoModel.from_pretrained(path, trust_remote_code=True, **kwargs)
    return model_class().from_pretrained(path, **kwargs)


def load_processor(model: str | os.PathLike | None = None, *, trust_remote_code: bool = True):
    """The processor that `load_model(model)` attaches, without loading weights: for work that tokenizes away from
    the model (`nova embed`'s Ray load stage). It comes from the same code as the model's (a Nova directory's own,
    else this repository's) and routes by the config alone: the model's processor checks adapter names."""
    path, own_code = _checked_source(model, trust_remote_code)
    if own_code:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, trust_remote_code=True)
    if not os.path.isdir(path):  # a hub id: the files a processor reads, fetched as the model's loading fetches them
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, allow_patterns=["*.json", "*.txt"])
    return model_class("NovaEmbeddingsV1Processor").from_pretrained(path)
