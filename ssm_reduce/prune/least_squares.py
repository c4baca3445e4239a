"""mrp's exact solve: every row's kept weights set to the least-squares optimum of its mask, to a certified
relative accuracy, by mixed-precision iterative refinement in the kept or the removed weights, with lower
bounds on each mask's optimal loss for the swap rounds (Zhao et al., "Pruning Foundation Models for High
Accuracy without Retraining", EMNLP 2024 Findings, Sec. 3; docs/mrp.md, "Exact solve")."""

from __future__ import annotations

from typing import Optional

import torch

from .conjugate_gradients import operators, pcg_by_precision
from .linalg import direct_solve, eig_floor as eig_floor_bound, kappa_estimate
from .settings import MRPSettings, resolve
from .workspace import NO_REUSE, SolveBuffers


def exact_solve(
    weight: torch.Tensor,
    mask: torch.Tensor,
    h_damped: torch.Tensor,
    hinv: torch.Tensor,
    start: Optional[torch.Tensor] = None,
    tol: Optional[float] = None,
    max_iter: Optional[int] = None,
    wh: Optional[torch.Tensor] = None,
    return_product: bool = False,
    residual_tol: Optional[float] = None,
    eig_floor: Optional[float] = None,
    work: Optional[SolveBuffers] = None,
    return_bound: bool = False,
    out: Optional[tuple] = None,
    start_h: Optional[torch.Tensor] = None,
    settings: Optional[MRPSettings] = None,
):
    """Per row, the exact least-squares optimum on the kept support: the w' with w'_P = 0 minimising
    (w' - w) H (w' - w)^T (H damped), i.e. ``H_KK w'_K = (w H)_K``. ``weight``, ``mask`` (True where
    removed) (out, in); ``h_damped``, ``hinv`` (in, in) float64. Returns (out, in) float64.

    Guarantee: every row ends within ``tol`` (default ``settings.weight_tol``) of its optimum, relative,
    ``|w'_K - w*_K| <= tol |w*_K|``, proved by a float64 residual: ``|w'_K - w*_K| <= |r_K| / lambda_min(H)``
    with ``lambda_min(H) >= eig_floor`` (default ``1 / max_i sum_j |H^-1_ij|``; ``prune_linear`` passes one
    it has verified from the damping). With ``residual_tol`` rows stop instead at a relative residual
    ``|r_K| / |(w H)_K|`` below it, by float32 products. Rows the iteration does not bring there (at most
    ``settings.refinements`` rounds of ``max_iter`` iterations, default in / 16) are solved directly.

    ``start``: a starting point (default w); ``wh``: ``weight @ h_damped`` (float64) where the caller has
    it; ``start_h``: ``(start * ~mask) @ h_damped`` (to float32 accuracy at least) where the caller has it.
    ``return_product``: ``(x, x @ h_damped)``, the product being the final residual check's (float32 ones
    with ``residual_tol``); with ``return_bound`` too: ``(x, x H, losses, lower)``, per row the loss
    ``(x - w) H (x - w)^T`` (an upper bound on the optimum's) and a lower bound on the optimum's.
    ``work``: scratch buffers (default: none kept); ``out``: two float64 (out, in) arrays for x and x H
    (returned; neither may be ``start``); ``settings``: the tolerances and knobs (``MRPSettings``, None: the
    defaults)."""
    settings = resolve(settings)
    work = NO_REUSE if work is None else work
    tol = settings.weight_tol if tol is None else tol
    w = weight.double()
    rows = w.shape[0]
    keep = ~mask
    if max_iter is None:
        max_iter = max(8, w.shape[1] // 16)
    start = w if start is None else start
    b = w @ h_damped if wh is None else wh  # (w H)_K is b off the mask; r is masked, so b need not be
    exact = residual_tol is None
    if exact:
        floor = eig_floor if eig_floor is not None else eig_floor_bound(h_damped, hinv)
        # |x - x*| <= beta |x| with beta = |r| / (floor |x|) gives |x - x*| <= beta / (1 - beta) |x*|
        factor = floor * tol / (1.0 + tol)
    # masking by a product: several times faster on a CPU than by a bool mask
    support = work.kept.support32.take(w, torch.float32).copy_(keep)
    support64 = work.kept.support64.take(w).copy_(keep)
    if not exact:
        scale = torch.mul(b, support64, out=work.r.take(b)).norm(dim=1)
    h_hat, scale32, h_low, h32 = operators(h_damped, work.hessian.operators, settings)
    if solve_space(h_hat, hinv, mask, work, settings) == "removed":
        return solve_removed(w, mask, h_damped, hinv, start, b, factor if exact else None,
                             None if exact else residual_tol * scale, max_iter, return_product, work,
                             return_bound, support, support64, settings, out, start_h)
    x = (torch.empty_like(w) if out is None else out[0]).copy_(start).mul_(support64)
    use_f64 = False  # residual products in float64 (exact solves, once a row may be near its target)

    def residual():
        """The kept residual b - x H of the rows iterating, and their x H into ``xh`` where it may be kept:
        in float64, or in float32 (the rounding of the residual is then the product's; x H is kept only
        by loose solves, whose rows may stop on it)."""
        nonlocal start_h
        rows_x = x if index is None else x[index]
        if use_f64:
            if index is None:
                return torch.sub(b, torch.matmul(x, h_damped, out=xh), out=work.r.take(b)).mul_(support64)
            product = rows_x @ h_damped
            xh[index] = product
            return torch.sub(b[index], product, out=product).mul_(support64[index])
        if start_h is not None and index is None:  # the start's product, from the caller
            product, start_h = work.kept.xh32.take(rows_x, torch.float32).copy_(start_h), None
        else:
            x32 = work.kept.x32.take(rows_x, torch.float32).copy_(rows_x)
            product = torch.matmul(x32, h32, out=work.kept.xh32.take(rows_x, torch.float32))
        if not exact:
            if index is None:
                xh.copy_(product)
            else:
                xh[index] = product.double()
        b_rows = b32 if index is None else b32[index]
        return torch.sub(b_rows, product, out=work.kept.r32.take(product)).mul_(
            support if index is None else support[index])

    b32 = work.kept.b32.take(b, torch.float32).copy_(b)
    xh = torch.empty_like(x) if out is None else out[1]
    direct = torch.zeros(rows, dtype=torch.bool, device=w.device)  # rows left to the direct solve
    # per row still iterating (aligned with ``index``): inner products in the low precision, and the
    # residual norm and inner tolerance of the last round
    low = torch.full((rows,), h_low is not None, dtype=torch.bool, device=w.device)
    previous = asked = None
    index = None  # every row (no copies), then the index of the rows still iterating
    for round_ in range(settings.refinements + 1):
        while True:
            r = residual()
            target = factor * (x if index is None else x[index]).norm(dim=1) if exact else (
                residual_tol * (scale if index is None else scale[index]))
            norm = r.norm(dim=1).double()
            # float32 residuals cannot confirm (or aim at) an exact target: near it, recompute in float64
            if exact and not use_f64 and near_target(norm, target, settings):
                use_f64 = True
                continue
            break
        unconverged = ~(norm <= target)  # a non-finite row is not converged
        if exact and not use_f64:
            unconverged.fill_(True)
        if previous is not None:
            stalled = _stalled(unconverged, norm, previous, asked, low)
            if bool(stalled.any()):
                direct[_rows(index, rows, w.device)[stalled]] = True
                unconverged &= ~stalled
        if not bool(unconverged.any()):
            break
        if not bool(unconverged.all()):
            index = _rows(index, rows, w.device)[unconverged]
            r, norm, target, low = r[unconverged], norm[unconverged], target[unconverged], low[unconverged]
        if round_ == settings.refinements:
            direct[_rows(index, rows, w.device)] = True
            break
        previous = norm
        sup = support if index is None else support[index]
        asked = _correct(x, index, r, work.kept.r32, scale32, sup, low, h_low, h_hat, target, norm, max_iter,
                         work, settings)
        # float64 products from the round whose inner solves may bring a row near its target
        if exact and not use_f64 and near_target(norm * asked, target, settings):
            use_f64 = True
    return _finish(w, mask, b, h_damped, hinv, x, xh, direct, return_product, return_bound, work, settings)


def _correct(state, index, residual, scratch, scale32, support, low, a_low, a_hat, target, norm, max_iter, work,
             settings):
    """One refinement round of either iteration: each iterating row (``index``; None: all) asks for the cut
    of its residual ``norm`` it still needs to reach ``target``, within what its inner products' precision
    reaches; the Jacobi-scaled ``residual`` (into ``scratch``) goes through ``pcg_by_precision`` on
    ``support``, and the correction is added to ``state`` (x, or z). Returns what each row asked."""
    asked = torch.maximum(target / norm, torch.where(low, settings.low_tol, settings.inner_tol).double())
    rhs = scratch.take(residual, torch.float32).copy_(residual).mul_(scale32)
    correction = pcg_by_precision(rhs, support, low, a_low, a_hat, asked.float(), max_iter, work.cg)
    correction.mul_(scale32)
    if index is None:
        state.add_(work.c64.take(state).copy_(correction))
    else:
        state[index] += correction.double()
    return asked


def _finish(w, mask, b, h_damped, hinv, x, xh, direct, return_product, return_bound, work, settings, lower=None):
    """The end of both iterations: the rows in ``direct`` solved directly, their products in float64 (also
    in loose solves: a few rows, exact ones), and the result in the shape asked: x, (x, x H) or
    (x, x H, losses, lower). ``lower``: the bounds the iteration computed (the removed weights' dual), else
    ``loss_lower_bound``'s, which rows solved directly get in any case."""
    todo = direct.nonzero().flatten()
    if todo.numel():
        x[todo] = direct_solve(w[todo], mask[todo], h_damped, hinv, settings.direct_residual,
                               settings.direct_chunk_elements)
        xh[todo] = x[todo] @ h_damped
    if not return_bound:
        return (x, xh) if return_product else x
    losses = row_losses(w, x, b, xh, work)
    if lower is None:
        lower = loss_lower_bound(losses, b, xh, mask, hinv, work, settings)
    elif todo.numel():
        lower[todo] = loss_lower_bound(losses[todo], b[todo], xh[todo], mask[todo], hinv, work, settings)
    return x, xh, losses, lower


def near_target(norm: torch.Tensor, target: torch.Tensor, settings: MRPSettings) -> bool:
    """Whether any row's residual ``norm`` (or the one a round that cuts it by ``asked`` may leave,
    ``norm * asked``) is within ``settings.far_from_target`` of its exact ``target``: from then on both
    iterations compute their residual products in float64."""
    return bool((norm <= settings.far_from_target * target).any())


def _stalled(iterating, norm, previous, asked, low):
    """The refinement's rule for rows that did not progress (``iterating`` rows that cut their residual
    norm less than 10x since ``previous``, or less than 2x when they ``asked`` for less than 100x): those
    in the low precision continue in float32 (``low`` is cleared for them, in place); the float32 ones
    are returned, for the direct solve."""
    poor = iterating & (norm > (10 * asked).clamp(0.1, 0.5) * previous)
    stalled = poor & ~low
    low &= ~poor
    return stalled


def _rows(index: Optional[torch.Tensor], rows: int, device) -> torch.Tensor:
    """The row indices ``index`` stands for (None: all ``rows``)."""
    return torch.arange(rows, device=device) if index is None else index


def row_losses(w: torch.Tensor, w_new: torch.Tensor, wh: torch.Tensor, new_h: torch.Tensor,
               work: SolveBuffers = NO_REUSE) -> torch.Tensor:
    """Per row (w' - w) H (w' - w)^T from the products w H and w' H, all (rows, in); (rows,) float64."""
    diff = torch.sub(w_new, w, out=work.r.take(w))
    return torch.sub(new_h, wh, out=work.r2.take(w)).mul_(diff).sum(1)


def loss_lower_bound(losses: torch.Tensor, wh: torch.Tensor, xh: torch.Tensor, mask: torch.Tensor,
                     hinv: torch.Tensor, work: SolveBuffers = NO_REUSE,
                     settings: Optional[MRPSettings] = None) -> torch.Tensor:
    """Per row, a lower bound on the optimal loss of the mask, ``min over w' with w'_P = 0 of
    (w' - w) H (w' - w)^T``, from any x on the kept support with loss ``losses`` and product ``xh = x H``
    (``wh = w H``): ``losses - r H^-1 r^T`` with r the kept residual ``(w H - x H)_K``, since
    ``(H_KK)^-1 <= (H^-1)_KK``; it is the Lagrange dual's value at ``z = ((w - x) H)_P``, and its gap closes
    quadratically with the residual. The product with H^-1 is a float32 one: it scales a small correction."""
    r = torch.sub(wh, xh, out=work.bound.r.take(wh)).masked_fill_(mask, 0.0)
    r32 = work.bound.r32.take(r, torch.float32).copy_(r)
    inv32 = operators(hinv, work.hessian.removed_operators, resolve(settings))[3]
    rh = torch.matmul(r32, inv32, out=work.bound.rh32.take(r32))
    # (summed in float32, cascaded: a float64 sum would first convert the whole array)
    return losses - rh.mul_(r32).sum(1).double()


def solve_space(h_hat: torch.Tensor, hinv: torch.Tensor, mask: torch.Tensor, work: SolveBuffers,
                settings: MRPSettings) -> str:
    """Which variables ``exact_solve`` iterates in (``settings.solve_space``): "kept" (conjugate gradients
    on ``H_KK``) or "removed" (on ``(H^-1)_PP``, ``solve_removed``). "auto" estimates both Jacobi-scaled
    condition numbers on the masks of a few rows by Lanczos and takes "removed" where its is under a quarter
    of "kept"'s (each of its rounds costs one more product); decided once per Hessian (``work.hessian``)."""
    if settings.solve_space != "auto":
        return settings.solve_space

    def decide():
        rows = mask.shape[0]
        removed = int(mask[0].sum()) if rows else 0
        if 0 < removed < mask.shape[1] and rows:
            pick = torch.linspace(0, rows - 1, min(rows, 16), device=mask.device).long()
            sample = mask[pick]
            inv_hat = operators(hinv, work.hessian.removed_operators, settings)[0]
            if kappa_estimate(h_hat, (~sample).float()) > 4.0 * kappa_estimate(inv_hat, sample.float()):
                return "removed"
        return "kept"

    return work.hessian.space.get(hinv, decide)


def solve_removed(w, mask, h_damped, hinv, start, b, factor, loose_target, max_iter, return_product, work,
                  return_bound, support, support64, settings, out=None, start_h=None):
    """``exact_solve`` in the removed weights' variables. The optimum is ``x* = w - z* H^-1`` with
    ``(H^-1)_PP z*_P = w_P`` (z zero off P); for any z, ``x = w - z H^-1`` off P (zero on P) has the kept
    residual ``r_K = (s H)_K`` with ``s = w_P - (z H^-1)_P`` the removed residual. Far from the target each
    round computes these by float32 products, near it (``near_target``) ``z H^-1`` and the true kept residual
    ``(b - x H)_K`` by float64 ones; exact rows (``factor``) stop only on those, ``|r_K| <= factor |x|``: the
    guarantee of ``exact_solve``. Loose rows (``loose_target``: per-row residual norms) stop on the float32
    estimate. Corrections of z by conjugate gradients on ``(H^-1)_PP``; a row that stalls is solved directly.

    ``return_bound``: per row the Lagrange dual of the optimal loss at the iterate z, a lower bound that
    costs no product: ``2 z w^T - (z H^-1)_P z^T = z (w + s)^T``."""
    rows = w.shape[0]
    exact = factor is not None
    buf = work.removed
    # the masks in both dtypes (``support``: the kept ones, float32 and float64, from the caller)
    removed = buf.removed32.take(w, torch.float32).copy_(mask)
    removed64 = buf.removed64.take(w).copy_(mask)
    inv_hat, iscale32, inv_low, inv32 = operators(hinv, work.hessian.removed_operators, settings)
    h32 = operators(h_damped, work.hessian.operators, settings)[3]
    w32 = buf.w32.take(w, torch.float32).copy_(w)
    # start from x (the start, off P): z = (b - x H)_P (exact when x is the optimum)
    if start_h is None:
        x32 = buf.u32.take(w, torch.float32).copy_(start).mul_(support)
        z = buf.zstate.take(b).copy_(torch.matmul(x32, h32, out=buf.sh32.take(x32)))
    else:  # (the caller's product of the start)
        z = buf.zstate.take(b).copy_(start_h)
    torch.sub(b, z, out=z).mul_(removed64)
    out_x, out_xh = (torch.empty_like(w), torch.empty_like(w)) if out is None else out
    lower = torch.empty(rows, dtype=w.dtype, device=w.device) if return_bound else None
    direct = torch.zeros(rows, dtype=torch.bool, device=w.device)
    index = None  # every row (no copies), then the index of the rows still iterating

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t if index is None else t[index]
    low = torch.full((rows,), inv_low is not None, dtype=torch.bool, device=w.device)
    previous = asked = None
    use_f64 = False
    for round_ in range(settings.refinements + 1):
        while True:
            zi, wi, bi = pick(z), pick(w), pick(b)  # (each round's masks in the dtype it works in)
            if use_f64:  # near the target: x = (w - z H^-1) off P and the true kept residual, in float64
                sup_k64 = pick(support64)
                xi = torch.addmm(wi, zi, hinv, alpha=-1.0, out=buf.x.take(zi))
                s = torch.mul(xi, pick(removed64), out=buf.s.take(zi))
                xi.mul_(sup_k64)
                t = torch.addmm(bi, xi, h_damped, alpha=-1.0, out=buf.t.take(zi))  # b - x H
                norm = torch.mul(t, sup_k64, out=buf.s2.take(zi)).norm(dim=1)
                xnorm = xi.norm(dim=1)
            else:  # far from it, in float32: the kept residual is s H off P, and x H = b - z - s H
                z32 = buf.z32.take(zi, torch.float32).copy_(zi)
                y = torch.matmul(z32, inv32, out=buf.y32.take(z32))
                u = torch.sub(pick(w32), y, out=buf.u32.take(z32))  # w - z H^-1
                sup_k = pick(support)
                s = torch.mul(u, pick(removed), out=buf.s32.take(z32))
                sh = torch.matmul(s, h32, out=buf.sh32.take(z32))
                norm = torch.mul(sh, sup_k, out=z32).norm(dim=1).double()
                xnorm = u.mul_(sup_k).norm(dim=1).double()
            target = factor * xnorm if exact else pick(loose_target)
            if exact and not use_f64 and near_target(norm, target, settings):
                use_f64 = True
                continue
            break
        done = norm <= target
        if exact and not use_f64:
            done.fill_(False)
        at = _rows(index, rows, w.device)
        if bool(done.any()):  # the rows done: x, x H and the lower bound
            if use_f64:
                x_rows, xh_rows = xi, torch.sub(bi, t, out=t)
            else:  # x = (w - z H^-1) off P, x H = b - z - s H
                x_rows = buf.x.take(zi).copy_(y)
                torch.sub(wi, x_rows, out=x_rows).mul_(pick(support64))
                xh_rows = buf.t.take(zi).copy_(sh)
                torch.sub(bi, xh_rows, out=xh_rows).sub_(zi)
            low_rows = None if lower is None else work.c64.take(zi).copy_(s).add_(wi).mul_(zi).sum(1)
            if index is None and bool(done.all()):  # (writing alone: fresh pages fault once, not twice)
                out_x.copy_(x_rows)
                out_xh.copy_(xh_rows)
                if lower is not None:
                    lower.copy_(low_rows)
            elif index is None:  # in place: no gathered copies
                torch.where(done[:, None], x_rows, out_x, out=out_x)
                torch.where(done[:, None], xh_rows, out_xh, out=out_xh)
                if lower is not None:
                    torch.where(done, low_rows, lower, out=lower)
            else:
                rows_done = at[done]
                out_x[rows_done], out_xh[rows_done] = x_rows[done], xh_rows[done]
                if lower is not None:
                    lower[rows_done] = low_rows[done]
        if previous is not None:
            stalled = _stalled(~done, norm, previous, asked, low)
            if bool(stalled.any()):
                direct[at[stalled]] = True
                done |= stalled
        left = ~done & ~(norm != norm)  # a non-finite row goes to the direct solve
        direct[at[~done & ~left]] = True
        if not bool(left.any()):
            break
        if not bool(left.all()):
            index, s, norm, target, low = at[left], s[left], norm[left], target[left], low[left]
        if round_ == settings.refinements:
            direct[_rows(index, rows, w.device)] = True
            break
        previous = norm
        asked = _correct(z, index, s, buf.rhs, iscale32, pick(removed), low, inv_low, inv_hat, target, norm,
                         max_iter, work, settings)
        # float64 products from the round whose inner solves may bring a row near its target
        if exact and not use_f64 and near_target(norm * asked, target, settings):
            use_f64 = True
    return _finish(w, mask, b, h_damped, hinv, out_x, out_xh, direct, return_product, return_bound, work,
                   settings, lower)
