"""Front door of the token-reduction ops: the compiled kernel when it is built and the inputs are on
CUDA, the torch reference (``ops.reference``) otherwise.

Set ``SSM_REDUCE_DISABLE_KERNELS=1`` to force the reference everywhere (useful to compare the two).
``SSM_REDUCE_SCAN_BACKEND=triton`` runs the Mamba-2 scan on CUDA through the chunked Triton kernels of
``ops.ssd_triton`` instead of the compiled step-by-step kernel (no compiled extension needed; under
``TRITON_INTERPRET=1`` also on a CPU); ``cuda``, the default, keeps the compiled kernel.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from typing import List, Optional

import torch
from torch import Tensor  # module scope: custom_op reads the (string) annotations below from here

from . import reference

__all__ = ["match", "apply_plan", "scan_score_mamba2", "scan_score_mamba1", "kernel_status", "kernels_run_on", "METRIC_CODES",
           "scan_backend"]

METRIC_CODES = {"clip": 0, "l1": 1, "l2": 2, "mean": 3}
KERNEL_OPS = ("scan_score_mamba2", "scan_score_mamba1", "match", "apply_plan")


def _disabled() -> bool:
    # Read at every call, so a process can compare kernels against the references.
    return os.environ.get("SSM_REDUCE_DISABLE_KERNELS", "0") not in ("", "0")


SCAN_BACKENDS = ("cuda", "triton")


def scan_backend() -> str:
    """The Mamba-2 scan's backend on CUDA (``SSM_REDUCE_SCAN_BACKEND``, read at every call): ``cuda``
    (default) — the compiled kernel where it is built; ``triton`` — the chunked Triton kernels."""
    value = os.environ.get("SSM_REDUCE_SCAN_BACKEND", "").strip().lower() or "cuda"
    if value not in SCAN_BACKENDS:
        raise ValueError(f"SSM_REDUCE_SCAN_BACKEND must be one of {', '.join(SCAN_BACKENDS)}, got {value!r}")
    return value


def _triton_selected(x: torch.Tensor) -> bool:
    """The Triton Mamba-2 scan is selected and can run on ``x``'s device: CUDA, or the CPU under
    TRITON_INTERPRET=1 (Triton's interpreter), with triton importable."""
    if _disabled() or scan_backend() != "triton":
        return False
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1" and x.device.type == "cpu"
    if not (x.is_cuda or interpreted):
        return False
    from . import ssd_triton

    return ssd_triton.available()


def _triton_scan_serves(x: torch.Tensor, operands, dstate: int) -> bool:
    """The Triton scan serves the scan of ``x`` (B, L, H, P): selected (``_triton_selected``), every
    operand on x's device, batch and heads within the grid's limits, every array within the kernels'
    int32 indexing."""
    from . import ssd_triton

    return (_triton_selected(x) and all(t is None or t.device == x.device for t in operands)
            and 0 < x.shape[0] <= GRID_YZ_LIMIT and 0 < x.shape[2] <= GRID_YZ_LIMIT and ssd_triton.fits(x, dstate))


def _load_extension():
    """(module or None, reason) for the compiled extension ``ssm_reduce._C``."""
    if _disabled():
        return None, "disabled by SSM_REDUCE_DISABLE_KERNELS"
    return _import_extension()


@lru_cache(maxsize=None)
def _import_extension():
    try:
        module = importlib.import_module("ssm_reduce._C")
    except ImportError as err:
        return None, f"extension ssm_reduce._C not built ({err}); on a CUDA machine: SSM_REDUCE_BUILD_CUDA=1 pip install --no-build-isolation -e ."
    try:
        _register_custom_ops(module)
    except Exception as err:  # e.g. a torch too old for these custom-op signatures: use the references
        return None, f"extension ssm_reduce._C loaded but its ops could not be registered with torch ({err})"
    return module, "loaded"


def _register_custom_ops(module) -> None:
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


def kernel_status() -> dict:
    """Whether the compiled kernels are loaded, why not, which ops they provide, and the Mamba-2 scan's
    backend (``scan_backend``; with whether triton is importable)."""
    from . import ssd_triton

    module, reason = _load_extension()
    ops = sorted(name for name in KERNEL_OPS if module is not None and hasattr(module, name))
    return {"loaded": module is not None, "reason": reason, "ops": ops, "scan_backend": scan_backend(),
            "triton": ssd_triton.available()}


def kernels_run_on(tensor: torch.Tensor) -> bool:
    """Whether the compiled kernels would serve a tensor on this device."""
    return _use_kernel(tensor)


def _use_kernel(*tensors: torch.Tensor) -> bool:
    """The kernels serve these tensors: built, and all of them on one CUDA device."""
    module, _ = _load_extension()
    return module is not None and all(t.is_cuda and t.device == tensors[0].device for t in tensors)


def match(src, dst, src_mask, dst_mask):
    """See ``reference.match``."""
    if _use_kernel(src, dst, src_mask, dst_mask):
        return torch.ops.ssm_reduce.match(src, dst, src_mask, dst_mask)
    return reference.match(src, dst, src_mask, dst_mask)


def apply_plan(xs, slot, weights, n_out):
    """See ``reference.apply_plan``."""
    xs, weights = list(xs), list(weights)
    # (float64 streams: the reference, which accumulates them in float64; the kernel accumulates in float32)
    if _use_kernel(slot, *xs, *weights) and all(x.dtype != torch.float64 for x in xs):
        return torch.ops.ssm_reduce.apply_plan(xs, slot, [w.float() for w in weights], int(n_out))
    return reference.apply_plan(xs, slot, weights, n_out)


def _finish_scores(score_part, sq_part, channels: int, metric: str):
    total = score_part.sum(-1) / channels
    return (total.sqrt() if metric == "l2" else total), sq_part.sum(-1)


# State sizes the scan kernels are instantiated for (8 lanes per channel, 1-32 states per lane).
KERNEL_DSTATES = (8, 16, 32, 64, 128, 256)


def scan_kernel_serves(x: torch.Tensor, dstate: int, mamba2: bool = False) -> bool:
    """Whether a scan-and-score kernel runs a scan of input ``x`` with state size ``dstate``: the
    compiled one (built, x on CUDA, an instantiated state size) or, for a Mamba-2 scan (``mamba2``),
    the Triton one where ``SSM_REDUCE_SCAN_BACKEND=triton`` selects it."""
    return (mamba2 and _triton_selected(x)) or (dstate in KERNEL_DSTATES and _use_kernel(x))


# CUDA's limit on a grid's y and z dimensions, which the scan kernels give to batch rows and heads.
GRID_YZ_LIMIT = 65535


def _scan_kernel_fits(x, dstate: int, same_dtype, same_device, grid_yz=()) -> bool:
    """Whether a scan's operands suit the compiled kernel: an instantiated state size, the streamed
    inputs (dt, B, C, z) in x's dtype (the kernel reads them as x's type; anything else would be
    rounded), every operand on x's device, and the sizes that index the grid (``grid_yz``) within
    CUDA's limit. Otherwise the reference runs (and reports a device mismatch)."""
    return (dstate in KERNEL_DSTATES and all(t is None or t.dtype == x.dtype for t in same_dtype)
            and all(t is None or t.device == x.device for t in (*same_dtype, *same_device))
            and all(0 < n <= GRID_YZ_LIMIT for n in grid_yz))


def _metric_code(metric: str) -> int:
    if metric not in METRIC_CODES:
        raise ValueError(f"metric={metric!r} is not supported; choose {', '.join(METRIC_CODES)}")
    return METRIC_CODES[metric]


def scan_score_mamba2(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None, dt_softplus=True,
                      dt_min=0.0, dt_max=float("inf"), metric="clip"):
    """See ``reference.scan_score_mamba2``."""
    if _triton_scan_serves(x, (dt, A, B, C, D, z, dt_bias, initial_state), B.shape[-1]):
        from . import ssd_triton

        y, state, part, sq = ssd_triton.scan_score_mamba2(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus,
                                                          dt_min, dt_max, metric)
        return (y, state, *_finish_scores(part, sq, x.shape[2] * x.shape[3], metric))
    fits = _scan_kernel_fits(x, B.shape[-1], (dt, B, C, z), (A, D, dt_bias, initial_state), (x.shape[0], x.shape[2]))
    if not (_use_kernel(x) and fits):
        return reference.scan_score_mamba2(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, dt_min, dt_max, metric)
    as_f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    y, state, part, sq = torch.ops.ssm_reduce.scan_score_mamba2(
        x, dt, A.float().contiguous(), B, C, as_f32(D), z, as_f32(dt_bias),
        initial_state, bool(dt_softplus), float(dt_min), float(dt_max), _metric_code(metric),
    )
    return (y, state, *_finish_scores(part, sq, x.shape[2] * x.shape[3], metric))


def scan_score_mamba1(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None, delta_softplus=True,
                      metric="clip"):
    """See ``reference.scan_score_mamba1``."""
    if not (_use_kernel(u) and _scan_kernel_fits(u, A.shape[-1], (delta, B, C, z), (A, D, delta_bias, initial_state),
                                                 (u.shape[0],))):
        return reference.scan_score_mamba1(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, metric)
    as_f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    y, state, part, sq = torch.ops.ssm_reduce.scan_score_mamba1(
        u, delta, A.float().contiguous(), B, C, as_f32(D), z, as_f32(delta_bias),
        initial_state, bool(delta_softplus), _metric_code(metric),
    )
    return (y, state, *_finish_scores(part, sq, u.shape[1], metric))
