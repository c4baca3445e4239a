"""mrp's mask selection: a SparseGPT-style column sweep that removes the weights of each block (or N:M group)
jointly, by the optimal multiple-removal update (Zhao et al., "Pruning Foundation Models for High Accuracy
without Retraining", EMNLP 2024 Findings, Sec. 3; docs/mrp.md, "Sweep")."""

from __future__ import annotations

import itertools
from typing import Optional

import torch

from .conjugate_gradients import jacobi_scaled, pcg32
from .masks import block_counts, lowest_indices
from .settings import DEFAULT_SETTINGS, MRPSettings
from .workspace import NO_REUSE, CGBuffers


def remove_jointly(w1, u1, gram, remove_idx, buffers: CGBuffers = NO_REUSE.sweep_cg,
                   settings: MRPSettings = DEFAULT_SETTINGS):
    """Jointly remove, in every row, the columns ``remove_idx`` (rows x r) of the block ``w1`` (rows x B)
    with the optimal multiple-removal update; returns the per-row error vectors e (rows x B) such that the
    update of any column c right of the block start is ``-e @ U[block, c]``. ``u1`` is the block's upper
    factor and ``gram = U^T U`` the remaining problem's inverse Hessian on the block, shared by all rows.

    The per-row systems ``[(H_rem^-1)_SS] z = w_S`` are solved approximately, by float32 Jacobi-PCG for all
    rows at once, to a relative residual of ``settings.sweep_tol`` (at most ``settings.sweep_max_iter``
    iterations): the sweep only chooses the mask and a starting point for the exact solve."""
    rows, width = w1.shape
    removed = torch.zeros(rows, width, dtype=torch.bool, device=w1.device).scatter_(1, remove_idx, True)
    gram_hat, scale = jacobi_scaled(gram)
    rhs = torch.where(removed, w1.float() * scale, 0.0)
    iterations = min(settings.sweep_max_iter, remove_idx.shape[1])
    z = pcg32(rhs, removed.float(), gram_hat, settings.sweep_tol, iterations, buffers).mul_(scale)
    return z.to(u1.dtype) @ u1.T  # e_n = U[:, S_n] z_n (z is zero off S_n)


def mrp_sweep(w, upper, sparsity: float, nm: Optional[tuple[int, int]], blocksize: int,
              buffers: CGBuffers = NO_REUSE.sweep_cg, settings: MRPSettings = DEFAULT_SETTINGS):
    """Mask selection by joint optimal removal over the (out, in) weight ``w``, updated in place, with
    ``upper`` the upper Cholesky factor of the damped H^-1: every N:M group removes, per row, the least-loss
    of its C(M, N) candidate sets ``loss(S) = w_S [(H^-1)_SS]^-1 w_S^T`` (exactly); unstructured, every block
    its per-row share of lowest OBS saliencies ``w_j^2 / [H^-1]_jj`` (``remove_jointly``). Returns (the swept
    weights, a warm start for the exact solve; the (out, in) bool mask, True where removed)."""
    rows, cols = w.shape
    mask = torch.zeros_like(w, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        blocksize = max(m, (blocksize // m) * m)
        combos = torch.tensor(list(itertools.combinations(range(m), m - n)), device=w.device)  # (C, r)
        n_combos = combos.shape[0]
        # E[c]: the (m, r) one-hot embedding of candidate set c; chosen[c]: its (m,) removal pattern
        embed = torch.zeros(n_combos, m, m - n, dtype=w.dtype, device=w.device)
        embed.scatter_(1, combos[:, None, :], 1.0)
        chosen = embed.sum(-1) > 0
    counts = block_counts(sparsity, cols, blocksize) if nm is None else None
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        u1 = upper[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:
            k = counts[b]
            if k > 0:
                gram = u1.T @ u1  # the remaining problem's inverse Hessian on the block
                idx = lowest_indices(w1**2 / torch.diag(gram)[None, :], k)
                e = remove_jointly(w1, u1, gram, idx, buffers, settings)
                w1 -= e @ u1
                mask1.scatter_(1, idx, True)
                w1.mul_(~mask1)  # exactly zero where removed
                err1 = e
        else:
            groups = (i2 - i1) // m
            # per group g and candidate set S (all groups of the block at once): A = (H_rem^-1)_SS =
            # U_GS^T U_GS with U_GS the group's block of U; a row's loss is w_S A^-1 w_S = w_G Q w_G^T, so
            # one (rows x m^2)(m^2 x C) product of the rows' outer products scores every candidate set,
            # and its joint removal is e_G = U_GS A^-1 w_S = w_G R
            arange = torch.arange(groups, device=w.device)
            ug = u1.reshape(groups, m, groups, m)[arange, :, arange, :]  # (G, m, m) diagonal blocks
            us = ug[:, :, combos]  # (G, m, C, r)
            a_inv = torch.linalg.inv(torch.einsum("gicr,gics->gcrs", us, us))  # (G, C, r, r)
            q = torch.einsum("cir,gcrs,cjs->gijc", embed, a_inv, embed).reshape(groups, m * m, n_combos)
            rr = torch.einsum("cir,gcrs,gjcs->gcij", embed, a_inv, us)  # (G, C, m, m)
            for gi, g in enumerate(range(0, i2 - i1, m)):
                wg = w1[:, g : g + m]
                best = ((wg[:, :, None] * wg[:, None, :]).view(rows, m * m) @ q[gi]).argmin(1)  # (rows,)
                e_g = torch.bmm(wg[:, None, :], rr[gi][best])[:, 0]  # (rows, m)
                w1[:, g:] -= e_g @ u1[g : g + m, g:]
                sel = chosen[best]
                w1[:, g : g + m].mul_(~sel)  # exactly zero where removed
                mask1[:, g : g + m] = sel
                err1[:, g : g + m] = e_g
        w[:, i1:i2] = w1
        w[:, i2:].addmm_(err1, upper[i1:i2, i2:], alpha=-1.0)  # in place: no product temporary
        mask[:, i1:i2] = mask1
    return w, mask
