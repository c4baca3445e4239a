"""``tor-official`` reproduces the official ToR_SSM selection and arithmetic, quirks included.

The reference below is an independent, loop-by-loop restatement of what the official code computes
for one sequence (hidden stream ``hybrid``, residual stream ``merge_only``, metric = clipped mixer
output, keep ``ceil(N * ratio)`` tokens, at most N // 2 removed).
"""

import math

import pytest
import torch

import ssm_reduce
from ssm_reduce.reduce import _official_row

from .conftest import FAMILIES, random_tokens


def official_reference(hidden, residual, metric, ratio):
    """hidden, residual, metric: (n, D). Returns (hidden', residual', kept positions)."""
    n = hidden.shape[0]
    r = min(n - math.ceil(n * ratio), n // 2)
    if r <= 0:
        return hidden, residual, list(range(n))
    unit = metric / metric.norm(dim=-1, keepdim=True)
    per_channel = unit.sort(dim=0, descending=True).values  # each channel sorted on its own
    half = n // 2
    lower, upper = per_channel[half:], per_channel[:half]
    scores = lower @ upper.T
    best, best_j = scores.max(dim=-1)
    edge_order = best.argsort(descending=True)
    src_edges = edge_order[:r]
    unmerged = sorted(edge_order[r:].tolist())
    sources = sorted(src_edges.tolist())  # paired with the destinations of the *unsorted* edges
    destinations = [int(best_j[e]) for e in src_edges.tolist()]
    even, odd = list(range(0, n, 2)), list(range(1, n, 2))

    def reduce(x, top_half):
        src = torch.stack([x[even[s]] for s in sources])  # (r, channels)
        count = torch.ones(r, 1, dtype=x.dtype)
        if top_half:
            keep = torch.zeros_like(src)
            keep.scatter_(0, src.topk(r // 2, dim=0).indices, 1)
            src = src * keep
            count_keep = torch.zeros_like(count)
            count_keep.scatter_(0, count.topk(r // 2, dim=0).indices, 1)
            count = count * count_keep
        sums = [x[o].clone() for o in odd]
        sizes = [torch.ones(1, dtype=x.dtype) for _ in odd]
        for k, d in enumerate(destinations):
            sums[d] = sums[d] + src[k]
            sizes[d] = sizes[d] + count[k]
        out = {}
        for j, o in enumerate(odd):
            out[o] = sums[j] / sizes[j]
        for u in unmerged:
            out[even[u]] = x[even[u]] / torch.ones(1, dtype=x.dtype)
        kept = sorted(out)
        return torch.stack([out[p] for p in kept]), kept

    h, kept = reduce(hidden, True)
    res, kept_r = reduce(residual, False)
    assert kept == kept_r
    return h, res, kept


def official_removals(n: int, keep_ratio: float) -> int:
    """The official code's removals for a row of n tokens: n - ceil(n * keep_ratio), at most n // 2."""
    return min(n - math.ceil(n * keep_ratio), n // 2)


@pytest.mark.parametrize("n", [2, 7, 16, 33, 64])
@pytest.mark.parametrize("clip", [True, False])
def test_row_matches_reference(n, clip):
    gen = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, 12, generator=gen)
    residual = torch.randn(n, 12, generator=gen)
    metric = hidden.clamp(min=0) if clip else hidden
    h_ref, r_ref, kept_ref = official_reference(hidden, residual, metric, 0.6)
    h, res, kept, merged_into = _official_row(hidden[None], residual[None], metric[None], official_removals(n, 0.6))
    assert kept.nonzero().flatten().tolist() == kept_ref
    torch.testing.assert_close(h[0], h_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res[0], r_ref, rtol=1e-6, atol=1e-6)


def test_positive_metric_pools_the_oldest_tokens_into_position_one():
    # With a positive metric every source picks the same destination (the per-channel maxima) and
    # the best-scoring sources are the first even positions: the official "selection" removes
    # positions 0, 2, ..., 2r-2 and sums them into position 1 - later tokens moved into the past.
    # (A clipped metric is mostly zeros in the lower half, and then ties decide the order.)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 40, 8, generator=gen)
    _, _, kept, merged_into = _official_row(hidden, hidden.clone(), hidden.abs() + 0.01, official_removals(40, 0.8))
    removed = (~kept).nonzero().flatten().tolist()
    assert removed == list(range(0, 16, 2))  # r = min(40 - 32, 20) = 8
    assert set(merged_into[removed].tolist()) == {1}


@pytest.mark.parametrize("ratio", [0.8, 0.3])
@torch.no_grad()
def test_model_level_matches_layerwise_reference(ratio):
    """Keep ratios below one half run as in the official code: each anchor removes at most half of its
    tokens (the other methods refuse them instead)."""
    model = FAMILIES["mamba2"]()
    ids = random_tokens(1, 45)
    anchors = [2, 4]
    ssm_reduce.apply(model, method="tor-official", keep_ratio=ratio, layers=anchors)
    out = model(ids)
    ssm_reduce.remove(model)

    backbone = model.backbone
    x = backbone.embeddings(ids)
    positions = list(range(45))
    for i, block in enumerate(backbone.layers):
        if i not in anchors:
            x = block(x)
            continue
        residual = x
        mixed = block.mixer(block.norm(x))
        h, res, kept = official_reference(mixed[0], residual[0], mixed[0].clamp(min=0), ratio)
        positions = [positions[k] for k in kept]
        x = (res + h)[None]
    logits = model.lm_head(backbone.norm_f(x))
    assert out.kept_positions[0].tolist() == positions
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    if ratio < 0.5:
        assert out.logits.shape[1] == 45 - 22 - 11  # 22 of 45 removed, then 11 of 23: the official cap
