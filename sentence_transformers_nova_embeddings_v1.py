"""The sentence-transformers module: `modules.json` points here, so `SentenceTransformer(<nova dir>,
trust_remote_code=True)` loads the model, and code written for Jina V4's sentence-transformers integration runs
unchanged (`model_kwargs={"default_task": ...}`, `encode(..., task=..., prompt_name="query"|"passage")`, images
in `encode`).

Rendering and routing stay in the processor (one rule for every surface): this module only turns what
sentence-transformers hands over (inputs, `task`, the resolved prompt string) into Nova items. It adds what
Jina's module cannot do: `instructions=` and `adapter=` keywords and Nova item dicts as inputs.
"""

from __future__ import annotations

import functools
import numbers
import os
import pathlib
from urllib.parse import urlparse

import torch
from PIL import Image
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import InputModule

from .modeling_nova_embeddings_v1 import NovaEmbeddingsV1Model, non_finite_error
from .processing_nova_embeddings_v1 import INHERIT, ItemError

# sentence-transformers' own roles: encode_query() passes task="query", encode_document() task="document".
ROLE_SIDES = {"query": "query", "document": "passage"}
# Strings that name an image file are images, as in Jina V4's module and sentence-transformers' own rule.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tiff", ".webp")
# Jina V4's default `max_length` in encode_text; settable with `model.max_seq_length`.
DEFAULT_MAX_SEQ_LENGTH = 32768


class NovaEmbeddingsV1STModule(InputModule):
    """Wraps `NovaEmbeddingsV1Model`. Outputs `sentence_embedding` (the L2-normalized pooled vector, as
    `encode_text`) and `token_embeddings` (the 128-d multi-vector rows, as `encode(..., return_multivector=True)`,
    reachable with `output_value="token_embeddings"`)."""

    forward_kwargs = {"task", "instructions", "adapter"}

    def __init__(self, model: NovaEmbeddingsV1Model, default_task: str | None = None,
                 max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH):
        super().__init__()
        self.model = model
        self.tokenizer = model.processor.tokenizer
        self.max_seq_length = max_seq_length
        self.default_task = self._check_default_task(default_task or model.config.default_task)
        self._side_of_prompt = _prompt_sides(model.config.task_routing)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder: str | None = None,
             revision: str | None = None, local_files_only: bool = False, model_kwargs: dict | None = None,
             backend: str = "torch", **kwargs) -> NovaEmbeddingsV1STModule:
        """`model_kwargs` go to `NovaEmbeddingsV1Model.from_pretrained` (dtype, device_map, chat_template,
        max_loras, ...), except Jina V4's `default_task`, which this module keeps."""
        if backend != "torch":
            raise ValueError(f"Nova runs on the torch backend only, not {backend!r}")
        if subfolder:
            raise ValueError(f"Nova's module lives at the repository root, not in {subfolder!r}")
        model_kwargs = dict(model_kwargs or {})
        default_task = model_kwargs.pop("default_task", None)
        max_seq_length = model_kwargs.pop("max_seq_length", DEFAULT_MAX_SEQ_LENGTH)
        model = NovaEmbeddingsV1Model.from_pretrained(
            model_name_or_path, token=token, cache_dir=cache_folder, revision=revision,
            local_files_only=local_files_only, **model_kwargs,
        )
        return cls(model, default_task=default_task, max_seq_length=max_seq_length)

    @property
    def modalities(self) -> list:
        # "message" is what sentence-transformers calls a batch that mixes text and images; Nova embeds such
        # batches in one forward pass (chat-message inputs themselves are refused in `to_item`).
        return ["text", "image", ("image", "text"), "message"]

    def get_embedding_dimension(self) -> int:
        return self.model.config.text_config.hidden_size

    def on_model_ready(self, model) -> None:
        """sentence-transformers cuts `sentence_embedding[..., :truncate_dim]` after this module's forward, where a
        size beyond the vectors cuts nothing: full-size vectors would come back as if truncated. So the owning
        model's `truncate_dim` is checked here (set at construction) and on each of its `encode` calls (the
        argument, or the value `truncate_embeddings(...)` sets), as `encode(dimensions=...)` is."""
        if not isinstance(model, SentenceTransformer):
            return
        self.check_truncate_dim(model.truncate_dim)
        encode = model.encode

        @functools.wraps(encode)
        def encode_checked(*args, truncate_dim: int | None = None, **kwargs):
            self.check_truncate_dim(model.truncate_dim if truncate_dim is None else truncate_dim)
            return encode(*args, truncate_dim=truncate_dim, **kwargs)

        model.encode = encode_checked

    def check_truncate_dim(self, truncate_dim) -> None:
        """Any size from 1 to the model's (sentence-transformers slices; with `normalize_embeddings=True` a trained
        matryoshka size gives Nova's own truncated vector); anything else is a ValueError naming the sizes."""
        if truncate_dim is None:
            return
        size = self.get_embedding_dimension()
        if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, numbers.Integral) \
                or not 1 <= truncate_dim <= size:
            trained = ", ".join(str(d) for d in self.model.config.matryoshka_dims)
            too_large = isinstance(truncate_dim, numbers.Integral) and truncate_dim > size
            raise ValueError(f"truncate_dim must be from 1 to {size}, got {truncate_dim!r}"
                             + (f": larger than this model's {size}-d vectors" if too_large else "")
                             + f" (its trained matryoshka sizes: {trained})")

    def _check_default_task(self, task: str) -> str:
        routing = self.model.config.task_routing
        if task not in routing:
            raise ValueError(f"default_task {task!r} is not a task of this model; known: {', '.join(sorted(routing))}")
        return task

    # ---- sentence-transformers' (task, prompt) -> a Nova task -------------------------------------------

    def nova_task(self, task: str | None, prompt: str | None) -> str:
        """Jina V4's rule: the task family (`task=`, else the default task) plus the side chosen by the prompt
        (`prompt_name="query"|"passage"`, or encode_query / encode_document); no prompt means the query side,
        as in `encode_text`. Full Nova task names ("code.passage") are taken as they are."""
        side = self._side(prompt)
        if task in ROLE_SIDES:
            side, task = side or ROLE_SIDES[task], None
        task = task or self.default_task
        routing = self.model.config.task_routing
        if task not in routing:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(sorted(routing))}, or 'query'/'document'")
        fixed_side = task.partition(".")[2]
        if fixed_side:
            if side and side != fixed_side:
                raise ValueError(f"task {task!r} is the {fixed_side} side, but the prompt asks for the {side} side")
            return task
        sided = f"{task}.{side or 'query'}"
        return sided if sided in routing else task

    def _side(self, prompt: str | None) -> str | None:
        if not prompt:
            return None
        side = self._side_of_prompt.get(prompt)
        if side is None:
            known = ", ".join(f"{p!r} (prompt_name={s!r})" for p, s in self._side_of_prompt.items())
            raise ValueError(
                f"prompt {prompt!r} is not one of Nova's trained prompts ({known}); Nova renders the prompt itself, "
                "so choose a side with prompt_name, and steer with instructions=... for free-text guidance"
            )
        return side

    # ---- inputs -> prepared rows -> embeddings ----------------------------------------------------------

    def to_item(self, value, task: str, adapter) -> dict:
        """One sentence-transformers input as a Nova item: text, an image (PIL, path, bytes, data: or image URL) or a Nova
        item dict (its own task/adapter/instructions win over the request's)."""
        if _is_chat(value):
            raise ValueError(f"input {_describe(value)}: chat messages are not supported; pass text, an image "
                             "or a Nova item dict (with 'instructions' for a system turn)")
        if isinstance(value, dict):
            item = {"task": task, **value}
        elif isinstance(value, (Image.Image, pathlib.Path, bytes, bytearray)) or _is_image_string(value):
            item = {"task": task, "image": value}
        elif isinstance(value, str):
            item = {"task": task, "text": value}
        else:
            raise ValueError(f"input {_describe(value)}: unsupported type {type(value).__name__}; pass text, an "
                             "image or a Nova item dict")
        if adapter is not INHERIT:
            item.setdefault("adapter", adapter)
        return item

    def preprocess(self, inputs, prompt: str | None = None, task: str | None = None,
                   instructions: str | None = None, adapter=INHERIT, **kwargs) -> dict:
        if kwargs:
            raise ValueError(f"Nova does not use {sorted(kwargs)} (it accepts task, instructions, adapter)")
        task = self.nova_task(task, prompt)
        rows = []
        for value in inputs:
            item = self.to_item(value, task, adapter)
            try:
                rows.append(self.model.processor.prepare_item(item, instructions=instructions,
                                                              max_length=self.max_seq_length, fetch_urls=True))
            except ItemError as exc:  # sentence-transformers reorders inputs: name the input, not a position
                raise ItemError(None, f"input {_describe(value)}: {exc}", exc.code, exc.field) from None
        return {"nova_rows": rows, "nova_inputs": [_describe(value) for value in inputs]}

    def forward(self, features: dict, **kwargs) -> dict:
        """Pooled vectors and multi-vector rows in one pass; `token_embeddings` holds each row's multi-vector
        rows left-aligned (instruction turn excluded) with `attention_mask` marking them, so
        sentence-transformers' trimming returns exactly `encode(..., return_multivector=True)`."""
        rows = features["nova_rows"]
        pooled, tokens, token_mask = self.model.forward_rows(rows, pooled=True, multivector=True)
        finite = torch.isfinite(pooled).all(-1) & (torch.isfinite(tokens).all(-1) | ~token_mask).all(-1)
        if not bool(finite.all()):  # an overflowing dtype (float16): loud, never a NaN vector
            bad = int((~finite).nonzero()[0, 0])
            error = non_finite_error(rows[bad], self.model.model.embed_tokens.weight.dtype)
            raise ItemError(None, f"input {features['nova_inputs'][bad]}: {error._message}", error.code)
        counts = token_mask.sum(1)
        width = int(counts.max())
        token_embeddings = tokens.new_zeros(len(rows), width, tokens.shape[-1])
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long, device=tokens.device)
        for i, n in enumerate(counts.tolist()):
            token_embeddings[i, :n] = tokens[i][token_mask[i]]
            attention_mask[i, :n] = 1
        return {"sentence_embedding": pooled, "token_embeddings": token_embeddings, "attention_mask": attention_mask}

    def save(self, output_path: str, *args, **kwargs) -> None:
        raise NotImplementedError(
            "Nova's sentence-transformers module does not re-save the model: the model directory (config, weights, "
            "adapters/, remote code, modules.json) already is the saved model; copy it, or use `nova convert` for a "
            "Jina V4 directory"
        )


def _prompt_sides(routing: dict) -> dict[str, str]:
    """Prompt string -> side ("query"/"passage"), from the `<task>.query` / `<task>.passage` routes."""
    sides: dict[str, set] = {}
    for name, route in routing.items():
        side = name.partition(".")[2]
        if side in ("query", "passage") and route.get("prompt"):
            sides.setdefault(route["prompt"], set()).add(side)
    return {prompt: found.pop() for prompt, found in sides.items() if len(found) == 1}


def _is_chat(value) -> bool:
    """A chat message (role/content dict) or a conversation (a list of them)."""
    first = value[0] if isinstance(value, list) and value else value
    return isinstance(first, dict) and "role" in first and "content" in first


def _is_image_string(value) -> bool:
    if not isinstance(value, str):
        return False
    if value.startswith("data:image/"):
        return True
    if value.startswith(("http://", "https://")) and " " not in value:
        # As Jina V4's module: an image URL is an image, fetched in this process by the model's guarded
        # fetcher (public addresses only, size and time limits); other URLs are text.
        return urlparse(value).path.lower().endswith(IMAGE_SUFFIXES)
    return len(value) < 4096 and value.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(value)


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["NovaEmbeddingsV1STModule"]
