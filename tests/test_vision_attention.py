"""The vision tower's batched attention: the same vectors as transformers' Qwen2.5-VL tower, one
attention call per layer, and a constant number of torch operations per additional image."""

import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLModel,
)
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from nova.op_count import count_ops

# (t, h, w) patch grids: one image whose windows are all full (448x448), one with partial edge windows, a
# mix of sizes (and a two-frame grid: one full-attention segment per frame) in one batch
GRIDS = {
    "448x448": [(1, 32, 32)],
    "partial windows": [(1, 30, 22)],
    "mixed sizes": [(1, 32, 32), (1, 6, 10), (1, 64, 48), (2, 12, 20), (1, 18, 70), (1, 2, 2)],
}


def stock_tower(model) -> Qwen2_5_VisionTransformerPretrainedModel:
    """transformers' own tower (per-window attention calls) with the model's vision weights: the reference."""
    stock = Qwen2_5_VisionTransformerPretrainedModel._from_config(copy.deepcopy(model.config.vision_config))
    stock.load_state_dict(model.visual.state_dict())
    return stock.eval()


def patches(grids, seed=0) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(seed))


def assert_same_rows(got: torch.Tensor, want: torch.Tensor):
    assert got.shape == want.shape
    assert float(F.cosine_similarity(got, want, dim=-1).min()) >= 0.99999
    assert torch.allclose(got, want, atol=1e-5)


def vision_module(model) -> types.ModuleType:
    return sys.modules[type(model.visual).__module__]


@pytest.mark.parametrize("case", GRIDS)
def test_tower_equals_transformers_tower(tiny_model, case):
    grids = GRIDS[case]
    x, grid_thw = patches(grids), torch.tensor(grids)
    with torch.inference_mode():
        want = stock_tower(tiny_model)(x, grid_thw=grid_thw).pooler_output
        assert_same_rows(tiny_model.visual(x, grid_thw=grid_thw).pooler_output, want)
        # a plan built beforehand (off the launching thread) gives the same
        plan = tiny_model.visual.plan(grid_thw)
        assert_same_rows(tiny_model.visual(x, grid_thw=grid_thw, plan=plan).pooler_output, want)


def test_gradients_equal_transformers_tower(tiny_model):
    """Training goes through the gathers: the same gradients reach the weights."""
    grids = [(1, 16, 16), (1, 6, 10), (2, 12, 20)]
    x, grid_thw = patches(grids, seed=1), torch.tensor(grids)
    stock = stock_tower(tiny_model)
    mine = copy.deepcopy(tiny_model.visual)
    grads = []
    for tower in (stock, mine):
        tower.zero_grad()
        (tower(x, grid_thw=grid_thw).pooler_output ** 2).sum().backward()
        grads.append({name: p.grad for name, p in tower.named_parameters()})
    for name, want in grads[0].items():
        assert torch.allclose(grads[1][name], want, atol=1e-5, rtol=1e-4), name


def test_plan_matches_transformers_indices(tiny_model):
    """The host-side plan holds transformers' own window order, segment boundaries and rotary positions (the
    flash-attention path passes its `cu_seqlens` to transformers' varlen attention unchanged)."""
    visual, config = tiny_model.visual, tiny_model.config.vision_config
    grid_thw = torch.tensor(GRIDS["mixed sizes"])
    plan = visual.plan(grid_thw)
    window_index, cu_windows = get_vision_window_index(grid_thw, config.spatial_merge_size, config.window_size,
                                                       config.patch_size)
    unit = config.spatial_merge_size ** 2
    assert plan.patch_order.tolist() == (window_index[:, None] * unit + torch.arange(unit)).reshape(-1).tolist()
    assert plan.restore_order.tolist() == torch.argsort(window_index).tolist()
    assert plan.windows.cu_seqlens.tolist() == cu_windows.tolist()
    assert plan.frames.cu_seqlens.tolist() == get_vision_cu_seqlens(grid_thw).tolist()
    positions = get_vision_position_ids(grid_thw, config.spatial_merge_size)
    assert plan.position_ids.tolist() == positions[plan.patch_order].tolist()
    # the padded layout: every packed row once, in its segment, padding masked
    windows = plan.windows
    assert windows.key_mask.sum() == len(plan.patch_order) == len(windows.unpad)
    slots = torch.arange(windows.count * windows.width)
    assert windows.gather[windows.unpad].tolist() == list(range(len(plan.patch_order)))
    assert slots[windows.unpad].tolist() == slots[windows.key_mask.reshape(-1)].tolist()


def test_one_attention_call_per_layer_whatever_the_images(tiny_model):
    visual = tiny_model.visual
    for grids in (GRIDS["448x448"], GRIDS["mixed sizes"]):
        x, grid_thw = patches(grids), torch.tensor(grids)
        with torch.inference_mode():
            counts = count_ops(lambda x=x, grid_thw=grid_thw: visual(x, grid_thw=grid_thw))
        attention_calls = sum(n for name, n in counts.items() if "scaled_dot_product" in name)
        assert attention_calls == len(visual.blocks), counts


def image_item(make_image, width, height, seed, **extra):
    return {"image": make_image(width, height, seed=seed), "task": "retrieval.passage", **extra}


def encode_ops(model, items) -> int:
    model.encode(items, batch_size=len(items))
    return sum(count_ops(lambda: model.encode(items, batch_size=len(items))).values())


def test_an_additional_image_adds_a_few_operations_whatever_its_size(tiny_model, make_image):
    photos = [image_item(make_image, 448, 448, seed) for seed in range(4)]
    two, three, four = (encode_ops(tiny_model, photos[:n]) for n in (2, 3, 4))
    assert three - two == four - three <= 10
    # 16 windows of 64 patches, 36 windows, 12 windows of which 5 partial
    sizes = [photos[0], image_item(make_image, 672, 672, 5), image_item(make_image, 420, 308, 6)]
    # a single image: the same count at any size
    assert len({encode_ops(tiny_model, [item]) for item in sizes}) == 1
    # added to a batch of rows of different lengths (text padding already there): the same count at any size
    base = [photos[1], image_item(make_image, 224, 448, 7, text="a chart")]
    added = {encode_ops(tiny_model, base + [item]) - encode_ops(tiny_model, base) for item in sizes}
    assert len(added) == 1 and added.pop() <= 10


def test_encode_equals_the_transformers_tower(fresh_model, make_image):
    """Images of several sizes, alone and with text, and text rows in one batch: the vectors of the stock tower
    (run per window, per image) and of the batched one are the same."""
    items = [image_item(make_image, w, h, seed) for seed, (w, h) in enumerate(((448, 448), (120, 80), (896, 672),
                                                                               (300, 500)))]
    items += [image_item(make_image, 1000, 250, 5, text="a wide chart"), {"text": "plain text"},
              image_item(make_image, 60, 90, 6, text="sales", instructions="Represent the chart")]
    batched = fresh_model.encode(items, batch_size=len(items)), fresh_model.encode(items, batch_size=len(items),
                                                                                    return_multivector=True)
    fresh_model.visual = stock_tower(fresh_model)
    stock = fresh_model.encode(items, batch_size=len(items)), fresh_model.encode(items, batch_size=len(items),
                                                                                  return_multivector=True)
    for got, want in zip(batched[0], stock[0], strict=True):
        assert float(got @ want) >= 0.99999
    for got, want in zip(batched[1], stock[1], strict=True):
        assert_same_rows(got, want)


def transformers_rope_index(model, batch) -> torch.Tensor:
    """transformers' Qwen2.5-VL positions (text, image tokens and text after the image) of a collated batch."""
    config = model.config
    owner = types.SimpleNamespace(config=config, get_vision_position_ids=lambda *args, **kwargs:
                                  Qwen2_5_VLModel.get_vision_position_ids(None, *args, **kwargs))
    token_types = (batch.input_ids == config.image_token_id).int()
    return Qwen2_5_VLModel.get_rope_index(owner, batch.input_ids, token_types,
                                          image_grid_thw=batch.image_grid_thw,
                                          attention_mask=batch.attention_mask)[0]


def test_rope_positions_of_image_rows_equal_transformers(tiny_model, make_image):
    processor = tiny_model.processor
    items = [image_item(make_image, 448, 448, 0), {"text": "text between"},
             image_item(make_image, 300, 500, 1, text="a chart"), image_item(make_image, 1000, 250, 2)]
    batch = processor.collate([processor.prepare_item(item) for item in items])
    positions = tiny_model.rope_positions(batch)
    want = transformers_rope_index(tiny_model, batch)
    rows = batch.image_rows
    assert rows == [0, 2, 3]
    assert torch.equal(positions[:, rows], want[:, rows])
    attended = batch.attention_mask[1].bool()  # the text row, where it is not padding (transformers pads with 1)
    assert torch.equal(positions[:, 1, attended], want[:, 1, attended])


def test_rope_positions_of_an_image_row_continue_after_a_dropped_prefix(tiny_model, make_image):
    processor = tiny_model.processor
    row = processor.prepare_item(image_item(make_image, 300, 500, 1, instructions="Represent the chart"))
    assert row.prefix_len > 0
    full = tiny_model.rope_positions(processor.collate([row]))
    dropped = tiny_model.rope_positions(processor.collate([row], drop_prefix=True))
    assert torch.equal(dropped[:, 0], full[:, 0, row.prefix_len:])
