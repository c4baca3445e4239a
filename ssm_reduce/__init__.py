"""ssm_reduce: make trained Mamba / Mamba-2 language models cheaper at inference, without retraining.

    import ssm_reduce
    ssm_reduce.apply(model, method="utr", flops_reduction=0.2)   # in place
    out = model(input_ids)          # shorter logits; out.kept_positions says which inputs remain
    ssm_reduce.stats(model)         # tokens per layer, realised FLOPs reduction
    ssm_reduce.remove(model)        # exact original behaviour back
    ssm_reduce.prune(model, calib, sparsity=0.5, method="mrp")   # one-shot weight pruning
"""

from .config import ReduceConfig, default_schedule, flops_reduction_for, solve_keep_ratio
from .methods import METHODS
from .embedded import embedded_model_path
from .loading import load_model, save_model
from .patch import apply, check, is_patched, protect, remove, scan_routes, stats, supported_hosts
from . import prune  # noqa: E402  (callable: ssm_reduce.prune(model, calib, ...))

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ReduceConfig",
    "apply",
    "check",
    "default_schedule",
    "embedded_model_path",
    "flops_reduction_for",
    "is_patched",
    "load_model",
    "protect",
    "prune",
    "remove",
    "save_model",
    "scan_routes",
    "solve_keep_ratio",
    "stats",
    "supported_hosts",
]
