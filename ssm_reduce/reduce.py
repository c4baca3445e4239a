"""Token algebra of token reduction — host-free, pure torch.

Implements "Rethinking Token Reduction for State Space Models" (Zhan et al., EMNLP 2024, Sec. 4) and
the baselines it compares against, correctly for causal models:

* importance of each token (Eq. 5: a metric over the channels of the SSM output),
* a per-row budget (rows never influence each other; padding never counts and never merges),
* the method's selection of removed tokens (and, for matching methods, their destinations),
* a :class:`Plan` that maps the tokens entering an anchor to the tokens leaving it: order preserved,
  merged groups placed at the *latest* member's position (causality), sizes carried, padding side kept.

A plan is applied to the mixer-output ("hidden") stream and to the residual stream with the same
output positions, but each stream has its own prune / merge split (``q_hidden`` / ``q_residual``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import ops

__all__ = [
    "TokenState",
    "Plan",
    "importance_scores",
    "budget_source_half",
    "budget_alternate_half",
    "budget_all_but_one",
    "budget_official",
    "select_by_importance_halves",
    "select_alternate",
    "select_least_important",
    "select_random",
    "select_oldest",
    "build_plan",
    "official_reduce",
]


@dataclass
class TokenState:
    """Per-token bookkeeping carried through a reduced forward.

    pos: (B, N) int64 original position of the token (a merged token: its latest member); -1 = padding.
    size: (B, N) float32 number of original tokens the token stands for; 0 = padding.
    valid: (B, N) bool, real token (not padding).
    protected: (B, N) bool, must survive every anchor (never removed, never a merge destination).
    left_padded: the batch's padding sits on the left (kept that way after every reduction).
    """

    pos: torch.Tensor
    size: torch.Tensor
    valid: torch.Tensor
    protected: torch.Tensor
    left_padded: bool

    @classmethod
    def initial(
        cls,
        batch: int,
        seq_len: int,
        device: torch.device,
        attention_mask: Optional[torch.Tensor] = None,
        protect_mask: Optional[torch.Tensor] = None,
        protect_first: int = 0,
        protect_last: int = 0,
    ) -> "TokenState":
        if attention_mask is None:
            valid = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        else:
            valid = attention_mask.to(device=device).bool()
        positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
        real_rank = valid.long().cumsum(1) - 1
        n_real = valid.sum(1, keepdim=True)
        protected = valid & ((real_rank < protect_first) | (real_rank >= n_real - protect_last))
        if protect_mask is not None:
            protected |= protect_mask.to(device=device).bool() & valid
        return cls(
            pos=torch.where(valid, positions, -1),
            size=valid.float(),
            valid=valid,
            protected=protected,
            # Unpadded input counts as left-padded: padding introduced later goes left, so the last
            # column stays every row's last real token (what generate and logits_to_keep=1 read). A row
            # of padding only says nothing about the side.
            left_padded=bool((valid[:, -1] | ~valid.any(1)).all()) if seq_len > 0 else True,
        )

    @property
    def n_real(self) -> torch.Tensor:
        """(B,) number of real tokens per row."""
        return self.valid.sum(1)

    def to(self, device) -> "TokenState":
        """This state on ``device`` (models split across devices hand hidden states from one to the next)."""
        if self.pos.device == torch.device(device):
            return self
        return TokenState(
            self.pos.to(device), self.size.to(device), self.valid.to(device), self.protected.to(device), self.left_padded
        )


@dataclass
class Plan:
    """How the N tokens entering an anchor become the N' tokens leaving it.

    slot: (B, N) int64 output column of each input token; -1 = dropped (padding, or pruned in both
        streams).
    hidden_weight / residual_weight: (B, N) float32 weight of each token in its column's mean, per
        stream (0 = pruned in that stream). The weights of a column sum to 1.
    n_out: N'.
    state: the TokenState of the output tokens.
    """

    slot: torch.Tensor
    hidden_weight: torch.Tensor
    residual_weight: torch.Tensor
    n_out: int
    state: TokenState

    def apply(self, hidden: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """Reduce (B, N, D) hidden states (and the residual stream, when given) to (B, N', D), both
        through one plan application; returns hidden, or (hidden, residual)."""
        if residual is None:
            return ops.apply_plan([hidden], self.slot, [self.hidden_weight], self.n_out)[0]
        hidden, residual = ops.apply_plan([hidden, residual], self.slot, [self.hidden_weight, self.residual_weight],
                                          self.n_out)
        return hidden, residual

    def extend(self, state_in: TokenState) -> "Plan":
        """This plan for a longer input whose first N tokens are the ones it was made for and whose
        extra tokens are all kept (appended after the plan's outputs). Right padding cannot be extended.
        """
        n_in = self.slot.shape[1]
        extra = state_in.pos.shape[1] - n_in
        if extra < 0:
            raise ValueError(f"cannot replay a plan for {n_in} tokens on {n_in + extra} tokens")
        if extra == 0:
            return self
        device = self.slot.device
        batch = self.slot.shape[0]
        new_cols = self.n_out + torch.arange(extra, device=device).expand(batch, extra)
        ones = torch.ones(batch, extra, device=device)
        tail = lambda t: t[:, n_in:]  # noqa: E731
        out = self.state
        return Plan(
            slot=torch.cat([self.slot, new_cols], 1),
            hidden_weight=torch.cat([self.hidden_weight, ones], 1),
            residual_weight=torch.cat([self.residual_weight, ones], 1),
            n_out=self.n_out + extra,
            state=TokenState(
                pos=torch.cat([out.pos, tail(state_in.pos)], 1),
                size=torch.cat([out.size, tail(state_in.size)], 1),
                valid=torch.cat([out.valid, tail(state_in.valid)], 1),
                protected=torch.cat([out.protected, tail(state_in.protected)], 1),
                left_padded=out.left_padded,
            ),
        )


# --------------------------------------------------------------------------------------------------
# importance and budgets


def importance_scores(values: torch.Tensor, metric: str) -> torch.Tensor:
    """(B, N, D) -> (B, N) float32 importance: ``clip`` mean(max(0, v)), ``l1`` mean|v|,
    ``l2`` sqrt(mean v^2), ``mean`` mean(v) — over channels (paper Eq. 5 with ``clip``)."""
    v = values.float()
    if metric == "clip":
        return v.clamp(min=0).mean(-1)
    if metric == "l1":
        return v.abs().mean(-1)
    if metric == "l2":
        return v.pow(2).mean(-1).sqrt()
    if metric == "mean":
        return v.mean(-1)
    raise ValueError(f"importance metric {metric!r} is not supported; choose clip, l1, l2 or mean")


def _wanted(state: TokenState, keep_ratio: float) -> torch.Tensor:
    """(B,) ``round(n_real * (1 - keep_ratio))``: what a row asks to remove, from its own real length."""
    return torch.floor(state.n_real.double() * (1.0 - keep_ratio) + 0.5).long()


def _candidates(state: TokenState) -> torch.Tensor:
    """(B,) tokens each row may remove: real and unprotected."""
    return (state.valid & ~state.protected).sum(1)


def budget_source_half(state: TokenState, keep_ratio: float) -> torch.Tensor:
    """(B,) tokens each row removes when only the less important half of its candidates may leave."""
    return torch.minimum(_wanted(state, keep_ratio), _candidates(state) // 2)


def budget_alternate_half(state: TokenState, keep_ratio: float) -> torch.Tensor:
    """(B,) tokens each row removes when every other candidate (the first, third, ...) may leave."""
    candidates = _candidates(state)
    cap = torch.where(candidates >= 2, (candidates + 1) // 2, torch.zeros_like(candidates))
    return torch.minimum(_wanted(state, keep_ratio), cap)


def budget_all_but_one(state: TokenState, keep_ratio: float) -> torch.Tensor:
    """(B,) tokens each row removes when any candidate may leave (a row never loses all its tokens)."""
    return torch.minimum(_wanted(state, keep_ratio), torch.minimum(_candidates(state), (state.n_real - 1).clamp_min(0)))


def budget_official(state: TokenState, keep_ratio: float) -> torch.Tensor:
    """(B,) tokens each row removes in the official code: ``n - ceil(n * keep_ratio)``, at most half of the
    row's real tokens, protection ignored."""
    n = state.n_real
    return torch.minimum(n - torch.ceil(n.double() * keep_ratio).long(), n // 2)


# --------------------------------------------------------------------------------------------------
# selection


@dataclass
class Selection:
    """removed: (B, N) bool sources leaving the sequence; dst: (B, N) int64 merge destination of each
    removed token (-1 = none: the token can only be pruned)."""

    removed: torch.Tensor
    dst: torch.Tensor


def _rank(keys: torch.Tensor, mask: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """(B, N) rank of each masked element among the masked ones of its row (ties: lower index first);
    unmasked elements rank after all masked ones."""
    keys = keys.double()
    fill = float("-inf") if descending else float("inf")
    keyed = torch.where(mask, keys, torch.full_like(keys, fill))
    if descending:
        keyed = -keyed
    # Masked entries sort before unmasked ones even when a key is +-inf.
    order = _lexsort(~mask, keyed)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return rank


def _lexsort(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Stable argsort of rows by (primary bool, secondary float), both ascending."""
    order = torch.argsort(secondary, dim=1, stable=True)
    prim = primary.gather(1, order).long()
    return order.gather(1, torch.argsort(prim, dim=1, stable=True))


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the masked tokens of each row in positional order, padded: (B, M) idx and valid."""
    count = mask.sum(1)
    width = int(count.max()) if mask.numel() else 0
    order = torch.argsort((~mask).long(), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < count[:, None]
    return order, valid


def _bipartite(src_mask, dst_mask, features, r) -> Selection:
    """Match every source to its most cosine-similar destination; remove the ``r`` best-matched."""
    batch, n = src_mask.shape
    src_idx, src_valid = _compact(src_mask)
    dst_idx, dst_valid = _compact(dst_mask)
    removed = torch.zeros_like(src_mask)
    dst = torch.full((batch, n), -1, dtype=torch.long, device=src_mask.device)
    if src_idx.shape[1] == 0 or dst_idx.shape[1] == 0:
        return Selection(removed, dst)
    gather_rows = lambda idx: features.gather(1, idx[..., None].expand(-1, -1, features.shape[-1]))  # noqa: E731
    sim, best = ops.match(gather_rows(src_idx), gather_rows(dst_idx), src_valid, dst_valid)
    matched = src_valid & torch.isfinite(sim)
    chosen = matched & (_rank(sim, matched, descending=True) < r[:, None])
    trash = torch.full_like(src_idx, n)
    target = torch.where(chosen, src_idx, trash)
    removed_ext = torch.zeros(batch, n + 1, dtype=torch.bool, device=src_mask.device)
    removed_ext.scatter_(1, target, chosen)
    dst_ext = torch.full((batch, n + 1), -1, dtype=torch.long, device=src_mask.device)
    dst_ext.scatter_(1, target, dst_idx.gather(1, best))
    return Selection(removed_ext[:, :n], dst_ext[:, :n])


def _hash_keys(index: torch.Tensor, seed: int, layer: int) -> torch.Tensor:
    """Deterministic pseudo-random keys in [0, 2^31) from integers; identical on every device."""
    mod = (1 << 31) - 1
    h = (index * 1103515245 + 12345 + (seed * 2654435761 + layer * 40503) % mod) % mod
    for mult, inc in ((1664525, 1013904223), (22695477, 1), (1103515245, 12345)):
        h = (h ^ (h >> 13)) % mod
        h = (h * mult + inc) % mod
    return h


def _time_index(candidates: torch.Tensor) -> torch.Tensor:
    """(B, N) index of each candidate among its row's candidates, in time order."""
    return candidates.long().cumsum(1) - 1


def _remove_lowest(candidates: torch.Tensor, keys: torch.Tensor, r: torch.Tensor) -> Selection:
    """Remove the ``r[b]`` candidates of each row with the lowest keys; nothing merges."""
    removed = candidates & (_rank(keys, candidates) < r[:, None])
    return Selection(removed, torch.full(candidates.shape, -1, dtype=torch.long, device=candidates.device))


# Every selection takes (state, r, importance, features, seed, layer) and removes exactly ``r[b]`` tokens of
# row b, never protected or padding ones. importance: (B, N) float32. features: (B, N, D) similarity
# features (matching methods; None otherwise).


def select_by_importance_halves(state: TokenState, r, importance, features, seed: int = 0, layer: int = 0) -> Selection:
    """Sec. 4.2: the less important half of the candidates are sources, matched to the more important half."""
    candidates = state.valid & ~state.protected
    n_src = candidates.sum(1) // 2
    src = candidates & (_rank(importance, candidates) < n_src[:, None])
    return _bipartite(src, candidates & ~src, features, r)


def select_alternate(state: TokenState, r, importance, features, seed: int = 0, layer: int = 0) -> Selection:
    """ToMe's split: every other candidate (in time order) is a source, matched to the others."""
    candidates = state.valid & ~state.protected
    even = candidates & (_time_index(candidates) % 2 == 0)
    return _bipartite(even, candidates & ~even, features, r)


def select_least_important(state: TokenState, r, importance, features, seed: int = 0, layer: int = 0) -> Selection:
    """EViT done in the right direction: the least important candidates are pruned."""
    candidates = state.valid & ~state.protected
    return _remove_lowest(candidates, importance, r)


def select_random(state: TokenState, r, importance, features, seed: int = 0, layer: int = 0) -> Selection:
    """Candidates pruned in a pseudo-random order fixed by ``seed`` and ``layer`` (the same on every device)."""
    candidates = state.valid & ~state.protected
    return _remove_lowest(candidates, _hash_keys(_time_index(candidates).clamp(min=0), seed, layer).double(), r)


def select_oldest(state: TokenState, r, importance, features, seed: int = 0, layer: int = 0) -> Selection:
    """The oldest candidates are pruned (a sliding window over the unprotected tokens)."""
    candidates = state.valid & ~state.protected
    return _remove_lowest(candidates, _time_index(candidates).double(), r)


# --------------------------------------------------------------------------------------------------
# plans


def build_plan(
    state: TokenState,
    selection: Selection,
    importance: torch.Tensor,
    q_hidden: float,
    q_residual: float,
    causal: bool = True,
    size_weighted: bool = True,
) -> Plan:
    """Turn a selection into a plan.

    Of each row's removed tokens, the fraction ``q`` with the lowest importance is pruned and the rest
    merged into its destination, separately per stream. A token merged in at least one stream joins
    its destination's group; a group sits at its latest member's position when ``causal``.
    """
    valid, removed, dst = state.valid, selection.removed, selection.dst
    batch, n = valid.shape
    device = valid.device
    arange = torch.arange(n, device=device).expand(batch, n)
    n_removed = removed.sum(1, keepdim=True)
    prune_rank = _rank(importance, removed)
    has_dst = removed & (dst >= 0)

    def merged(q: float) -> torch.Tensor:
        n_pruned = torch.floor(n_removed.double() * q + 0.5).long()
        return has_dst & (prune_rank >= n_pruned)

    merged_h, merged_r = merged(q_hidden), merged(q_residual)
    kept = valid & ~removed
    joins = merged_h | merged_r
    rep = torch.where(kept, arange, torch.where(joins, dst, torch.full_like(arange, -1)))
    member = rep >= 0
    rep_or_trash = torch.where(member, rep, torch.full_like(rep, n))

    if causal:
        gpos = torch.full((batch, n + 1), -1, dtype=torch.long, device=device)
        gpos.scatter_reduce_(1, rep_or_trash, torch.where(member, state.pos, -1), reduce="amax")
        gpos = gpos[:, :n]
    else:
        gpos = state.pos
    big = torch.iinfo(torch.long).max
    order = torch.argsort(torch.where(kept, gpos, big), dim=1, stable=True)
    out_rank = torch.empty_like(order)
    out_rank.scatter_(1, order, arange)
    n_kept = kept.sum(1)
    n_out = int(n_kept.max()) if batch else 0
    offset = (n_out - n_kept)[:, None] if state.left_padded else torch.zeros_like(n_kept)[:, None]
    rep_slot = out_rank + offset  # meaningful where kept
    slot = torch.where(member, rep_slot.gather(1, rep.clamp(min=0)), torch.full_like(rep, -1))

    def group_sum(values: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(batch, n + 1, dtype=values.dtype, device=device)
        total.scatter_add_(1, rep_or_trash, values)
        return total[:, :n]

    base = state.size if size_weighted else valid.float()

    def weights(merged_s: torch.Tensor) -> torch.Tensor:
        w = torch.where(kept | merged_s, base, torch.zeros_like(base))
        total = group_sum(w).gather(1, rep.clamp(min=0))
        return torch.where(w > 0, w / total.clamp(min=1e-30), torch.zeros_like(w))

    group_size = group_sum(torch.where(member, state.size, torch.zeros_like(state.size)))
    out_slot = torch.where(kept, rep_slot, torch.full_like(rep_slot, n_out))

    def scatter_out(values: torch.Tensor, fill) -> torch.Tensor:
        out = torch.full((batch, n_out + 1), fill, dtype=values.dtype, device=device)
        out.scatter_(1, out_slot, values)
        return out[:, :n_out]

    out_state = TokenState(
        pos=scatter_out(gpos, -1),
        size=scatter_out(group_size, 0.0),
        valid=scatter_out(kept, False),
        protected=scatter_out(state.protected & kept, False),
        left_padded=state.left_padded,
    )
    return Plan(
        slot=slot,
        hidden_weight=weights(merged_h),
        residual_weight=weights(merged_r),
        n_out=n_out,
        state=out_state,
    )


# --------------------------------------------------------------------------------------------------
# the official code's selection (tor-official), reproduced with its quirks


def _official_row(hidden: torch.Tensor, residual: torch.Tensor, metric: torch.Tensor, r: int):
    """One row of the official ``hybrid`` (hidden) / ``merge_only`` (residual) reduction, removing ``r``
    tokens (``budget_official``).

    hidden, residual, metric: (1, n, D) in time order. Returns (hidden', residual', kept, merged_into)
    where kept (n,) bool marks surviving positions and merged_into (n,) int64 gives the position each
    removed token was summed into (-1 if kept). Quirks kept on purpose (see README):
    ``metric`` is sorted per channel along tokens and the sort indices are dropped, the bipartite split
    is even/odd positional, destinations may lie in the past or the future, the source/destination
    pairing uses the unsorted order, and the hidden stream adds only each channel's top r//2 source
    values. Sizes are not carried across anchors.
    """
    n = hidden.shape[1]
    kept = torch.ones(n, dtype=torch.bool, device=hidden.device)
    merged_into = torch.full((n,), -1, dtype=torch.long, device=hidden.device)
    if r <= 0:
        return hidden, residual, kept, merged_into
    normed = metric / metric.norm(dim=-1, keepdim=True)
    ordered = normed.sort(dim=1, descending=True).values
    half = n // 2
    scores = ordered[:, half:] @ ordered[:, :half].transpose(-1, -2)
    best_score, best_dst = scores.max(dim=-1)
    edges = best_score.argsort(dim=-1, descending=True)[..., None]
    src_edges = edges[:, :r]
    unmerged = edges[:, r:].sort(dim=1).values
    dst_of_edge = best_dst[..., None].gather(1, src_edges)
    src_sorted = src_edges.sort(dim=1).values

    def reduce_stream(x: torch.Tensor, per_channel_top: bool) -> torch.Tensor:
        ones = torch.ones_like(x[..., :1])

        def merge(t: torch.Tensor) -> torch.Tensor:
            evens, odds = t[:, ::2], t[:, 1::2]
            width = t.shape[-1]
            unm = evens.gather(1, unmerged.expand(1, unmerged.shape[1], width))
            src = evens.gather(1, src_sorted.expand(1, r, width))
            if per_channel_top:
                top = src.topk(r // 2, dim=1).indices
                src = src * torch.zeros_like(src).scatter_(1, top, 1)
            odds = odds.scatter_reduce(1, dst_of_edge.expand(1, r, width), src, reduce="sum")
            return torch.cat([unm, odds], 1)

        merged_x = merge(x * ones) / merge(ones)
        n_unm = unmerged.shape[1]
        out = torch.zeros(1, n, x.shape[-1], device=x.device, dtype=merged_x.dtype)
        out[:, 1::2] = merged_x[:, n_unm:]
        out.scatter_(1, (2 * unmerged).expand(1, n_unm, x.shape[-1]), merged_x[:, :n_unm])
        return out

    kept[2 * src_sorted[0, :, 0]] = False
    merged_into[2 * src_sorted[0, :, 0]] = 2 * dst_of_edge[0, :, 0] + 1
    hidden_out = reduce_stream(hidden, per_channel_top=True)[:, kept]
    residual_out = reduce_stream(residual, per_channel_top=False)[:, kept]
    return hidden_out, residual_out, kept, merged_into


def official_reduce(hidden: torch.Tensor, residual: torch.Tensor, state: TokenState, r: torch.Tensor, metric_name: str):
    """Apply the official selection to each row's real tokens, removing ``r`` (B,) of them
    (``budget_official``); returns (hidden', residual', state').

    The metric is the mixer output, clamped at 0 for ``clip`` (the official default) and raw otherwise.
    Protection is ignored (the official code has none); padding is removed first.
    """
    batch = hidden.shape[0]
    rows = []
    removals = r.tolist()
    for b in range(batch):
        idx = state.valid[b].nonzero().squeeze(1)
        h, res = hidden[b : b + 1, idx], residual[b : b + 1, idx]
        metric = h.clamp(min=0) if metric_name == "clip" else h
        h2, res2, kept, merged_into = _official_row(h, res, metric, removals[b])
        pos = state.pos[b, idx]
        size = _official_sizes(state.size[b, idx].clone(), kept, merged_into)
        rows.append((h2[0], res2[0], pos[kept], size[kept], state.protected[b, idx][kept]))
    n_out = max(row[0].shape[0] for row in rows) if rows else 0
    dim_h, dim_r = hidden.shape[-1], residual.shape[-1]
    out_h = hidden.new_zeros(batch, n_out, dim_h)
    out_r = residual.new_zeros(batch, n_out, dim_r)
    pos = torch.full((batch, n_out), -1, dtype=torch.long, device=hidden.device)
    size = torch.zeros(batch, n_out, device=hidden.device)
    protected = torch.zeros(batch, n_out, dtype=torch.bool, device=hidden.device)
    valid = torch.zeros_like(protected)
    for b, (h, res, p, s, prot) in enumerate(rows):
        k = h.shape[0]
        cols = slice(n_out - k, n_out) if state.left_padded else slice(0, k)
        out_h[b, cols], out_r[b, cols] = h, res
        pos[b, cols], size[b, cols], protected[b, cols], valid[b, cols] = p, s, prot, True
    return out_h, out_r, TokenState(pos, size, valid, protected, state.left_padded)


def _official_sizes(size: torch.Tensor, kept: torch.Tensor, merged_into: torch.Tensor) -> torch.Tensor:
    """Add the sizes of removed tokens to the tokens they were summed into (bookkeeping only)."""
    removed = (~kept).nonzero().squeeze(1)
    size.index_add_(0, merged_into[removed], size[removed])
    return size
