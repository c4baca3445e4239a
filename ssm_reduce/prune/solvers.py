"""Layer-wise pruning solvers: for y = W x with calibration inputs X and H = 2 X X^T, choose which
weights to remove and how to update the rest.

Methods (all give exactly the same number of removed weights in every row, or valid N:M groups):

* ``magnitude``: remove the smallest |w| of each row (or group).
* ``wanda``: remove the smallest |w_ij| * ||X_j||_2 of each row (or group) — Sun et al. 2023.
* ``sparsegpt``: Frantar & Alistarh 2023's column sweep: lazy blocks of 128 columns, damping 1% of the
  mean Hessian diagonal, OBS updates of the columns to the right. The masks are chosen per row inside
  each block (scores w^2 / [H^-1]_jj^2 of the updated weights) so that every row loses exactly its
  share (the original code picks one threshold per block, which lets rows end at different sparsity).
  In float32, as the original; its reported error comes from the sweep's summed OBS losses.
* ``mrp``: optimal multiple removal — Zhao et al., "Pruning Foundation Models for High Accuracy without
  Retraining" (EMNLP 2024 Findings). Weights are removed *jointly*, with the closed form
  ``dw = -w_P [(H^-1)_PP]^-1 (H^-1)_P,:`` (FACTS.md, "Pruning math"):

  1. mask selection in a SparseGPT-style sweep, in float32, over the damped inverse Hessian of the
     remaining columns: N:M — every group of M picks, per row, the least-loss of the C(M, N) candidate removal
     sets, ``loss(S) = 1/2 w_S [(H^-1)_SS]^-1 w_S^T``, and removes it jointly; unstructured — every block
     picks per row its share of lowest OBS saliencies ``w_j^2 / [H^-1]_jj`` and removes them jointly
     (the block's per-row systems solved by conjugate gradients to a relative residual of 1e-3: this
     step only chooses the mask and a starting point, step 2 makes the kept weights exact);
  2. the kept weights of every row are then set to the exact least-squares optimum on the kept support
     with the damped Hessian (``H_KK w'_K = (w H)_K``), solved for all rows at once from the sweep's
     weights by iterative refinement — float32 residuals while far from the target and float64 ones
     near it, Jacobi-preconditioned conjugate gradients for the corrections, their products in
     bfloat16 where that is fast (``LOW_PRECISION``; float32 for rows it cannot move), iterating in the
     kept weights (``H_KK``) or, where a Lanczos estimate finds that far better conditioned, in the
     removed ones (``(H^-1)_PP``; strongly correlated inputs make ``H_KK`` thousands of times worse
     conditioned) — until every row's kept weights are provably within a relative 5e-5
     (``WEIGHT_TOL``; for bfloat16 weights 4.9e-4, ``weight_tolerance``) of the exact optimum:
     ``|w' - w*| <= |residual| / lambda_min(H)``, with a floor on lambda_min verified from the damping
     by a shifted Cholesky factorisation (direct batched factorisation for any row that has not
     converged) — the sweep can never move kept weights left of the current block, this does;
  3. where it pays, swap rounds (``swap_rounds``, default 1): per row, removed weights whose freeing would gain more
     (g_i^2 / H_ii, g = gradient at the solution) than the cheapest kept weights cost to remove
     (w_j^2 / [H^-1]_jj) are swapped in (for N:M within the same group of M), the row is re-solved,
     and the swap is kept only where it certainly lowers the row's optimal (damped) loss. Rounds stop
     when one gains < 1%. The current masks are solved to a relative residual of 1e-2 (``SWAP_TOL``)
     and so are the candidates, except in the last round, whose candidates are solved exactly (as in
     step 2); the rows left without an exact solution are then solved exactly. A loose solution's loss
     is an upper bound on its mask's optimum, and a Lagrange-dual bound from the same solve a lower
     one (``_loss_lower_bound``; in the removed weights' iteration, at its iterate); a row takes its
     swap where the candidate's loss is below the current mask's lower bound, and in the last round a
     row whose comparison is undecided has its current mask solved exactly too and compares exactly.
     So no row ends worse than with its sweep's mask. The comparisons are in the damped loss, the
     objective every solve minimises: on layers where the damping dominates it (calibration inputs
     spanning few directions), a swap that lowers it can raise the undamped error that the report
     shows (by 1-8% on the bench's strongly correlated random layers; on the embedded model's layers
     swaps lowered that error in every case). So a trial decides per layer first: ``SWAP_TRIAL_ROWS``
     (32) rows spread over the weight, swept once, go through steps 2-3 with and without the swap
     rounds, and the rest of the layer gets the rounds only where they lowered those rows' summed
     undamped error (``SolveStats.swaps_skipped`` and a note say when they did not). The trial rows
     keep the variant chosen, so the trial costs the other variant on 32 rows. On the bench's 8 random
     and the embedded model's 12 layer/target cases, 32-row trials at 16 placements each all classified
     the layer as its whole-layer swap gain does; the closest were 1.6% below and 0.7% above even
     (``eval/swap_trial_check.py``).

  Given H, every step works row by row, so the rows of a big weight go through all three in chunks
  (``MRP_CHUNK_ELEMENTS``: about 20 float64 arrays of a chunk's size are alive at once), which bounds
  the memory; the only other difference is that the swap rounds' early stop is judged per chunk.

  Departures from the paper's text, as far as it is known (its code was never published): the exact
  re-solve of step 2 and the swap round of step 3 are ours; the paper's sweep keeps the weights it
  produces (so its joint removals must be exact, where ours need only pick the mask). Step 2 never
  increases the layer error for the chosen mask.
"""

from __future__ import annotations

import itertools
import math
import numbers
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

METHODS = ("magnitude", "wanda", "sparsegpt", "mrp")
_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
# The damped Hessian is refused (and the damping raised, as for a failed Cholesky factorisation) where the
# ratio of its Cholesky pivots — a lower bound on its condition number — exceeds this: the solves' float32
# factorisations and products could not refine such a system to their guarantee.
MAX_PIVOT_RATIO = 1e7
# The direct solve's float32-factored rows whose relative residual stays above this after refinement are
# solved again with float64 factorisations.
DIRECT_RESIDUAL = 1e-12
# Elements of one batched (rows x p x p) system solved at once by the exact re-solve.
SOLVE_CHUNK_ELEMENTS = 1 << 26
# The entries of a solve's scratch dict that belong to one Hessian (the rows of a layer share them).
HESSIAN_KEYS = ("operators", "removed_operators", "space")
# N:M patterns mrp accepts: it scores every one of the C(M, N) removal sets of each group (C(16, 8) = 12870).
MRP_MAX_CANDIDATES = 12870
# mrp prunes the rows of a weight in chunks of at most this many elements (rows x in_features): its
# solves hold about 20 float64 arrays of a chunk's size at once (~3 GB at this setting), and rows are
# independent given the Hessian, so chunking changes only the memory (and the swap rounds' early stop
# is judged per chunk). Each chunk repeats the sweep's column loop: on a CPU, chunks of 2^22 made a
# mamba2-2.7b out_proj, four chunks of 819 rows, 17-27% slower; its in_proj, seven chunks of 1638
# rows, ran within 6% of one piece.
MRP_CHUNK_ELEMENTS = 1 << 24
# The sweep's joint removals: relative residual and iteration cap of their float32 PCG solves.
SWEEP_TOL = 1e-3
SWEEP_MAX_ITER = 32
# Exact solve: the guaranteed relative error of every row's kept weights (a row's loss then exceeds its
# optimum by at most lambda_max(H) (WEIGHT_TOL |w*|)^2; for half-precision weights, which round far
# coarser, ``weight_tolerance`` loosens it),
# its refinement rounds, and the float32 inner solve's floor on relative tolerance.
WEIGHT_TOL = 5e-5
REFINEMENTS = 6
INNER_TOL = 1e-6
# The exact solve's residual products are float32 ones while every row's residual is above FAR_FROM_TARGET
# times its target (their rounding is then a small fraction of it), float64 from the first round that
# may bring a row near its target.
FAR_FROM_TARGET = 300.0
# Inner solves apply the Jacobi-scaled Hessian in this dtype where that is fast: "auto" (bfloat16 on CUDA
# devices of compute capability 8.0+, and on CPUs where a probe finds bfloat16 products faster than
# float32's), None (float32 everywhere) or a dtype. Their rounding (~4e-3) limits one inner solve to
# about LOW_TOL relative residual; the float32/float64 residuals of the outer refinement still decide
# every stopping test, so the guarantee is the same. A row whose low-precision round fails to cut its
# residual 10x (2x where it asked for less than 100x) continues in float32; a row whose float32 round
# fails to goes to the direct solve.
LOW_PRECISION = "auto"
LOW_TOL = 1e-2
# "auto" keeps float32 below this many input features: there the products are too small to gain.
LOW_MIN_FEATURES = 512
# The variables the exact solve iterates in: "kept" (H_KK), "removed" ((H^-1)_PP) or "auto" (per layer,
# whichever is much better conditioned; ``_solve_space``).
SOLVE_SPACE = "auto"
# Row chunks (in elements) of the passes over a whole weight that need float64 copies of it (errors and
# their damping terms, sparsegpt's denominator): small temporaries, no fresh pages for whole-weight arrays.
ROW_PASS_ELEMENTS = 1 << 20
# Swap rounds stop once a round lowers the layer's (damped) error by less than this fraction.
SWAP_MIN_GAIN = 0.01
# Swap rounds solve the current masks, and every round's candidates but the last's, to this relative
# residual, by float32 products (a row's loss is off by a second-order amount in it); the last round's
# candidates and the rows left with a loose solution are solved to the exact solve's tolerance.
SWAP_TOL = 1e-2
# Before its swap rounds, mrp solves this many rows spread over the weight with and without them, and
# skips them for the whole layer where they do not lower those rows' undamped error (0: no trial).
SWAP_TRIAL_ROWS = 32


@dataclass
class SolveStats:
    """What one ``prune_linear`` call did."""

    method: str
    sparsity: float  # fraction of weights removed
    relative_error: float  # ||WX - W'X||^2 / ||WX||^2 with the undamped Hessian
    seconds: float
    damp: float  # damping actually used, relative to the mean diagonal
    cholesky_retries: int = 0
    swap_rows_improved: int = 0
    swaps_skipped: bool = False  # mrp: the swap trial found that swaps would not lower the error
    notes: list = field(default_factory=list)


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4): keep N of every M consecutive input weights. ``ValueError`` if malformed."""
    match = _PATTERN.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(f"pattern must look like 'N:M' (for example '2:4' or '4:8'), got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r} must keep 0 < N < M weights of every M, got N={n}, M={m}")
    return n, m


def check_target(sparsity, pattern, method) -> Optional[tuple[int, int]]:
    """Validate the (sparsity, pattern, method) triple; returns the parsed pattern or None."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; choose one of {', '.join(map(repr, METHODS))}")
    if (sparsity is None) == (pattern is None):
        raise ValueError("set exactly one of sparsity (unstructured, e.g. 0.5) and pattern (N:M, e.g. '2:4')")
    if pattern is not None:
        n, m = parse_pattern(pattern)
        if method == "mrp" and math.comb(m, n) > MRP_MAX_CANDIDATES:
            raise ValueError(
                f"pattern {pattern!r}: mrp scores all C({m}, {n}) = {math.comb(m, n)} removal sets of every group "
                f"of {m}, more than the {MRP_MAX_CANDIDATES} it allows (every M <= 16 fits); use a smaller M or another method"
            )
        return n, m
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return None


def check_options(blocksize, damp) -> None:
    """Validate the sweeps' ``blocksize`` (an integer >= 1) and the damping ``damp`` (a finite number >= 0)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) or blocksize < 1:
        raise ValueError(f"blocksize must be an integer >= 1 (columns per lazy block), got {blocksize!r}")
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not 0.0 <= damp < math.inf:
        raise ValueError(f"damp must be a finite number >= 0 (a fraction of the Hessian's mean diagonal), got {damp!r}")


def weight_tolerance(dtype: torch.dtype) -> float:
    """The exact solve's guaranteed relative accuracy for weights stored in ``dtype``: ``WEIGHT_TOL``,
    or for half-precision weights a sixteenth of their epsilon (bfloat16: 4.9e-4, float16: 6.1e-5),
    whose rounding of the result (up to half an epsilon per weight) is far coarser."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(WEIGHT_TOL, eps / 16)


def check_swap_rounds(swap_rounds) -> None:
    if isinstance(swap_rounds, bool) or not isinstance(swap_rounds, int) or swap_rounds < 0:
        raise ValueError(f"swap_rounds must be an integer >= 0 (0 = no swap rounds), got {swap_rounds!r}")


def _row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    """(first, end) of row chunks of at most ``ROW_PASS_ELEMENTS`` elements (at least one row each)."""
    step = max(1, ROW_PASS_ELEMENTS // max(1, cols))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def _weighted_square_sum(w: torch.Tensor, h: torch.Tensor, minus: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The sum over rows of ``v H v^T`` with ``v = w`` (or ``w - minus``), in float64, row chunk by row
    chunk (``ROW_PASS_ELEMENTS``: no float64 copy of the whole weight)."""
    total = torch.zeros((), dtype=torch.float64, device=w.device)
    for r1, r2 in _row_chunks(*w.shape):
        rows = w[r1:r2].double()  # (a view where w is float64: not to be written)
        if minus is not None:
            rows = rows - minus[r1:r2].double()
        total += torch.dot((rows @ h).flatten(), rows.flatten())
    return total


def relative_error(original: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X - W' X||^2 / ||W X||^2 = tr(D H D^T) / tr(W H W^T) with D = W - W', in float64, a few rows
    at a time (``_weighted_square_sum``)."""
    h = hessian.double()
    num = _weighted_square_sum(original, h, minus=pruned)
    den = _weighted_square_sum(original, h)
    if not math.isfinite(float(num)) or not math.isfinite(float(den)):
        return math.nan
    return float(num / den) if float(den) > 0 else 0.0


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` lowest scores along the last dim (exact ties: any of the tied entries)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count > 0:
        mask.scatter_(-1, _lowest_indices(scores, count), True)
    return mask


def _lowest_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` lowest scores along the last dim, in no particular order (a partial
    selection: about 3x faster than a sort on a CPU)."""
    return torch.topk(scores, count, dim=-1, largest=False, sorted=False).indices


def removed_per_row(sparsity: float, cols: int) -> int:
    """floor(sparsity * cols), the weights each row loses, exact where the product rounds just below an
    integer (0.29 * 100 is 28.999999999999996 in floating point)."""
    return int(math.floor(sparsity * cols + 1e-9))


def _score_mask(scores: torch.Tensor, sparsity: Optional[float], nm: Optional[tuple[int, int]]) -> torch.Tensor:
    rows, cols = scores.shape
    if nm is None:
        return _lowest(scores, removed_per_row(sparsity, cols))
    n, m = nm
    return _lowest(scores.reshape(rows, cols // m, m), m - n).reshape(rows, cols)


def _damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    h = hessian.double().clone()
    diag = torch.diag(h)
    dead = diag == 0
    # inputs that never fire: any value works; the live inputs' mean keeps the matrix invertible without
    # changing its scale (so the damping, relative to the mean diagonal, means the same at any scale)
    live_mean = diag[~dead].mean() if bool((~dead).any()) else torch.ones((), dtype=h.dtype, device=h.device)
    h[dead, dead] = live_mean
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    return h


class _IllConditioned(torch.linalg.LinAlgError):
    """A damped Hessian that factors, but too ill-conditioned for the solves (``MAX_PIVOT_RATIO``)."""


def _inverse_upper(hessian: torch.Tensor, damp: float, stats: SolveStats):
    """(damped H, H^-1, upper Cholesky factor U of H^-1), retrying with 10x damping on failure (from 0:
    with 1e-3)."""
    for attempt in range(6):
        h = _damped(hessian, damp)
        try:
            chol = torch.linalg.cholesky(h)
            pivots = torch.diagonal(chol).square()
            if float(pivots.max()) > MAX_PIVOT_RATIO * float(pivots.min()):
                # condition number at least this ratio: beyond what the float32 steps of the solves can
                # refine (only a tiny damping gets here; the default keeps it below 100 x in_features + 1)
                raise _IllConditioned(f"condition number above {MAX_PIVOT_RATIO:g}")
            hinv = torch.cholesky_inverse(chol)
            upper = torch.linalg.cholesky(hinv, upper=True)
            stats.damp = damp
            return h, hinv, upper
        except torch.linalg.LinAlgError as err:
            stats.cholesky_retries += 1
            more = damp * 10 if damp > 0 else 1e-3
            why = str(err) if isinstance(err, _IllConditioned) else "Cholesky failed"
            stats.notes.append(f"{why} with damp={damp:g}; retrying with damp={more:g}")
            damp = more
    raise RuntimeError(f"the Hessian is not positive definite even with damp={damp:g}")


def _block_counts(sparsity: float, cols: int, blocksize: int) -> list[int]:
    """Weights each row removes per block, summing exactly to floor(sparsity * cols)."""
    total = removed_per_row(sparsity, cols)
    edges = list(range(0, cols, blocksize)) + [cols]
    cum = [round(total * e / cols) for e in edges]
    return [b - a for a, b in zip(cum[:-1], cum[1:])]


def _sparsegpt(w, upper, sparsity, nm, blocksize):
    """The column sweep; returns (new weights, mask, loss), ``loss`` being the sum over rows of the damped
    ``(w' - w) H (w' - w)^T``: the sum of the squared OBS errors (exact, in exact arithmetic, for the
    sequential removals; within ~1e-6 in float32)."""
    rows, cols = w.shape
    mask = torch.zeros_like(w, dtype=torch.bool)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    if nm is not None:  # whole groups of M in every block
        blocksize = max(nm[1], (blocksize // nm[1]) * nm[1])
    counts = _block_counts(sparsity, cols, blocksize) if nm is None else None
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        d = torch.diag(u1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:
            mask1 = _lowest(w1**2 / d[None, :] ** 2, counts[b])
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                mask1[:, group] = _lowest(w1[:, group] ** 2 / d[None, group] ** 2, nm[1] - nm[0])
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


def _gather_square(matrix: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``matrix[idx_n][:, idx_n]`` for every row n of ``idx`` (rows x r) -> (rows, r, r)."""
    return matrix[idx[:, :, None], idx[:, None, :]]  # one pass: no (rows, r, in) intermediate


def _remove_jointly(w1, u1, gram, remove_idx, work: Optional[dict] = None):
    """Jointly remove, in every row, the columns ``remove_idx`` (rows x r) of the block ``w1`` with the
    optimal multiple-removal update; returns the per-row error vectors e (rows x B) such that the
    update of any column c right of the block start is ``-e @ U[block, c]``. ``gram = U^T U`` of the
    block's upper factor is the remaining problem's inverse Hessian, shared by all rows.

    The per-row systems ``[(H_rem^-1)_SS] z = w_S`` are solved approximately — float32 Jacobi-PCG for all
    rows at once, one (rows x B)(B x B) product per iteration, to a relative residual of ``SWEEP_TOL``
    (at most ``SWEEP_MAX_ITER`` iterations). The sweep only chooses the mask and warm-starts the exact
    solve, which sets the kept weights to the exact optimum of the final mask whatever the sweep left;
    batched per-row factorisations cost several times more and changed no layer's error measurably.
    ``work``: scratch buffers for the solves (``_scratch``)."""
    rows, width = w1.shape
    removed = torch.zeros(rows, width, dtype=torch.bool, device=w1.device).scatter_(1, remove_idx, True)
    gram_hat, scale = _jacobi_scaled(gram)
    rhs = torch.where(removed, w1.float() * scale, 0.0)
    z = _pcg32(rhs, removed.float(), gram_hat, SWEEP_TOL, min(SWEEP_MAX_ITER, remove_idx.shape[1]), work).mul_(scale)
    return z.to(u1.dtype) @ u1.T  # e_n = U[:, S_n] z_n (z is zero off S_n)


def _mrp_sweep(w, upper, sparsity, nm, blocksize, work: Optional[dict] = None):
    """Mask selection by joint optimal removal (see module docstring, step 1); returns the swept
    weights (a warm start for the exact solve) and the mask. ``w`` is updated in place; ``work``: a dict
    for the joint removals' scratch buffers (``_scratch``; their shapes differ from the exact solve's)."""
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
    counts = _block_counts(sparsity, cols, blocksize) if nm is None else None
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
                idx = _lowest_indices(w1**2 / torch.diag(gram)[None, :], k)
                e = _remove_jointly(w1, u1, gram, idx, work)
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


def exact_solve(
    weight: torch.Tensor,
    mask: torch.Tensor,
    h_damped: torch.Tensor,
    hinv: torch.Tensor,
    start: Optional[torch.Tensor] = None,
    tol: float = WEIGHT_TOL,
    max_iter: Optional[int] = None,
    wh: Optional[torch.Tensor] = None,
    return_product: bool = False,
    residual_tol: Optional[float] = None,
    eig_floor: Optional[float] = None,
    work: Optional[dict] = None,
    return_bound: bool = False,
    out: Optional[tuple] = None,
    start_h: Optional[torch.Tensor] = None,
):
    """Per row, the exact least-squares optimum on the kept support: the w' with w'_P = 0 minimising
    (w' - w) H (w' - w)^T (H damped), i.e. ``H_KK w'_K = (w H)_K``.

    All rows are solved together by mixed-precision iterative refinement: the residual
    ``r_K = (w H)_K - (w' H)_K`` is computed in float32 while every row is far from its target
    (``FAR_FROM_TARGET``) and in float64 from then on, and the correction is solved by
    Jacobi-preconditioned conjugate gradients (one dense product per iteration, all rows at once; the
    product in bfloat16 where that is fast, ``LOW_PRECISION``, else float32), until every row is within
    ``tol`` of its optimum, relative: ``|w'_K - w*_K| <= tol |w*_K|``, by a float64 residual.
    That is guaranteed, not estimated: ``|w'_K - w*_K| <= |r_K| / lambda_min(H_KK)`` and
    ``lambda_min(H_KK) >= lambda_min(H) >= eig_floor`` (eigenvalue interlacing); ``eig_floor`` defaults
    to ``1 / max_i sum_j |H^-1_ij|``, and ``prune_linear`` passes a tighter floor it has verified from
    the damping (``_eig_floor``). With ``residual_tol`` the rows stop instead at a relative residual
    ``|r_K| / |(w H)_K|`` below it, by float32 products (the swap rounds' cheap comparisons).

    Rows not converged after ``REFINEMENTS`` rounds of at most ``max_iter`` iterations (default
    in_features / 16, about the cost of one direct solve), or whose float32 round stalled, are solved
    directly (float64-refined batched factorisations). ``wh`` may pass ``weight @ h_damped`` (float64)
    when the caller has it; with ``return_product`` the result is ``(x, x @ h_damped)``, the product
    being the one the final residual check computed (float32 ones with ``residual_tol``); with
    ``return_bound`` too, ``(x, x @ h_damped, losses, lower)``: per row the loss of x,
    ``(x - w) H (x - w)^T``, an upper bound on the optimum's, and a lower bound on that (the swap rounds
    decide through both): ``_loss_lower_bound``, or where the iteration ran in the removed weights, the
    Lagrange dual at its iterate (``_solve_removed``). ``work``: a dict of scratch buffers to reuse
    across calls (``_scratch``). ``out``: two float64 arrays of the weight's shape to hold x and x H
    (returned; neither may be ``start``), else new ones. ``start_h``: the start's product with H after
    it is masked (``(start * ~mask) @ h_damped``, to float32 accuracy at least) where the caller has it,
    for the first residual.
    """
    w = weight.double()
    rows = w.shape[0]
    keep = ~mask
    if max_iter is None:
        max_iter = max(8, w.shape[1] // 16)
    # few big temporaries: on a CPU, fresh pages for them can cost as much as the arithmetic (and an
    # elementwise operation on two dtypes makes a converted copy of one: the masks come in both)
    start = w if start is None else start
    b = w @ h_damped if wh is None else wh  # (w H)_K is b off the mask; r is masked, so b need not be
    exact = residual_tol is None
    if exact:
        floor = eig_floor if eig_floor is not None else _eig_floor(h_damped, hinv)
        # |x - x*| <= beta |x| with beta = |r| / (floor |x|) gives |x - x*| <= beta / (1 - beta) |x*|
        factor = floor * tol / (1.0 + tol)
    # masking by a product: several times faster on a CPU than by a bool mask
    support = _scratch(work, "support32", w, torch.float32).copy_(keep)
    support64 = _scratch(work, "support64", w).copy_(keep)
    if not exact:
        scale = torch.mul(b, support64, out=_scratch(work, "r", b)).norm(dim=1)
    h_hat, scale32, h_low, h32 = _operators(h_damped, work)
    if _solve_space(h_hat, hinv, mask, work) == "removed":
        return _solve_removed(w, mask, h_damped, hinv, start, b, factor if exact else None,
                              None if exact else residual_tol * scale, max_iter, return_product, work,
                              return_bound, support, support64, out, start_h)
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
                return torch.sub(b, torch.matmul(x, h_damped, out=xh), out=_scratch(work, "r", b)).mul_(support64)
            product = rows_x @ h_damped
            xh[index] = product
            return torch.sub(b[index], product, out=product).mul_(support64[index])
        if start_h is not None and index is None:  # the start's product, from the caller
            product, start_h = _scratch(work, "xh32", rows_x, torch.float32).copy_(start_h), None
        else:
            x32 = _scratch(work, "x32", rows_x, torch.float32).copy_(rows_x)
            product = torch.matmul(x32, h32, out=_scratch(work, "xh32", rows_x, torch.float32))
        if not exact:
            if index is None:
                xh.copy_(product)
            else:
                xh[index] = product.double()
        b_rows = b32 if index is None else b32[index]
        return torch.sub(b_rows, product, out=_scratch(work, "r32", product)).mul_(
            support if index is None else support[index])

    b32 = _scratch(work, "b32", b, torch.float32).copy_(b)
    xh = torch.empty_like(x) if out is None else out[1]
    direct = torch.zeros(rows, dtype=torch.bool, device=w.device)  # rows left to the direct solve
    # per row still iterating (aligned with ``index``): inner products in bfloat16, and the residual
    # norm and inner tolerance of the last round
    low = torch.full((rows,), h_low is not None, dtype=torch.bool, device=w.device)
    previous = asked = None
    index = None  # every row (no copies), then the index of the rows still iterating
    for round_ in range(REFINEMENTS + 1):
        while True:
            r = residual()
            target = factor * (x if index is None else x[index]).norm(dim=1) if exact else (
                residual_tol * (scale if index is None else scale[index]))
            norm = r.norm(dim=1).double()
            # float32 residuals cannot confirm (or aim at) an exact target: near it, recompute in float64
            if exact and not use_f64 and _near_target(norm, target):
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
        if round_ == REFINEMENTS:
            direct[_rows(index, rows, w.device)] = True
            break
        # ask each row for what it still needs, within what its inner products' precision reaches
        previous = norm
        asked = torch.maximum(target / norm, torch.where(low, LOW_TOL, INNER_TOL).double())
        asked32 = asked.float()
        r32 = _scratch(work, "r32", r, torch.float32).copy_(r).mul_(scale32)
        sup = support if index is None else support[index]
        correction = _pcg_by_precision(r32, sup, low, h_low, h_hat, asked32, max_iter, work)
        correction.mul_(scale32)
        if index is None:
            x.add_(_scratch(work, "c64", x).copy_(correction))
        else:
            x[index] += correction.double()
        # float64 products from the round whose inner solves may bring a row near its target
        if exact and not use_f64 and _near_target(norm * asked, target):
            use_f64 = True
    return _finish(w, mask, b, h_damped, hinv, x, xh, direct, return_product, return_bound, work)


def _finish(w, mask, b, h_damped, hinv, x, xh, direct, return_product, return_bound, work, lower=None):
    """The end of both iterations: the rows in ``direct`` (CG did not bring them to the target) solved
    directly, their products in float64 (also in loose solves: a few rows, exact ones), and the result
    in the shape asked: x, (x, x H) or (x, x H, losses, lower). ``lower``: the bounds the iteration
    computed (the removed weights' dual), else ``_loss_lower_bound``'s, which rows solved directly get
    in any case."""
    todo = direct.nonzero().flatten()
    if todo.numel():
        x[todo] = _direct_solve(w[todo], mask[todo], h_damped, hinv)
        xh[todo] = x[todo] @ h_damped
    if not return_bound:
        return (x, xh) if return_product else x
    losses = _row_losses(w, x, b, xh, work)
    if lower is None:
        lower = _loss_lower_bound(losses, b, xh, mask, hinv, work)
    elif todo.numel():
        lower[todo] = _loss_lower_bound(losses[todo], b[todo], xh[todo], mask[todo], hinv, work)
    return x, xh, losses, lower


def _near_target(norm: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether any row's residual ``norm`` (or the one a round that cuts it by ``asked`` may leave,
    ``norm * asked``) is within ``FAR_FROM_TARGET`` of its exact ``target``: from then on both iterations
    compute their residual products in float64."""
    return bool((norm <= FAR_FROM_TARGET * target).any())


def _loss_lower_bound(losses: torch.Tensor, wh: torch.Tensor, xh: torch.Tensor, mask: torch.Tensor,
                      hinv: torch.Tensor, work: Optional[dict] = None) -> torch.Tensor:
    """Per row, a lower bound on the optimal loss of the mask, ``min over w' with w'_P = 0 of
    (w' - w) H (w' - w)^T``, from any x on the kept support with loss ``losses`` and product ``xh = x H``
    (``wh = w H``): ``losses - r H^-1 r^T`` with r the kept residual ``(w H - x H)_K``. The loss of x
    exceeds the optimum by exactly ``r_K (H_KK)^-1 r_K^T``, and ``(H_KK)^-1 <= (H^-1)_KK`` (their
    difference is ``(H^-1)_KP [(H^-1)_PP]^-1 (H^-1)_PK``); the bound is also the Lagrange dual's value at
    ``z = ((w - x) H)_P``. Its gap closes quadratically with the residual. The product with H^-1 is a
    float32 one: it scales a small correction. ``work``: scratch buffers."""
    r = torch.sub(wh, xh, out=_scratch(work, "lb_r", wh)).masked_fill_(mask, 0.0)
    r32 = _scratch(work, "lb_r32", r, torch.float32).copy_(r)
    rh = torch.matmul(r32, _removed_operators(hinv, work)[3], out=_scratch(work, "lb_rh32", r32))
    # (summed in float32, cascaded: a float64 sum would first convert the whole array)
    return losses - rh.mul_(r32).sum(1).double()


def _solve_space(h_hat: torch.Tensor, hinv: torch.Tensor, mask: torch.Tensor, work: Optional[dict]) -> str:
    """Which variables ``exact_solve`` iterates in (``SOLVE_SPACE``): "kept" — conjugate gradients on
    ``H_KK`` — or "removed" — on ``(H^-1)_PP`` (``_solve_removed``). Both are Jacobi-preconditioned; "auto"
    estimates both condition numbers on a few rows' masks by Lanczos and takes "removed" where it is
    under a quarter of "kept"'s (each of its rounds costs one more product). On well-spread inputs the two
    are alike; where input features are strongly correlated, ``H_KK`` can be thousands of times worse
    conditioned than ``(H^-1)_PP`` (the removed weights are the ones the kept ones explain). Decided once
    per ``prune_linear`` call (cached in ``work``)."""
    if SOLVE_SPACE != "auto":
        return SOLVE_SPACE
    key = "space"
    if work is not None and key in work and work[key][0] is hinv:
        return work[key][1]
    rows = mask.shape[0]
    removed = int(mask[0].sum()) if rows else 0
    space = "kept"
    if 0 < removed < mask.shape[1] and rows:
        pick = torch.linspace(0, rows - 1, min(rows, 16), device=mask.device).long()
        sample = mask[pick]
        inv_hat, _, _, _ = _removed_operators(hinv, work)
        kept_kappa = _kappa_estimate(h_hat, (~sample).float())
        removed_kappa = _kappa_estimate(inv_hat, sample.float())
        if kept_kappa > 4.0 * removed_kappa:
            space = "removed"
    if work is not None:
        work[key] = (hinv, space)
    return space


def _kappa_estimate(a_hat: torch.Tensor, support: torch.Tensor, steps: int = 24) -> float:
    """Median over rows of the condition number of ``A_KK`` (K: each row's ``support``) estimated from the
    Ritz values of ``steps`` Lanczos steps (float32, no reorthogonalisation: the extreme Ritz values
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


def _removed_operators(hinv: torch.Tensor, work: Optional[dict]):
    """``_operators`` for H^-1 (the removed-weights iteration's matrix), cached under its own key."""
    return _operators(hinv, work, key="removed_operators")


def _solve_removed(w, mask, h_damped, hinv, start, b, factor, loose_target, max_iter, return_product, work,
                   return_bound, support, support64, out=None, start_h=None):
    """``exact_solve`` in the removed weights' variables. The optimum is ``x* = w - z* H^-1`` with
    ``(H^-1)_PP z*_P = w_P`` (z zero off P); for any z, ``x = w - z H^-1`` off P (zero on P) has the kept
    residual ``r_K = (b - x H)_K = (s H)_K`` with ``s = w_P - (z H^-1)_P`` the removed residual (up to the
    rounding of H^-1 H = I). While every row is far from its target, each round computes ``z H^-1`` and
    the kept residual estimate ``(s H)_K`` by float32 products; from the round that may bring a row near
    it, ``z H^-1`` and the true kept residual ``(b - x H)_K`` by float64 ones — exact rows stop only on
    that, ``|r_K| <= factor |x|``: the same guarantee as ``exact_solve``'s. Loose rows (``loose_target``:
    per-row residual norms) stop on the float32 estimate. The correction cuts s by Jacobi-preconditioned
    conjugate gradients on ``(H^-1)_PP`` by what the kept residual still needs (bfloat16 products where
    that is fast, as in ``exact_solve``). A row that stalls is solved directly.

    ``return_bound``: also, per row, the Lagrange dual of the optimal loss at the iterate z, a lower
    bound on it that costs no product: ``2 z w^T - (z H^-1)_P z^T = z (w + s)^T``. Its gap is
    ``s [(H^-1)_PP]^-1 s^T``, small where this iteration is used; ``_loss_lower_bound``'s, through
    ``H_KK``, is not (rows solved directly get that one, from float64 products)."""
    rows = w.shape[0]
    exact = factor is not None
    # the masks in both dtypes (``support``: the kept ones, float32 and float64, from the caller)
    removed = _scratch(work, "removed32", w, torch.float32).copy_(mask)
    removed64 = _scratch(work, "removed64", w).copy_(mask)
    inv_hat, iscale32, inv_low, inv32 = _removed_operators(hinv, work)
    h32 = _operators(h_damped, work)[3]
    w32 = _scratch(work, "rm_w32", w, torch.float32).copy_(w)
    # start from x (the start, off P): z = (b - x H)_P (exact when x is the optimum)
    if start_h is None:
        x32 = _scratch(work, "rm_u32", w, torch.float32).copy_(start).mul_(support)
        z = _scratch(work, "rm_zstate", b).copy_(torch.matmul(x32, h32, out=_scratch(work, "rm_sh32", x32)))
    else:  # (the caller's product of the start)
        z = _scratch(work, "rm_zstate", b).copy_(start_h)
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
    for round_ in range(REFINEMENTS + 1):
        while True:
            zi, wi, bi = pick(z), pick(w), pick(b)  # (each round's masks in the dtype it works in)
            # (into scratch buffers: on a CPU, fresh pages for big temporaries cost more than the arithmetic,
            # and each pass over a float64 array about as much as a low-precision product's share)
            if use_f64:  # near the target: x = (w - z H^-1) off P and the true kept residual, in float64
                sup_k64 = pick(support64)
                xi = torch.addmm(wi, zi, hinv, alpha=-1.0, out=_scratch(work, "rm_x", zi))
                s = torch.mul(xi, pick(removed64), out=_scratch(work, "rm_s", zi))
                xi.mul_(sup_k64)
                t = torch.addmm(bi, xi, h_damped, alpha=-1.0, out=_scratch(work, "rm_t", zi))  # b - x H
                norm = torch.mul(t, sup_k64, out=_scratch(work, "rm_s2", zi)).norm(dim=1)
                xnorm = xi.norm(dim=1)
            else:  # far from it, in float32: the kept residual is s H off P, and x H = b - z - s H
                z32 = _scratch(work, "rm_z32", zi, torch.float32).copy_(zi)
                y = torch.matmul(z32, inv32, out=_scratch(work, "rm_y32", z32))
                u = torch.sub(pick(w32), y, out=_scratch(work, "rm_u32", z32))  # w - z H^-1
                sup_k = pick(support)
                s = torch.mul(u, pick(removed), out=_scratch(work, "rm_s32", z32))
                sh = torch.matmul(s, h32, out=_scratch(work, "rm_sh32", z32))
                norm = torch.mul(sh, sup_k, out=z32).norm(dim=1).double()
                xnorm = u.mul_(sup_k).norm(dim=1).double()
            target = factor * xnorm if exact else pick(loose_target)
            if exact and not use_f64 and _near_target(norm, target):
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
                x_rows = _scratch(work, "rm_x", zi).copy_(y)
                torch.sub(wi, x_rows, out=x_rows).mul_(pick(support64))
                xh_rows = _scratch(work, "rm_t", zi).copy_(sh)
                torch.sub(bi, xh_rows, out=xh_rows).sub_(zi)
            low_rows = None if lower is None else _scratch(work, "c64", zi).copy_(s).add_(wi).mul_(zi).sum(1)
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
        if round_ == REFINEMENTS:
            direct[_rows(index, rows, w.device)] = True
            break
        previous = norm
        asked = torch.maximum(target / norm, torch.where(low, LOW_TOL, INNER_TOL).double())
        rhs = _scratch(work, "rm_rhs", s, torch.float32).copy_(s).mul_(iscale32)
        correction = _pcg_by_precision(rhs, pick(removed), low, inv_low, inv_hat, asked.float(), max_iter, work)
        correction.mul_(iscale32)
        if index is None:
            z.add_(_scratch(work, "c64", z).copy_(correction))
        else:
            z[index] += correction.double()
        # float64 products from the round whose inner solves may bring a row near its target
        if exact and not use_f64 and _near_target(norm * asked, target):
            use_f64 = True
    return _finish(w, mask, b, h_damped, hinv, out_x, out_xh, direct, return_product, return_bound, work, lower)


def _operators(h_damped: torch.Tensor, work: Optional[dict], key: str = "operators"):
    """(Jacobi-scaled float32 H, its float32 row scale, the scaled H in the low precision or None, H in
    float32), cached in ``work[key]`` for the solves of one ``prune_linear`` call (which drops it)."""
    if work is not None and key in work and work[key][0] is h_damped:
        return work[key][1]
    h32 = h_damped.float()
    h_hat, scale32 = _jacobi_scaled(h_damped, h32)
    auto_small = LOW_PRECISION == "auto" and h_damped.shape[0] < LOW_MIN_FEATURES
    dtype = None if auto_small else _low_dtype(h_damped.device)
    ops = (h_hat, scale32, None if dtype is None else h_hat.to(dtype), h32)
    if work is not None:
        work[key] = (h_damped, ops)
    return ops


_LOW_FAST: dict = {}


def _low_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype of the inner solves' products on ``device`` (``LOW_PRECISION``), or None for float32."""
    if LOW_PRECISION is None or isinstance(LOW_PRECISION, torch.dtype):
        return LOW_PRECISION
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else None
    if device.type != "cpu":
        return None
    key = torch.get_num_threads()
    if key not in _LOW_FAST:
        _LOW_FAST[key] = _bfloat16_is_faster()
    return torch.bfloat16 if _LOW_FAST[key] else None


def _bfloat16_is_faster() -> bool:
    """Whether this CPU multiplies bfloat16 matrices clearly faster than float32 ones (native bfloat16
    instructions make it about 2x faster; without them a low-precision product can be far slower)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(512, 512, generator=gen)
    p = torch.randn(256, 512, generator=gen)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        aa, pp = a.to(dtype), p.to(dtype)
        torch.matmul(pp, aa)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            torch.matmul(pp, aa)
            times.append(time.perf_counter() - t0)
            if dtype is torch.bfloat16 and times[-1] > 4 * best[torch.float32]:
                break  # slow: emulated
        best[dtype] = min(times)
    return best[torch.bfloat16] < 0.75 * best[torch.float32]


def _eig_floor(h_damped: torch.Tensor, hinv: torch.Tensor, guess: Optional[float] = None) -> float:
    """A verified lower bound on the smallest eigenvalue of ``h_damped``: ``guess`` if ``h_damped - guess I``
    has a Cholesky factor (backward stability makes that a proof, up to a relative 1e-12 we take off),
    else ``1 / |H^-1|_inf`` (the largest eigenvalue of H^-1 is at most any induced norm of it)."""
    bound = 1.0 / float(hinv.abs().sum(1).max())
    if guess is not None and guess > bound:
        shifted = h_damped - guess * torch.eye(h_damped.shape[0], dtype=h_damped.dtype, device=h_damped.device)
        if int(torch.linalg.cholesky_ex(shifted).info) == 0:
            return max(bound, guess - 1e-12 * float(torch.diag(h_damped).abs().max()) * h_damped.shape[0])
    return bound


def _scratch(work: Optional[dict], name: str, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A scratch buffer ``work[name]`` with the shape and device of ``like`` (and ``dtype``, default
    its), reused across calls: the first rows of the one kept there when it has at least as many (the
    rows still iterating), a new one when ``work`` is None or holds none that fits. Reuse spares a CPU
    the page faults of fresh big buffers (which an elementwise operation on two dtypes also makes, for
    its converted copy of one operand: the solves keep their masks in both dtypes instead)."""
    dtype = like.dtype if dtype is None else dtype
    buffer = None if work is None else work.get(name)
    if (buffer is not None and buffer.dtype == dtype and buffer.device == like.device
            and buffer.dim() == like.dim() and buffer.shape[1:] == like.shape[1:]
            and like.dim() > 0 and buffer.shape[0] >= like.shape[0]):
        return buffer[: like.shape[0]]  # fewer rows (the rows still iterating): the first ones, contiguous
    buffer = torch.empty(like.shape, dtype=dtype, device=like.device)
    if work is not None:
        work[name] = buffer
    return buffer


def _result_buffers(work: Optional[dict], like: torch.Tensor, avoid=()) -> Optional[tuple]:
    """``exact_solve``'s ``out``: two float64 arrays shaped like ``like`` for its x and x H, from one of
    two pairs of scratch buffers in ``work`` (the one holding none of the arrays in ``avoid``, which
    the caller still needs), or None (new arrays) without ``work``. The swap rounds alternate between
    the pairs, so a solve's result is overwritten two solves later at the earliest."""
    if work is None:
        return None
    held = {t.untyped_storage().data_ptr() for t in avoid if t is not None}
    for name in ("result_a", "result_b"):
        pair = (_scratch(work, name + "_x", like, torch.float64), _scratch(work, name + "_xh", like, torch.float64))
        if not any(t.untyped_storage().data_ptr() in held for t in pair):
            return pair
    return None


def _rows(index: Optional[torch.Tensor], rows: int, device) -> torch.Tensor:
    """The row indices ``index`` stands for (None: all ``rows``)."""
    return torch.arange(rows, device=device) if index is None else index


def _pcg32(b, support, a_hat, rel_tol, max_iter, work: Optional[dict] = None):
    """Conjugate gradients for ``A_KK y = b_K`` on every row from y = 0, in float32, each row with its own
    support K (``support``: 1.0 on it, 0.0 off it, float32), until each row's residual norm is below
    ``rel_tol`` times its right-hand side's, or ``max_iter``. ``a_hat`` is the Jacobi-scaled operator
    ``D^-1/2 A D^-1/2`` (unit diagonal) shared by all rows, so this is Jacobi-preconditioned CG in scaled
    variables: the caller scales ``b`` by ``D^-1/2`` going in and ``y`` going out. A bfloat16 ``a_hat``
    is applied in bfloat16 (the vectors stay float32; the rounding limits the attainable relative
    residual to about 1e-2, which the caller's refinement accounts for). ``b`` must be zero
    off the support and is overwritten (it becomes the residual); ``y`` may be a buffer of ``work``
    (``_scratch``), valid until the next call with the same ``work``.

    No big buffer is allocated inside the loop (on a CPU, fresh pages cost more than the arithmetic); row
    dot products are a product then a sum (faster there than ``vecdot``), squared norms a ``vector_norm``
    (one pass, no product written), and a low-precision product is masked before it is converted."""
    y = _scratch(work, "cg_y", b).zero_()
    r = b  # overwritten: callers pass a temporary
    p = _scratch(work, "cg_p", b).copy_(r)
    hp, tmp = _scratch(work, "cg_hp", b), _scratch(work, "cg_tmp", b)
    low = a_hat.dtype != torch.float32
    if low:
        p_low, hp_low = _scratch(work, "cg_p_low", b, a_hat.dtype), _scratch(work, "cg_hp_low", b, a_hat.dtype)
        support_low = _scratch(work, "cg_support_low", b, a_hat.dtype).copy_(support)  # (0 and 1: exact)

    def dot(u, v):
        return torch.mul(u, v, out=tmp).sum(1)

    def squared_norm(u):
        return torch.linalg.vector_norm(u, dim=1).square_()

    rr = squared_norm(r)
    target = rr * rel_tol**2
    for _ in range(max_iter):
        if bool((rr <= target).all()):
            break
        # masked: keeps r, and so p, on the support
        if low:
            hp.copy_(torch.matmul(p_low.copy_(p), a_hat, out=hp_low).mul_(support_low))
        else:
            torch.matmul(p, a_hat, out=hp).mul_(support)
        curvature = dot(p, hp)
        # a row whose operator float32 sees as not positive definite (p A p <= 0, or not finite) stops
        # for good where it is (rr = 0 from then on); the caller's float64 check or direct solve takes over
        live = (curvature > 0) & (rr > 0)
        alpha = torch.where(live, rr / torch.where(live, curvature, 1.0), 0.0)[:, None]
        y.addcmul_(alpha, p)
        r.addcmul_(alpha, hp, value=-1.0)
        rr_next = torch.where(live, squared_norm(r), 0.0)
        beta = torch.where(live, rr_next / torch.where(live, rr, 1.0), 0.0)[:, None]
        torch.addcmul(r, p, beta, out=p)  # p = r + beta p, in one pass
        rr = rr_next
    return y


def _stalled(iterating, norm, previous, asked, low):
    """The refinement's rule for rows that did not progress (``iterating`` rows that cut their residual
    norm less than 10x since ``previous``, or less than 2x when they ``asked`` for less than 100x): those
    in the low precision continue in float32 (``low`` is cleared for them, in place); the float32 ones
    are returned, for the direct solve."""
    poor = iterating & (norm > (10 * asked).clamp(0.1, 0.5) * previous)
    stalled = poor & ~low
    low &= ~poor
    return stalled


def _pcg_by_precision(b, support, low, a_low, a_hat, rel_tol, max_iter, work):
    """``_pcg32`` with the low-precision operator ``a_low`` for the rows where ``low`` is True and the
    float32 ``a_hat`` for the others (no row copies when all rows share one)."""
    correction = None
    for part, matrix in ((low, a_low), (~low, a_hat)):
        if not bool(part.any()):
            continue
        if bool(part.all()):
            return _pcg32(b, support, matrix, rel_tol, max_iter, work)
        if correction is None:
            correction = _scratch(work, "split_y", b)
        rows = part.nonzero().flatten()  # (gathered into scratch buffers: no fresh pages)
        b_part = torch.index_select(b, 0, rows, out=_scratch(work, "split_b", b[: rows.numel()]))
        support_part = torch.index_select(support, 0, rows, out=_scratch(work, "split_support", b[: rows.numel()]))
        correction.index_copy_(0, rows, _pcg32(b_part, support_part, matrix, rel_tol[rows], max_iter, work))
    return correction


def _jacobi_scaled(a: torch.Tensor, a32: Optional[torch.Tensor] = None):
    """(``D^-1/2 A D^-1/2`` in float32, ``D^-1/2`` as a float32 row) for a matrix with a positive diagonal,
    scaled in float32 (``a32``: A in float32 when the caller has it; the scaled matrix serves the inner
    solves only, whose rounding the outer residuals correct)."""
    scale = torch.diag(a).double().rsqrt().float()
    a32 = a.float() if a32 is None else a32
    return torch.mul(a32, scale[:, None]).mul_(scale[None, :]), scale[None, :]


def _direct_solve(weight: torch.Tensor, mask: torch.Tensor, h_damped: torch.Tensor, hinv: torch.Tensor) -> torch.Tensor:
    """``exact_solve`` by batched factorisations, using the smaller of the removed / kept sets:
    ``w' = w - w_P [(H^-1)_PP]^-1 (H^-1)_P,:`` or ``H_KK w'_K = (w H)_K``; factored in float32 and refined
    twice with float64 residuals."""
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
    chunk = max(1, SOLVE_CHUNK_ELEMENTS // (size * size))
    factors = []
    for r1 in range(0, rows, chunk):
        r2 = min(rows, r1 + chunk)
        factors.append((r1, r2, _factor(_gather_square(matrix32, idx[r1:r2]), matrix, idx[r1:r2])))

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
    # rows the float32 factor could not refine (systems too ill-conditioned for it): float64 factorisations
    residual = rhs - (dense @ matrix).gather(1, idx)
    poor = (residual.norm(dim=1) > DIRECT_RESIDUAL * rhs.norm(dim=1)).nonzero().flatten()
    if poor.numel():
        exact = _factor64(_gather_square(matrix, idx[poor]))(rhs[poor])
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
    return _factor64(_gather_square(matrix, idx))


def _factor64(sub64: torch.Tensor):
    """A solver for the batched float64 systems ``sub64 x = b``: Cholesky, or LU where that fails."""
    chol64, info64 = torch.linalg.cholesky_ex(sub64)
    if bool((info64 != 0).any()):
        return lambda b: torch.linalg.solve(sub64, b[..., None])[..., 0]
    return lambda b: torch.cholesky_solve(b[..., None], chol64)[..., 0]


def _relative_error_from_losses(w, new, loss, whw, h_damped, hessian, loss_accuracy: float = 1e-12) -> float:
    """``relative_error(w, new, hessian)`` from ``loss``, the sum over rows of the damped
    ``(new - w) H (new - w)^T`` (known to a relative ``loss_accuracy``), and ``whw``, the sum of
    ``(w @ h_damped) * w`` (H_damped - H is diagonal), without two more products with H. The damping's
    terms in float64, row chunk by row chunk (``ROW_PASS_ELEMENTS``), whatever the dtypes of w and new."""
    shift = torch.diag(h_damped) - torch.diag(hessian).double()
    squares_new = torch.zeros_like(shift)
    squares_w = torch.zeros_like(shift)
    for r1, r2 in _row_chunks(*w.shape):
        rows = w[r1:r2].double()
        squares_w += rows.square().sum(0)
        squares_new += (new[r1:r2].double() - rows).square_().sum(0)  # (.double() may be a view: no in place)
    shift_num = (squares_new * shift).sum()
    shift_den = (squares_w * shift).sum()
    num = loss - shift_num
    den = whw - shift_den
    # where the damping dominates, the subtractions cancel: below 4 significant digits, compute directly
    if (float(num) <= max(1e-6 * float(shift_num), 1e4 * loss_accuracy * float(loss))
            or float(den) <= 1e-6 * float(shift_den)):
        return relative_error(w, new, hessian)
    return float(num / den)


def _row_losses(w: torch.Tensor, w_new: torch.Tensor, wh: torch.Tensor, new_h: torch.Tensor,
                work: Optional[dict] = None) -> torch.Tensor:
    """Per row (w' - w) H (w' - w)^T from the products w H and w' H (``work``: scratch buffers)."""
    diff = torch.sub(w_new, w, out=_scratch(work, "r", w))
    return torch.sub(new_h, wh, out=_scratch(work, "r2", w)).mul_(diff).sum(1)


def _swap_round(w, wh, mask, solution, solution_h, losses, lower, h_damped, hinv, group: Optional[int] = None,
                fraction: float = 0.05, eig_floor: Optional[float] = None, work: Optional[dict] = None,
                tol: float = WEIGHT_TOL):
    """One swap round (module docstring, step 3); returns (mask, solution, solution @ H, losses, lower,
    taken, solved), where ``losses`` are the rows' ``(solution - w) H (solution - w)^T``, ``lower``
    lower bounds on their masks' optimal losses (``exact_solve``'s ``return_bound``), ``taken`` is True
    for the rows that took their swap and ``solved`` for the rows that now hold their mask's exact
    solution. The inputs may be updated in place.

    Removed weights whose freeing would gain more than the cheapest kept weights cost are swapped in
    (within the same group of ``group`` columns for N:M, which keeps the pattern valid). A row takes
    its swap only where that certainly lowers its optimal loss: the re-solved candidate's loss (an
    upper bound on the candidate's optimum) below the current mask's lower bound. ``wh``/``solution_h``:
    ``w @ H`` and ``solution @ H``, so that gradients and errors need no further products. The
    re-solves stop at ``SWAP_TOL``, or, given ``eig_floor``, are exact (``exact_solve``'s tolerance);
    then the rows whose comparison is undecided (candidate between the current mask's bounds) have
    their current mask solved exactly too and compare exactly, and every row that took its swap or was
    compared exactly holds its exact solution.
    """
    rows, cols = w.shape
    removed = int(mask[0].sum())
    taken = torch.zeros(rows, dtype=torch.bool, device=w.device)
    solved = torch.zeros(rows, dtype=torch.bool, device=w.device)
    # in place where possible: on a CPU, fresh pages for big temporaries cost more than the arithmetic
    gain = torch.sub(solution_h, wh, out=_scratch(work, "r", wh)).square_().div_(torch.diag(h_damped)[None, :])
    gain.masked_fill_(~mask, -1.0)
    cost = torch.square(solution, out=_scratch(work, "r2", wh)).div_(torch.diag(hinv)[None, :])
    cost.masked_fill_(mask, float("inf"))
    rows_idx = torch.arange(rows, device=w.device)[:, None]
    if group is None:
        t = max(1, int(fraction * min(removed, cols - removed)))
        add = torch.topk(gain, t, dim=1).indices
        drop = torch.topk(cost, t, dim=1, largest=False).indices
        worth = gain.gather(1, add) > cost.gather(1, drop)
    else:
        groups = cols // group
        t = max(1, int(fraction * groups))
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
    dropped = _sparse_rows(entry_rows if index is None else torch.searchsorted(index, entry_rows), entry_cols,
                           solution[entry_rows, entry_cols], tuple(w_c.shape))
    start_h = torch.addmm(pick(solution_h), dropped, h_damped, alpha=-1.0, out=_scratch(work, "start_h", w_c))
    exact = eig_floor is not None
    if exact:
        trial, trial_h = exact_solve(w_c, pick(candidate), h_damped, hinv, start=pick(solution), wh=wh_c,
                                     return_product=True, eig_floor=eig_floor, work=work, tol=tol,
                                     out=_result_buffers(work, w_c, (solution, solution_h)), start_h=start_h)
        trial_losses, trial_lower = _row_losses(w_c, trial, wh_c, trial_h, work), None
    else:
        trial, trial_h, trial_losses, trial_lower = exact_solve(
            w_c, pick(candidate), h_damped, hinv, start=pick(solution), wh=wh_c, return_product=True,
            residual_tol=SWAP_TOL, work=work, return_bound=True,
            out=_result_buffers(work, w_c, (solution, solution_h)), start_h=start_h)
    # certainly better: the candidate's loss is below any the current mask can reach
    improved = trial_losses < pick(lower)
    if exact:
        # undecided (the candidate beats the current solution but not its bound): solve the current mask
        # exactly and compare exactly; those rows then hold an exact solution whichever mask they keep
        unsure = (~improved & (trial_losses < pick(losses))).nonzero().flatten()
        if unsure.numel():
            at = unsure if index is None else index[unsure]
            current, current_h = exact_solve(w[at], mask[at], h_damped, hinv, start=solution[at], wh=wh[at],
                                             return_product=True, eig_floor=eig_floor, work=work, tol=tol)
            current_losses = _row_losses(w[at], current, wh[at], current_h)
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


def _sparse_rows(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """A sparse (CSR) matrix of ``shape`` with ``values`` at (``rows``, ``cols``), entries sorted by row
    (products with it cost its entries, not its size)."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=values.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    with warnings.catch_warnings():  # ("beta" support: the matrix product is all this needs)
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, values, size=shape)


def _trial_rows(rows: int, count: int, device) -> torch.Tensor:
    """``count`` row indices spread evenly over ``rows`` (all of them when there are no more)."""
    if rows <= count:
        return torch.arange(rows, device=device)
    return torch.div(torch.arange(count, device=device) * rows, count, rounding_mode="floor")


def _mrp_rows(w, h, hinv, upper, floor, sparsity, nm, blocksize, swap_rounds, work, tol, sweep=None, solved=None):
    """``mrp`` on some rows of a weight (float64) given the damped Hessian ``h``, its inverse, the
    inverse's upper Cholesky factor and a verified floor on its smallest eigenvalue: the sweep, the
    exact solve (to ``tol``) and the swap rounds (module docstring). Returns (new rows, their mask, their
    damped losses ``(new - w) h (new - w)^T``, the sum of ``(w @ h) * w`` over them, how many rows took a
    swap, ``new @ h``). ``sweep``: the rows' (swept weights, mask) when the caller has them; ``solved``:
    the exact solution of that mask as this function returns it without swap rounds (the swap rounds
    then start from it instead of from a loose solve). Neither is modified. With ``work``, the new rows
    and their product are scratch buffers of it (``_result_buffers``), valid until its next solves."""
    if sweep is None:
        # in float32: the sweep only picks the mask and a starting point (the masks match float64's)
        swept, mask = _mrp_sweep(_scratch(work, "sweep_w32", w, torch.float32).copy_(w), upper.float(), sparsity,
                                 nm, blocksize, None if work is None else work.setdefault("sweep", {}))
    else:
        swept, mask = sweep[0], sweep[1].clone()  # (the swap rounds update their mask in place)
    wh = torch.matmul(w, h, out=_scratch(work, "mrp_wh", w))
    improved_rows = 0
    exact = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)  # rows holding their exact solution
    if swap_rounds and solved is not None:  # exact solutions: their losses are the optimal ones
        new, new_h, losses = solved[0].clone(), solved[5].clone(), solved[2].clone()
        lower = losses.clone()
        exact.fill_(True)
    elif swap_rounds:  # loose solutions, their losses, and lower bounds on their masks' optimal losses
        new, new_h, losses, lower = exact_solve(w, mask, h, hinv, start=swept, wh=wh, return_product=True,
                                                residual_tol=SWAP_TOL, work=work, return_bound=True,
                                                out=_result_buffers(work, w))
    else:
        new, new_h = exact_solve(w, mask, h, hinv, start=swept, wh=wh, return_product=True, eig_floor=floor,
                                 work=work, tol=tol, out=_result_buffers(work, w))
        losses = _row_losses(w, new, wh, new_h, work)
    for round_ in range(swap_rounds):
        last = round_ == swap_rounds - 1  # the last round's re-solves are exact
        previous = float(losses.sum())
        mask, new, new_h, losses, lower, improved, now_exact = _swap_round(
            w, wh, mask, new, new_h, losses, lower, h, hinv, group=None if nm is None else nm[1],
            eig_floor=floor if last else None, work=work, tol=tol)
        improved_rows += int(improved.sum())
        exact = (exact & ~improved) | now_exact  # a row that took a swap holds the candidate's solution
        if not bool(improved.any()) or float(losses.sum()) > previous * (1 - SWAP_MIN_GAIN):
            break
    if swap_rounds:  # the final mask solved exactly, where the rounds left a loose solution
        if not bool(exact.any()):
            new, new_h = exact_solve(w, mask, h, hinv, start=new, wh=wh, return_product=True, eig_floor=floor,
                                     work=work, tol=tol, out=_result_buffers(work, w, (new, new_h)))
            losses = _row_losses(w, new, wh, new_h, work)
        elif not bool(exact.all()):
            rest = (~exact).nonzero().flatten()
            new[rest], new_h[rest] = exact_solve(w[rest], mask[rest], h, hinv, start=new[rest], wh=wh[rest],
                                                 return_product=True, eig_floor=floor, work=work, tol=tol,
                                                 out=_result_buffers(work, w[rest], (new, new_h)))
            losses[rest] = _row_losses(w[rest], new[rest], wh[rest], new_h[rest])
    return new, mask, losses, torch.dot(wh.flatten(), w.flatten()), improved_rows, new_h


@torch.no_grad()
def prune_linear(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: Optional[float] = None,
    pattern: Optional[str] = None,
    method: str = "mrp",
    blocksize: int = 128,
    damp: float = 0.01,
    swap_rounds: int = 1,
    workspace: Optional[dict] = None,
):
    """Prune one Linear weight given its calibration Hessian.

    Args:
        weight: (out, in) weight.   hessian: (in, in) ``2 X X^T`` summed over calibration tokens.
        sparsity: fraction of every row to remove (unstructured), in [0, 1).
        pattern: ``"N:M"`` — keep N of every M consecutive weights of a row (``in`` divisible by M).
        method: ``magnitude``, ``wanda``, ``sparsegpt`` or ``mrp``.
        blocksize: columns per lazy block (``sparsegpt``, ``mrp``).   damp: damping / mean diagonal.
        swap_rounds: ``mrp``: at most this many swap rounds after the exact solve (0 = none; each
            costs one more exact solve); they stop early once a round gains less than 1%, and a trial
            on 32 rows skips them for the layer where they would not lower its error.
        workspace: ``mrp``: a dict in which to keep the solves' scratch buffers for later calls with the
            same shapes (``prune`` passes one per run on a CPU, where fresh pages for big buffers cost
            as much as the arithmetic: about 5000 page faults per 20 MB; it holds, until dropped, about
            20 float64 arrays of a row chunk's size and two of the weight's: its float64 copy and the
            result before conversion). The returned weight is always a new tensor. Not thread-safe.
            ``mrp`` works through the rows in chunks of at most ``MRP_CHUNK_ELEMENTS`` elements, which
            bounds its memory.
    Returns:
        (new_weight in weight's dtype, mask (out, in) bool True where removed, SolveStats)
    """
    nm = check_target(sparsity, pattern, method)
    check_swap_rounds(swap_rounds)
    check_options(blocksize, damp)
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"weight must be (out, in) and hessian (in, in); got {tuple(weight.shape)} and {tuple(hessian.shape)}"
        )
    if nm is not None and weight.shape[1] % nm[1]:
        raise ValueError(f"pattern {pattern!r} needs in_features divisible by {nm[1]}, got {weight.shape[1]}")
    for name, tensor in (("weight", weight), ("hessian", hessian)):
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a real floating-point tensor, got dtype {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} has non-finite entries (inf or nan); pruning needs finite values")
    asymmetry = float((hessian - hessian.T).abs().max()) if hessian.numel() else 0.0
    if asymmetry > 1e-4 * float(hessian.abs().max()):
        raise ValueError(f"hessian must be symmetric (2 X X^T); it differs from its transpose by up to {asymmetry:.3g}")
    if asymmetry:  # (float32 sums of X X^T: rounding only) the symmetric part, which every step then reads
        hessian = (hessian + hessian.T) / 2
    sparsity = None if sparsity is None else float(sparsity)
    start = time.perf_counter()
    stats = SolveStats(method=method, sparsity=0.0, relative_error=0.0, seconds=0.0, damp=damp)
    if weight.numel() == 0:  # no rows (or no inputs): nothing to remove
        return weight.clone(), torch.zeros(weight.shape, dtype=torch.bool, device=weight.device), stats
    # mrp: the whole weight's float64 arrays in scratch buffers too (``workspace``); sparsegpt works in
    # float32 and takes its float64 sums row chunk by row chunk (no whole-weight float64 copy)
    whole = None if method != "mrp" else {} if workspace is None else workspace.setdefault(
        ("whole", tuple(weight.shape), str(weight.device)), {})
    if method == "sparsegpt":
        w = weight
    elif whole is None or weight.dtype == torch.float64:
        w = weight.double()
    else:
        w = _scratch(whole, "w", weight, torch.float64).copy_(weight)
    if method == "magnitude":
        mask = _score_mask(w.abs(), sparsity, nm)
        new = w.masked_fill(mask, 0.0)
    elif method == "wanda":
        norms = torch.sqrt(torch.clamp(torch.diag(hessian.double()) / 2, min=0))
        mask = _score_mask(w.abs() * norms[None, :], sparsity, nm)
        new = w.masked_fill(mask, 0.0)
    else:
        h, hinv, upper = _inverse_upper(hessian, damp, stats)
        if method == "sparsegpt":
            # float32, as the reference implementation (float64 gave the same masks and errors to 6 digits
            # on the benchmark layers, at 1.3-1.5x the time)
            new, mask, loss = _sparsegpt(w.to(torch.float32, copy=True), upper.float(), sparsity or 0.0, nm,
                                         blocksize)
            # (both sweeps and the exact solve leave removed weights exactly zero: no masking after)
            whw = _weighted_square_sum(w, h)  # the error's denominator (its numerator is the sweep's loss)
        else:
            # H = hessian + damping >= 0.9 x the smallest diagonal shift if hessian is PSD (verified)
            shift = torch.diag(h) - torch.diag(hessian).to(h.dtype)  # H_damped - H is diagonal
            floor = _eig_floor(h, hinv, 0.9 * float(shift.min()))
            tol = weight_tolerance(weight.dtype)
            # scratch buffers shared by the solves (and, through ``workspace``, by later calls)
            works = {"whole": whole}
            new, mask = _scratch(whole, "new", w), torch.empty(w.shape, dtype=torch.bool, device=w.device)
            loss = whw = 0.0

            def solve(index, rounds, sweep=None, solved=None):
                key = (int(w.shape[0] if isinstance(index, slice) else index.numel()), w.shape[1], str(w.device))
                work = works.setdefault(key, {} if workspace is None else workspace.setdefault(key, {}))
                rows = w if isinstance(index, slice) else torch.index_select(w, 0, index, out=_scratch(
                    work, "rows", w[: index.numel()]))
                for other in works.values():  # what is tied to this Hessian serves rows of any shape
                    for name in HESSIAN_KEYS:
                        if name in other:
                            work.setdefault(name, other[name])
                return _mrp_rows(rows, h, hinv, upper, floor, sparsity or 0.0, nm, blocksize, rounds, work, tol,
                                 sweep, solved)

            def keep(index, result):
                nonlocal loss, whw
                new[index], mask[index] = result[0], result[1]
                loss, whw = loss + result[2].sum(), whw + result[3]
                stats.swap_rows_improved += result[4]

            rounds, rest = swap_rounds, torch.arange(w.shape[0], device=w.device)
            if swap_rounds and SWAP_TRIAL_ROWS:
                # the swap trial: rows spread over the weight, with and without swaps, in the error the
                # report shows (module docstring, step 3)
                trial = _trial_rows(w.shape[0], SWAP_TRIAL_ROWS, w.device)
                sweep = _mrp_sweep(w[trial].float(), upper.float(), sparsity or 0.0, nm, blocksize)  # shared
                # (copied: the second solve's scratch buffers take the first's place)
                results = {0: tuple(t.clone() if torch.is_tensor(t) else t for t in solve(trial, 0, sweep))}
                results[swap_rounds] = solve(trial, swap_rounds, sweep, results[0])  # from those exact solutions
                error = {r: float((res[2] - (res[0] - w[trial]).square().mul_(shift).sum(1)).sum())
                         for r, res in results.items()}
                if not error[swap_rounds] < error[0]:
                    rounds = 0
                    stats.swaps_skipped = True
                    stats.notes.append(f"swap rounds skipped: on {trial.numel()} of the rows they would raise the "
                                       f"undamped error by {error[swap_rounds] / error[0] - 1:.2%}"
                                       if error[0] > 0 else "swap rounds skipped: they gain nothing on this layer")
                keep(trial, results[rounds])
                del results
                rest = rest[~torch.isin(rest, trial)]
            # the other rows in chunks (MRP_CHUNK_ELEMENTS; they are independent given H: only the memory
            # changes)
            step = max(1, MRP_CHUNK_ELEMENTS // max(1, w.shape[1]))
            for begin in range(0, rest.numel(), step):
                part = rest[begin:begin + step]
                if rest.numel() == w.shape[0] and part.numel() == w.shape[0]:
                    part = slice(None)  # every row: no gathering copy
                keep(part, solve(part, rounds))
            for work in works.values():  # drop what is specific to this Hessian (shared by its chunks)
                for key in HESSIAN_KEYS:
                    work.pop(key, None)
    stats.sparsity = float(torch.count_nonzero(mask)) / mask.numel() if mask.numel() else 0.0  # (exact: a count)
    result = new.to(weight.dtype, copy=method == "mrp")  # (mrp's ``new`` is a scratch buffer)
    if method in ("sparsegpt", "mrp") and torch.finfo(weight.dtype).bits < 32:
        # half-precision weights: the error of what is returned, after rounding (one more product)
        stats.relative_error = relative_error(weight, result, hessian)
    elif method == "mrp":
        stats.relative_error = _relative_error_from_losses(w, new, loss, whw, h, hessian)
    elif method == "sparsegpt":
        stats.relative_error = _relative_error_from_losses(w, new, loss, whw, h, hessian, loss_accuracy=1e-6)
    else:
        stats.relative_error = relative_error(weight, new, hessian)
    stats.seconds = time.perf_counter() - start
    if not math.isfinite(stats.relative_error):
        raise RuntimeError(f"{method} produced non-finite weights")
    return result, mask, stats
