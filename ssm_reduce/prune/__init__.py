"""One-shot post-training weight pruning (the companion to token reduction).

    import ssm_reduce
    report = ssm_reduce.prune(model, calib_ids, sparsity=0.5, method="mrp")   # or pattern="2:4"
    str(report)                                                                # a per-layer table
    new_w, mask, stats = ssm_reduce.prune.prune_linear(weight, hessian, pattern="2:4")
    settings = ssm_reduce.prune.MRPSettings(swap_trial_rows=0)                 # tuning knobs, passed in

This package is itself callable: ``ssm_reduce.prune(...)`` is ``prune_model(...)``. The methods and their
settings: docs/pruning.md and docs/mrp.md.
"""

import sys
import types

from .driver import LayerReport, PruneReport, calibration_tokens, find_blocks, prune_model, select_targets
from .layer_error import relative_error
from .least_squares import exact_solve
from .request import SolveStats
from .settings import MRPSettings
from .solvers import METHODS, SOLVERS, parse_pattern, prune_linear
from .sparse import to_semi_structured
from .workspace import Workspace

__all__ = [
    "METHODS",
    "LayerReport",
    "MRPSettings",
    "PruneReport",
    "SOLVERS",
    "SolveStats",
    "Workspace",
    "calibration_tokens",
    "exact_solve",
    "find_blocks",
    "parse_pattern",
    "prune_linear",
    "prune_model",
    "relative_error",
    "select_targets",
    "to_semi_structured",
]


class _CallablePackage(types.ModuleType):
    def __call__(self, model, calib, **kwargs) -> PruneReport:
        return prune_model(model, calib, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
