"""One contrastive batch's gradient, at any batch size, on one or several processes (GradCache).

InfoNCE needs every candidate of the batch for every query, so its memory would grow with the batch if the
whole batch were embedded with a graph. Instead (Gao et al., "Scaling Deep Contrastive Learning Batch Size
under Memory Limited Setup", the method of sentence-transformers' CachedMultipleNegativesRankingLoss):

1. embed the batch without a graph, one mini-batch at a time, recording the random state before each;
2. treat those embeddings as leaf tensors: compute the loss over the whole batch and its gradient with respect
   to every embedding (cheap: vectors, not activations);
3. replay each mini-batch with a graph under the same random state (dropout draws the same masks) and
   backpropagate its cached embedding gradients into the adapter.

The parameter gradients equal the full batch's exactly (up to rounding), at one mini-batch's activation
memory, for about one extra forward pass. When the process's share fits in one mini-batch, step 1 keeps its
graph and step 3 is skipped.

Across processes, each one embeds its shard; the candidates (positives, then hard negatives) are all-gathered,
each process scores its own queries against all of them, and the gradients with respect to the gathered
candidates are summed over processes, so each candidate's owner receives the gradient of the whole batch's
loss. The loss and the gradients are then those of one process holding the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from .data import Triplet, item_key
from .distributed import Processes, shard_bounds
from .loss import Contrast, ContrastedRows, cosine_scores, duplicate_mask, maxsim_scores


@dataclass
class Embeddings:
    """A set of rows' embeddings: pooled vectors and/or multi-vectors (padded tokens + mask)."""

    pooled: torch.Tensor | None = None  # [N, H]
    tokens: torch.Tensor | None = None  # [N, T, d]
    mask: torch.Tensor | None = None  # [N, T] bool: real multi-vector rows

    def differentiable(self) -> list[torch.Tensor]:
        return [t for t in (self.pooled, self.tokens) if t is not None]

    def leaves(self) -> Embeddings:
        """Detached copies that collect their own gradient (GradCache's cached embeddings)."""
        def leaf(t):
            return None if t is None else t.detach().requires_grad_(True)

        return Embeddings(leaf(self.pooled), leaf(self.tokens), self.mask)

    def rows(self, start: int, stop: int) -> Embeddings:
        def cut(t):
            return None if t is None else t[start:stop]

        return Embeddings(cut(self.pooled), cut(self.tokens), cut(self.mask))

    def padded_to(self, length: int) -> Embeddings:
        """Multi-vectors padded (zeros, masked out) to `length` tokens; differentiable."""
        if self.tokens is None or self.tokens.shape[1] == length:
            return self
        extra = length - self.tokens.shape[1]
        return Embeddings(self.pooled, F.pad(self.tokens, (0, 0, 0, extra)), F.pad(self.mask, (0, extra), value=False))

    @property
    def length(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]

    @staticmethod
    def cat(parts: list[Embeddings]) -> Embeddings:
        """Rows of several sets in order; multi-vectors padded to the longest."""
        length = max(p.length for p in parts)
        parts = [p.padded_to(length) for p in parts]

        def joined(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return Embeddings(joined("pooled"), joined("tokens"), joined("mask"))


Encoder = Callable[[list], Embeddings]  # prepared rows -> their embeddings (with a graph when grad is enabled)


@dataclass
class ContrastiveBatch:
    """One contrastive batch: its triplets (the same on every process) and this process's shard of them.

    Candidates are ordered as on one process: every positive of the batch, then every hard negative triplet by
    triplet. Rank r holds the contiguous triplets bounds[r]:bounds[r + 1], so the gathered shards in rank
    order are that same order."""

    triplets: list[Triplet]
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if len(self.triplets) < self.world:
            raise ValueError(f"a contrastive batch of {len(self.triplets)} triplets cannot be split across "
                             f"{self.world} processes")
        self.bounds = shard_bounds(len(self.triplets), self.world)
        self.positive_sizes = [self.bounds[r + 1] - self.bounds[r] for r in range(self.world)]
        self.negative_sizes = [sum(len(t.negatives) for t in self.triplets[self.bounds[r]:self.bounds[r + 1]])
                               for r in range(self.world)]

    @property
    def local(self) -> list[Triplet]:
        return self.triplets[self.bounds[self.rank]:self.bounds[self.rank + 1]]

    @property
    def candidates(self) -> list[dict]:
        return [t.positive for t in self.triplets] + [n for t in self.triplets for n in t.negatives]

    @cached_property
    def ignore(self) -> torch.Tensor:
        """[B, P]: candidates that are the same passage as a row's positive (not counted as negatives)."""
        return duplicate_mask([item_key(t.positive) for t in self.triplets], [item_key(c) for c in self.candidates])


@dataclass
class RandomState:
    """The generators dropout draws from, captured before a mini-batch's first pass, restored for its replay."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> RandomState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    @contextmanager
    def replay(self):
        """The generators start from this state inside the block; the outer state is kept."""
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


@dataclass
class MiniBatch:
    """Some triplets' rows, embedded in one forward pass: their queries, positives, then hard negatives."""

    rows: list
    queries: int
    positives: int
    random_state: RandomState | None = None
    embeddings: Embeddings | None = None

    def part(self, which: str) -> Embeddings:
        bounds = {"queries": (0, self.queries), "positives": (self.queries, self.queries + self.positives),
                  "negatives": (self.queries + self.positives, len(self.rows))}[which]
        return self.embeddings.rows(*bounds)


@dataclass
class BatchOutcome:
    loss: float  # the whole batch's loss (the same on every process)
    tokens: int  # tokens embedded by this process (each once, replays not counted)
    reached_adapter: bool  # False: no embedding depended on a trainable parameter (no gradient)
    negatives_per_query: float  # the whole batch's, see `EmbeddingGradients`


@dataclass
class EmbeddingGradients:
    """What differentiating the whole batch's loss gives one process."""

    loss: float  # the whole batch's loss (times the weight; the same on every process)
    # the negatives the loss kept per query, averaged over all processes' queries (and over the cosine and MaxSim
    # terms when both are trained): the margin's drops make it smaller than the candidates minus duplicates
    negatives_per_query: float
    grads: list[torch.Tensor]  # with respect to this process's embeddings: queries, positives, negatives


def split_mini_batches(local: list[Triplet], query_rows: list, positive_rows: list, negative_rows: list,
                       size: int) -> list[MiniBatch]:
    """Consecutive groups of `size` triplets with their prepared rows."""
    starts = [0]
    for t in local:
        starts.append(starts[-1] + len(t.negatives))
    out = []
    for first in range(0, len(local), size):
        last = min(first + size, len(local))
        rows = query_rows[first:last] + positive_rows[first:last] + negative_rows[starts[first]:starts[last]]
        out.append(MiniBatch(rows, last - first, last - first))
    return out


def batch_loss(queries: Embeddings, candidates: Embeddings, positives: torch.Tensor, ignore: torch.Tensor,
               contrast: Contrast, scale: float) -> ContrastedRows:
    """InfoNCE of these queries against every candidate of the batch (cosine and/or MaxSim, summed), times
    `scale` (the share of the batch's queries these are, so the processes' losses add up to the batch's), and
    the negatives it kept, summed over the queries (a float: averaged over the terms, whose margins may drop
    different candidates)."""
    terms = []
    if queries.pooled is not None:
        terms.append(contrast.rows(cosine_scores(queries.pooled, candidates.pooled), ignore, positives))
    if queries.tokens is not None:
        scores = maxsim_scores(queries.tokens, queries.mask, candidates.tokens, candidates.mask)
        terms.append(contrast.rows(scores, ignore, positives))
    loss = torch.stack([t.loss for t in terms]).sum()
    negatives = torch.stack([t.negatives for t in terms]).float().mean()
    return ContrastedRows(loss * scale, negatives)


def _gather(local: Embeddings, sizes: list[int], processes: Processes) -> list[Embeddings]:
    def parts(t):
        return [None] * len(sizes) if t is None else processes.gather_rows(t.detach(), sizes)

    mask = None if local.mask is None else local.mask.to(torch.uint8)
    masks = [None if m is None else m.bool() for m in parts(mask)]
    return [Embeddings(p, t, m) for p, t, m in zip(parts(local.pooled), parts(local.tokens), masks, strict=True)]


def embedding_gradients(batch: ContrastiveBatch, queries: Embeddings, positives: Embeddings,
                        negatives: Embeddings, ignore: torch.Tensor, contrast: Contrast,
                        processes: Processes, weight: float = 1.0,
                        query_chunk: int | None = None) -> EmbeddingGradients:
    """The whole batch's loss (times `weight`), the negatives it kept per query, and its gradient with respect
    to this process's embeddings (their `differentiable()` tensors, queries, positives, negatives).
    Multi-vectors of positives and negatives must be padded to the same length on every process.

    The loss is a sum over queries, so it is differentiated `query_chunk` queries at a time: the scores of a
    chunk against every candidate (for MaxSim a chunk x candidates x query tokens x candidate tokens tensor)
    are what is held at once, not the whole batch's."""
    rank = batch.rank
    gathered_p = _gather(positives, batch.positive_sizes, processes)
    gathered_n = _gather(negatives, batch.negative_sizes, processes)
    gathered_p[rank], gathered_n[rank] = positives, negatives  # this process's own rows, exact
    candidates = Embeddings.cat([*gathered_p, *[n for n, size in zip(gathered_n, batch.negative_sizes, strict=True)
                                                if size]]).leaves()
    own = queries.leaves()
    offset = batch.bounds[rank]
    rows = slice(offset, batch.bounds[rank + 1])
    targets = torch.arange(offset, batch.bounds[rank + 1])
    local_ignore = ignore[rows]
    step = query_chunk or len(batch.local)
    loss = torch.zeros((), device=candidates.differentiable()[0].device)  # where the collectives run
    kept = torch.zeros((), device=loss.device)  # negatives the loss kept, summed over this process's queries
    for first in range(0, len(batch.local), step):
        last = min(first + step, len(batch.local))
        part = batch_loss(own.rows(first, last), candidates, targets[first:last], local_ignore[first:last],
                          contrast, (last - first) / len(batch.triplets) * weight)
        part.loss.backward()
        loss, kept = loss + part.loss.detach(), kept + part.negatives
    # a candidate's gradient comes from every process's queries: sum them, keep this process's rows
    candidate_grads = [processes.sum_(t.grad) for t in candidates.differentiable()]
    first_negative = len(batch.triplets) + sum(batch.negative_sizes[:rank])
    p_rows = slice(offset, batch.bounds[rank + 1])
    n_rows = slice(first_negative, first_negative + batch.negative_sizes[rank])
    # the loss and the count travel together: one collective, one host sync per contrastive batch, as before
    total_loss, total_kept = processes.sum_(torch.stack([loss.detach(), kept])).tolist()
    grads = [t.grad for t in own.differentiable()]
    grads += [g[p_rows] for g in candidate_grads] + [g[n_rows] for g in candidate_grads]
    return EmbeddingGradients(total_loss, total_kept / len(batch.triplets), grads)


def contrastive_backward(batch: ContrastiveBatch, query_rows: list, positive_rows: list, negative_rows: list,
                         encode: Encoder, *, mini_batch_size: int, contrast: Contrast, processes: Processes,
                         device: torch.device, weight: float = 1.0) -> BatchOutcome:
    """Accumulate the batch's gradient (of its loss times `weight`: 1 / gradient accumulation) into the
    trainable parameters' `.grad`, this process's part (the processes' parts still to be summed)."""
    minis = split_mini_batches(batch.local, query_rows, positive_rows, negative_rows, mini_batch_size)
    cached = len(minis) > 1
    for mini in minis:  # pass 1: without a graph when cached
        mini.random_state = RandomState.capture(device) if cached else None
        with torch.no_grad() if cached else nullcontext():
            mini.embeddings = encode(mini.rows)
        if cached:
            mini.embeddings = mini.embeddings.leaves()

    queries = Embeddings.cat([m.part("queries") for m in minis])
    positives = Embeddings.cat([m.part("positives") for m in minis])
    negatives = Embeddings.cat([m.part("negatives") for m in minis])
    length = processes.max_int(max(positives.length, negatives.length), device)
    positives, negatives = positives.padded_to(length), negatives.padded_to(length)
    gradients = embedding_gradients(batch, queries, positives, negatives, batch.ignore, contrast, processes,
                                    weight, query_chunk=mini_batch_size)
    grads = gradients.grads

    outputs = queries.differentiable() + positives.differentiable() + negatives.differentiable()
    pairs = [(t, g) for t, g in zip(outputs, grads, strict=True) if t.requires_grad and t.numel()]
    if pairs:  # into the mini-batches' outputs: the model itself, or GradCache's leaves
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
    reached = not cached and bool(pairs)
    if cached:  # pass 2: replay each mini-batch with a graph, feed it its cached gradients
        for mini in minis:
            with mini.random_state.replay():
                replayed = encode(mini.rows).differentiable()
            cached_grads = [t.grad for t in mini.embeddings.differentiable()]
            live = [(t, g) for t, g in zip(replayed, cached_grads, strict=True) if t.requires_grad]
            if live:
                torch.autograd.backward([t for t, _ in live], [g for _, g in live])
                reached = True
    tokens = sum(len(r.input_ids) for m in minis for r in m.rows)
    return BatchOutcome(gradients.loss, tokens, reached, gradients.negatives_per_query)
