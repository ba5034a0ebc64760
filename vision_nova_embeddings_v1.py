"""Qwen2.5-VL's vision tower with its attention batched: one attention call per layer for all windows (or
whole frames) of all images of a batch, whatever their number and sizes.

transformers' sdpa path runs one attention call per window in a Python loop and builds each image's rotary
positions and window order with torch operations per image, so a batch's operations (on a GPU, launches)
grow with its windows times its layers. Here the per-image work is plain numpy on the host, done once per
forward (`VisionPlan.build`) and moved to the device in one transfer; each layer gathers its rows into padded
segments [segments, heads, longest, head_dim] and runs one `scaled_dot_product_attention` with a key padding
mask. With flash-attention (packed rows and `cu_seqlens`, already one call per layer) transformers' attention
runs as it is, fed from the same plan. Weights, module names (`visual.*`) and the patch order every Linear
layer sees are transformers' own, so checkpoints load unchanged and LoRA hooks on the vision Linear layers
see the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLVisionAttention,
    apply_rotary_pos_emb_vision,
)


@dataclass(frozen=True, eq=False)
class SegmentLayout:
    """Host-side layout of packed rows split into independent attention segments (windows or frames), laid
    out as `count` segments padded to `width` rows. Always padded, even when every segment has one length,
    so that a forward's operations never depend on the images' sizes."""

    lengths: np.ndarray  # [count] rows per segment
    gather: np.ndarray  # [count * width] the packed row of each padded slot (padding repeats a real row)
    unpad: np.ndarray  # [rows] each packed row's padded slot
    key_mask: np.ndarray  # [count, width] True on real rows

    @classmethod
    def of(cls, lengths: np.ndarray) -> SegmentLayout:
        width = int(lengths.max())
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        slots = np.arange(width)
        real = slots[None, :] < lengths[:, None]
        gather = np.where(real, starts[:, None] + slots, starts[:, None]).reshape(-1)
        unpad = (np.arange(len(lengths))[:, None] * width + slots)[real]
        return cls(lengths, gather, unpad, real)

    @property
    def count(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return int(self.lengths.max())

    def cu_seqlens(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(self.lengths)))


@dataclass(frozen=True, eq=False)
class Segments:
    """One segmentation on the device, as the attention layers use it (see `SegmentLayout`)."""

    count: int
    width: int
    cu_seqlens: torch.Tensor  # [count + 1] int32, for varlen kernels (flash-attention)
    # the padded layout (see `SegmentLayout`); None in plans for flash-attention, which takes packed rows
    gather: torch.Tensor | None
    unpad: torch.Tensor | None
    key_mask: torch.Tensor | None  # [count, 1, 1, width] bool, broadcast over heads and queries

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """Packed rows [N, ...] -> padded slots [count * width, ...]."""
        return rows[self.gather]


@dataclass(frozen=True, eq=False)
class VisionPlan:
    """Everything about a batch's images that depends on their sizes only: computed on the host with numpy,
    moved to the device in one transfer, so a forward holds no per-image torch operation and no host sync."""

    position_ids: torch.Tensor  # [N, 2] (row, column) of each patch, in window order
    patch_order: torch.Tensor  # [N] the processor's patch order -> window order
    restore_order: torch.Tensor  # [N / merge**2] merged tokens, window order -> the processor's order
    windows: Segments  # the windowed layers' segments
    frames: Segments  # the full-attention layers' segments (one per image frame)

    @classmethod
    def build(cls, grid_thw, config, device: torch.device | str, padded: bool = True) -> VisionPlan:
        """`grid_thw`: (t, h, w) patches per image, a host tensor or a list. `padded=False` leaves out the
        padding indices (varlen kernels need only `cu_seqlens`)."""
        grids = [tuple(int(x) for x in grid) for grid in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw)]
        if not grids:
            raise ValueError("no images to plan: grid_thw is empty")
        merge = config.spatial_merge_size
        side = config.window_size // merge // config.patch_size  # a window's side, in merged tokens
        orders, window_lengths, frame_lengths, positions = [], [], [], []
        base = 0
        for t, h, w in grids:
            if h % merge or w % merge:
                raise ValueError(f"image grid {(t, h, w)}: height and width must be multiples of {merge}")
            order, lengths = _window_order(t, h // merge, w // merge, side)
            orders.append(order + base)
            window_lengths.append(lengths * merge * merge)
            frame_lengths.append(np.full(t, h * w))
            positions.append(_patch_positions(t, h, w, merge))
            base += t * (h // merge) * (w // merge)
        order = np.concatenate(orders)
        unit = merge * merge
        patch_order = (order[:, None] * unit + np.arange(unit)).reshape(-1)
        position_ids = np.concatenate(positions)[patch_order]
        layouts = [SegmentLayout.of(np.concatenate(window_lengths)), SegmentLayout.of(np.concatenate(frame_lengths))]
        return cls._to_device(position_ids, patch_order, np.argsort(order), layouts, torch.device(device), padded)

    @classmethod
    def _to_device(cls, position_ids, patch_order, restore_order, layouts, device, padded) -> VisionPlan:
        arrays = [position_ids.reshape(-1), patch_order, restore_order]
        for layout in layouts:
            arrays.append(layout.cu_seqlens())
            if padded:
                arrays += [layout.gather, layout.unpad, layout.key_mask.reshape(-1)]
        packed = torch.from_numpy(np.concatenate(arrays).astype(np.int64)).to(device, non_blocking=True)
        pieces = iter(torch.split(packed, [len(a) for a in arrays]))
        position, patch, restore = next(pieces).view(-1, 2), next(pieces), next(pieces)
        segments = []
        for layout in layouts:
            cu_seqlens = next(pieces).to(torch.int32)
            gather = unpad = mask = None
            if padded:
                gather, unpad = next(pieces), next(pieces)
                mask = next(pieces).view(layout.count, 1, 1, layout.width).bool()
            segments.append(Segments(layout.count, layout.width, cu_seqlens, gather, unpad, mask))
        return cls(position, patch, restore, *segments)


def _window_order(t: int, rows: int, cols: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Merged tokens of one image in window order (frame, window row, window column, then row-major inside
    the window; windows at the right and bottom edges are partial), and each window's token count."""
    tiles_down, tiles_across = -(-rows // side), -(-cols // side)
    grid = np.full((t, tiles_down * side, tiles_across * side), -1, dtype=np.int64)
    grid[:, :rows, :cols] = np.arange(t * rows * cols).reshape(t, rows, cols)
    tiles = grid.reshape(t, tiles_down, side, tiles_across, side).transpose(0, 1, 3, 2, 4).reshape(-1, side * side)
    real = tiles >= 0
    return tiles[real], real.sum(1)


def _patch_positions(t: int, h: int, w: int, merge: int) -> np.ndarray:
    """(row, column) of each patch of one image in the processor's order: merge x merge blocks, row-major,
    the patches inside a block row-major; repeated for every frame."""
    block_rows, block_cols = h // merge, w // merge
    shape = (block_rows, block_cols, merge, merge)
    row = np.arange(block_rows)[:, None, None, None] * merge + np.arange(merge)[None, None, :, None]
    col = np.arange(block_cols)[None, :, None, None] * merge + np.arange(merge)[None, None, None, :]
    one = np.stack([np.broadcast_to(row, shape).reshape(-1), np.broadcast_to(col, shape).reshape(-1)], axis=1)
    return np.tile(one, (t, 1))


def _uses_flash_attention(config) -> bool:
    """flash-attention kernels take packed rows with `cu_seqlens` (one varlen call per layer already)."""
    return "flash" in (getattr(config, "_attn_implementation", None) or "")


class BatchedVisionAttention(Qwen2_5_VLVisionAttention):
    """One attention call for every segment of a layer: rows gathered into padded segments, one sdpa call
    with a key padding mask, rows scattered back. Same parameters (`qkv`, `proj`) as transformers' class."""

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                segments: Segments | None = None, attention_bias: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        """`segments`: the padded layout; `attention_bias`: its key mask as 0 / -inf in the hidden states'
        dtype (made once per forward: sdpa would convert a boolean mask in every layer)."""
        if segments is None:  # packed rows for flash-attention's varlen kernel, or a caller of the stock API
            return super().forward(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        count, width = segments.count, segments.width
        qkv = segments.pad(self.qkv(hidden_states))
        query, key, value = qkv.view(count * width, 3, self.num_heads, -1).unbind(1)
        cos, sin = position_embeddings  # already in the padded layout
        query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)
        query, key, value = (x.view(count, width, self.num_heads, -1).transpose(1, 2) for x in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_bias,
                                             dropout_p=self.attention_dropout if self.training else 0.0,
                                             scale=self.scaling)
        out = out.transpose(1, 2).reshape(count * width, -1)[segments.unpad]
        return self.proj(out)


class BatchedVisionTransformer(Qwen2_5_VisionTransformerPretrainedModel):
    """transformers' Qwen2.5-VL vision tower (same modules, same weights, same outputs) whose forward runs a
    constant number of torch operations per layer, whatever the number of images and windows."""

    def __init__(self, config, *inputs, **kwargs) -> None:
        super().__init__(config, *inputs, **kwargs)
        for block in self.blocks:
            block.attn = BatchedVisionAttention(config)
        self.post_init()

    def plan(self, grid_thw) -> VisionPlan:
        return VisionPlan.build(grid_thw, self.config, self.patch_embed.proj.weight.device,
                                padded=not _uses_flash_attention(self.config))

    def forward(self, hidden_states: torch.Tensor, grid_thw, plan: VisionPlan | None = None,
                **kwargs) -> BaseModelOutputWithPooling:
        """`hidden_states`: the processor's patches [N, C*T*P*P]; `grid_thw`: (t, h, w) per image, best a host
        tensor (a device tensor costs a sync). `plan`: `self.plan(grid_thw)` built beforehand (off the thread
        that launches the forward)."""
        plan = plan if plan is not None else self.plan(grid_thw)
        hidden = self.patch_embed(hidden_states)[plan.patch_order]
        cos, sin = self._rotary(plan.position_ids, hidden.device)
        padded = not _uses_flash_attention(self.config)

        def layer_arguments(seg: Segments) -> dict:
            if not padded:
                return {"cu_seqlens": seg.cu_seqlens, "max_seqlen": seg.width, "position_embeddings": (cos, sin)}
            bias = seg.key_mask.to(hidden.dtype).log()  # log 1 = 0 on real rows, log 0 = -inf on padding
            return {"cu_seqlens": seg.cu_seqlens, "segments": seg, "position_embeddings": (seg.pad(cos), seg.pad(sin)),
                    "attention_bias": bias}

        windowed, full = layer_arguments(plan.windows), layer_arguments(plan.frames)
        for index, block in enumerate(self.blocks):
            hidden = block(hidden, **(full if index in self.fullatt_block_indexes else windowed))
        merged = self.merger(hidden)[plan.restore_order]
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=merged)

    def _rotary(self, position_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [N, head_dim] of each patch's (row, column): the frequencies of rows, then of columns,
        twice (transformers' axial layout)."""
        inv_freq = self.rotary_pos_emb.inv_freq.to(device=device, dtype=torch.float)
        freqs = (position_ids[..., None].float() * inv_freq).flatten(1)
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = getattr(self.rotary_pos_emb, "attention_scaling", 1.0)
        return emb.cos() * scaling, emb.sin() * scaling


__all__ = ["BatchedVisionTransformer", "BatchedVisionAttention", "VisionPlan"]
