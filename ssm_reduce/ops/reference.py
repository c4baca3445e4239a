"""Pure-torch twins of the fused kernels: the same signatures, the ground truth the kernels are tested against.

They run on any device and dtype and are what ``ssm_reduce.ops`` dispatches to when the compiled
extension is missing or the inputs are not on CUDA.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

# Rows of the source set processed at once by ``match``: bounds the similarity tile to
# MATCH_TILE x |dst| per batch row instead of materialising |src| x |dst|.
MATCH_TILE = 512


def match(src: torch.Tensor, dst: torch.Tensor, src_mask: torch.Tensor, dst_mask: torch.Tensor):
    """Most cosine-similar destination of every source token.

    Args:
        src: (B, Ns, D) source features.   dst: (B, Nd, D) destination features.
        src_mask: (B, Ns) bool, sources to match.   dst_mask: (B, Nd) bool, allowed destinations.
    Returns:
        sim: (B, Ns) float32 cosine similarity of the best destination; -inf where the source is
            masked or its row has no allowed destination.
        idx: (B, Ns) int64 index into ``dst`` of the best destination (ties: lowest index); 0 where
            ``sim`` is -inf.
    A similarity that is NaN (a NaN feature) never wins: one bad token does not stop its row from
    merging, and a NaN source gets -inf.
    """
    batch, n_src, _ = src.shape
    if dst.shape[1] == 0:
        return (torch.full((batch, n_src), float("-inf"), device=src.device),
                torch.zeros(batch, n_src, dtype=torch.long, device=src.device))
    src_n = torch.nn.functional.normalize(src.float(), dim=-1)
    dst_n = torch.nn.functional.normalize(dst.float(), dim=-1)
    neg_inf = torch.tensor(float("-inf"), device=src.device)
    sims, idxs = [], []
    for start in range(0, n_src, MATCH_TILE):
        tile = src_n[:, start : start + MATCH_TILE] @ dst_n.transpose(1, 2)
        tile = torch.where(dst_mask[:, None, :] & ~tile.isnan(), tile, neg_inf)
        best, arg = tile.max(dim=-1)
        sims.append(best)
        idxs.append(arg)
    if n_src == 0:
        empty = src.new_zeros((batch, 0), dtype=torch.float32)
        return empty, empty.long()
    sim = torch.cat(sims, dim=1)
    idx = torch.cat(idxs, dim=1)
    sim = torch.where(src_mask, sim, neg_inf)
    idx = torch.where(torch.isfinite(sim), idx, torch.zeros_like(idx))
    return sim, idx


def apply_plan(xs: Sequence[torch.Tensor], slot: torch.Tensor, weights: Sequence[torch.Tensor],
               n_out: int) -> list[torch.Tensor]:
    """Reduce token streams that share a plan (hidden states and residual):
    ``out_k[b, slot[b, i]] += weights[k][b, i] * xs[k][b, i]`` for every stream k.

    Args:
        xs: (B, N, D_k) token features of each stream (any float dtype, each its own).
        slot: (B, N) int64 output column of each token; -1 drops the token.
        weights: per stream, (B, N) float32 weight of each token in its output column (weights of a
            column sum to 1; a token kept alone has weight exactly 1, so it is copied bit for bit).
        n_out: N', the number of output columns.
    Returns:
        per stream, (B, N', D_k) in its dtype; columns no token maps to are zero. Accumulates in
        float32 (float64 for float64 streams), in token order.
    """
    if len(xs) != len(weights):
        raise ValueError(f"apply_plan needs one weight per stream; got {len(xs)} streams and {len(weights)} weights")
    target = torch.where(slot < 0, torch.full_like(slot, n_out), slot)
    outs = []
    for x, weight in zip(xs, weights):
        batch, _, dim = x.shape
        acc = torch.promote_types(x.dtype, torch.float32)
        out = torch.zeros(batch, n_out + 1, dim, device=x.device, dtype=acc)
        contrib = x.to(acc) * weight.to(acc)[..., None]
        out.scatter_add_(1, target[..., None].expand(-1, -1, dim), contrib)
        outs.append(out[:, :n_out].to(x.dtype))
    return outs


def _metric_over_channels(y: torch.Tensor, metric: str, dims) -> torch.Tensor:
    """Importance metric of float32 ``y`` over the channel ``dims`` (see ssm_reduce.reduce.importance_scores)."""
    if metric == "clip":
        return y.clamp(min=0).mean(dims)
    if metric == "l1":
        return y.abs().mean(dims)
    if metric == "l2":
        return y.pow(2).mean(dims).sqrt()
    if metric == "mean":
        return y.mean(dims)
    raise ValueError(f"metric={metric!r} is not supported; choose clip, l1, l2 or mean")


def scan_score_mamba2(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    dt_softplus: bool = True,
    dt_min: float = 0.0,
    dt_max: float = float("inf"),
    metric: str = "clip",
):
    """Mamba-2 selective scan forward with per-token scores, computed exactly step by step in float32.

    Args:
        x: (B, L, H, P).  dt: (B, L, H).  A: (H,) (negative).  B, C: (B, L, G, N), H divisible by G.
        D: (H,) skip.  z: (B, L, H, P) gate.  dt_bias: (H,).  initial_state: (B, H, P, N).
        dt_softplus / dt_min / dt_max: dt = clamp(softplus(dt + dt_bias), dt_min, dt_max).
        metric: importance metric over the H * P channels of y (before the gate).
    Returns:
        y: (B, L, H, P) in x's dtype (times silu(z) when z is given); final_state: (B, H, P, N) float32;
        score: (B, L) float32 metric of the pre-gate y; sqnorm: (B, L) float32 sum of its squares.
    """
    batch, seqlen, heads, _ = x.shape
    groups = B.shape[2]
    d = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    if dt_softplus:
        d = torch.nn.functional.softplus(d)
    d = d.clamp(min=dt_min, max=dt_max)
    decay = torch.exp(d * A.float())  # (B, L, H)
    bh = B.float().repeat_interleave(heads // groups, dim=2)
    ch = C.float().repeat_interleave(heads // groups, dim=2)
    xf = x.float()
    state = (
        initial_state.float().clone()
        if initial_state is not None
        else x.new_zeros(batch, heads, x.shape[3], B.shape[3], dtype=torch.float32)
    )
    ys = []
    for t in range(seqlen):
        state = state * decay[:, t, :, None, None] + (d[:, t, :, None] * xf[:, t])[..., None] * bh[:, t, :, None, :]
        ys.append((state * ch[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, 1) if ys else xf.new_zeros(xf.shape)
    skip = D.float()[None, None, :, None] if D is not None else None
    return _finish_scan(y, xf, skip, z, state, metric, (-2, -1), x.dtype)


def scan_score_mamba1(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    initial_state: Optional[torch.Tensor] = None,
    delta_softplus: bool = True,
    metric: str = "clip",
):
    """Mamba-1 selective scan forward with per-token scores (float32, step by step).

    Args:
        u: (B, D, L).  delta: (B, D, L).  A: (D, N).  B, C: (B, N, L).  D: (D,).  z: (B, D, L).
        delta_bias: (D,).  initial_state: (B, D, N).
    Returns:
        y: (B, D, L) in u's dtype (times silu(z) when given); final_state: (B, D, N) float32;
        score, sqnorm: (B, L) float32, over the D channels of the pre-gate y.
    """
    batch, dim, seqlen = u.shape
    d = delta.float() + (delta_bias.float()[None, :, None] if delta_bias is not None else 0.0)
    if delta_softplus:
        d = torch.nn.functional.softplus(d)
    uf = u.float()
    state = (
        initial_state.float().clone()
        if initial_state is not None
        else u.new_zeros(batch, dim, A.shape[1], dtype=torch.float32)
    )
    ys = []
    for t in range(seqlen):
        state = state * torch.exp(d[:, :, t, None] * A.float()) + (d[:, :, t] * uf[:, :, t])[..., None] * B.float()[:, None, :, t]
        ys.append((state * C.float()[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1) if ys else uf.new_zeros(uf.shape)
    skip = D.float()[None, :, None] if D is not None else None
    return _finish_scan(y, uf, skip, z, state, metric, 1, u.dtype)


def _finish_scan(y, x, skip, z, state, metric, channel_dims, dtype):
    """Add the D skip, score y over its channels, then gate: (y, final_state, score, sqnorm)."""
    if skip is not None:
        y = y + skip * x
    score = _metric_over_channels(y, metric, channel_dims)
    sqnorm = y.pow(2).sum(channel_dims)
    if z is not None:
        y = y * torch.nn.functional.silu(z.float())
    return y.to(dtype), state, score, sqnorm
