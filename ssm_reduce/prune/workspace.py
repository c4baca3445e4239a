"""Scratch buffers of mrp's solves, kept from call to call for the same shapes (docs/mrp.md, "Workspace").

On a CPU, fresh pages for big temporaries cost about as much as the arithmetic on them (and an elementwise
operation on two dtypes makes a converted copy of one operand: the solves keep their masks in both dtypes
instead). So every big temporary of the solves has a named slot here, reused by later solves of the same
shapes: ``prune`` keeps one ``Workspace`` per run. Not thread-safe.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


class Scratch:
    """One reusable scratch tensor. ``take(like, dtype)`` returns a tensor with the shape and device of
    ``like`` (and ``dtype``, default like's): the first rows of the one kept when that has the same trailing
    shape, dtype and device and at least as many rows (contiguous, same memory), else a new one, which is
    kept (``keep``) for the next take. Its values are whatever the last user left."""

    __slots__ = ("tensor", "keep")

    def __init__(self, keep: bool = True):
        self.tensor: Optional[torch.Tensor] = None
        self.keep = keep

    def take(self, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = like.dtype if dtype is None else dtype
        buffer = self.tensor
        if (buffer is not None and buffer.dtype == dtype and buffer.device == like.device
                and buffer.dim() == like.dim() and buffer.shape[1:] == like.shape[1:]
                and like.dim() > 0 and buffer.shape[0] >= like.shape[0]):
            return buffer[: like.shape[0]]
        buffer = torch.empty(like.shape, dtype=dtype, device=like.device)
        if self.keep:
            self.tensor = buffer
        return buffer


class _Slots:
    """A closed set of named ``Scratch`` slots: the names are the class's ``__slots__``."""

    __slots__ = ()

    def __init__(self, keep: bool = True):
        for name in self.__slots__:
            setattr(self, name, Scratch(keep))


class CGBuffers(_Slots):
    """Conjugate gradients' vectors (``pcg32``: iterate, direction, its product, a product temporary, and
    their low-precision copies) and the rows ``pcg_by_precision`` gathers for one precision."""

    __slots__ = ("y", "p", "hp", "tmp", "p_low", "hp_low", "support_low", "split_y", "split_b", "split_support")


class KeptBuffers(_Slots):
    """The exact solve's kept-weights iteration: the kept masks in float32 and float64, x and x H in
    float32, the float32 residual and right-hand side."""

    __slots__ = ("support32", "support64", "x32", "xh32", "r32", "b32")


class RemovedBuffers(_Slots):
    """The exact solve's removed-weights iteration (``solve_removed``): the removed masks in float32 and
    float64, its state z, and its float32 and float64 temporaries."""

    __slots__ = ("removed32", "removed64", "w32", "u32", "zstate", "sh32", "x", "s", "t", "s2", "z32", "y32",
                 "s32", "rhs")


class BoundBuffers(_Slots):
    """``loss_lower_bound``'s kept residual (float64, float32) and its product with H^-1."""

    __slots__ = ("r", "r32", "rh32")


class ResultPair(_Slots):
    """An exact solve's result x and its product x H (float64, ``out=``)."""

    __slots__ = ("x", "xh")


class WeightBuffers(_Slots):
    """mrp's whole-weight float64 arrays: the weight's copy and the result before conversion."""

    __slots__ = ("w", "new")


class Memo:
    """A value derived from one matrix, kept (``keep``) while that matrix is the same object."""

    __slots__ = ("matrix", "value", "keep")

    def __init__(self, keep: bool = True):
        self.matrix, self.value, self.keep = None, None, keep

    def get(self, matrix: torch.Tensor, compute: Callable[[], object]):
        if self.matrix is matrix:
            return self.value
        value = compute()
        if self.keep:
            self.matrix, self.value = matrix, value
        return value


class HessianCache:
    """What the solves of one ``prune_linear`` call derive from its damped Hessian, shared by all its row
    chunks: the inner solves' operators for H and for H^-1 (``conjugate_gradients.operators``), and the
    variables the exact solve iterates in (``least_squares.solve_space``)."""

    __slots__ = ("operators", "removed_operators", "space")

    def __init__(self, keep: bool = True):
        self.operators, self.removed_operators, self.space = Memo(keep), Memo(keep), Memo(keep)


class SolveBuffers:
    """Every scratch buffer of the solves of one row count (the sweep, exact solves, swap rounds), by role:
    ``cg`` and ``sweep_cg`` (the exact solves' and the sweep's inner solves), ``kept``, ``removed``, ``bound``,
    two ``results`` pairs (``result_pair``), float64 row-shaped temporaries ``r``, ``r2`` (residuals,
    differences, swap scores) and ``c64`` (corrections), and mrp's per-chunk arrays: ``sweep_w32`` (the
    sweep's float32 weights), ``wh`` (w H), ``start_h`` (a swap candidate's start times H) and ``rows`` (the
    gathered rows). ``hessian``: the caches tied to one Hessian. ``keep=False``: buffers that keep nothing
    (every take is a new tensor, every cached value computed again)."""

    def __init__(self, keep: bool = True):
        self.keep = keep
        self.cg, self.sweep_cg = CGBuffers(keep), CGBuffers(keep)
        self.kept, self.removed, self.bound = KeptBuffers(keep), RemovedBuffers(keep), BoundBuffers(keep)
        self.results = (ResultPair(keep), ResultPair(keep))
        self.r, self.r2, self.c64 = Scratch(keep), Scratch(keep), Scratch(keep)
        self.sweep_w32, self.wh, self.start_h, self.rows = Scratch(keep), Scratch(keep), Scratch(keep), Scratch(keep)
        self.hessian = HessianCache(keep)

    def result_pair(self, like: torch.Tensor, avoid=()) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``exact_solve``'s ``out``: two float64 arrays shaped like ``like`` for its x and x H, from the one
        of the two ``results`` pairs that holds none of the arrays in ``avoid`` (which the caller still
        needs), or None (new arrays) for buffers that keep nothing. The swap rounds alternate between the
        pairs, so a solve's result is overwritten two solves later at the earliest."""
        if not self.keep:
            return None
        held = {t.untyped_storage().data_ptr() for t in avoid if t is not None}
        for pair in self.results:
            arrays = (pair.x.take(like, torch.float64), pair.xh.take(like, torch.float64))
            if not any(t.untyped_storage().data_ptr() in held for t in arrays):
                return arrays
        return None


NO_REUSE = SolveBuffers(keep=False)


class Workspace:
    """Scratch buffers of ``prune_linear``'s mrp solves, kept for later calls with the same shapes: per
    weight shape and device, the whole-weight arrays (``weights``); per row count, columns and device, the
    solves' buffers (``rows``). It holds, until dropped, about 20 float64 arrays of a row chunk's size and
    two of the weight's. Results returned by ``prune_linear`` never live in it."""

    def __init__(self):
        self.weights: dict[tuple, WeightBuffers] = {}
        self.rows: dict[tuple, SolveBuffers] = {}

    def weight_buffers(self, weight: torch.Tensor) -> WeightBuffers:
        key = (tuple(weight.shape), str(weight.device))
        if key not in self.weights:
            self.weights[key] = WeightBuffers()
        return self.weights[key]

    def solve_buffers(self, rows: int, cols: int, device: torch.device, hessian: HessianCache) -> SolveBuffers:
        """The buffers for solves of ``rows`` x ``cols`` on ``device``, sharing the caches ``hessian``."""
        key = (rows, cols, str(device))
        if key not in self.rows:
            self.rows[key] = SolveBuffers()
        buffers = self.rows[key]
        buffers.hessian = hessian
        return buffers

    def release_hessian(self) -> None:
        """Drop what is tied to one Hessian (the end of a ``prune_linear`` call)."""
        for buffers in self.rows.values():
            buffers.hessian = HessianCache()
