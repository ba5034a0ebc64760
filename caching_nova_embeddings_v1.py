"""The instruction prefix cache: key/values of a shared prefix (the instruction turn and the user-turn markup
before an item's own tokens) computed once per (prefix ids, adapter, weights, dtype, device) and reused.

Exact by construction: a row's forward sees the cached keys/values of its own prefix (already rotated with
their own positions 0..p-1), its tokens continue at position p, and a mask hides the other rows' longer
prefixes, so the arithmetic is the uncached computation's, split in two.

`PrefixCache` is the bounded store (LRU by bytes, counters); `PrefixKV` is the object handed to the
backbone as its cache: it records each layer's key/values (to fill the store) and/or prepends a batch's
padded prefix key/values. It implements only what the attention layers call (`update`), so it does not
depend on the Cache classes that change between transformers releases.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

DEFAULT_MAX_BYTES = 256 * 1024 * 1024


class PrefixCache:
    """LRU of prefix key/values bounded by bytes. `configure(0)` disables it. Thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.lock = threading.Lock()
        self._entries: OrderedDict[tuple, tuple[list[tuple[torch.Tensor, torch.Tensor]], int]] = OrderedDict()
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

    def put(self, key: tuple, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        with self.lock:
            if size > self.max_bytes or key in self._entries:
                return
            self._evict_to(self.max_bytes - size)
            self._entries[key] = (layers, size)
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


class PrefixKV:
    """Passed to the backbone as its cache for one forward.

    `prefix`: per layer (keys, values) of shape [B, kv_heads, P, head_dim] (P the batch's longest prefix,
    shorter ones zero-padded and masked), prepended to the layer's own key/values. `record`: keep each
    layer's own (already rotated) key/values in `recorded`, to store them as prefixes.
    """

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None, record: bool = False):
        self.prefix = prefix
        self.record = record
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.record:
            self.recorded[layer_idx] = (key_states, value_states)
        if self.prefix is None:
            return key_states, value_states
        keys, values = self.prefix[layer_idx]
        return torch.cat([keys, key_states], dim=2), torch.cat([values, value_states], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.prefix is None else self.prefix[0][0].shape[2]


def attention_bias(prefix_lens: list[int] | None, lengths, width: int, dtype, device) -> torch.Tensor:
    """Additive mask [B, 1, T, P + T]: row b's queries see its own prefix slots (the first prefix_lens[b] of P)
    and, causally, its own tokens. Padded queries still see their row's tokens, so no row is all -inf.

    `lengths` may be a list or a device tensor; with `prefix_lens` None (no prefix slots) nothing here reads a
    tensor's value on the host, so a CUDA graph can capture it with the lengths in a static buffer."""
    lengths = torch.as_tensor(lengths, device=device)
    query = torch.arange(width, device=device)
    own = query[None, :] <= query[:, None]  # causal over the row's own tokens [T, T]
    valid = query[None, :] < lengths[:, None]  # [B, T]
    allowed = own[None] & valid[:, None, :]
    slots = max(prefix_lens, default=0) if prefix_lens is not None else 0
    if slots:
        prefix = torch.arange(slots, device=device)[None, :] < torch.tensor(prefix_lens, device=device)[:, None]
        allowed = torch.cat([prefix[:, None, :].expand(len(prefix_lens), width, slots), allowed], dim=2)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]


__all__ = ["PrefixCache", "PrefixKV", "attention_bias", "DEFAULT_MAX_BYTES"]
