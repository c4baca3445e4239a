"""Pure-torch twins of the fused kernels: the same signatures, the ground truth the kernels are tested against.

They run on any device and dtype and are what ``ssm_reduce.ops`` dispatches to when the compiled
extension is missing or the inputs are not on CUDA.
"""

from __future__ import annotations

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
    """
    batch, n_src, _ = src.shape
    src_n = torch.nn.functional.normalize(src.float(), dim=-1)
    dst_n = torch.nn.functional.normalize(dst.float(), dim=-1)
    neg_inf = torch.tensor(float("-inf"), device=src.device)
    sims, idxs = [], []
    for start in range(0, n_src, MATCH_TILE):
        tile = src_n[:, start : start + MATCH_TILE] @ dst_n.transpose(1, 2)
        tile = torch.where(dst_mask[:, None, :], tile, neg_inf)
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


def apply_plan(x: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor, n_out: int) -> torch.Tensor:
    """Reduce a token stream with a plan: ``out[b, slot[b, i]] += weight[b, i] * x[b, i]``.

    Args:
        x: (B, N, D) token features (any float dtype).
        slot: (B, N) int64 output column of each token; -1 drops the token.
        weight: (B, N) float32 weight of each token in its output column (weights of a column sum
            to 1; a token kept alone has weight exactly 1, so it is copied bit for bit).
        n_out: N', the number of output columns.
    Returns:
        (B, N', D) in the dtype of ``x``; columns no token maps to are zero. Accumulates in float32.
    """
    batch, _, dim = x.shape
    target = torch.where(slot < 0, torch.full_like(slot, n_out), slot)
    out = torch.zeros(batch, n_out + 1, dim, device=x.device, dtype=torch.float32)
    contrib = x.float() * weight[..., None]
    out.scatter_add_(1, target[..., None].expand(-1, -1, dim), contrib)
    return out[:, :n_out].to(x.dtype)
