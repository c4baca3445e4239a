"""Loading the compiled extension ``ssm_reduce._C`` and exposing its kernels as torch custom ops.

``SSM_REDUCE_DISABLE_KERNELS=1`` turns the extension off (read at every call, so one process can compare
the kernels against the references).
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from typing import List, Optional

import torch
from torch import Tensor  # module scope: custom_op reads the (string) annotations below from here

KERNEL_OPS = ("scan_score_mamba2", "scan_score_mamba1", "match", "apply_plan")

# Device types the loaded extension serves; ``ssm_reduce.testing.standin_extension`` widens it.
_served = {"device_types": ("cuda",), "module": None}


def disabled() -> bool:
    return os.environ.get("SSM_REDUCE_DISABLE_KERNELS", "0") not in ("", "0")


def load() -> tuple:
    """(module or None, reason) for the compiled extension."""
    if disabled():
        return None, "disabled by SSM_REDUCE_DISABLE_KERNELS"
    if _served["module"] is not None:
        return _served["module"], "loaded"
    return _import_extension()


def serves(*tensors: torch.Tensor) -> bool:
    """The kernels serve these tensors: loaded, and all of them on one device of a served type."""
    module, _ = load()
    served = _served["device_types"]
    return module is not None and all(t.device.type in served and t.device == tensors[0].device for t in tensors)


def serves_device(device: torch.device) -> bool:
    return load()[0] is not None and torch.device(device).type in _served["device_types"]


@lru_cache(maxsize=None)
def _import_extension():
    try:
        module = importlib.import_module("ssm_reduce._C")
    except ImportError as err:
        return None, (f"extension ssm_reduce._C not built ({err}); on a CUDA machine: SSM_REDUCE_BUILD_CUDA=1 pip "
                      "install --no-build-isolation -e .")
    try:
        register_custom_ops(module)
    except Exception as err:  # e.g. a torch too old for these custom-op signatures: use the references
        return None, f"extension ssm_reduce._C loaded but its ops could not be registered with torch ({err})"
    return module, "loaded"


def register_custom_ops(module) -> None:
    """Expose the kernels as ``torch.ops.ssm_reduce.*`` custom ops with shape-only fake implementations,
    so ``torch.compile`` traces through them and ``torch.library.opcheck`` can test them."""
    from torch.library import custom_op

    @custom_op("ssm_reduce::scan_score_mamba2", mutates_args=())
    def scan_score_mamba2_op(
        x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
        dt_bias: Optional[Tensor], initial_state: Optional[Tensor], dt_softplus: bool, dt_min: float, dt_max: float,
        metric: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return tuple(module.scan_score_mamba2(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, dt_min, dt_max, metric))

    @scan_score_mamba2_op.register_fake
    def _(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, dt_min, dt_max, metric):
        b, l, h, p = x.shape
        tiles = -(-p // 32)
        part = x.new_empty(b, l, h * tiles, dtype=torch.float32)
        return x.new_empty(b, l, h, p), x.new_empty(b, h, p, B.shape[-1], dtype=torch.float32), part, part.clone()

    @custom_op("ssm_reduce::scan_score_mamba1", mutates_args=())
    def scan_score_mamba1_op(
        u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
        delta_bias: Optional[Tensor], initial_state: Optional[Tensor], delta_softplus: bool, metric: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return tuple(module.scan_score_mamba1(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, metric))

    @scan_score_mamba1_op.register_fake
    def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, metric):
        b, d, l = u.shape
        part = u.new_empty(b, l, -(-d // 32), dtype=torch.float32)
        return u.new_empty(b, d, l), u.new_empty(b, d, A.shape[1], dtype=torch.float32), part, part.clone()

    @custom_op("ssm_reduce::match", mutates_args=())
    def match_op(src: Tensor, dst: Tensor, src_mask: Tensor, dst_mask: Tensor) -> tuple[Tensor, Tensor]:
        return tuple(module.match(src, dst, src_mask, dst_mask))

    @match_op.register_fake
    def _(src, dst, src_mask, dst_mask):
        b, n = src.shape[:2]
        return src.new_empty(b, n, dtype=torch.float32), src.new_empty(b, n, dtype=torch.long)

    @custom_op("ssm_reduce::apply_plan", mutates_args=())
    def apply_plan_op(xs: List[Tensor], slot: Tensor, weights: List[Tensor], n_out: int) -> List[Tensor]:
        return list(module.apply_plan(xs, slot, weights, n_out))

    @apply_plan_op.register_fake
    def _(xs, slot, weights, n_out):
        return [x.new_empty(x.shape[0], n_out, x.shape[2]) for x in xs]
