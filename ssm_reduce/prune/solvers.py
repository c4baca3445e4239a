"""``prune_linear``: one Linear weight pruned given its calibration Hessian H = 2 X X^T, by a table of
solvers (magnitude, wanda, sparsegpt, mrp) behind one validation (Zhao et al., "Pruning Foundation Models
for High Accuracy without Retraining", EMNLP 2024 Findings, Sec. 3; docs/mrp.md)."""

from __future__ import annotations

import math
import numbers
import re
import time
from typing import Callable, Optional

import torch

from .. import validation
from .baselines import prune_magnitude, prune_sparsegpt, prune_wanda
from .mrp import prune_mrp
from .request import SolveRequest, SolveStats
from .settings import MRPSettings, resolve
from .workspace import Workspace

# Every solver: (weight, hessian, request, stats, settings, workspace) -> (new weight in weight's dtype, mask
# True where removed), its error and what it did in ``stats``.
Solver = Callable[[torch.Tensor, torch.Tensor, SolveRequest, SolveStats, MRPSettings, Optional[Workspace]],
                  tuple[torch.Tensor, torch.Tensor]]
SOLVERS: dict[str, Solver] = {
    "magnitude": prune_magnitude,
    "wanda": prune_wanda,
    "sparsegpt": prune_sparsegpt,
    "mrp": prune_mrp,
}
METHODS = tuple(SOLVERS)
_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
# N:M patterns mrp accepts: it scores every one of the C(M, N) removal sets of each group (C(16, 8) = 12870)
MRP_MAX_CANDIDATES = 12870


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
    if method not in SOLVERS:
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


def check_options(blocksize, damp) -> tuple[int, float]:
    """The sweeps' ``blocksize`` (an integer >= 1) and the damping ``damp`` (a finite number >= 0), as Python
    numbers; ``ValueError`` naming the argument otherwise."""
    blocksize = validation.integer("blocksize", blocksize, 1, "columns per lazy block")
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not 0.0 <= damp < math.inf:
        raise ValueError(f"damp must be a finite number >= 0 (a fraction of the Hessian's mean diagonal), got {damp!r}")
    return blocksize, float(damp)


def check_swap_rounds(swap_rounds) -> int:
    return validation.integer("swap_rounds", swap_rounds, 0, "0 = no swap rounds")


def check_workspace(workspace) -> None:
    if workspace is not None and not isinstance(workspace, Workspace):
        raise TypeError(f"workspace must be an ssm_reduce.prune.Workspace or None, got {type(workspace).__name__}")


def _checked_tensors(weight: torch.Tensor, hessian: torch.Tensor, nm, pattern) -> torch.Tensor:
    """Check the shapes, dtypes and values of ``weight`` and ``hessian``; returns the Hessian every solver
    reads (its symmetric part where float32 rounding made it slightly asymmetric)."""
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
    return (hessian + hessian.T) / 2 if asymmetry else hessian


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
    settings: Optional[MRPSettings] = None,
    workspace: Optional[Workspace] = None,
):
    """Prune one Linear weight given its calibration Hessian.

    Args:
        weight: (out, in) weight.   hessian: (in, in) ``2 X X^T`` summed over calibration tokens.
        sparsity: fraction of every row to remove (unstructured), in [0, 1).
        pattern: ``"N:M"``: keep N of every M consecutive weights of a row (``in`` divisible by M).
        method: ``magnitude``, ``wanda``, ``sparsegpt`` or ``mrp`` (``METHODS``).
        blocksize: columns per lazy block (``sparsegpt``, ``mrp``).   damp: damping / mean diagonal.
        swap_rounds: ``mrp``: at most this many swap rounds after the exact solve (0 = none), where its
            swap trial finds that they lower the layer's error.
        settings: tolerances and tuning knobs (``MRPSettings``; None: the defaults).
        workspace: ``mrp``: a ``Workspace`` keeping the solves' scratch buffers for later calls with the
            same shapes (None: buffers for this call only). The returned weight is always a new tensor.
    Returns:
        (new_weight in weight's dtype, mask (out, in) bool True where removed, SolveStats)
    Raises:
        ValueError for a bad target, option, shape or non-finite input; TypeError for a non-float weight or
        Hessian, or settings / workspace of another type; RuntimeError where the damped Hessian cannot be
        factored even with 10^6 x the damping, or the result is not finite.
    """
    nm = check_target(sparsity, pattern, method)
    swap_rounds = check_swap_rounds(swap_rounds)
    blocksize, damp = check_options(blocksize, damp)
    settings = resolve(settings)
    check_workspace(workspace)
    hessian = _checked_tensors(weight, hessian, nm, pattern)
    request = SolveRequest(sparsity=0.0 if sparsity is None else float(sparsity), nm=nm, blocksize=blocksize,
                           damp=damp, swap_rounds=swap_rounds)
    start = time.perf_counter()
    stats = SolveStats(method=method, sparsity=0.0, relative_error=0.0, seconds=0.0, damp=damp)
    if weight.numel() == 0:  # no rows (or no inputs): nothing to remove
        return weight.clone(), torch.zeros(weight.shape, dtype=torch.bool, device=weight.device), stats
    result, mask = SOLVERS[method](weight, hessian, request, stats, settings, workspace)
    stats.sparsity = float(torch.count_nonzero(mask)) / mask.numel() if mask.numel() else 0.0  # (exact: a count)
    stats.seconds = time.perf_counter() - start
    if not math.isfinite(stats.relative_error):
        raise RuntimeError(f"{method} produced non-finite weights")
    return result, mask, stats
