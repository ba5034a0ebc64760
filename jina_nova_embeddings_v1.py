"""Jina Embeddings V4's own API on a Nova model (`encode_text`, `encode_image`): same arguments, same ids, same
vectors, as a thin layer over `encode()`, so code written for Jina V4 runs unchanged."""

from __future__ import annotations

import numpy as np
import torch

JINA_TASKS = {"retrieval", "text-matching", "code"}


class JinaV4Mixin:
    """Mixed into the model class; calls only its `encode()`."""

    def encode_text(
        self,
        texts,
        task: str | None = None,
        max_length: int = 32768,
        batch_size: int = 8,
        return_multivector: bool = False,
        return_numpy: bool = False,
        truncate_dim: int | None = None,
        prompt_name: str | None = None,
    ):
        """Jina V4's `encode_text`: same arguments, same ids, same vectors."""
        single = isinstance(texts, str)
        task = _jina_task(task, prompt_name or "query")
        items = [{"task": task, "text": text} for text in ([texts] if single else texts)]
        out = self.encode(items, return_multivector=return_multivector, dimensions=truncate_dim,
                          batch_size=batch_size, max_length=max_length)
        return _jina_output(out, single, return_numpy, return_multivector)

    def encode_image(
        self,
        images,
        task: str | None = None,
        batch_size: int = 8,
        return_multivector: bool = False,
        return_numpy: bool = False,
        truncate_dim: int | None = None,
        max_pixels: int | None = None,
    ):
        """Jina V4's `encode_image`: PIL images, paths, bytes, data URLs or http(s) URLs (fetched by the guarded
        fetcher: public addresses only, size and time limits)."""
        single = not isinstance(images, (list, tuple))
        task = _jina_task(task, "query")
        items = [{"task": task, "image": image} for image in ([images] if single else images)]
        out = self.encode(items, return_multivector=return_multivector, dimensions=truncate_dim,
                          batch_size=batch_size, max_pixels=max_pixels)
        return _jina_output(out, single, return_numpy, return_multivector)


def _jina_task(task: str | None, prompt_name: str) -> str:
    task = task or "retrieval"
    if task not in JINA_TASKS:
        raise ValueError(f"unknown task {task!r}; Jina V4 tasks: {', '.join(sorted(JINA_TASKS))}")
    if prompt_name not in ("query", "passage"):
        raise ValueError(f"prompt_name must be 'query' or 'passage', got {prompt_name!r}")
    return task if task == "text-matching" else f"{task}.{prompt_name}"


def _jina_output(out: list[torch.Tensor], single: bool, return_numpy: bool, multivector: bool):
    if return_numpy:
        out = [v.numpy() for v in out]
        if not multivector and not single:
            return np.stack(out)
    return out[0] if single else out
