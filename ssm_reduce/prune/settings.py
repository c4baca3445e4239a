"""The solvers' tolerances and tuning knobs, as one frozen settings object (docs/mrp.md, "Settings").

Most of them are mrp's (Zhao et al., "Pruning Foundation Models for High Accuracy without Retraining",
EMNLP 2024 Findings, Sec. 3); sparsegpt also reads ``max_pivot_ratio`` and every method ``row_pass_elements``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch

_POSITIVE = ("max_pivot_ratio", "direct_residual", "sweep_tol", "weight_tol", "inner_tol", "far_from_target",
             "low_tol", "swap_tol")
_COUNTS = ("direct_chunk_elements", "chunk_elements", "row_pass_elements", "sweep_max_iter", "low_min_features")
_SPACES = ("auto", "kept", "removed")


@dataclass(frozen=True)
class MRPSettings:
    """Tolerances and tuning knobs of ``prune_linear`` (and ``prune_model``, which passes them on); the
    defaults are the tested ones. Every field is checked on construction (``ValueError`` naming it)."""

    # damped Hessians whose Cholesky pivots span more than this are refused (and the damping raised)
    max_pivot_ratio: float = 1e7
    # the direct solve redoes in float64 the rows whose relative residual stays above this
    direct_residual: float = 1e-12
    # elements of one batched (rows x p x p) system of the direct solve
    direct_chunk_elements: int = 1 << 26
    # mrp prunes the rows of a weight in chunks of at most this many elements (a memory bound)
    chunk_elements: int = 1 << 24
    # row chunks, in elements, of the float64 passes over a whole weight (error statistics)
    row_pass_elements: int = 1 << 20
    # the sweep's joint removals: relative residual and iteration cap of their float32 solves
    sweep_tol: float = 1e-3
    sweep_max_iter: int = 32
    # the exact solve: guaranteed relative error of every row's kept weights (float32 weights)
    weight_tol: float = 5e-5
    # its refinement rounds, and its float32 inner solves' floor on relative tolerance
    refinements: int = 6
    inner_tol: float = 1e-6
    # residual products turn float64 once a row's residual is within this factor of its target
    far_from_target: float = 300.0
    # inner products' dtype: "auto", None (float32) or a torch dtype; what one such solve can reach
    low_precision: Union[str, None, torch.dtype] = "auto"
    low_tol: float = 1e-2
    # "auto" keeps float32 below this many input features
    low_min_features: int = 512
    # the exact solve's variables: "kept", "removed" or "auto" (per layer)
    solve_space: str = "auto"
    # swap rounds stop once a round lowers the damped error by less than this fraction
    swap_min_gain: float = 0.01
    # the loose solves' relative residual in the swap rounds
    swap_tol: float = 1e-2
    # rows of the swap trial (0: no trial, every layer gets its swap rounds)
    swap_trial_rows: int = 32
    # the share of a row's removed weights (or groups) a swap round may exchange
    swap_fraction: float = 0.05

    def __post_init__(self):
        for name in _POSITIVE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"MRPSettings.{name} must be a finite number > 0, got {value!r}")
        for name in _COUNTS:
            _check_count(name, getattr(self, name), 1)
        _check_count("refinements", self.refinements, 0)
        _check_count("swap_trial_rows", self.swap_trial_rows, 0)
        for name, value in (("swap_min_gain", self.swap_min_gain), ("swap_fraction", self.swap_fraction)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
                raise ValueError(f"MRPSettings.{name} must be a number in [0, 1], got {value!r}")
        if self.solve_space not in _SPACES:
            raise ValueError(f"MRPSettings.solve_space must be one of {_SPACES}, got {self.solve_space!r}")
        low = self.low_precision
        if not (low is None or low == "auto" or (isinstance(low, torch.dtype) and low.is_floating_point)):
            raise ValueError(f"MRPSettings.low_precision must be 'auto', None or a floating torch dtype, got {low!r}")

    def weight_tolerance(self, dtype: torch.dtype) -> float:
        """The exact solve's guaranteed relative accuracy for weights stored in ``dtype``: ``weight_tol``,
        or for half-precision weights a sixteenth of their epsilon, whose rounding of the result (up to
        half an epsilon per weight) is far coarser."""
        eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
        return max(self.weight_tol, eps / 16)


def _check_count(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"MRPSettings.{name} must be an integer >= {least}, got {value!r}")


DEFAULT_SETTINGS = MRPSettings()


def resolve(settings: Optional[MRPSettings]) -> MRPSettings:
    """``settings``, or the defaults for None; ``TypeError`` for anything else."""
    if settings is None:
        return DEFAULT_SETTINGS
    if not isinstance(settings, MRPSettings):
        raise TypeError(f"settings must be an ssm_reduce.prune.MRPSettings or None, got {type(settings).__name__}")
    return settings
