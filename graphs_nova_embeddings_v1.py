"""CUDA graphs of the text forward: one graph captured per shape bucket, replayed with each batch copied into
that bucket's static input buffers.

Why: on a GPU a forward of a few short rows is bound by launching its thousands of operations, not by
arithmetic; a replay launches them all at once. What is captured is `model.text_forward` (token embeddings,
the language model with per-row LoRA routing and the rows' cached instruction prefixes, the multi-vector
projector when asked) of a text-only batch, on CUDA, without gradients, with sdpa or eager attention.
Everything else (images, training, CPU, shapes outside the buckets, flash-attention 2) runs eagerly, with
the same arithmetic.

A bucket is (rows rounded up to a power of two, the batch's padded length, which `pad_to_multiple_of` already
rounds, LoRA on or off, multi-vector on or off, prefix slots: the longest cached prefix rounded up to a
multiple of 16, 0 without). Rows added to fill a bucket are one pad token long, use no adapter and no prefix,
and are dropped from the output. A prefix bucket's static buffer holds every layer's prefix keys/values
([layers, 2, rows, kv_heads, slots, head_dim]); each batch zeroes it (so a slot no row uses never holds a
stale, possibly non-finite, value) and copies in each distinct prefix once. All graphs share one memory
pool; capture stops at `max_graphs` graphs or once they hold `memory_budget` bytes (static buffers
included), and new shapes then run eagerly. Loading or unloading an adapter, replacing a weight's tensor or
moving the model drops every graph (they read the old tensors; `WeightsWatch` notices); an in-place weight
edit needs nothing, since a replay reads the same memory (the prefix cache drops the prefixes computed with
the old weights, as without graphs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .caching_nova_embeddings_v1 import RowPrefixes, attention_bias
from .processing_nova_embeddings_v1 import TokenBatch

PREFIX_SLOTS_MULTIPLE = 16  # prefix buckets: instructions of 33 to 48 tokens share one graph


@dataclass(frozen=True)
class Bucket:
    rows: int
    length: int
    adapters: bool
    multivector: bool
    prefix: int = 0  # prefix slots (0: no cached prefix)


@dataclass
class GraphStats:
    captured: int = 0
    replays: int = 0
    eager: int = 0  # batches the graphs could have served but did not: shape beyond the limits, budget spent
    memory_bytes: int = 0


class StaticForward:
    """One bucket's static buffers, and its forward on them: captured into a CUDA graph and replayed, or run
    eagerly on the same buffers (`capture=False`, how the CPU tests check everything but the capture)."""

    def __init__(self, model, bucket: Bucket):
        device = model.device
        self.bucket = bucket
        self.pad_token_id = model.processor.pad_token_id
        # ordinary tensors even when made under inference_mode, so that a batch run under no_grad can fill them
        with torch.inference_mode(False):
            self.input_ids = torch.full((bucket.rows, bucket.length), self.pad_token_id, dtype=torch.long,
                                        device=device)
            self.lengths = torch.ones(bucket.rows, dtype=torch.long, device=device)
            self.position_ids = torch.zeros(3, bucket.rows, bucket.length, dtype=torch.long, device=device)
            self.slots = torch.full((bucket.rows,), model.lora.no_slot, dtype=torch.long, device=device) \
                if bucket.adapters else None
            self.prefix_lens = self.prefix_kv = None
            if bucket.prefix:
                config = model.model.config
                head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
                self.prefix_lens = torch.zeros(bucket.rows, dtype=torch.long, device=device)
                self.prefix_kv = torch.zeros(len(model.model.layers), 2, bucket.rows, config.num_key_value_heads,
                                             bucket.prefix, head_dim, dtype=model.model.embed_tokens.weight.dtype,
                                             device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, model) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = attention_bias(self.prefix_lens, self.lengths, self.bucket.length, model.model.embed_tokens.weight.dtype,
                              self.input_ids.device, prefix_slots=self.bucket.prefix)
        attention = {"full_attention": bias, "sliding_attention": bias}
        return model.text_forward(self.input_ids, attention, self.position_ids, self.slots, self.bucket.multivector,
                                  self.prefix_kv)

    def capture(self, model, pool) -> None:
        """Warm up on a side stream (cuBLAS and the allocator set themselves up outside the capture), then
        capture one forward into the shared pool."""
        side = torch.cuda.Stream(device=self.input_ids.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(model)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # "thread_local": a host sync in this forward still fails the capture, while other threads' potentially
        # unsafe CUDA calls (a cudaMalloc, say) do not error, as under torch's default, "global": a server's
        # model process captures new shapes while its reply thread waits on the previous forward's event and an
        # adapter load may allocate and copy weights on the device
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = self.forward(model)

    def fill(self, batch: TokenBatch, position_ids: torch.Tensor, slots: list[int], no_slot: int,
             prefixes: RowPrefixes | None = None) -> None:
        """Copy a batch (host tensors) into the buffers: one host-to-device copy per buffer; its prefixes
        (device tensors) with one zeroing and one copy per distinct prefix."""
        rows, length = self.bucket.rows, self.bucket.length
        n = batch.input_ids.shape[0]
        ids = torch.full((rows, length), self.pad_token_id, dtype=torch.long)
        ids[:n] = batch.input_ids
        lengths = torch.ones(rows, dtype=torch.long)
        lengths[:n] = batch.attention_mask.sum(1)
        positions = torch.zeros(3, rows, length, dtype=torch.long)
        positions[:, :n] = position_ids
        self.input_ids.copy_(ids, non_blocking=True)
        self.lengths.copy_(lengths, non_blocking=True)
        self.position_ids.copy_(positions, non_blocking=True)
        if self.slots is not None:
            self.slots.copy_(torch.tensor(slots + [no_slot] * (rows - n)), non_blocking=True)
        if self.prefix_kv is not None:
            self.prefix_lens.copy_(torch.tensor(batch.prefix_lens + [0] * (rows - n)), non_blocking=True)
            self.prefix_kv.zero_()
            prefixes.copy_into(self.prefix_kv)

    def run(self, model, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The filled batch's (hidden, projected), as copies: the buffers are overwritten by the next batch."""
        if self.graph is None:
            hidden, projected = self.forward(model)
        else:
            self.graph.replay()
            hidden, projected = self.outputs
        return hidden[:rows].clone(), projected[:rows].clone() if projected is not None else None


class TextGraphs:
    """The model's CUDA graphs (off until `configure(enabled=True)`): which batches they serve, the buckets
    captured so far, and their limits."""

    def __init__(self):
        self.enabled = False
        self.capture = True
        self.prefixes = True  # batches with cached instruction prefixes too (prefix buckets)
        self.max_rows = 64
        self.max_length = 512
        self.max_prefix_length = 256
        self.max_graphs = 64
        self.memory_budget = 4 << 30
        self.stats = GraphStats()
        self._forwards: dict[Bucket, StaticForward] = {}
        self._pool = None
        self._identity: tuple | None = None

    def configure(self, enabled: bool | None = None, *, max_rows: int | None = None, max_length: int | None = None,
                  max_graphs: int | None = None, memory_budget: int | None = None, capture: bool | None = None,
                  prefixes: bool | None = None, max_prefix_length: int | None = None) -> None:
        """Change the switch or a limit (dropping the graphs captured so far). `capture=False` runs the bucket
        path eagerly on its static buffers: any device, no graph (for tests). `prefixes=False` leaves batches
        with cached instruction prefixes to the eager forward."""
        for name, value in (("max_rows", max_rows), ("max_length", max_length), ("max_graphs", max_graphs),
                            ("memory_budget", memory_budget), ("max_prefix_length", max_prefix_length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"cuda graphs: {name} must be a non-negative integer, got {value!r}")
        for name, value in (("enabled", enabled), ("capture", capture), ("prefixes", prefixes)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"cuda graphs: {name} must be True or False, got {value!r}")
        updates = {"enabled": enabled, "capture": capture, "prefixes": prefixes, "max_rows": max_rows,
                   "max_length": max_length, "max_graphs": max_graphs, "memory_budget": memory_budget,
                   "max_prefix_length": max_prefix_length}
        for name, value in updates.items():
            if value is not None:
                setattr(self, name, value)
        self.clear()

    @property
    def buckets(self) -> list[Bucket]:
        """The buckets held now (the graphs are dropped lazily, at the next batch after their tensors changed)."""
        return list(self._forwards)

    def clear(self) -> None:
        self._forwards.clear()
        self._pool = None
        self._identity = None
        self.stats.memory_bytes = 0

    def run(self, model, batch: TokenBatch, prefixes: RowPrefixes | None, position_ids: torch.Tensor,
            adapters: list[str | None], multivector: bool):
        """(hidden, projected) of `batch` through its bucket's graph, or None where the batch runs eagerly."""
        if not self.enabled or batch.image_rows or torch.is_grad_enabled():
            return None
        if prefixes is not None and not self.prefixes:
            return None
        if self.capture and model.device.type != "cuda":
            return None
        if model.model.config._attn_implementation not in ("sdpa", "eager"):
            return None
        rows, length = batch.input_ids.shape
        self._check_identity(model)
        slots = model.lora.slot_indices(adapters)
        prefix = _round_up(prefixes.width, PREFIX_SLOTS_MULTIPLE) if prefixes is not None else 0
        bucket = Bucket(_power_of_two(rows), length, any(slot != model.lora.no_slot for slot in slots), multivector,
                        prefix)
        forward = self._forwards.get(bucket) or self._add(model, bucket)
        if forward is None:
            self.stats.eager += 1
            return None
        forward.fill(batch, position_ids, slots, model.lora.no_slot, prefixes)
        self.stats.replays += 1
        return forward.run(model, rows)

    def prepare(self, model, rows=(1, 2, 4, 8, 16, 32), lengths=(16, 32, 64), adapters=(False, True),
                multivector=(False,), prefixes=(0,)) -> list[Bucket]:
        """Capture these buckets now (at load, say) instead of on their first batch, within the same limits
        (`prefixes`: prefix lengths, rounded up to their slots as batches are; 0: none). Returns the buckets
        held afterwards."""
        self._check_identity(model)
        with torch.inference_mode():
            for bucket in (Bucket(_power_of_two(r), n, a, m, _round_up(p, PREFIX_SLOTS_MULTIPLE)) for r in rows
                           for n in lengths for a in adapters for m in multivector for p in prefixes):
                if bucket not in self._forwards and not (bucket.adapters and not model.lora.adapters):
                    self._add(model, bucket)
        return self.buckets

    def _add(self, model, bucket: Bucket) -> StaticForward | None:
        if (bucket.rows > self.max_rows or bucket.length > self.max_length or bucket.prefix > self.max_prefix_length
                or len(self._forwards) >= self.max_graphs or self.stats.memory_bytes >= self.memory_budget):
            return None
        device = model.device
        before = torch.cuda.memory_allocated(device) if self.capture else 0
        forward = StaticForward(model, bucket)
        if self.capture:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            forward.capture(model, self._pool)
            self.stats.memory_bytes += max(torch.cuda.memory_allocated(device) - before, 0)
        self._forwards[bucket] = forward
        self.stats.captured += 1
        return forward

    def _check_identity(self, model) -> None:
        """Drop every graph when the tensors they read were replaced (adapters rebuilt, a weight assigned, the
        model moved). In-place edits keep them: a replay reads the same memory."""
        projector = model.multi_vector_projector
        identity = (model.lora.generation, model.backbone_watch.storage(model.model),
                    model.adapters_watch.storage(model.lora), projector.weight.data_ptr(),
                    projector.bias.data_ptr() if projector.bias is not None else None)
        if identity != self._identity:
            self.clear()
            self._identity = identity


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


__all__ = ["TextGraphs", "StaticForward", "Bucket", "GraphStats"]
