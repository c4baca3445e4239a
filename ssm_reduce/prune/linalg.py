"""Dense linear algebra of the second-order methods: damping and the inverse Hessian with its pivot check, a
verified floor on the smallest eigenvalue, batched factorisations (the direct solve) and a condition-number
estimate (Zhao et al., "Pruning Foundation Models for High Accuracy without Retraining", EMNLP 2024
Findings, Sec. 3; docs/mrp.md)."""

from __future__ import annotations

from typing import Optional

import torch

from .request import SolveStats


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """(in, in) float64 ``H + damp * mean(diag H) I``, where inputs that never fire (a zero diagonal entry)
    first take the live inputs' mean diagonal (any value works for them; this keeps the scale, so that
    ``damp`` means the same at any scale)."""
    h = hessian.double().clone()
    diag = torch.diag(h)
    dead = diag == 0
    live_mean = diag[~dead].mean() if bool((~dead).any()) else torch.ones((), dtype=h.dtype, device=h.device)
    h[dead, dead] = live_mean
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    return h


class IllConditioned(torch.linalg.LinAlgError):
    """A damped Hessian that factors, but too ill-conditioned for the solves (``max_pivot_ratio``)."""


def inverse_upper(hessian: torch.Tensor, damp: float, stats: SolveStats, max_pivot_ratio: float):
    """(damped H, H^-1, upper Cholesky factor U of H^-1 = U^T U), all (in, in) float64. A failed Cholesky
    factorisation, or pivots spanning more than ``max_pivot_ratio`` (a lower bound on the condition number,
    past what float32 steps can refine), is retried with 10x the damping (from 0: with 1e-3), counted and
    noted in ``stats``; ``stats.damp`` gets the damping used. ``RuntimeError`` after six tries."""
    for attempt in range(6):
        h = damped(hessian, damp)
        try:
            chol = torch.linalg.cholesky(h)
            pivots = torch.diagonal(chol).square()
            if float(pivots.max()) > max_pivot_ratio * float(pivots.min()):
                raise IllConditioned(f"condition number above {max_pivot_ratio:g}")
            hinv = torch.cholesky_inverse(chol)
            upper = torch.linalg.cholesky(hinv, upper=True)
            stats.damp = damp
            return h, hinv, upper
        except torch.linalg.LinAlgError as err:
            stats.cholesky_retries += 1
            more = damp * 10 if damp > 0 else 1e-3
            why = str(err) if isinstance(err, IllConditioned) else "Cholesky failed"
            stats.notes.append(f"{why} with damp={damp:g}; retrying with damp={more:g}")
            damp = more
    raise RuntimeError(f"the Hessian is not positive definite even with damp={damp:g}")


def eig_floor(h_damped: torch.Tensor, hinv: torch.Tensor, guess: Optional[float] = None) -> float:
    """A verified lower bound on the smallest eigenvalue of ``h_damped``: ``guess`` if ``h_damped - guess I``
    has a Cholesky factor (backward stability makes that a proof, up to a relative 1e-12 taken off), else
    ``1 / |H^-1|_inf`` (the largest eigenvalue of H^-1 is at most any induced norm of it)."""
    bound = 1.0 / float(hinv.abs().sum(1).max())
    if guess is not None and guess > bound:
        shifted = h_damped - guess * torch.eye(h_damped.shape[0], dtype=h_damped.dtype, device=h_damped.device)
        if int(torch.linalg.cholesky_ex(shifted).info) == 0:
            return max(bound, guess - 1e-12 * float(torch.diag(h_damped).abs().max()) * h_damped.shape[0])
    return bound


def gather_square(matrix: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``matrix[idx_n][:, idx_n]`` for every row n of ``idx`` (rows x r) -> (rows, r, r)."""
    return matrix[idx[:, :, None], idx[:, None, :]]  # one pass: no (rows, r, in) intermediate


def direct_solve(weight: torch.Tensor, mask: torch.Tensor, h_damped: torch.Tensor, hinv: torch.Tensor,
                 residual_tol: float, chunk_elements: int) -> torch.Tensor:
    """``exact_solve`` by batched factorisations, through the smaller of the removed / kept sets:
    ``w' = w - w_P [(H^-1)_PP]^-1 (H^-1)_P,:`` or ``H_KK w'_K = (w H)_K``. Factored in float32 (systems of
    at most ``chunk_elements`` elements at once) and refined twice with float64 residuals; rows whose
    relative residual stays above ``residual_tol`` are solved again with float64 factorisations. Every row
    of ``mask`` (out, in) must remove as many weights; returns (out, in) float64."""
    w = weight.double()
    rows, cols = w.shape
    removed = int(mask[0].sum()) if rows else 0
    if removed == 0:
        return w.clone()
    order = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices
    use_removed = removed <= cols - removed
    if use_removed:
        idx, matrix, rhs = order[:, :removed], hinv, w.gather(1, order[:, :removed])
    else:
        idx, matrix = order[:, removed:], h_damped
        rhs = (w @ h_damped).gather(1, idx)
    matrix32 = matrix.float()
    size = idx.shape[1]
    chunk = max(1, chunk_elements // (size * size))
    factors = []
    for r1 in range(0, rows, chunk):
        r2 = min(rows, r1 + chunk)
        factors.append((r1, r2, _factor(gather_square(matrix32, idx[r1:r2]), matrix, idx[r1:r2])))

    def solve(b: torch.Tensor) -> torch.Tensor:
        x = torch.empty_like(b)
        for r1, r2, factor in factors:
            x[r1:r2] = factor(b[r1:r2])
        return x

    sol = solve(rhs)
    for _ in range(2):  # iterative refinement: residuals in float64 through one dense product each
        dense = torch.zeros_like(w).scatter_(1, idx, sol)
        residual = rhs - (dense @ matrix).gather(1, idx)
        sol = sol + solve(residual)
    dense = torch.zeros_like(w).scatter_(1, idx, sol)
    residual = rhs - (dense @ matrix).gather(1, idx)
    poor = (residual.norm(dim=1) > residual_tol * rhs.norm(dim=1)).nonzero().flatten()
    if poor.numel():
        exact = _factor64(gather_square(matrix, idx[poor]))(rhs[poor])
        sol[poor] = exact
        dense[poor] = torch.zeros_like(w[poor]).scatter_(1, idx[poor], exact)
    if use_removed:
        return (w - dense @ hinv).scatter_(1, idx, 0.0)
    return dense


def _factor(sub32: torch.Tensor, matrix: torch.Tensor, idx: torch.Tensor):
    """A solver for the batched SPD systems ``sub x = b``: a float32 Cholesky factor, or float64 when
    float32 cannot factor them."""
    chol, info = torch.linalg.cholesky_ex(sub32)
    if not bool((info != 0).any()):
        def solve32(b):  # two triangular solves: faster than cholesky_solve on batches of small systems
            y = torch.linalg.solve_triangular(chol, b[..., None].float(), upper=False)
            return torch.linalg.solve_triangular(chol.mT, y, upper=True)[..., 0].double()

        return solve32
    return _factor64(gather_square(matrix, idx))


def _factor64(sub64: torch.Tensor):
    """A solver for the batched float64 systems ``sub64 x = b``: Cholesky, or LU where that fails."""
    chol64, info64 = torch.linalg.cholesky_ex(sub64)
    if bool((info64 != 0).any()):
        return lambda b: torch.linalg.solve(sub64, b[..., None])[..., 0]
    return lambda b: torch.cholesky_solve(b[..., None], chol64)[..., 0]


def kappa_estimate(a_hat: torch.Tensor, support: torch.Tensor, steps: int = 24) -> float:
    """Median over rows of the condition number of ``A_KK`` (K: each row's ``support``, 1.0 on it) estimated
    from the Ritz values of ``steps`` Lanczos steps (float32, no reorthogonalisation: the extreme Ritz values
    are all a choice between two solvers needs)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(support.shape, generator=gen).to(support.device).mul_(support)
    v /= v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    v_prev = torch.zeros_like(v)
    beta_prev = torch.zeros(v.shape[0], device=v.device)
    alphas, betas = [], []
    for _ in range(min(steps, int(support.sum(1).min()))):
        u = (v @ a_hat.float()).mul_(support)
        alpha = (u * v).sum(1)
        u -= alpha[:, None] * v + beta_prev[:, None] * v_prev
        beta = u.norm(dim=1)
        alphas.append(alpha)
        betas.append(beta)
        v_prev, v, beta_prev = v, u / beta[:, None].clamp_min(1e-30), beta
    k = len(alphas)
    if k == 0:
        return 1.0
    t = torch.diag_embed(torch.stack(alphas, 1).double())
    off = torch.stack(betas[:-1], 1).double() if k > 1 else None
    if off is not None:
        t = t + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    ritz = torch.linalg.eigvalsh(t)
    kappa = ritz[:, -1] / ritz[:, 0].clamp_min(1e-12 * ritz[:, -1].abs().max())
    return float(kappa.median())
