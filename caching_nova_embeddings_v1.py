"""The instruction prefix cache: key/values of a shared prefix (the instruction turn and the user-turn markup
before an item's own tokens) computed once per (prefix ids, adapter, weights, dtype, device) and reused.

Exact by construction: a row's forward sees the cached keys/values of its own prefix (already rotated with
their own positions 0..p-1), its tokens continue at position p, and a mask hides the other rows' longer
prefixes, so the arithmetic is the uncached computation's, split in two.

`PrefixCache` is the bounded store (LRU by bytes, counters). An entry is one tensor per prefix, every
layer's keys and values stacked: [layers, 2, kv_heads, p, head_dim], so that a batch's prefixes are padded
(or copied into a CUDA graph's static buffer) in one operation per distinct prefix, not one per layer.
`RowPrefixes` is one batch's prefixes: which rows share which entry. `PrefixKV` is the object handed to the
backbone as its cache: it records each layer's key/values (to fill the store) and/or prepends a batch's
padded prefix key/values. It implements only what the attention layers call (`update`), so it does not
depend on the Cache classes that change between transformers releases. `PrefixCachingMixin` is how the model
uses them (mixed into the model class). `WeightsWatch` is how the caches built from the weights (these
prefixes, and the CUDA graphs) notice that the weights changed.
"""

from __future__ import annotations

import functools
import inspect
import operator
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .lora_nova_embeddings_v1 import NO_ROUTE
from .processing_nova_embeddings_v1 import PreparedItem

DEFAULT_MAX_BYTES = 256 * 1024 * 1024

_registrations = 0  # parameters, buffers and submodules registered by any module of this process so far
_registrations_lock = threading.Lock()  # two threads registering at once must both count


def _count_registration(*_) -> None:
    global _registrations
    with _registrations_lock:
        _registrations += 1


_VERSION = operator.attrgetter("_version")

for _hook in ("parameter", "buffer", "module"):  # returning None keeps what is registered as it is
    getattr(torch.nn.modules.module, f"register_module_{_hook}_registration_hook")(_count_registration)


class WeightsWatch:
    """Whether a module's parameters (or buffers) changed since a cache was built from them.

    `storage()`: each tensor's memory (and the first one's dtype and device), which changes when a tensor is
    replaced (`module.weight = ...`, `load_state_dict(assign=True)`, `.data = ...`) or moved (`.to()`,
    `.half()`): what a CUDA graph reads. `state()`: that and each tensor's in-place version counter, which an
    in-place edit bumps: what cached key/values were computed from. Both read a list of the tensors kept
    between calls, not the module tree (walking 36 layers' modules costs ~0.6 ms of CPU per call, the list a
    tenth of it); the list is rebuilt after any module registers a parameter, buffer or submodule (torch's
    global registration hooks count them), since that is how a module gets a new tensor or loses one, and when
    its first tensor is no longer the one listed (a cheap guard against a tensor put straight into
    `module._parameters`, as accelerate's loading helpers do, where it is the first)."""

    def __init__(self, kind: str = "parameters"):
        self.kind = kind  # "parameters" or "buffers"
        self._tensors: list[torch.Tensor] = []
        self._seen: tuple | None = None

    def tensors(self, module: torch.nn.Module) -> list[torch.Tensor]:
        seen = (_registrations, id(module))
        first = next(getattr(module, self.kind)(), None)  # swapped in without registering?
        if seen != self._seen or (self._tensors[0] if self._tensors else None) is not first:
            self._tensors, self._seen = list(getattr(module, self.kind)()), seen
        return self._tensors

    def storage(self, module: torch.nn.Module) -> tuple:
        return _storage(self.tensors(module))

    def state(self, module: torch.nn.Module) -> tuple:
        tensors = self.tensors(module)
        return _storage(tensors), tuple(map(_VERSION, tensors))


def _storage(tensors: list[torch.Tensor]) -> tuple:
    where = (tensors[0].dtype, tensors[0].device) if tensors else ()
    return (*where, *map(torch.Tensor.data_ptr, tensors))


class PrefixCache:
    """LRU of prefix key/values bounded by bytes. `configure(0)` disables it. Thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.lock = threading.Lock()
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, int]] = OrderedDict()
        self.max_bytes = 0
        self.hits = self.misses = self.evictions = self.bytes = 0
        self._weights: dict[str, object] = {}
        self.configure(max_bytes)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def configure(self, max_bytes: int) -> None:
        """Set the byte budget (0 disables the cache and frees it); entries over the budget are evicted."""
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"prefix cache size must be a non-negative number of bytes, got {max_bytes!r}")
        with self.lock:
            self.max_bytes = max_bytes
            self._evict_to(max_bytes)

    def stats(self) -> dict:
        with self.lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions, "bytes": self.bytes,
                    "entries": len(self._entries), "max_bytes": self.max_bytes}

    def get(self, key: tuple):
        with self.lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: tuple, states: torch.Tensor) -> None:
        """Store one prefix's key/values, [layers, 2, kv_heads, p, head_dim]."""
        size = states.numel() * states.element_size()
        with self.lock:
            if size > self.max_bytes or key in self._entries:
                return
            self._evict_to(self.max_bytes - size)
            self._entries[key] = (states, size)
            self.bytes += size

    def check_weights(self, identity: object, *, part: str = "model", depends=lambda key: True) -> None:
        """Drop the entries that `depends` on `part` of the weights when its identity (pointers, in-place
        versions, dtype, device) is no longer the one they were computed with."""
        with self.lock:
            if identity != self._weights.get(part):
                self._drop(depends)
                self._weights[part] = identity

    def invalidate_adapter(self, adapter_id: int) -> None:
        """An adapter was unloaded or replaced: its prefixes are wrong for whatever gets its name next."""
        with self.lock:
            self._drop(lambda key: key[1] == adapter_id)

    def clear(self) -> None:
        with self.lock:
            self._drop(lambda key: True)

    def _drop(self, predicate) -> None:
        for key in [key for key in self._entries if predicate(key)]:
            self.bytes -= self._entries.pop(key)[1]

    def _evict_to(self, budget: int) -> None:
        while self._entries and self.bytes > budget:
            _, (_, size) = self._entries.popitem(last=False)
            self.bytes -= size
            self.evictions += 1


@dataclass
class RowPrefixes:
    """One batch's cached prefixes: each distinct prefix's stacked key/values ([layers, 2, kv_heads, p,
    head_dim], a `PrefixCache` entry) and the rows that continue after it. Rows in none of them have no prefix."""

    states: list[torch.Tensor]
    rows: list[list[int]]  # per entry of `states`, ascending
    batch_size: int

    @property
    def width(self) -> int:
        """The longest prefix: the prefix slots an eager forward needs."""
        return max(state.shape[3] for state in self.states)

    def padded(self) -> torch.Tensor:
        """[layers, 2, B, kv_heads, width, head_dim]: one expanded view when every row shares one prefix (the
        common case: one instruction on every query), else zeros with each prefix copied into its rows."""
        if len(self.states) == 1 and len(self.rows[0]) == self.batch_size:
            state = self.states[0]
            return state.unsqueeze(2).expand(-1, -1, self.batch_size, -1, -1, -1)
        some = self.states[0]
        layers, _, heads, _, head_dim = some.shape
        out = torch.zeros(layers, 2, self.batch_size, heads, self.width, head_dim, dtype=some.dtype,
                          device=some.device)
        self.copy_into(out)
        return out

    def copy_into(self, buffer: torch.Tensor) -> None:
        """Copy each prefix into its rows' first slots of `buffer` ([layers, 2, >= B, kv_heads, >= width,
        head_dim]; the other slots are left as they are): one copy per distinct prefix."""
        for state, rows in zip(self.states, self.rows, strict=True):
            n = state.shape[3]
            if rows[-1] - rows[0] + 1 == len(rows):  # a run of rows: a slice, no index tensor to send
                buffer[:, :, rows[0] : rows[-1] + 1, :, :n] = state.unsqueeze(2)
            else:
                buffer[:, :, torch.tensor(rows, device=buffer.device), :, :n] = state.unsqueeze(2)


class PrefixKV:
    """Passed to the backbone as its cache for one forward.

    `prefix`: [layers, 2, B, kv_heads, P, head_dim], every layer's prefix keys and values (P prefix slots,
    each row's own prefix first, the rest masked), prepended to the layer's own key/values. `record`: keep
    each layer's own (already rotated) key/values in `recorded`, to store them as prefixes.
    """

    def __init__(self, prefix: torch.Tensor | None = None, record: bool = False):
        self.prefix = prefix
        self.record = record
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.record:
            self.recorded[layer_idx] = (key_states, value_states)
        if self.prefix is None:
            return key_states, value_states
        keys, values = self.prefix[layer_idx]
        if keys.device != key_states.device:  # a model split across devices (`device_map`): the layer's own
            keys, values = keys.to(key_states.device), values.to(key_states.device)
        return torch.cat([keys, key_states], dim=2), torch.cat([values, value_states], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.prefix is None else self.prefix.shape[4]


def attention_bias(prefix_lens, lengths, width: int, dtype, device, prefix_slots: int | None = None) -> torch.Tensor:
    """Additive mask [B, 1, T, P + T]: row b's queries see its own prefix slots (the first prefix_lens[b] of P)
    and, causally, its own tokens. Padded queries still see their row's tokens, so no row is all -inf.

    `lengths` and `prefix_lens` may be lists or device tensors; P is `prefix_slots`, else the longest prefix
    (0 with `prefix_lens` None). Given P, nothing here reads a tensor's value on the host, so a CUDA graph can
    capture it with the lengths in static buffers."""
    lengths = torch.as_tensor(lengths, device=device)
    query = torch.arange(width, device=device)
    own = query[None, :] <= query[:, None]  # causal over the row's own tokens [T, T]
    valid = query[None, :] < lengths[:, None]  # [B, T]
    allowed = own[None] & valid[:, None, :]
    slots = prefix_slots if prefix_slots is not None else max(prefix_lens, default=0) if prefix_lens is not None else 0
    if slots:
        prefix_lens = torch.as_tensor(prefix_lens, device=device)
        prefix = torch.arange(slots, device=device)[None, :] < prefix_lens[:, None]
        allowed = torch.cat([prefix[:, None, :].expand(len(prefix_lens), width, slots), allowed], dim=2)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]


class PrefixCachingMixin:
    """How the model uses its `PrefixCache`: which batches it applies to, the rows' prefix key/values (cached,
    or computed together in one forward and stored), and when cached ones go stale (a weight replaced, edited in
    place or moved; an adapter changed). Mixed into the model class; it reads the model's `prefix_cache`, `lora`,
    `model` (the backbone), `processor` and `device`, and keeps `backbone_watch` and `adapters_watch`
    (`WeightsWatch`es of the backbone's parameters and of the adapters' stacked buffers)."""

    @functools.cached_property
    def backbone_watch(self) -> WeightsWatch:
        return WeightsWatch("parameters")

    @functools.cached_property
    def adapters_watch(self) -> WeightsWatch:
        return WeightsWatch("buffers")

    def _prefix_cache_applies(self, rows: list[PreparedItem]) -> bool:
        """sdpa/eager attention (their additive masks express per-row prefixes; flash-attention 2 would need
        varlen key lengths), and some row has a prefix to share. (Inference only: see `collate_rows`.)"""
        return (self.prefix_cache.enabled
                and self.model.config._attn_implementation in ("sdpa", "eager")
                and any(row.prefix_len for row in rows))

    def prefix_states(self, rows: list[PreparedItem], adapters: list[str | None]) -> RowPrefixes:
        """The rows' prefix key/values, each distinct prefix once. Cached prefixes are reused; the missing ones
        are computed together in one forward and stored."""
        cache = self.prefix_cache
        cache.check_weights(self.backbone_watch.state(self.model))
        # the adapters' stacks are shared, so a change to any adapter (an in-place edit included) drops every
        # adapter's prefixes; prefixes computed without an adapter stay
        cache.check_weights(self.adapters_watch.state(self.lora), part="adapters", depends=lambda key: key[1] != NO_ROUTE)
        param = self.model.embed_tokens.weight
        keys = [(row.prefix_ids, self.lora.identity(adapter), param.dtype, param.device)
                for row, adapter in zip(rows, adapters, strict=True)]
        rows_of: dict[tuple, list[int]] = {}  # each distinct prefix's rows
        for i, key in enumerate(keys):
            if key[0]:
                rows_of.setdefault(key, []).append(i)
        states: dict[tuple, torch.Tensor] = {}
        missing: dict[tuple, str | None] = {}
        for key, prefix_rows in rows_of.items():
            found = cache.get(key)
            if found is None:
                missing[key] = adapters[prefix_rows[0]]
            else:
                states[key] = found
        if missing:
            computed = self._compute_prefixes([list(key[0]) for key in missing], list(missing.values()))
            for key, state in zip(missing, computed, strict=True):
                cache.put(key, state)
                states[key] = state
        return RowPrefixes([states[key] for key in rows_of], list(rows_of.values()), len(keys))

    def _compute_prefixes(self, prefixes: list[list[int]], adapters: list[str | None]) -> list[torch.Tensor]:
        """Key/values of several prefixes (text only), each through its adapter, in one forward: per prefix
        [layers, 2, kv_heads, p, head_dim]."""
        lengths = [len(ids) for ids in prefixes]
        width = max(lengths)
        input_ids = torch.full((len(prefixes), width), self.processor.pad_token_id, dtype=torch.long)
        for i, ids in enumerate(prefixes):
            input_ids[i, : len(ids)] = torch.tensor(ids)
        positions = torch.arange(width).expand(3, len(prefixes), width)
        recorder = PrefixKV(record=True)
        with self.lora.route(adapters, [], [], 1):
            embeds = self.model.embed_tokens(input_ids.to(self.device))
            bias = attention_bias([0] * len(prefixes), lengths, width, embeds.dtype, embeds.device)
            self.model(inputs_embeds=embeds, attention_mask={"full_attention": bias, "sliding_attention": bias},
                       position_ids=positions.to(self.device), use_cache=False, **{self._cache_argument: recorder})
        layers = len(self.model.layers)
        device = self.model.embed_tokens.weight.device  # one entry on one device, whatever `device_map` split
        stacked = torch.stack([t.to(device) for layer in range(layers) for t in recorder.recorded[layer]])
        stacked = stacked.unflatten(0, (layers, 2))  # [layers, 2, prefixes, kv_heads, width, head_dim]
        return [stacked[:, :, i, :, :n].clone() for i, n in enumerate(lengths)]

    @functools.cached_property
    def _cache_argument(self) -> str:
        """The backbone's name for its cache argument (`cache` in newer transformers, `past_key_values` before);
        read once, not on every batch."""
        return "cache" if "cache" in inspect.signature(type(self.model).forward).parameters else "past_key_values"


__all__ = ["PrefixCache", "PrefixKV", "RowPrefixes", "PrefixCachingMixin", "WeightsWatch", "attention_bias",
           "DEFAULT_MAX_BYTES"]
