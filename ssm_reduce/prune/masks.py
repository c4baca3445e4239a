"""Mask selection shared by the methods: how many weights a row (or block) loses, and the lowest scores."""

from __future__ import annotations

import math
from typing import Optional

import torch


def removed_per_row(sparsity: float, cols: int) -> int:
    """floor(sparsity * cols), the weights each row loses, exact where the product rounds just below an
    integer (0.29 * 100 is 28.999999999999996 in floating point)."""
    return int(math.floor(sparsity * cols + 1e-9))


def block_counts(sparsity: float, cols: int, blocksize: int) -> list[int]:
    """Weights each row removes per block of ``blocksize`` columns, summing exactly to
    ``removed_per_row(sparsity, cols)``."""
    total = removed_per_row(sparsity, cols)
    edges = list(range(0, cols, blocksize)) + [cols]
    cum = [round(total * e / cols) for e in edges]
    return [b - a for a, b in zip(cum[:-1], cum[1:])]


def lowest_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` lowest scores along the last dim, in no particular order (a partial
    selection, cheaper than a sort)."""
    return torch.topk(scores, count, dim=-1, largest=False, sorted=False).indices


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` lowest scores along the last dim (exact ties: any of the tied entries)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count > 0:
        mask.scatter_(-1, lowest_indices(scores, count), True)
    return mask


def score_mask(scores: torch.Tensor, sparsity: float, nm: Optional[tuple[int, int]]) -> torch.Tensor:
    """(rows, cols) bool mask, True where removed: every row's ``sparsity`` share of lowest ``scores``, or
    with ``nm`` = (N, M) the M - N lowest of every group of M consecutive columns."""
    rows, cols = scores.shape
    if nm is None:
        return lowest(scores, removed_per_row(sparsity, cols))
    n, m = nm
    return lowest(scores.reshape(rows, cols // m, m), m - n).reshape(rows, cols)
