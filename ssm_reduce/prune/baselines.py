"""The baseline methods, each a solver of ``prune_linear``: magnitude; Wanda (Sun et al. 2023, |w| times the
input norm); SparseGPT (Frantar & Alistarh 2023, the OBS column sweep over lazy blocks, in float32 as the
reference code, with masks chosen per row so that every row loses exactly its share)."""

from __future__ import annotations

from typing import Optional

import torch

from .layer_error import relative_error, relative_error_from_losses, weighted_square_sum
from .linalg import inverse_upper
from .masks import block_counts, lowest, score_mask
from .request import SolveRequest, SolveStats
from .settings import MRPSettings
from .workspace import Workspace


def prune_magnitude(weight: torch.Tensor, hessian: torch.Tensor, request: SolveRequest, stats: SolveStats,
                    settings: MRPSettings, workspace: Optional[Workspace] = None):
    """Remove the smallest |w| of each row (or N:M group); the kept weights are left as they are."""
    w = weight.double()
    return _masked(weight, w, hessian, score_mask(w.abs(), request.sparsity, request.nm), stats, settings)


def prune_wanda(weight: torch.Tensor, hessian: torch.Tensor, request: SolveRequest, stats: SolveStats,
                settings: MRPSettings, workspace: Optional[Workspace] = None):
    """Remove the smallest |w_ij| * ||X_j||_2 of each row (or N:M group), ||X_j||^2 = H_jj / 2."""
    w = weight.double()
    norms = torch.sqrt(torch.clamp(torch.diag(hessian.double()) / 2, min=0))
    return _masked(weight, w, hessian, score_mask(w.abs() * norms[None, :], request.sparsity, request.nm),
                   stats, settings)


def _masked(weight, w, hessian, mask, stats: SolveStats, settings: MRPSettings):
    """(``w`` zeroed on ``mask``, in weight's dtype; the mask), its error into ``stats``."""
    new = w.masked_fill(mask, 0.0)
    stats.relative_error = relative_error(weight, new, hessian, settings.row_pass_elements)
    return new.to(weight.dtype), mask


def prune_sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, request: SolveRequest, stats: SolveStats,
                    settings: MRPSettings, workspace: Optional[Workspace] = None):
    """SparseGPT's column sweep (``sparsegpt_sweep``) on the damped Hessian; its error from the sweep's
    summed OBS losses (half-precision weights: measured after rounding)."""
    h, hinv, upper = inverse_upper(hessian, request.damp, stats, settings.max_pivot_ratio)
    new, mask, loss = sparsegpt_sweep(weight.to(torch.float32, copy=True), upper.float(), request.sparsity,
                                      request.nm, request.blocksize)
    result = new.to(weight.dtype)
    if torch.finfo(weight.dtype).bits < 32:
        stats.relative_error = relative_error(weight, result, hessian, settings.row_pass_elements)
    else:
        whw = weighted_square_sum(weight, h, elements=settings.row_pass_elements)
        stats.relative_error = relative_error_from_losses(weight, new, loss, whw, h, hessian, loss_accuracy=1e-6,
                                                          elements=settings.row_pass_elements)
    return result, mask


def sparsegpt_sweep(w, upper, sparsity: float, nm: Optional[tuple[int, int]], blocksize: int):
    """The column sweep over the (out, in) float32 weight ``w`` (updated in place) with ``upper`` the upper
    Cholesky factor of the damped H^-1; returns (new weights, (out, in) bool mask True where removed, loss),
    ``loss`` being the float64 sum over rows of the damped ``(w' - w) H (w' - w)^T``: the sum of the squared
    OBS errors (exact, in exact arithmetic, for the sequential removals). Removed weights are exactly zero."""
    rows, cols = w.shape
    mask = torch.zeros_like(w, dtype=torch.bool)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    if nm is not None:  # whole groups of M in every block
        blocksize = max(nm[1], (blocksize // nm[1]) * nm[1])
    counts = block_counts(sparsity, cols, blocksize) if nm is None else None
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        d = torch.diag(u1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:
            mask1 = lowest(w1**2 / d[None, :] ** 2, counts[b])
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                mask1[:, group] = lowest(w1[:, group] ** 2 / d[None, group] ** 2, nm[1] - nm[0])
            col = w1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(col), col)
            err = (col - q) / d[i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
        mask[:, i1:i2] = mask1
        loss += err1.square().sum(dtype=torch.float64)
    return w, mask, loss
