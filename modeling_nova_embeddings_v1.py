"""NovaEmbeddingsV1Model: Qwen2.5-VL backbone -> pooled (2048-d) or multi-vector (128-d per token) embeddings.

Module names are Jina V4's (`model.layers.*`, `visual.*`, `multi_vector_projector.*`), so a Jina V4
checkpoint loads as it is. What Nova adds: pooling masks computed per row (instructions excluded, mixed
text/image batches correct), per-row LoRA routing in one forward pass, and `encode()` over mixed items.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPreTrainedModel, Qwen2_5_VLTextModel
from transformers.utils import logging

from .caching_nova_embeddings_v1 import PrefixCache, PrefixCachingMixin, PrefixKV, RowPrefixes, attention_bias
from .configuration_nova_embeddings_v1 import NovaEmbeddingsV1Config
from .graphs_nova_embeddings_v1 import TextGraphs
from .jina_nova_embeddings_v1 import JinaV4Mixin
from .lora_nova_embeddings_v1 import AdapterMixin, LoraRegistry
from .processing_nova_embeddings_v1 import (
    ItemError,
    NovaEmbeddingsV1Processor,
    PreparedItem,
    TokenBatch,
    check_dimensions,
    item_error,
    matryoshka_truncate,
)
from .scoring_nova_embeddings_v1 import rerank as _rerank
from .vision_nova_embeddings_v1 import BatchedVisionTransformer

logger = logging.get_logger(__name__)

ADAPTERS_DIR = "adapters"


def _progress(iterable, total: int, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="Encoding", unit="batch")


def sort_windows(n_items: int, batch_size: int, ramp: bool = False) -> list[tuple[int, int]]:
    """Windows of items, (start, stop), for `windowed_batches` (`encode()`'s, `nova embed`'s): rows are sorted
    by length within each, and each next window is prepared while this one's batches run. 16 batches a
    window; with `ramp` (the model `launches_ahead`, on a GPU) 1, 2, 4 and 8 batches first, so the first
    forward starts once one batch is prepared instead of sixteen. On a CPU there is no device to keep busy,
    so every window sorts 16 batches."""
    bounds = [0]
    while bounds[-1] < n_items:
        batches = min(16, 2 ** (len(bounds) - 1)) if ramp else 16
        bounds.append(min(n_items, bounds[-1] + batch_size * batches))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def windowed_batches(windows: list[tuple[int, int]], prepare: Callable[[int, int], list[PreparedItem]],
                     split: Callable[[list[PreparedItem]], list[list[PreparedItem]]], overlap: bool,
                     ) -> Iterator[list[PreparedItem]]:
    """Batches of items prepared a window at a time: `prepare(start, stop)` gives the rows of items [start,
    stop) of a window (`sort_windows`), `split` sorts them by length into batches. With `overlap` (the model
    `launches_ahead`, on a GPU) the next window is prepared a share at a time after each batch of this one is
    taken, which `embed_batches` does after launching the one before, so preparing rows overlaps forwards;
    without it, at once after the last (there is no device to overlap)."""
    prepared = prepare(*windows[0]) if windows else []
    for w in range(len(windows)):
        taken = split(prepared)
        following, end = windows[w + 1] if w + 1 < len(windows) else (windows[w][1], windows[w][1])
        share = -(-(end - following) // max(len(taken), 1))
        prepared = []
        for j, batch in enumerate(taken):
            yield batch
            if overlap:
                prepared += prepare(following + j * share, min(following + (j + 1) * share, end))
        if not overlap or not taken:
            prepared = prepare(following, end)


@dataclass
class CollatedRows:
    """`collate_rows`' result: a batch's tensors, built on the host before its forward (a server collates the next
    batch while one runs), and what the forward needs besides them."""

    batch: TokenBatch
    adapters: list[str | None]  # per row (None: the base model)
    rows: list[PreparedItem]
    drop_prefix: bool  # the rows' cached instruction prefixes were left out (inference only)


class NovaEmbeddingsV1PreTrainedModel(Qwen2_5_VLPreTrainedModel):
    config_class = NovaEmbeddingsV1Config
    config: NovaEmbeddingsV1Config
    base_model_prefix = ""
    _checkpoint_conversion_mapping = {}
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]


class NovaEmbeddingsV1Model(AdapterMixin, PrefixCachingMixin, JinaV4Mixin, NovaEmbeddingsV1PreTrainedModel):
    def __init__(self, config: NovaEmbeddingsV1Config):
        super().__init__(config)
        self.visual = BatchedVisionTransformer._from_config(config.vision_config)
        self.model = Qwen2_5_VLTextModel._from_config(config.text_config)
        self.multi_vector_projector = nn.Linear(config.text_config.hidden_size, config.multi_vector_projector_dim)
        self.post_init()
        self.processor: NovaEmbeddingsV1Processor | None = None
        self.lora = LoraRegistry(self, config.max_loras, config.max_lora_rank)
        self.prefix_cache = PrefixCache()  # instruction prefixes' key/values; configure(max_bytes), stats()
        # Batches' padded length is rounded up to a multiple of this; None: 16 on CUDA, 1 elsewhere (a GPU pays
        # one-time costs for each new batch shape, docs/performance.md; a CPU pays for every padded token).
        self.pad_to_multiple_of: int | None = None
        # CUDA graphs of the text forward (graphs_nova_embeddings_v1.py); off until `configure_cuda_graphs`
        self.cuda_graphs = TextGraphs()

    # ---- loading -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *args,
        chat_template: str | None = None,
        load_adapters: bool = True,
        max_loras: int | None = None,
        max_lora_rank: int | None = None,
        device: str | torch.device | None = None,
        **kwargs,
    ):
        """Load a Nova or Jina V4 directory (or hub id), then its processor and its task adapters.

        Defaults: fp32 on CPU, bf16 on CUDA; weights go straight to that device and dtype (`device_map`
        works too; `dtype=` or `torch_dtype=`, a torch dtype or its name). sdpa attention; flash-attention 2
        when installed, on CUDA, in bf16 or fp16. float16 works as in Jina V4's card; a row whose activations
        overflow it is that row's error, not a NaN vector. Weights may use Jina V4's names or transformers' newer
        `model.language_model.*` / `model.visual.*`; any base weight missing from the checkpoint (other than
        `lm_head`, which embeddings do not use) is a load error naming it, never a random weight.
        """
        want_info = kwargs.pop("output_loading_info", False)
        if "device_map" in kwargs:
            device = None
        else:
            device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            kwargs["device_map"] = device
        first = torch.device(device) if device is not None else _first_device(kwargs["device_map"])
        dtype = _dtype(kwargs.get("dtype") or kwargs.get("torch_dtype"))
        if dtype is None:
            dtype = torch.bfloat16 if first.type == "cuda" else torch.float32
        kwargs.pop("torch_dtype", None)
        kwargs["dtype"] = dtype
        check_backbone_dtype(dtype)
        kwargs.setdefault("attn_implementation", _default_attention(first, dtype))
        kwargs.setdefault("key_mapping", NEWER_QWEN_NAMES)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing = sorted(key for key in info.get("missing_keys", ()) if not key.startswith("lm_head."))
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ValueError(f"{pretrained_model_name_or_path}: {len(missing)} base weight(s) missing from the "
                             f"checkpoint (they would be random): {shown}")
        model.eval()
        local_dir = _local_dir(pretrained_model_name_or_path, kwargs)
        model.lora.max_loras = max_loras or model.config.max_loras
        model.lora.max_lora_rank = max_lora_rank or model.config.max_lora_rank
        model.attach_processor(NovaEmbeddingsV1Processor.from_pretrained(local_dir, config=model.config, chat_template=chat_template))
        if load_adapters:
            model.load_task_adapters(os.path.join(local_dir, ADAPTERS_DIR))
        model.record_absent_task_adapters()
        return (model, info) if want_info else model

    def attach_processor(self, processor: NovaEmbeddingsV1Processor) -> None:
        self.processor = processor
        processor.adapter_names = lambda: set(self.lora.adapters)
        self.record_absent_task_adapters(log=False)

    def configure_cuda_graphs(self, enabled: bool = True, **limits) -> None:
        """Replay text-only batches through CUDA graphs, one per shape bucket (graphs_nova_embeddings_v1.py).
        `limits`: max_rows, max_length, max_graphs, memory_budget (bytes). A model that is not on CUDA refuses
        to enable them rather than silently running without."""
        if enabled and self.device.type != "cuda" and limits.get("capture", True):
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {self.device}")
        self.cuda_graphs.configure(enabled, **limits)

    # ---- forward -------------------------------------------------------------------------------------

    def forward_hidden(self, batch: TokenBatch, adapters: list[str | None], prefixes: RowPrefixes | None = None,
                       multivector: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(last hidden states [B, T, H], multi-vector projections [B, T, 128] or None) of a collated batch,
        each row through its own adapter. With `prefixes` (the key/values of the rows' dropped prefixes, see
        `collate(drop_prefix=True)` and `prefix_states`), the rows continue after their prefix."""
        check_backbone_dtype(self.model.embed_tokens.weight.dtype)
        device = self.device
        input_ids = batch.input_ids.to(device)
        merge = self.config.vision_config.spatial_merge_size
        pixel_grids = batch.pixel_grid_thw
        image_tokens = pixel_grids.prod(-1).tolist() if pixel_grids is not None else []
        position_ids = batch.position_ids if batch.position_ids is not None else self.rope_positions(batch)
        graphed = self.cuda_graphs.run(self, batch, prefixes, position_ids, adapters, multivector)
        if graphed is not None:
            return graphed
        prefix_kv = prefixes.padded() if prefixes is not None else None
        position_ids = position_ids.to(device)
        attention = self.attention_masks(batch, self.model.embed_tokens.weight.dtype, device)
        with self.lora.route(adapters, batch.pixel_rows, image_tokens, merge * merge):
            inputs_embeds = self.model.embed_tokens(input_ids)
            if batch.image_rows:
                features = self._image_features(batch)
                mask = (input_ids == self.config.image_token_id).unsqueeze(-1)
                inputs_embeds = inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.dtype))
            return self.language_pass(inputs_embeds, attention, position_ids, prefix_kv, multivector)

    def text_forward(self, input_ids: torch.Tensor, attention, position_ids: torch.Tensor, slots: torch.Tensor | None,
                     multivector: bool, prefix_kv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward_hidden` of a text-only batch, as a function of fixed-shape device tensors (`slots`: each
        row's adapter slot, `lora.slot_indices`; None: no adapter; `prefix_kv`: cached prefixes' key/values,
        `RowPrefixes.padded()`'s shape). No host sync, no data-dependent shape, no branch on a tensor's value:
        a CUDA graph captures it, and `torch.compile(fullgraph=True)` traces it whole (the tests hold it to
        that)."""
        with self.lora.routed(None if slots is None else self.lora.routing_for(slots)):
            return self.language_pass(self.model.embed_tokens(input_ids), attention, position_ids, prefix_kv,
                                      multivector)

    def language_pass(self, inputs_embeds, attention, position_ids, prefix_kv, multivector: bool):
        """(last hidden states, multi-vector projections or None) from input embeddings."""
        hidden = self.text_backbone(inputs_embeds, attention, position_ids, prefix_kv)
        return hidden, self.multi_vector_projector(hidden) if multivector else None

    def attention_masks(self, batch: TokenBatch, dtype: torch.dtype, device: torch.device):
        """What the backbone's attention layers take for a collated batch. sdpa/eager: Nova's additive bias
        [B, 1, T, P + T] (causal over each row's own tokens, padding hidden, a dropped instruction prefix's P
        slots in front), built from the host's row lengths, so that transformers never inspects a mask on the
        device (a host sync, and no CUDA graph could capture it). flash-attention 2: the 2-D padding mask."""
        lengths = batch.attention_mask.sum(1).tolist()
        if self.model.config._attn_implementation not in ("sdpa", "eager"):
            return batch.attention_mask.to(device)
        bias = attention_bias(batch.prefix_lens, lengths, batch.input_ids.shape[1], dtype, device)
        return {"full_attention": bias, "sliding_attention": bias}

    def text_backbone(self, inputs_embeds: torch.Tensor, attention, position_ids: torch.Tensor,
                      prefix_kv: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states of the language model. With `prefix_kv` ([layers, 2, B, kv_heads, P, head_dim]
        key/values of the rows' dropped prefixes), the rows continue after their prefix."""
        cache = {} if prefix_kv is None else {self._cache_argument: PrefixKV(prefix_kv)}
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention, position_ids=position_ids,
                          use_cache=False, **cache).last_hidden_state

    def _image_features(self, batch: TokenBatch) -> torch.Tensor:
        """Vision features of every image row, concatenated in row order (encoder output or precomputed).
        The grids stay on the host: the vision tower plans its windows from them without a device sync."""
        merged = None
        if batch.pixel_values is not None:
            pixels = batch.pixel_values.to(self.device, self.visual.dtype)
            merged = self.visual(pixels, grid_thw=batch.pixel_grid_thw).pooler_output
        given = [batch.image_embeds[row] for row in batch.image_rows]
        if all(embeds is None for embeds in given):
            return merged
        unit = self.config.vision_config.spatial_merge_size ** 2
        sizes = [t * h * w // unit for t, h, w in batch.pixel_grid_thw.tolist()] if merged is not None else []
        encoded = iter(torch.split(merged, sizes) if sizes else ())
        return torch.cat([embeds.to(self.device) if embeds is not None else next(encoded) for embeds in given])

    def rope_positions(self, batch: TokenBatch) -> torch.Tensor:
        """Qwen2.5-VL's 3-D (t, h, w) rotary positions, computed per row so padding never shifts a row. On the
        host, in numpy, as collation is (a few numpy operations where torch's would cost several times more)."""
        attention_mask = batch.attention_mask.numpy()
        batch_size, length = attention_mask.shape
        # a dropped (cached) instruction prefix of p tokens: the row's positions continue at p
        offsets = np.asarray(batch.prefix_lens or [0] * batch_size, dtype=np.int64)
        # text rows: p..p+n-1 on all three axes, vectorized (padding stays 0)
        steps = (np.arange(length, dtype=np.int64)[None, :] + offsets[:, None]) * attention_mask
        positions = np.repeat(steps[None], 3, axis=0)
        if batch.image_rows:
            positions[:, batch.image_rows] = self._image_row_positions(batch)
        return torch.from_numpy(positions)

    def _image_row_positions(self, batch: TokenBatch) -> np.ndarray:
        """[3, image rows, length] positions of the image rows, in numpy (host work, no torch operation per
        image): text before the image counts up from the row's offset p on all three axes, the image's merged
        tokens take (t, h, w) grid positions from there, and text after it continues past the grid's largest
        side."""
        ids, mask = batch.input_ids.numpy(), batch.attention_mask.numpy()
        image_rows = batch.image_rows
        offsets = batch.prefix_lens or [0] * len(ids)
        merge = self.config.vision_config.spatial_merge_size
        out = np.zeros((3, len(image_rows), ids.shape[1]), dtype=np.int64)
        for i, (row, (t, h, w)) in enumerate(zip(image_rows, batch.image_grid_thw.tolist(), strict=True)):
            n, p = int(mask[row].sum()), int(offsets[row])
            h, w = h // merge, w // merge
            start = int(np.flatnonzero(ids[row, :n] == self.config.image_token_id)[0])
            count = t * h * w
            out[:, i, :start] = np.arange(p, p + start)
            grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")).reshape(3, -1)
            out[:, i, start : start + count] = grid + p + start
            out[:, i, start + count : n] = np.arange(n - start - count) + p + start + max(t, h, w)
        return out

    # ---- embeddings ----------------------------------------------------------------------------------

    def collate_rows(self, rows: list[PreparedItem], adapters: list[str | None] | None = None, *,
                     for_training: bool = False) -> CollatedRows:
        """The host-side half of `forward_rows`: rows collated into padded tensors, in their order (per-row
        LoRA routing needs no grouping by adapter). No lock and no device work, so a server can collate the next
        batch while the current one runs.

        For inference (the default) rows whose instruction prefix the prefix cache serves are collated without
        it (`drop_prefix`); `for_training=True` keeps every token, since gradients must flow through them."""
        adapters = [r.adapter for r in rows] if adapters is None else list(adapters)
        drop_prefix = not for_training and self._prefix_cache_applies(rows)
        multiple = self.pad_to_multiple_of or (16 if self.device.type == "cuda" else 1)
        batch = self.processor.collate(rows, drop_prefix=drop_prefix, pad_to_multiple_of=multiple)
        batch.position_ids = self.rope_positions(batch)
        return CollatedRows(batch, adapters, list(rows), drop_prefix)

    def forward_rows(
        self,
        rows: list[PreparedItem],
        *,
        pooled: bool = True,
        multivector: bool = False,
        adapters: list[str | None] | None = None,
        collated: CollatedRows | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Differentiable embeddings of prepared rows: the one place pooling is defined (training uses it
        with gradients, `embed_prepared` without).

        Returns (pooled [N, H] L2-normalized, tokens [N, T, 128] L2-normalized per token, token_mask [N, T]
        marking each row's multi-vector rows: attended tokens outside the instruction turn), in the rows'
        order. `adapters` overrides the rows' own adapters (None entries: the base model); `collated` is
        `collate_rows(rows, adapters)` done beforehand.
        """
        if collated is None:
            collated = self.collate_rows(rows, adapters, for_training=torch.is_grad_enabled())
        elif collated.drop_prefix and torch.is_grad_enabled():
            raise ValueError("these rows were collated for inference (cached instruction prefixes left out); "
                             "collate them with collate_rows(..., for_training=True) to compute gradients")
        batch, row_adapters = collated.batch, collated.adapters
        with self.lora.lock:
            unloaded = set(row_adapters) - self.lora.adapters.keys() - {None}  # per adapter, not per row
            if unloaded:
                row, adapter = next((r, a) for r, a in zip(collated.rows, row_adapters, strict=True) if a in unloaded)
                raise ValueError(f"item {row.index}: adapter {adapter!r} is not loaded")
            prefixes = self.prefix_states(collated.rows, row_adapters) if collated.drop_prefix else None
            hidden, projected = self.forward_hidden(batch, row_adapters, prefixes, multivector)
        pooled_out = tokens = token_mask = None
        if pooled:
            mask = batch.pool_mask.to(hidden.device).unsqueeze(-1)
            pooled_out = F.normalize((hidden.float() * mask).sum(1) / mask.sum(1), dim=-1)
        if multivector:
            tokens = F.normalize(projected.float(), dim=-1)
            token_mask = batch.multi_mask.to(hidden.device)
        return pooled_out, tokens, token_mask

    @torch.inference_mode()
    def embed_prepared(self, rows: list[PreparedItem], return_multivector: bool | list[bool] = False,
                       collated: dict | None = None) -> list[torch.Tensor | ItemError]:
        """One forward pass over prepared rows. Returns one outcome per row: the full-size L2-normalized pooled
        vector or the [n_tokens, 128] multi-vector (instruction turn excluded), as float32 CPU tensors (one
        device-to-host copy per output kind, not one per row); or, for a row whose vector is not finite (its
        activations overflowed the model's dtype, float16's 65504 most likely), an `ItemError` naming it.
        The error is returned, not raised: rows are independent, so the others keep their vectors (a server
        answers each request with its own rows' outcomes; `encode()` raises it)."""
        return self.launch_prepared(rows, return_multivector, collated).result()

    @torch.inference_mode()
    def embed_batches(self, batches: Iterable[list[PreparedItem]], return_multivector: bool = False,
                      ) -> Iterator[tuple[list[PreparedItem], list[torch.Tensor | ItemError] | Exception]]:
        """`embed_prepared` over a stream of batches with one launched ahead: the next batch is taken from
        `batches` (prepared and collated on the host) and launched before the previous one's outputs are read,
        so on a GPU the host's work per batch overlaps the forward before it instead of leaving the device idle
        (on the CPU, where a launch returns with its outputs, the order of work is the same as one at a time).

        Yields (rows, outcomes) in the order of `batches`. A batch whose launch or copy raised yields that
        exception as its outcomes and the stream goes on, so a caller decides what one failed batch costs."""
        in_flight: tuple[list[PreparedItem], PendingOutcomes] | None = None
        for rows in batches:
            try:
                launched = self.launch_prepared(rows, return_multivector)
            except Exception as exc:  # noqa: BLE001 - handed to the caller with its batch, after the one before
                launched = exc
            if in_flight is not None:
                yield _read_outcomes(*in_flight)
            if isinstance(launched, Exception):
                in_flight = None
                yield rows, launched
            else:
                in_flight = (rows, launched)
        if in_flight is not None:
            yield _read_outcomes(*in_flight)

    @torch.inference_mode()
    def launch_prepared(self, rows: list[PreparedItem], return_multivector: bool | list[bool] = False,
                        collated: dict | None = None) -> PendingOutcomes:
        """`embed_prepared` in two halves: this one queues the forward and the copy of its outputs to the host,
        and `.result()` of what it returns waits for them. On a GPU the copy goes to pinned memory behind the
        forward on its stream, so a server can launch the next batch before it reads this one's vectors; on the
        CPU the outputs are ready when this returns."""
        wants = list(return_multivector) if isinstance(return_multivector, (list, tuple)) else [bool(return_multivector)] * len(rows)
        if not rows:
            return PendingOutcomes([], [], None, None, None, self.model.embed_tokens.weight.dtype)
        cuda = self.device.type == "cuda"
        started = torch.cuda.Event(enable_timing=True) if cuda else None
        if started is not None:
            started.record()
        pooled, tokens, token_mask = self.forward_rows(rows, pooled=not all(wants), multivector=any(wants),
                                                       collated=collated)
        # non_blocking from a GPU copies into pinned host memory; the event marks when the copies are done
        to_host = [None if t is None else t.to("cpu", non_blocking=cuda) for t in (pooled, tokens, token_mask)]
        done = None
        if cuda:
            done = torch.cuda.Event(enable_timing=True)
            done.record()
        return PendingOutcomes(rows, wants, *to_host, self.model.embed_tokens.weight.dtype, started, done)

    @property
    def launches_ahead(self) -> bool:
        """Whether a launch returns before its forward ends (on a GPU), so that host work done after it
        overlaps the forward."""
        return self.device.type == "cuda"

    def check_dimensions(self, dimensions: int | None, return_multivector: bool = False) -> None:
        check_dimensions(self.config, dimensions, return_multivector)

    def truncate(self, vector: torch.Tensor, dimensions: int | None) -> torch.Tensor:
        """Matryoshka: keep the first `dimensions` values and re-normalize."""
        self.check_dimensions(dimensions)
        return matryoshka_truncate(vector, dimensions)

    def encode(
        self,
        items: Iterable,
        instructions: str | None = None,
        return_multivector: bool = False,
        dimensions: int | None = None,
        batch_size: int = 8,
        show_progress: bool | None = None,
        max_pixels: int | None = None,
        max_length: int | None = None,
        return_numpy: bool = False,
        prompt_set: str | None = None,
    ) -> list:
        """Embed a mixed list of items (text, image, text+image, each with its own task/adapter/instructions).

        Rows are sorted by length inside windows of 16 batches to limit padding (`sort_windows`), and each
        batch is launched before the last one's vectors are read (`embed_batches`); results come back in
        input order and do not depend on what else is in a batch. An item whose vector is not finite (float16
        overflow) raises an `ItemError` (a ValueError) naming it.
        """
        items = list(items)
        self.check_dimensions(dimensions, return_multivector)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        show_progress = len(items) > 4 * batch_size if show_progress is None else show_progress
        results: list = [None] * len(items)
        n_batches = (len(items) + batch_size - 1) // batch_size

        def prepare(start: int, stop: int) -> list[PreparedItem]:
            return [self.processor.prepare_item(item, index=start + offset, instructions=instructions,
                                                max_pixels=max_pixels, max_length=max_length, prompt_set=prompt_set,
                                                fetch_urls=True)
                    for offset, item in enumerate(items[start:stop])]

        def split(rows: list[PreparedItem]) -> list[list[PreparedItem]]:
            rows = sorted(rows, key=lambda r: r.num_tokens)
            return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]

        overlap = self.launches_ahead
        batches = windowed_batches(sort_windows(len(items), batch_size, ramp=overlap), prepare, split, overlap)
        embedded = self.embed_batches(batches, return_multivector)
        for chunk, outcomes in _progress(embedded, n_batches, show_progress):
            if isinstance(outcomes, Exception):
                raise outcomes
            for row, vector in zip(chunk, outcomes, strict=True):
                if isinstance(vector, ItemError):
                    raise vector
                vector = self.truncate(vector, dimensions) if not return_multivector else vector
                results[row.index] = vector.numpy() if return_numpy else vector
        return results

    # model.rerank(query, documents, *, task, instructions, adapter, scoring, normalize, top_n, ...):
    # defined in the scoring module, so the model class holds only its name.
    rerank = _rerank
    # how encode() takes its batches, for other loops over many items (nova embed's)
    sort_windows = staticmethod(sort_windows)
    windowed_batches = staticmethod(windowed_batches)



@dataclass
class PendingOutcomes:
    """A launched forward's outputs on their way to the host (`launch_prepared`). `result()` waits for them
    (on a GPU, for the event recorded after the copies; on the CPU they are there) and splits them into one
    outcome per row: a float32 vector or that row's non-finite `ItemError`."""

    rows: list[PreparedItem]
    wants: list[bool]  # per row: its multi-vector (True) or its pooled vector
    pooled: torch.Tensor | None
    tokens: torch.Tensor | None
    token_mask: torch.Tensor | None
    dtype: torch.dtype  # the forward's, named in a non-finite row's error
    started: torch.cuda.Event | None = None
    done: torch.cuda.Event | None = None

    @property
    def ready(self) -> bool:
        """Whether `result()` returns without waiting for a device."""
        return self.done is None or self.done.query()

    def device_seconds(self) -> float | None:
        """On a GPU, what the forward and its copies took on the device (after `result()`); None on the CPU."""
        return None if self.done is None else self.started.elapsed_time(self.done) / 1000

    def result(self) -> list[torch.Tensor | ItemError]:
        if self.done is not None:
            self.done.synchronize()
        finite_pooled = finite_tokens = None
        if self.pooled is not None:
            finite_pooled = torch.isfinite(self.pooled).all(-1).tolist()
        if self.tokens is not None:
            finite_tokens = (torch.isfinite(self.tokens).all(-1) | ~self.token_mask).all(-1).tolist()
        outcomes: list[torch.Tensor | ItemError] = []
        for i, (row, want) in enumerate(zip(self.rows, self.wants, strict=True)):
            if not (finite_tokens if want else finite_pooled)[i]:
                outcomes.append(non_finite_error(row, self.dtype))
            else:
                outcomes.append(self.tokens[i][self.token_mask[i]] if want else self.pooled[i])
        return outcomes


def _read_outcomes(rows: list[PreparedItem], pending: PendingOutcomes,
                   ) -> tuple[list[PreparedItem], list[torch.Tensor | ItemError] | Exception]:
    try:
        return rows, pending.result()
    except Exception as exc:  # noqa: BLE001 - `embed_batches` hands it to the caller with its batch
        return rows, exc


def non_finite_error(row: PreparedItem, dtype: torch.dtype) -> ItemError:
    """A row whose vector came out inf/NaN: its activations overflowed `dtype` (float16's range ends at 65504,
    and Qwen2.5-VL's largest activations can pass it); the advice is the next wider dtype."""
    advice = {torch.float16: "load the model in bfloat16 or float32",
              torch.bfloat16: "load the model in float32"}.get(dtype, "check the model's and adapter's weights")
    adapter = f" (adapter {row.adapter!r})" if row.adapter else ""
    return item_error(row.index, f"the {str(dtype).removeprefix('torch.')} forward gave a non-finite vector"
                                 f"{adapter}; {advice}", code="non_finite_embedding")


# transformers >= 4.52 nests the backbone as `model.language_model` / `model.visual`; Jina V4 and Nova use
# `model.*` / `visual.*` (the names of this model's modules).
NEWER_QWEN_NAMES = {r"^model\.language_model\.": "model.", r"^model\.visual\.": "visual.",
                    r"^language_model\.": "model."}


BACKBONE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_backbone_dtype(dtype: torch.dtype) -> None:
    """The dtypes the backbone runs in. float16 is one (Jina V4's card and its vLLM builds use it): a row whose
    activations overflow it gets its own error (`embed_prepared`), never a NaN vector. Integer and 8-bit float
    dtypes would only give garbage vectors, so they are refused up front."""
    if dtype not in BACKBONE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in BACKBONE_DTYPES)
        raise ValueError(f"dtype {str(dtype).removeprefix('torch.')} is not supported for the Qwen2.5-VL backbone; "
                         f"use one of {names}")


def _dtype(value) -> torch.dtype | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        named = getattr(torch, value, None)
        if not isinstance(named, torch.dtype):
            raise ValueError(f"unknown dtype {value!r}; use one of "
                             f"{', '.join(str(d).removeprefix('torch.') for d in BACKBONE_DTYPES)} or 'auto'")
        return named
    return value


def _first_device(device_map) -> torch.device:
    """The device a `device_map` puts the first weights on (for the default dtype and attention)."""
    if isinstance(device_map, dict):
        device_map = next(iter(device_map.values()), "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map)


def _default_attention(device: torch.device, dtype: torch.dtype) -> str:
    """flash-attention 2 needs CUDA and a 16-bit dtype; everything else runs sdpa."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def _local_dir(name_or_path, kwargs: dict) -> str:
    if os.path.isdir(str(name_or_path)):
        return str(name_or_path)
    from huggingface_hub import snapshot_download

    return snapshot_download(str(name_or_path), revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"),
                             allow_patterns=["*.json", "*.txt", "adapters/**"])


__all__ = ["NovaEmbeddingsV1Model", "NovaEmbeddingsV1PreTrainedModel"]
