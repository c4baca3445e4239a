"""mrp, optimal multiple removal: the sweep, the exact solve and the swap rounds on every row of a weight, in
row chunks, after a swap trial (Zhao et al., "Pruning Foundation Models for High Accuracy without Retraining",
EMNLP 2024 Findings, Sec. 3; docs/mrp.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .layer_error import relative_error, relative_error_from_losses
from .least_squares import exact_solve, row_losses
from .linalg import eig_floor, inverse_upper
from .mrp_sweep import mrp_sweep
from .request import SolveRequest, SolveStats
from .settings import MRPSettings
from .swaps import swap_round
from .workspace import NO_REUSE, HessianCache, Workspace


@dataclass(frozen=True)
class DampedProblem:
    """What every row of one layer shares: the damped Hessian ``h``, its inverse, the inverse's upper
    Cholesky factor (all (in, in) float64), a verified floor on the smallest eigenvalue of ``h``, and the
    exact solve's tolerance for the weight's dtype."""

    h: torch.Tensor
    hinv: torch.Tensor
    upper: torch.Tensor
    floor: float
    tol: float


def solve_rows(w, problem: DampedProblem, request: SolveRequest, swap_rounds: int, work, settings: MRPSettings,
               sweep=None, solved=None):
    """mrp on some rows ``w`` (rows, in) float64 of a weight: the sweep, the exact solve and at most
    ``swap_rounds`` swap rounds. Returns (new rows, their mask, their damped losses
    ``(new - w) h (new - w)^T``, the sum of ``(w @ h) * w`` over them, how many rows took a swap,
    ``new @ h``). ``sweep``: the rows' (swept weights, mask) where the caller has them; ``solved``: the
    exact solution of that mask as this function returns it without swap rounds (the swap rounds then start
    from it instead of from a loose solve). Neither is modified. The new rows and their product live in
    ``work``'s buffers (``result_pair``), valid until its next solves."""
    h, hinv, floor, tol = problem.h, problem.hinv, problem.floor, problem.tol
    nm = request.nm
    if sweep is None:
        # in float32: the sweep only picks the mask and a starting point
        swept, mask = mrp_sweep(work.sweep_w32.take(w, torch.float32).copy_(w), problem.upper.float(),
                                request.sparsity, nm, request.blocksize, work.sweep_cg, settings)
    else:
        swept, mask = sweep[0], sweep[1].clone()  # (the swap rounds update their mask in place)
    wh = torch.matmul(w, h, out=work.wh.take(w))
    improved_rows = 0
    exact = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)  # rows holding their exact solution
    if swap_rounds and solved is not None:  # exact solutions: their losses are the optimal ones
        new, new_h, losses = solved[0].clone(), solved[5].clone(), solved[2].clone()
        lower = losses.clone()
        exact.fill_(True)
    elif swap_rounds:  # loose solutions, their losses, and lower bounds on their masks' optimal losses
        new, new_h, losses, lower = exact_solve(w, mask, h, hinv, start=swept, wh=wh, return_product=True,
                                                residual_tol=settings.swap_tol, work=work, return_bound=True,
                                                out=work.result_pair(w), settings=settings)
    else:
        new, new_h = exact_solve(w, mask, h, hinv, start=swept, wh=wh, return_product=True, eig_floor=floor,
                                 work=work, tol=tol, out=work.result_pair(w), settings=settings)
        losses = row_losses(w, new, wh, new_h, work)
    for round_ in range(swap_rounds):
        last = round_ == swap_rounds - 1  # the last round's re-solves are exact
        previous = float(losses.sum())
        mask, new, new_h, losses, lower, improved, now_exact = swap_round(
            w, wh, mask, new, new_h, losses, lower, h, hinv, None if nm is None else nm[1],
            floor if last else None, work, tol, settings)
        improved_rows += int(improved.sum())
        exact = (exact & ~improved) | now_exact  # a row that took a swap holds the candidate's solution
        if not bool(improved.any()) or float(losses.sum()) > previous * (1 - settings.swap_min_gain):
            break
    if swap_rounds:  # the final mask solved exactly, where the rounds left a loose solution
        if not bool(exact.any()):
            new, new_h = exact_solve(w, mask, h, hinv, start=new, wh=wh, return_product=True, eig_floor=floor,
                                     work=work, tol=tol, out=work.result_pair(w, (new, new_h)), settings=settings)
            losses = row_losses(w, new, wh, new_h, work)
        elif not bool(exact.all()):
            rest = (~exact).nonzero().flatten()
            new[rest], new_h[rest] = exact_solve(w[rest], mask[rest], h, hinv, start=new[rest], wh=wh[rest],
                                                 return_product=True, eig_floor=floor, work=work, tol=tol,
                                                 out=work.result_pair(w[rest], (new, new_h)), settings=settings)
            losses[rest] = row_losses(w[rest], new[rest], wh[rest], new_h[rest])
    return new, mask, losses, torch.dot(wh.flatten(), w.flatten()), improved_rows, new_h


def trial_rows(rows: int, count: int, device) -> torch.Tensor:
    """``count`` row indices spread evenly over ``rows`` (all of them when there are no more)."""
    if rows <= count:
        return torch.arange(rows, device=device)
    return torch.div(torch.arange(count, device=device) * rows, count, rounding_mode="floor")


def prune_mrp(weight: torch.Tensor, hessian: torch.Tensor, request: SolveRequest, stats: SolveStats,
              settings: MRPSettings, workspace: Optional[Workspace]):
    """The ``mrp`` solver of ``prune_linear`` (same contract): (new weight in weight's dtype, mask). Rows
    go through ``solve_rows`` in chunks of at most ``settings.chunk_elements`` elements, after a swap trial
    on ``settings.swap_trial_rows`` rows decides whether the layer gets its swap rounds (``stats``)."""
    workspace = Workspace() if workspace is None else workspace
    whole = workspace.weight_buffers(weight)
    w = weight.double() if weight.dtype == torch.float64 else whole.w.take(weight, torch.float64).copy_(weight)
    h, hinv, upper = inverse_upper(hessian, request.damp, stats, settings.max_pivot_ratio)
    # H = hessian + damping >= 0.9 x the smallest diagonal shift if hessian is PSD (verified)
    shift = torch.diag(h) - torch.diag(hessian).to(h.dtype)  # H_damped - H is diagonal
    problem = DampedProblem(h, hinv, upper, eig_floor(h, hinv, 0.9 * float(shift.min())),
                            settings.weight_tolerance(weight.dtype))
    cache = HessianCache()  # shared by the row chunks' buffers
    new, mask = whole.new.take(w), torch.empty(w.shape, dtype=torch.bool, device=w.device)
    loss = whw = 0.0

    def solve(index, rounds, sweep=None, solved=None):
        count = int(w.shape[0] if isinstance(index, slice) else index.numel())
        work = workspace.solve_buffers(count, w.shape[1], w.device, cache)
        rows = w if isinstance(index, slice) else torch.index_select(w, 0, index, out=work.rows.take(
            w[: index.numel()]))
        return solve_rows(rows, problem, request, rounds, work, settings, sweep, solved)

    def keep(index, result):
        nonlocal loss, whw
        new[index], mask[index] = result[0], result[1]
        loss, whw = loss + result[2].sum(), whw + result[3]
        stats.swap_rows_improved += result[4]

    rounds, rest = request.swap_rounds, torch.arange(w.shape[0], device=w.device)
    try:
        if request.swap_rounds and settings.swap_trial_rows:
            # the swap trial: rows spread over the weight, with and without swaps, in the undamped error
            trial = trial_rows(w.shape[0], settings.swap_trial_rows, w.device)
            sweep = mrp_sweep(w[trial].float(), upper.float(), request.sparsity, request.nm, request.blocksize,
                              NO_REUSE.sweep_cg, settings)  # shared by both variants
            # (copied: the second solve's scratch buffers take the first's place)
            results = {0: tuple(t.clone() if torch.is_tensor(t) else t for t in solve(trial, 0, sweep))}
            results[rounds] = solve(trial, rounds, sweep, results[0])  # from those exact solutions
            error = {r: float((res[2] - (res[0] - w[trial]).square().mul_(shift).sum(1)).sum())
                     for r, res in results.items()}
            if not error[rounds] < error[0]:
                stats.swaps_skipped = True
                stats.notes.append(f"swap rounds skipped: on {trial.numel()} of the rows they would raise the "
                                   f"undamped error by {error[rounds] / error[0] - 1:.2%}"
                                   if error[0] > 0 else "swap rounds skipped: they gain nothing on this layer")
                rounds = 0
            keep(trial, results[rounds])
            del results
            rest = rest[~torch.isin(rest, trial)]
        step = max(1, settings.chunk_elements // max(1, w.shape[1]))
        for begin in range(0, rest.numel(), step):
            part = rest[begin:begin + step]
            if rest.numel() == w.shape[0] and part.numel() == w.shape[0]:
                part = slice(None)  # every row: no gathering copy
            keep(part, solve(part, rounds))
    finally:
        workspace.release_hessian()
    result = new.to(weight.dtype, copy=True)  # (``new`` is a scratch buffer)
    if torch.finfo(weight.dtype).bits < 32:
        # half-precision weights: the error of what is returned, after rounding (one more product)
        stats.relative_error = relative_error(weight, result, hessian, settings.row_pass_elements)
    else:
        stats.relative_error = relative_error_from_losses(w, new, loss, whw, h, hessian,
                                                          elements=settings.row_pass_elements)
    return result, mask
