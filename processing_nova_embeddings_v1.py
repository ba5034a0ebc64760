"""NovaEmbeddingsV1Processor: turns one item into a `PreparedItem` (token ids, pooling mask, image tensors,
adapter) and a list of prepared items into padded batch tensors.

Rendering is data, not code: `chat_template.json` holds an `instruction_template` (the system turn, a
pure prefix so rows sharing an instruction share a cacheable key/value prefix) and a `chat_template` for
the item itself. Without instructions the rendered ids are exactly Jina V4's.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

import jinja2
import numpy as np
import torch
from PIL import Image
from transformers import Qwen2Tokenizer, Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from .fetching_nova_embeddings_v1 import FetchError, UrlFetcher
from .inputs_nova_embeddings_v1 import (
    ImageRefused,
    InputRefused,
    base64_bytes,
    check_item,
    checked_rgb,
    data_url_bytes,
    open_image,
)

CHAT_TEMPLATE_FILE = "chat_template.json"
IMAGE_PLACEHOLDER = "<|image_pad|>"
# Template variables whose values come from the caller: always tokenized as plain text (see `_segments`).
PLAIN_VARIABLES = ("instructions", "prompt", "text")
_SENTINEL = "\ue000nova:{}\ue000"
_SENTINELS = re.compile("\ue000nova:(" + "|".join(PLAIN_VARIABLES) + ")\ue000")
NO_ADAPTER = ("none", "base")

DEFAULT_INSTRUCTION_TEMPLATE = "<|im_start|>system\n{{ instructions }}<|im_end|>\n"
DEFAULT_ITEM_TEMPLATE = (
    "{% if has_image %}"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
    "{% if text is not none %}{{ prompt }}{{ text }}{% else %}Describe the image.{% endif %}"
    "<|im_end|>\n"
    "{% elif instructed %}<|im_start|>user\n{{ prompt }}{{ text }}<|im_end|>\n"
    "{% else %}{{ prompt }}{{ text }}"
    "{% endif %}"
)


@dataclass
class PreparedItem:
    """One item ready for the model: what the batcher needs to pack, pad and route it. Its token fields are lists
    as `prepare_item` makes them, or 1-D numpy arrays (views of a `PackedItems`' columns, in a server's model
    process); everything that reads them takes either."""

    index: int
    task: str
    adapter: str | None
    input_ids: Sequence[int]
    pool_mask: Sequence[bool]  # the tokens averaged into the pooled vector
    instruction_len: int  # tokens of the instruction turn (the system turn)
    multi_mask: Sequence[bool] | None = None  # the item's own tokens: its multi-vector rows (None: after the instruction)
    prefix_len: int | None = None  # tokens before the first of the item's own: a shareable, cacheable prefix
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None  # [1, 3]
    image_embeds: torch.Tensor | None = None  # precomputed merger output, [n_image_tokens, hidden]
    truncated: bool = False

    def __post_init__(self):
        if self.multi_mask is None:
            self.multi_mask = [i >= self.instruction_len for i in range(len(self.input_ids))]
        if self.prefix_len is None:
            self.prefix_len = self.multi_mask.index(True) if any(self.multi_mask) else self.instruction_len

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def content_end(self) -> int:
        """One past the last token that is pooled or returned as a multi-vector row. Searched from the end
        (a few tokens at most: an instructed text's closing markup), since collation asks it of every row."""
        n = self.check_masks()
        for i in range(n - 1, -1, -1):
            if self.pool_mask[i] or self.multi_mask[i]:
                return i + 1
        return n

    def check_masks(self) -> int:
        """The number of tokens; ValueError naming the item if a mask does not hold one value per token."""
        n = len(self.input_ids)
        if len(self.pool_mask) != n or len(self.multi_mask) != n:
            raise ValueError(f"item {self.index}: {n} tokens, but a pool mask of {len(self.pool_mask)} and a "
                             f"multi-vector mask of {len(self.multi_mask)}")
        return n

    @property
    def has_image(self) -> bool:
        return self.image_grid_thw is not None

    def as_fields(self) -> dict:
        """Its fields as plain values (lists, arrays, tensors, strings), for a process that may lack this module:
        there, `processor.item_from_fields` rebuilds the item with the model's own class (`nova embed` on Ray)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def prefix_ids(self) -> tuple[int, ...]:
        """The shareable prefix's token ids as Python ints (the prefix cache's key, whatever the fields' type)."""
        head = self.input_ids[: self.prefix_len]
        return tuple(head.tolist() if isinstance(head, np.ndarray) else head)


# The token fields: one value per token, packed into one flat array each (`PackedItems`).
TOKEN_FIELDS = {"input_ids": np.int64, "pool_mask": np.bool_, "multi_mask": np.bool_}


@dataclass
class PackedItems:
    """Prepared items as columns: the form in which a batch crosses to another process (a server's model process).
    Each token field of all items is one flat array, so the batch pickles and copies as a few buffers rather than
    a Python object per token; every other field of `PreparedItem` is one list per field (all of them: a field
    added to `PreparedItem` travels without a change here). `unpack()` gives the items back, their token fields
    as views of the arrays, which `collate` joins without a Python loop over tokens."""

    lengths: list[int]  # tokens per item
    tokens: dict[str, np.ndarray]  # TOKEN_FIELDS' name -> the items' values, concatenated
    columns: dict[str, list]  # every other PreparedItem field's name -> one value per item

    @classmethod
    def of(cls, items: list[PreparedItem]) -> PackedItems:
        lengths = [item.check_masks() for item in items]  # a mask of another length would shift every later row
        total = sum(lengths)
        tokens = {name: np.fromiter(itertools.chain.from_iterable(getattr(item, name) for item in items),
                                    dtype=dtype, count=total)
                  for name, dtype in TOKEN_FIELDS.items()}
        columns = {f.name: [getattr(item, f.name) for item in items]
                   for f in fields(PreparedItem) if f.name not in TOKEN_FIELDS}
        return cls(lengths, tokens, columns)

    def unpack(self) -> list[PreparedItem]:
        ends = list(itertools.accumulate(self.lengths))
        spans = list(zip([end - length for end, length in zip(ends, self.lengths, strict=True)], ends, strict=True))
        by_field = [[column[a:b] for a, b in spans] if (column := self.tokens.get(f.name)) is not None
                    else self.columns[f.name] for f in fields(PreparedItem)]
        return [PreparedItem(*values) for values in zip(*by_field, strict=True)]  # positional: a third of kwargs' cost


class ItemError(ValueError):
    """A bad item, typed: `index` (None outside a batch), a machine-readable `code` and the `field` at fault.
    The message starts with `item N:` so it reads well on its own; servers map `code` to HTTP statuses."""

    def __init__(self, index: int | None, message: str, code: str = "invalid_input", field: str | None = None):
        super().__init__(message if index is None else f"item {index}: {message}")
        self.index = index
        self.code = code
        self.field = field
        self._message = message

    def __reduce__(self):  # crosses process boundaries whole (a server's model process, Ray workers)
        return type(self), (self.index, self._message, self.code, self.field)


def item_error(index: int | None, message: str, code: str = "invalid_input", field: str | None = None) -> ItemError:
    return ItemError(index, message, code, field)


# Marks an item that names no adapter (its task's adapter applies), as opposed to `adapter: null` (base model).
INHERIT = object()


@dataclass(frozen=True)
class Route:
    """Where one item goes: its task, the prompt prefixed to its text, and its adapter (None: base model)."""

    task: str
    prompt: str
    adapter: str | None


def _check_text(value: str, name: str, index: int | None) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise item_error(index, f"'{name}' is not valid Unicode ({exc.reason} at position {exc.start})") from None
    if "\ue000nova:" in value:
        raise item_error(index, f"'{name}' contains the processor's internal marker U+E000 'nova:'")


def _named_adapter(adapter, index: int | None) -> str | None:
    """An item's explicit 'adapter' value -> its name, or None for the base model."""
    if adapter is None or (isinstance(adapter, str) and adapter.lower() in NO_ADAPTER):
        return None
    if not isinstance(adapter, str):
        raise item_error(index, f"'adapter' must be a string or null, not {type(adapter).__name__}", field="adapter")
    return adapter


def check_dimensions(config, dimensions: int | None, return_multivector: bool = False) -> None:
    """Matryoshka sizes: one of `config.matryoshka_dims`, pooled vectors only (ValueError otherwise)."""
    if dimensions is None:
        return
    if return_multivector:
        raise ValueError("'dimensions' applies to pooled vectors only; multi-vector rows are always "
                         f"{config.multi_vector_projector_dim}-d")
    allowed = config.matryoshka_dims
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions not in allowed:
        size = config.text_config.hidden_size
        larger = isinstance(dimensions, int) and not isinstance(dimensions, bool) and dimensions > size
        raise ValueError(f"dimensions must be one of {allowed}, got {dimensions!r}"
                         + (f": larger than this model's {size}-d vectors" if larger else ""))


def matryoshka_truncate(vectors: torch.Tensor, dimensions: int | None) -> torch.Tensor:
    """Matryoshka: the first `dimensions` values of each vector (last axis), re-normalized. The one
    implementation: the model, the server and `nova eval` (on its cached full-size vectors) all call it."""
    if dimensions is not None and dimensions > vectors.shape[-1]:
        raise ValueError(f"dimensions {dimensions} is larger than these {vectors.shape[-1]}-d vectors")
    if dimensions is None or dimensions == vectors.shape[-1]:
        return vectors
    return torch.nn.functional.normalize(vectors[..., :dimensions], dim=-1)


def _private_copy(backend, *, plain: bool):
    """An independent copy of a `tokenizers.Tokenizer` without padding or truncation. `plain`: special tokens
    in the input are tokenized as ordinary text."""
    copy = type(backend).from_str(backend.to_str())
    copy.no_padding()
    copy.no_truncation()
    copy.encode_special_tokens = plain
    return copy


def load_chat_templates(path: str | os.PathLike | None) -> dict:
    """Read `chat_template.json` (or a bare Jinja file for the item template); defaults where absent."""
    templates = {"instruction_template": DEFAULT_INSTRUCTION_TEMPLATE, "chat_template": DEFAULT_ITEM_TEMPLATE}
    if path is None or not os.path.isfile(path):
        return templates
    text = pathlib.Path(path).read_text(encoding="utf-8")
    if str(path).endswith(".json"):
        data = json.loads(text)
        if "instruction_template" not in data:
            return templates  # a Qwen/Jina chat template for generation, not an embedding template
        unknown = set(data) - set(templates)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(templates)}")
        templates.update(data)
    else:
        templates["chat_template"] = text
    return templates


def decode_image(source, *, index: int | None, allow_paths: bool, max_image_pixels: int,
                 fetcher: UrlFetcher | None = None) -> Image.Image:
    """PIL image, path, bytes, base64, data: URL or (only when a `fetcher` is given) http(s) URL -> RGB image,
    by the rules the server applies too (inputs_nova_embeddings_v1)."""
    try:
        if isinstance(source, Image.Image):
            return checked_rgb(source, max_pixels=max_image_pixels)
        data = _image_bytes(source, index=index, allow_paths=allow_paths, fetcher=fetcher)
        return open_image(data, max_pixels=max_image_pixels)
    except ImageRefused as exc:
        raise item_error(index, str(exc), code=exc.code, field="image") from None


def _image_bytes(source, *, index: int | None, allow_paths: bool, fetcher: UrlFetcher | None) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, pathlib.Path):
        source = str(source)
    if not isinstance(source, str):
        raise item_error(index, f"image must be a PIL image, path, bytes, base64 or data: URL, not {type(source).__name__}")
    if source[:5].lower() == "data:":
        return data_url_bytes(source)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source):
        if fetcher is None:
            raise item_error(index, "image URLs are not fetched by the model; pass the image bytes instead")
        try:
            return fetcher.fetch(source)
        except FetchError as exc:
            raise item_error(index, str(exc), field="image") from None
    if len(source) < 4096 and os.path.isfile(source):
        if not allow_paths:
            raise item_error(index, "local file paths are not accepted here; send the image as base64 or a data: URL")
        return pathlib.Path(source).read_bytes()
    try:
        return base64_bytes(source)
    except ImageRefused:
        raise ImageRefused("image is not an existing file, a data: URL or valid base64") from None


@dataclass
class TokenBatch:
    """Rows collated into right-padded tensors (`NovaEmbeddingsV1Processor.collate`): what a forward reads."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 1 on each row's real tokens
    pool_mask: torch.Tensor  # [B, T], the tokens averaged into the pooled vector
    multi_mask: torch.Tensor  # [B, T], the tokens returned as multi-vector rows
    pixel_values: torch.Tensor | None  # the patches of the rows that carry pixels, concatenated
    pixel_grid_thw: torch.Tensor | None  # [n_pixel_images, 3]
    image_grid_thw: torch.Tensor | None  # [n_images, 3], pixels and precomputed embeddings alike
    image_rows: list[int]  # rows with an image (pixels or precomputed embeddings)
    pixel_rows: list[int]  # rows with pixels
    image_embeds: list[torch.Tensor | None]  # per row: precomputed merger output, or None
    prefix_lens: list[int] | None  # with `drop_prefix`: where each row's positions continue
    position_ids: torch.Tensor | None = None  # [3, B, T] rope positions, filled in by the model on the host


class NovaEmbeddingsV1Processor:
    """Items -> PreparedItem -> batch tensors. Knows rendering and routing, not the network weights."""

    def __init__(self, tokenizer, image_processor, templates: dict, config):
        self.tokenizer = tokenizer  # public: callers may change its padding/truncation; encoding never reads it
        # Private copies of the Rust tokenizer, so nothing a caller does to `self.tokenizer` (padding,
        # truncation) changes encoding: one for template markup (control tokens are control tokens) and one
        # for caller text, where "<|im_end|>" and every other special token is plain text.
        self._markup_tokenizer = _private_copy(tokenizer.backend_tokenizer, plain=False)
        self._plain_tokenizer = _private_copy(tokenizer.backend_tokenizer, plain=True)
        self.image_processor = image_processor
        self.config = config
        self.set_templates(templates)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 151643
        self.image_token_id = config.image_token_id
        self.vision_start_token_id = config.vision_start_token_id
        self.vision_end_token_id = config.vision_end_token_id
        self.im_end_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.merge_size = config.vision_config.spatial_merge_size
        self.url_fetcher = UrlFetcher()  # used only with prepare_item(fetch_urls=True): public addresses only
        # Set by the model: which adapter names are resident, and which task adapters the checkpoint did not
        # ship (their tasks run on the base model, as documented; an adapter unloaded later is an error).
        # None: a processor on its own (AutoProcessor) knows no model, so adapter names are not checked.
        self.adapter_names = None
        self.absent_task_adapters: frozenset[str] = frozenset()

    @classmethod
    def from_pretrained(cls, path, config=None, chat_template: str | None = None, **kwargs):
        from .configuration_nova_embeddings_v1 import NovaEmbeddingsV1Config

        path = str(path)
        config = config or NovaEmbeddingsV1Config.from_pretrained(path)
        tokenizer = Qwen2Tokenizer.from_pretrained(path)
        tokenizer.padding_side = "right"
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        templates = load_chat_templates(chat_template or os.path.join(path, CHAT_TEMPLATE_FILE))
        return cls(tokenizer, image_processor, templates, config)

    def __getstate__(self) -> dict:
        """Pickles (for a server's model process, Ray workers) as what it was built from; routing state
        travels too, the model hook does not (a processor on its own checks no adapter names)."""
        return {"tokenizer": self.tokenizer, "image_processor": self.image_processor, "templates": self.templates,
                "config": self.config, "absent_task_adapters": self.absent_task_adapters}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tokenizer"], state["image_processor"], state["templates"], state["config"])
        self.absent_task_adapters = state["absent_task_adapters"]

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """Called by `AutoProcessor` on remote-code classes; the repository's auto_map already records it."""

    def set_templates(self, templates: dict) -> None:
        env = jinja2.Environment(autoescape=False, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
        try:
            self._instruction_template = env.from_string(templates["instruction_template"])
            self._item_template = env.from_string(templates["chat_template"])
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template does not compile: {exc}") from None
        self.templates = dict(templates)
        self._layouts: dict = {}  # (template, non-text values) -> its layout (_layout)
        self._instruction_ids: dict[str, tuple[int, ...]] = {}  # instructions -> the ids of their turn

    # ---- routing -------------------------------------------------------------------------------------

    def resolve(self, task: str | None = None, adapter=INHERIT, *, index: int | None = None,
                prompt_set: str | None = None) -> Route:
        """The one routing rule (model, server and playground all call it): item -> task, prompt, adapter.

        - `task` None: the config's default task; unknown tasks are an item error.
        - `adapter` not given: the task's adapter from `config.task_routing`. When the checkpoint shipped no
          weights for it, the base model (documented, logged at load); when it was loaded and later unloaded,
          an `adapter_not_found` error, never a quietly different vector.
        - `adapter` None, "none" or "base": the base model; any other name must be loaded.
        """
        task = task or self.config.default_task
        routing = self.config.task_routing
        if not isinstance(task, str) or task not in routing:
            raise item_error(index, f"unknown task {task!r}; known tasks: {', '.join(sorted(routing))}",
                             field="task")
        prompt = routing[task].get("prompt", "")
        if prompt_set:
            prompts = self.config.prompt_sets.get(prompt_set)
            if prompts is None:
                raise item_error(index, f"unknown prompt set {prompt_set!r}; known: "
                                 f"{', '.join(sorted(self.config.prompt_sets))}", field="prompt_set")
            prompt = prompts.get(task, prompt)
        routed = routing[task].get("adapter")
        if self.adapter_names is None:  # no model attached: route by the config alone
            return Route(task, prompt, routed if adapter is INHERIT else _named_adapter(adapter, index))
        loaded = self.adapter_names()
        if adapter is INHERIT:
            if routed is None or routed in loaded:
                return Route(task, prompt, routed)
            if routed in self.absent_task_adapters:
                return Route(task, prompt, None)
            raise item_error(index, f"task {task!r} routes to adapter {routed!r}, which is not loaded; loaded "
                             f"adapters: {', '.join(sorted(loaded)) or 'none'}", code="adapter_not_found",
                             field="task")
        adapter = _named_adapter(adapter, index)
        if adapter is None:
            return Route(task, prompt, None)
        if adapter not in loaded:
            raise item_error(index, f"unknown adapter {adapter!r}; loaded adapters: "
                             f"{', '.join(sorted(loaded)) or 'none'}", code="adapter_not_found", field="adapter")
        return Route(task, prompt, adapter)

    def resolve_item(self, item: dict, *, index: int | None = None, prompt_set: str | None = None) -> Route:
        """`resolve` for an item dict: a missing 'adapter' key inherits the task's adapter."""
        return self.resolve(item.get("task"), item.get("adapter", INHERIT), index=index, prompt_set=prompt_set)

    def check_dimensions(self, dimensions: int | None, return_multivector: bool = False) -> None:
        check_dimensions(self.config, dimensions, return_multivector)

    # ---- one item ------------------------------------------------------------------------------------

    def prepare_item(
        self,
        item,
        *,
        index: int | None = None,
        instructions: str | None = None,
        max_pixels: int | None = None,
        max_length: int | None = None,
        truncate: bool = True,
        allow_paths: bool = True,
        fetch_urls: bool = False,
        prompt_set: str | None = None,
        route: Route | None = None,
    ) -> PreparedItem:
        """Validate, render, tokenize and (for images) decode + patchify one item. CPU only, thread-safe.

        `fetch_urls`: fetch http(s) image URLs with `self.url_fetcher` (the in-process API sets it; a
        server never does: it applies its own URL policy and passes bytes). `route`: the item's
        `resolve_item(...)`, when the caller resolved it already (a server checks adapters before any work)."""
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict):
            raise item_error(index, f"an item must be a string or an object, not {type(item).__name__}")
        try:
            check_item(item)
        except InputRefused as exc:
            raise item_error(index, str(exc), code=exc.code, field=exc.field) from None
        text = item.get("text")
        has_image = item.get("image") is not None or item.get("image_embeds") is not None
        route = route or self.resolve_item(item, index=index, prompt_set=prompt_set)
        task, prompt, adapter = route.task, route.prompt, route.adapter
        instructions = item.get("instructions", instructions)
        if instructions is not None and not isinstance(instructions, str):
            raise item_error(index, f"'instructions' must be a string, not {type(instructions).__name__}",
                             field="instructions")
        instructions = instructions or None
        for name, value in (("text", text), ("instructions", instructions)):
            if value:
                _check_text(value, name, index)

        pixel_values = grid = image_embeds = None
        if item.get("image") is not None:
            image = decode_image(
                item["image"], index=index, allow_paths=allow_paths, max_image_pixels=self.config.max_image_pixels,
                fetcher=self.url_fetcher if fetch_urls else None,
            )
            pixel_values, grid = self._patchify(image, max_pixels, index)
        elif item.get("image_embeds") is not None:
            image_embeds, grid = self._check_image_embeds(item, index)

        prefix_ids = self.instruction_ids(instructions) if instructions else []
        n_image_tokens = int(grid.prod().item()) // self.merge_size**2 if grid is not None else 0
        segments = self._item_segments(prompt, text, has_image, bool(instructions), n_image_tokens)
        n_item = sum(len(ids) for _, ids in segments)
        truncated = False
        if max_length is not None and len(prefix_ids) + n_item > max_length:
            if not truncate:
                raise item_error(index, f"{len(prefix_ids) + n_item} tokens exceed the limit of {max_length} tokens")
            segments = self._truncate_text(segments, prompt, max_length - len(prefix_ids), index)
            truncated = True
        item_ids = [token for _, ids in segments for token in ids]
        # The item's own tokens: with instructions, a text item's user-turn markup is context, not
        # content; its {prompt}{text} tokens are exactly those it has without instructions. Image items keep
        # all their tokens (their image turn is the same with and without instructions).
        own = [plain or has_image or not instructions for plain, ids in segments for _ in ids]
        pool_mask = self._pool_mask(item_ids, has_image, text is not None) if has_image else own
        return PreparedItem(
            index=-1 if index is None else index,
            task=task,
            adapter=adapter,
            input_ids=prefix_ids + item_ids,
            pool_mask=[False] * len(prefix_ids) + pool_mask,
            instruction_len=len(prefix_ids),
            multi_mask=[False] * len(prefix_ids) + own,
            prefix_len=len(prefix_ids) + (own.index(True) if True in own else 0),
            pixel_values=pixel_values,
            image_grid_thw=grid,
            image_embeds=image_embeds,
            truncated=truncated,
        )

    def instruction_ids(self, instructions: str) -> list[int]:
        """Token ids of the instruction turn (the system turn): the prefix shared by every row with it."""
        ids = self._instruction_ids.get(instructions)
        if ids is None:  # a server sees the same few instructions on many items: tokenize each once
            ids = tuple(token for _, part in self._segments(self._instruction_template, instructions=instructions)
                        for token in part)
            if len(self._instruction_ids) >= 1024:
                self._instruction_ids.clear()
            self._instruction_ids[instructions] = ids
        return list(ids)

    def _segments(self, template, **values) -> list[tuple[bool, list[int]]]:
        """Render `template` and tokenize it as [(is_text, ids)]: template markup with control tokens, the
        caller's values (instructions, prompt + text, adjacent ones joined as Jina V4 joins them) as plain
        text, so "<|im_end|>" in a query is seven ordinary tokens, never a control token.

        Only the caller's text is tokenized per item: the template's layout (its markup already tokenized, and
        where the values go) depends on the template and its non-text values alone, and is kept per both."""
        out = []
        for plain, part in self._layout(template, values):
            if not plain:
                out.append((False, list(part)))
                continue
            text = "".join(values[name] for name in part)
            if text:
                out.append((True, self._plain_tokenizer.encode(text, add_special_tokens=False).ids))
        return out

    def _layout(self, template, values: dict) -> list[tuple[bool, tuple]]:
        """The rendered template as [(False, markup ids) | (True, names of adjacent plain values)]."""
        key = (id(template), tuple(sorted((k, v is None) if k in PLAIN_VARIABLES else (k, v) for k, v in values.items())))
        try:
            layout = self._layouts.get(key)
        except TypeError:  # a non-text value that cannot be a key: lay the template out every time
            key, layout = None, None
        if layout is not None:
            return layout
        rendered = template.render(**{k: _SENTINEL.format(k) if k in PLAIN_VARIABLES and v is not None else v
                                    for k, v in values.items()})
        parts: list[tuple[bool, str | list[str]]] = []
        at = 0
        for match in _SENTINELS.finditer(rendered):
            if match.start() > at:
                parts.append((False, rendered[at : match.start()]))
            if parts and parts[-1][0] and match.start() == at:
                parts[-1][1].append(match[1])
            else:
                parts.append((True, [match[1]]))
            at = match.end()
        if at < len(rendered):
            parts.append((False, rendered[at:]))
        layout = [(True, tuple(part)) if plain else
                  (False, tuple(self._markup_tokenizer.encode(part, add_special_tokens=False).ids))
                  for plain, part in parts if part]
        if key is not None and len(self._layouts) < 256:
            self._layouts[key] = layout
        return layout

    def _item_segments(self, prompt, text, has_image, instructed, n_image_tokens) -> list[tuple[bool, list[int]]]:
        segments = self._segments(self._item_template, prompt=prompt, text=text, has_image=has_image,
                                  instructed=instructed)
        pads = [i for i, (plain, ids) in enumerate(segments) if not plain and self.image_token_id in ids]
        if has_image:
            if len(pads) != 1 or segments[pads[0]][1].count(self.image_token_id) != 1:
                raise ValueError("the chat template must place exactly one <|image_pad|> for an image item")
            ids = segments[pads[0]][1]
            at = ids.index(self.image_token_id)
            segments[pads[0]] = (False, ids[:at] + [self.image_token_id] * n_image_tokens + ids[at + 1 :])
        return segments

    def _truncate_text(self, segments, prompt, budget, index) -> list[tuple[bool, list[int]]]:
        """Cut the item's prompt + text tokens (never the image span or chat markup) to fit `budget` tokens,
        as Jina V4 cuts its `prefix + text` (tokenized whole, then cut): same ids for text items."""
        texts = [i for i, (plain, _) in enumerate(segments) if plain]
        fixed = sum(len(ids) for plain, ids in segments if not plain)
        keep_min = len(self._plain_tokenizer.encode(prompt, add_special_tokens=False).ids) + 1 if prompt else 1
        if not texts or budget - fixed < keep_min:
            raise item_error(index, f"the item without its text already takes {fixed + keep_min - 1} tokens, "
                             f"over the limit of {budget}")
        at = texts[-1]
        room = budget - fixed - sum(len(segments[i][1]) for i in texts[:-1])
        return segments[:at] + [(True, segments[at][1][:room])] + segments[at + 1 :]

    def _pool_mask(self, item_ids: list[int], has_image: bool, has_text: bool) -> list[bool]:
        """Jina's pooling span: all tokens for text; the vision span for images; vision span + the text up
        to the closing <|im_end|> for image+text."""
        if not has_image:
            return [True] * len(item_ids)
        start = item_ids.index(self.vision_start_token_id)
        end = item_ids.index(self.vision_end_token_id)
        if has_text and self.im_end_token_id in item_ids[end:]:
            end = end + item_ids[end:].index(self.im_end_token_id) - 1
        return [start <= i <= end for i in range(len(item_ids))]

    def fit_image(self, image: Image.Image, *, max_pixels: int | None = None, index: int | None = None) -> Image.Image:
        """An RGB image at the size the image processor resizes it to, by its own size rule and filter: patchifying
        it later resizes nothing (PIL copies an image resized to its own size), so its patches are the same, bit
        for bit. Lets work that moves images between processes (`nova embed` on Ray) carry at most max_pixels x 3
        bytes per image, however large the photo, and resize away from the model's process. ValueError (an
        aspect ratio the size rule refuses, a bad max_pixels) as patchifying raises it."""
        min_pixels, max_pixels = self._pixel_bounds(max_pixels, index)
        factor = self.image_processor.patch_size * self.image_processor.merge_size
        height, width = smart_resize(image.height, image.width, factor=factor, min_pixels=min_pixels,
                                     max_pixels=max_pixels)
        return image.resize((width, height), resample=self.image_processor.resample)

    def _pixel_bounds(self, max_pixels: int | None, index) -> tuple[int, int]:
        min_pixels = self.image_processor.size["shortest_edge"]
        max_pixels = max_pixels or self.image_processor.size["longest_edge"]
        if not isinstance(max_pixels, int) or max_pixels < min_pixels:
            raise item_error(index, f"max_pixels must be an integer >= {min_pixels}, got {max_pixels!r}")
        return min_pixels, max_pixels

    def _patchify(self, image: Image.Image, max_pixels: int | None, index):
        min_pixels, max_pixels = self._pixel_bounds(max_pixels, index)
        out = self.image_processor(
            images=[image], return_tensors="pt", size={"shortest_edge": min_pixels, "longest_edge": max_pixels}
        )
        return out["pixel_values"], out["image_grid_thw"]

    def _check_image_embeds(self, item, index):
        try:
            embeds = torch.as_tensor(item["image_embeds"], dtype=torch.float32)
            grid = torch.as_tensor(item.get("image_grid_thw"), dtype=torch.long).reshape(1, 3)
        except Exception:
            raise item_error(index, "'image_embeds' needs a [n, hidden] array and 'image_grid_thw' [t, h, w]") from None
        t, h, w = grid[0].tolist()
        if t < 1 or h < 1 or w < 1 or h % self.merge_size or w % self.merge_size:
            raise item_error(index, f"'image_grid_thw' {[t, h, w]} must be positive with h and w multiples of the "
                             f"merge size {self.merge_size}", field="image_grid_thw")
        expected = t * h * w // self.merge_size**2
        hidden = self.config.text_config.hidden_size
        if embeds.dim() != 2 or embeds.shape != (expected, hidden):
            raise item_error(index, f"'image_embeds' must have shape [{expected}, {hidden}] for grid {grid.tolist()[0]}, got {list(embeds.shape)}")
        if not torch.isfinite(embeds).all():
            raise item_error(index, "'image_embeds' holds non-finite values (inf or NaN, or beyond float32's range)",
                             field="image_embeds")
        return embeds, grid

    # ---- batches -------------------------------------------------------------------------------------

    def pack(self, items: list[PreparedItem]) -> PackedItems:
        """Items as columns, to send to another process (`PackedItems.unpack()` there)."""
        return PackedItems.of(items)

    def item_from_fields(self, values: dict) -> PreparedItem:
        """An item from `PreparedItem.as_fields()` (made by another copy of this code, such as a processor that
        tokenized in another process); a field this version does not know is a TypeError naming it."""
        return PreparedItem(**values)

    def collate(self, rows: list[PreparedItem], *, drop_prefix: bool = False, pad_to_multiple_of: int = 1) -> TokenBatch:
        """Right-padded batch tensors (right padding keeps every row's positions independent of the batch).
        Vectorized, in numpy (a numpy operation costs a fraction of a torch one, and collation is host work a
        server does per batch): one array per field from the rows' concatenated token fields (lists, or arrays),
        scattered through a length mask, then shared with torch without a copy.

        `drop_prefix`: leave out each row's shareable prefix (its first `prefix_len` tokens, whose key/values
        come from the prefix cache); `prefix_lens` then says where each row's positions continue.
        `pad_to_multiple_of`: the padded length rounded up to a multiple of it (fewer distinct batch shapes;
        padding is masked, so no row's vectors change)."""
        if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be an integer >= 1, got {pad_to_multiple_of!r}")
        starts = [row.prefix_len if drop_prefix else 0 for row in rows]
        # Tokens after a row's last pooled or returned one (an instructed text's closing `<|im_end|>\n`) are
        # never output and, attention being causal, change nothing before them: they are not computed.
        ends = [row.content_end for row in rows]
        lengths = np.array([end - start for start, end in zip(starts, ends, strict=True)], dtype=np.int64)
        width = -(-int(lengths.max()) // pad_to_multiple_of) * pad_to_multiple_of
        attended = np.arange(width)[None, :] < lengths[:, None]
        spans = list(zip(rows, starts, ends, strict=True))
        total = int(lengths.sum())

        def scattered(field: str, fill, dtype) -> torch.Tensor:  # the rows' spans of one field, joined in C
            parts = [getattr(row, field)[a:b] for row, a, b in spans]
            if set(map(type, parts)) == {np.ndarray}:  # unpacked rows: views of one array
                values = np.concatenate(parts)
            else:
                values = np.fromiter(itertools.chain.from_iterable(parts), dtype=dtype, count=total)
            out = np.full(attended.shape, fill, dtype=dtype)
            out[attended] = values
            return torch.from_numpy(out)

        input_ids = scattered("input_ids", self.pad_token_id, np.int64)
        pool_mask = scattered("pool_mask", False, np.bool_)
        multi_mask = scattered("multi_mask", False, np.bool_)
        attention_mask = torch.from_numpy(attended.astype(np.int64))
        pixel_rows = [row for row in rows if row.pixel_values is not None]
        grids = [row.image_grid_thw for row in rows if row.has_image]
        return TokenBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pool_mask=pool_mask,
            multi_mask=multi_mask,
            pixel_values=torch.cat([row.pixel_values for row in pixel_rows]) if pixel_rows else None,
            pixel_grid_thw=torch.cat([row.image_grid_thw for row in pixel_rows]) if pixel_rows else None,
            image_grid_thw=torch.cat(grids) if grids else None,
            image_rows=[i for i, row in enumerate(rows) if row.has_image],
            pixel_rows=[i for i, row in enumerate(rows) if row.pixel_values is not None],
            image_embeds=[row.image_embeds for row in rows],
            prefix_lens=starts if drop_prefix else None,
        )


__all__ = ["NovaEmbeddingsV1Processor", "PreparedItem", "PackedItems", "TokenBatch", "ItemError", "Route", "INHERIT", "decode_image", "load_chat_templates"]
