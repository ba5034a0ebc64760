"""GradCache (`contrastive_backward` with mini-batches smaller than the batch) gives the full batch's gradient.

The reference embeds the batch with a graph and backpropagates the InfoNCE loss directly (its own loss code:
cosine or MaxSim scores, the duplicate mask, cross-entropy). With LoRA dropout on, the reference draws its
dropout masks mini-batch by mini-batch from the same seed, in the order GradCache's first pass does: the
replay must then reproduce those masks exactly for the gradients to agree.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nova.maxsim import maxsim_scores
from nova.training.contrastive import ContrastiveBatch, contrastive_backward
from nova.training.data import item_key, load_triplets
from nova.training.distributed import Processes
from nova.training.loss import Contrast
from nova.training.trainer import RowEncoder, prepare_rows

TEMPERATURE = 0.05
SEED = 123


@pytest.fixture(scope="module")
def triplets(task):
    rows = load_triplets(task["train"])[:7]
    rows[5].negatives[1] = dict(rows[2].positive)  # a duplicate of another row's positive: masked, not a negative
    return rows


def lora_model(tiny_dir, dropout: float, checkpointing: bool = False):
    """A fresh tiny model with a rank-4 LoRA whose B is non-zero (PEFT starts B at zero, which would leave A
    without gradient), in training mode; with activation checkpointing as `--gradient-checkpointing` sets it."""
    from peft import LoraConfig, get_peft_model

    from nova.loading import load_model

    model = load_model(tiny_dir)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=True,
                                                  target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj|"
                                                                 r"multi_vector_projector"))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    peft_model.train()
    return peft_model, peft_model.base_model.model


def rows_of(inner, triplets):
    queries = prepare_rows(inner, [t.query for t in triplets], None, ["q"] * len(triplets))
    positives = prepare_rows(inner, [t.positive for t in triplets], None, ["p"] * len(triplets))
    negatives = prepare_rows(inner, [n for t in triplets for n in t.negatives], None,
                             ["n"] * sum(len(t.negatives) for t in triplets))
    return queries, positives, negatives


def gradients(peft_model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in peft_model.parameters() if p.requires_grad])


def gradcache_gradients(peft_model, inner, triplets, vectors: str, mini: int) -> torch.Tensor:
    encoder = RowEncoder(inner, vectors in ("single", "both"), vectors in ("multi", "both"))
    peft_model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    contrastive_backward(ContrastiveBatch(triplets), *rows_of(inner, triplets), encoder, mini_batch_size=mini,
                         contrast=Contrast(TEMPERATURE), processes=Processes(), device=inner.device)
    return gradients(peft_model)


def padded_cat(tokens: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(t.shape[1] for t in tokens)
    return (torch.cat([F.pad(t, (0, 0, 0, length - t.shape[1])) for t in tokens]),
            torch.cat([F.pad(m, (0, length - m.shape[1]), value=False) for m in masks]))


def reference_gradients(peft_model, inner, triplets, vectors: str, chunk: int, seed: int = SEED) -> torch.Tensor:
    """The batch embedded with a graph, `chunk` triplets per forward (their queries, positives and negatives
    in one forward), the loss over the whole batch, one backward."""
    single, multi = vectors in ("single", "both"), vectors in ("multi", "both")
    queries, positives, negatives = rows_of(inner, triplets)
    starts = [0]
    for t in triplets:
        starts.append(starts[-1] + len(t.negatives))
    peft_model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    q_parts, p_parts, n_parts = [], [], []
    for first in range(0, len(triplets), chunk):
        last = min(first + chunk, len(triplets))
        n = last - first
        rows = queries[first:last] + positives[first:last] + negatives[starts[first]:starts[last]]
        out = inner.forward_rows(rows, pooled=single, multivector=multi, adapters=[None] * len(rows))
        q_parts.append(tuple(None if x is None else x[:n] for x in out))
        p_parts.append(tuple(None if x is None else x[n: 2 * n] for x in out))
        n_parts.append(tuple(None if x is None else x[2 * n:] for x in out))
    keys = [item_key(t.positive) for t in triplets]
    candidate_keys = keys + [item_key(n) for t in triplets for n in t.negatives]
    masked = torch.tensor([[j != i and other == key for j, other in enumerate(candidate_keys)]
                           for i, key in enumerate(keys)])
    targets = torch.arange(len(triplets))
    loss = torch.zeros(())
    if single:
        q = torch.cat([part[0] for part in q_parts])
        c = torch.cat([part[0] for part in p_parts + n_parts])
        loss = loss + F.cross_entropy((q @ c.T / TEMPERATURE).masked_fill(masked, float("-inf")), targets)
    if multi:
        q_tokens, q_mask = padded_cat([part[1] for part in q_parts], [part[2] for part in q_parts])
        c_tokens, c_mask = padded_cat([part[1] for part in p_parts + n_parts], [part[2] for part in p_parts + n_parts])
        scores = maxsim_scores(q_tokens, q_mask, c_tokens, c_mask) / q_mask.sum(-1, keepdim=True)
        loss = loss + F.cross_entropy((scores / TEMPERATURE).masked_fill(masked, float("-inf")), targets)
    loss.backward()
    return gradients(peft_model)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("vectors", ["single", "multi", "both"])
def test_gradcache_equals_the_full_batch_gradient(tiny_dir, triplets, vectors):
    """No dropout: GradCache over mini-batches of 3, 3 and 1 triplets against the whole batch in one forward."""
    peft_model, inner = lora_model(tiny_dir, dropout=0.0)
    want = reference_gradients(peft_model, inner, triplets, vectors, chunk=len(triplets))
    got = gradcache_gradients(peft_model, inner, triplets, vectors, mini=3)
    assert float(want.norm()) > 0
    assert relative_error(got, want) <= 1e-5, relative_error(got, want)
    # one mini-batch holding the whole batch: the direct path (no cache), the same gradient
    direct = gradcache_gradients(peft_model, inner, triplets, vectors, mini=len(triplets))
    assert relative_error(direct, want) <= 1e-5, relative_error(direct, want)


@pytest.mark.parametrize(("vectors", "checkpointing"), [("single", False), ("multi", False), ("both", True)])
def test_gradcache_replays_dropout_exactly(tiny_dir, triplets, vectors, checkpointing):
    peft_model, inner = lora_model(tiny_dir, dropout=0.3, checkpointing=checkpointing)
    want = reference_gradients(peft_model, inner, triplets, vectors, chunk=3)
    got = gradcache_gradients(peft_model, inner, triplets, vectors, mini=3)
    assert relative_error(got, want) <= 1e-5, relative_error(got, want)
    # dropout is really on: other masks (another seed) give another gradient
    other = reference_gradients(peft_model, inner, triplets, vectors, chunk=3, seed=SEED + 1)
    assert relative_error(other, want) > 1e-3
