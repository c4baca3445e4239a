"""What every layer solver takes (``SolveRequest``) and what it reports (``SolveStats``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class SolveRequest:
    """One validated ``prune_linear`` call, as every solver gets it."""

    sparsity: float  # fraction of every row to remove (0.0 with ``nm``)
    nm: Optional[tuple[int, int]]  # keep N of every M consecutive weights, or None (unstructured)
    blocksize: int  # columns per lazy block of the sweeps
    damp: float  # damping, a fraction of the Hessian's mean diagonal
    swap_rounds: int  # mrp: at most this many swap rounds


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
