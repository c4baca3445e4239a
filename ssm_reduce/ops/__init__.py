"""Front door of the token-reduction ops: the compiled kernel when it is built and the inputs are on
CUDA, the torch reference (``ops.reference``) otherwise.

Set ``SSM_REDUCE_DISABLE_KERNELS=1`` to force the reference everywhere (useful to compare the two).
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch

from . import reference

__all__ = ["match", "apply_plan", "kernel_status"]


@lru_cache(maxsize=None)
def _load_extension():
    """(module or None, reason) for the compiled extension ``ssm_reduce._C``."""
    if os.environ.get("SSM_REDUCE_DISABLE_KERNELS", "0") not in ("", "0"):
        return None, "disabled by SSM_REDUCE_DISABLE_KERNELS"
    try:
        module = importlib.import_module("ssm_reduce._C")
    except ImportError as err:
        return None, f"extension ssm_reduce._C not built ({err}); set SSM_REDUCE_BUILD_CUDA=1 and reinstall on a CUDA machine"
    return module, "loaded"


def kernel_status() -> dict:
    """Whether the compiled kernels are loaded, why not, and which ops they provide."""
    module, reason = _load_extension()
    ops = sorted(name for name in ("match", "apply_plan", "scan_score") if module is not None and hasattr(module, name))
    return {"loaded": module is not None, "reason": reason, "ops": ops}


def _kernel(name: str, *tensors: torch.Tensor):
    module, _ = _load_extension()
    if module is None or not all(t.is_cuda for t in tensors):
        return None
    return getattr(module, name, None)


def match(src, dst, src_mask, dst_mask):
    """See ``reference.match``."""
    fn = _kernel("match", src, dst)
    return (fn or reference.match)(src, dst, src_mask, dst_mask)


def apply_plan(x, slot, weight, n_out):
    """See ``reference.apply_plan``."""
    fn = _kernel("apply_plan", x)
    return (fn or reference.apply_plan)(x, slot, weight, n_out)
