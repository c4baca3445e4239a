"""The layer reconstruction error ``||W X - W' X||^2 / ||W X||^2`` every method reports, in float64, a few
rows at a time (no float64 copy of a whole weight)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .settings import DEFAULT_SETTINGS

ROW_PASS_ELEMENTS = DEFAULT_SETTINGS.row_pass_elements


def row_chunks(rows: int, cols: int, elements: int = ROW_PASS_ELEMENTS) -> list[tuple[int, int]]:
    """(first, end) of row chunks of at most ``elements`` elements (at least one row each)."""
    step = max(1, elements // max(1, cols))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def weighted_square_sum(w: torch.Tensor, h: torch.Tensor, minus: Optional[torch.Tensor] = None,
                        elements: int = ROW_PASS_ELEMENTS) -> torch.Tensor:
    """The sum over rows of ``v H v^T`` with ``v = w`` (or ``w - minus``): w (out, in), H (in, in); a float64
    scalar, summed row chunk by row chunk (``elements`` per chunk)."""
    total = torch.zeros((), dtype=torch.float64, device=w.device)
    for r1, r2 in row_chunks(*w.shape, elements):
        rows = w[r1:r2].double()  # (a view where w is float64: not to be written)
        if minus is not None:
            rows = rows - minus[r1:r2].double()
        total += torch.dot((rows @ h).flatten(), rows.flatten())
    return total


def relative_error(original: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor,
                   elements: int = ROW_PASS_ELEMENTS) -> float:
    """||W X - W' X||^2 / ||W X||^2 = tr(D H D^T) / tr(W H W^T) with D = W - W' (both (out, in), H (in, in)),
    in float64; nan where a sum is not finite, 0 where W H W^T is 0."""
    h = hessian.double()
    num = weighted_square_sum(original, h, minus=pruned, elements=elements)
    den = weighted_square_sum(original, h, elements=elements)
    if not math.isfinite(float(num)) or not math.isfinite(float(den)):
        return math.nan
    return float(num / den) if float(den) > 0 else 0.0


def relative_error_from_losses(w, new, loss, whw, h_damped, hessian, loss_accuracy: float = 1e-12,
                               elements: int = ROW_PASS_ELEMENTS) -> float:
    """``relative_error(w, new, hessian)`` from ``loss``, the sum over rows of the damped
    ``(new - w) H (new - w)^T`` (known to a relative ``loss_accuracy``), and ``whw``, the sum of
    ``(w @ h_damped) * w`` (H_damped - H is diagonal), without two more products with H. Where the damping's
    terms cancel the sums below four significant digits, the direct formula instead."""
    shift = torch.diag(h_damped) - torch.diag(hessian).double()
    squares_new = torch.zeros_like(shift)
    squares_w = torch.zeros_like(shift)
    for r1, r2 in row_chunks(*w.shape, elements):
        rows = w[r1:r2].double()
        squares_w += rows.square().sum(0)
        squares_new += (new[r1:r2].double() - rows).square_().sum(0)  # (.double() may be a view: no in place)
    shift_num = (squares_new * shift).sum()
    shift_den = (squares_w * shift).sum()
    num = loss - shift_num
    den = whw - shift_den
    if (float(num) <= max(1e-6 * float(shift_num), 1e4 * loss_accuracy * float(loss))
            or float(den) <= 1e-6 * float(shift_den)):
        return relative_error(w, new, hessian, elements)
    return float(num / den)
