"""mrp's swap rounds: per row, exchange removed weights that would gain more than the cheapest kept ones
cost, and keep an exchange only where it certainly lowers the row's optimal loss (docs/mrp.md, "Swap
rounds"; an addition to Zhao et al., "Pruning Foundation Models for High Accuracy without Retraining",
EMNLP 2024 Findings, Sec. 3)."""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from .least_squares import exact_solve, row_losses
from .settings import MRPSettings
from .workspace import SolveBuffers


def swap_round(w, wh, mask, solution, solution_h, losses, lower, h_damped, hinv, group: Optional[int],
               eig_floor: Optional[float], work: SolveBuffers, tol: float, settings: MRPSettings):
    """One swap round over the rows of ``w`` (rows, in) with their ``mask`` and ``solution`` (its x, x H
    ``solution_h``, loss ``(x - w) H (x - w)^T`` ``losses`` and a lower bound ``lower`` on the mask's
    optimal loss), ``wh = w H``. Returns (mask, solution, solution H, losses, lower, taken, solved):
    ``taken`` is True for the rows that took their swap and ``solved`` for the rows that now hold their
    mask's exact solution. The inputs may be updated in place.

    Candidates exchange up to ``settings.swap_fraction`` of a row's removed weights (N:M: of its groups of
    ``group``, within a group). A row takes its candidate where the re-solved candidate's loss is below the
    current mask's lower bound. Re-solves stop at ``settings.swap_tol``, or, given ``eig_floor``, are exact
    (to ``tol``); then rows whose comparison is undecided have their current mask solved exactly and compare
    exactly, and every row that took its swap or was compared exactly holds its exact solution."""
    rows, cols = w.shape
    removed = int(mask[0].sum())
    taken = torch.zeros(rows, dtype=torch.bool, device=w.device)
    solved = torch.zeros(rows, dtype=torch.bool, device=w.device)
    # freeing a removed weight gains g_i^2 / H_ii (g: the gradient at the solution); removing a kept one
    # costs w_j^2 / [H^-1]_jj
    gain = torch.sub(solution_h, wh, out=work.r.take(wh)).square_().div_(torch.diag(h_damped)[None, :])
    gain.masked_fill_(~mask, -1.0)
    cost = torch.square(solution, out=work.r2.take(wh)).div_(torch.diag(hinv)[None, :])
    cost.masked_fill_(mask, float("inf"))
    rows_idx = torch.arange(rows, device=w.device)[:, None]
    if group is None:
        t = max(1, int(settings.swap_fraction * min(removed, cols - removed)))
        add = torch.topk(gain, t, dim=1).indices
        drop = torch.topk(cost, t, dim=1, largest=False).indices
        worth = gain.gather(1, add) > cost.gather(1, drop)
    else:
        groups = cols // group
        t = max(1, int(settings.swap_fraction * groups))
        best_gain, add_in = gain.view(rows, groups, group).max(-1)
        low_cost, drop_in = cost.view(rows, groups, group).min(-1)
        chosen = torch.topk(best_gain - low_cost, t, dim=1).indices
        worth = (best_gain - low_cost).gather(1, chosen) > 0
        add = chosen * group + add_in.gather(1, chosen)
        drop = chosen * group + drop_in.gather(1, chosen)
    del gain, cost
    if not bool(worth.any()):
        return mask, solution, solution_h, losses, lower, taken, solved
    candidate = mask.clone()
    rows_idx = rows_idx.expand(rows, add.shape[1])
    candidate[rows_idx[worth], add[worth]] = False
    candidate[rows_idx[worth], drop[worth]] = True
    changed = worth.any(1)
    # only rows with a swap need a new solve (no row copies when that is every row)
    index = None if bool(changed.all()) else changed.nonzero().flatten()

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t if index is None else t[index]

    w_c, wh_c = pick(w), pick(wh)
    # the start (the current solution, its dropped weights now removed) times H, without a dense product:
    # the current one less the dropped weights' share (a sparse product)
    entry_rows, entry_cols = rows_idx[worth], drop[worth]
    dropped = sparse_rows(entry_rows if index is None else torch.searchsorted(index, entry_rows), entry_cols,
                          solution[entry_rows, entry_cols], tuple(w_c.shape))
    start_h = torch.addmm(pick(solution_h), dropped, h_damped, alpha=-1.0, out=work.start_h.take(w_c))
    exact = eig_floor is not None
    out = work.result_pair(w_c, (solution, solution_h))
    if exact:
        trial, trial_h = exact_solve(w_c, pick(candidate), h_damped, hinv, start=pick(solution), wh=wh_c,
                                     return_product=True, eig_floor=eig_floor, work=work, tol=tol, out=out,
                                     start_h=start_h, settings=settings)
        trial_losses, trial_lower = row_losses(w_c, trial, wh_c, trial_h, work), None
    else:
        trial, trial_h, trial_losses, trial_lower = exact_solve(
            w_c, pick(candidate), h_damped, hinv, start=pick(solution), wh=wh_c, return_product=True,
            residual_tol=settings.swap_tol, work=work, return_bound=True, out=out, start_h=start_h,
            settings=settings)
    # certainly better: the candidate's loss is below any the current mask can reach
    improved = trial_losses < pick(lower)
    if exact:
        # undecided (the candidate beats the current solution but not its bound): solve the current mask
        # exactly and compare exactly; those rows then hold an exact solution whichever mask they keep
        unsure = (~improved & (trial_losses < pick(losses))).nonzero().flatten()
        if unsure.numel():
            at = unsure if index is None else index[unsure]
            current, current_h = exact_solve(w[at], mask[at], h_damped, hinv, start=solution[at], wh=wh[at],
                                             return_product=True, eig_floor=eig_floor, work=work, tol=tol,
                                             settings=settings)
            current_losses = row_losses(w[at], current, wh[at], current_h)
            solution[at], solution_h[at], losses[at], lower[at] = current, current_h, current_losses, current_losses
            improved[unsure] = trial_losses[unsure] < current_losses * (1 - 1e-9)
            solved[at] = True
    if index is None:  # the trial arrays become the result; the rows that refused get their old state back
        refused = (~improved).nonzero().flatten()
        if refused.numel():
            candidate[refused], trial[refused], trial_h[refused] = mask[refused], solution[refused], solution_h[refused]
            trial_losses[refused] = losses[refused]
            if trial_lower is not None:
                trial_lower[refused] = lower[refused]
        if exact:
            solved |= improved
        lower = lower if trial_lower is None else trial_lower
        return candidate, trial, trial_h, trial_losses, lower, improved, solved
    accepted = index[improved]
    mask[accepted] = candidate[accepted]
    solution[accepted] = trial[improved]
    solution_h[accepted] = trial_h[improved]
    losses[accepted] = trial_losses[improved]
    if trial_lower is not None:
        lower[accepted] = trial_lower[improved]
    taken[accepted] = True
    if exact:
        solved |= taken
    return mask, solution, solution_h, losses, lower, taken, solved


def sparse_rows(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """A sparse (CSR) matrix of ``shape`` with ``values`` at (``rows``, ``cols``), entries sorted by row
    (products with it cost its entries, not its size)."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=values.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    with warnings.catch_warnings():  # ("beta" support: the matrix product is all this needs)
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, values, size=shape)
