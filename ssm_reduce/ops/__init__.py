"""Front door of the token-reduction ops: the compiled kernel when it is built and the inputs are on
CUDA, the torch reference (``ops.reference``) otherwise; ``ops.route`` decides which.

Set ``SSM_REDUCE_DISABLE_KERNELS=1`` to force the reference everywhere (useful to compare the two).
``SSM_REDUCE_SCAN_BACKEND=triton`` runs the Mamba-2 scan on CUDA through the chunked Triton kernels of
``ops.ssd_triton`` instead of the compiled step-by-step kernel (no compiled extension needed; under
``TRITON_INTERPRET=1`` also on a CPU); ``cuda``, the default, keeps the compiled kernel.
"""

from __future__ import annotations

import torch

from . import extension, reference
from .route import GRID_YZ_LIMIT, KERNEL_DSTATES, SCAN_BACKENDS, Scan, scan_backend, scan_kernel

__all__ = ["match", "apply_plan", "scan_score_mamba2", "scan_score_mamba1", "kernel_status", "kernels_run_on",
           "METRIC_CODES", "scan_backend", "KERNEL_DSTATES", "GRID_YZ_LIMIT", "SCAN_BACKENDS"]

METRIC_CODES = {"clip": 0, "l1": 1, "l2": 2, "mean": 3}


def kernel_status() -> dict:
    """Whether the compiled kernels are loaded, why not, which ops they provide, and the Mamba-2 scan's
    backend (``scan_backend``; with whether triton is importable)."""
    from . import ssd_triton

    module, reason = extension.load()
    ops = sorted(name for name in extension.KERNEL_OPS if module is not None and hasattr(module, name))
    return {"loaded": module is not None, "reason": reason, "ops": ops, "scan_backend": scan_backend(),
            "triton": ssd_triton.available()}


def kernels_run_on(tensor: torch.Tensor) -> bool:
    """Whether the compiled kernels would serve a tensor on this device."""
    return extension.serves(tensor)


def match(src, dst, src_mask, dst_mask):
    """See ``reference.match``."""
    if extension.serves(src, dst, src_mask, dst_mask):
        return torch.ops.ssm_reduce.match(src, dst, src_mask, dst_mask)
    return reference.match(src, dst, src_mask, dst_mask)


def apply_plan(xs, slot, weights, n_out):
    """See ``reference.apply_plan``."""
    xs, weights = list(xs), list(weights)
    # (float64 streams: the reference, which accumulates them in float64; the kernel accumulates in float32)
    if extension.serves(slot, *xs, *weights) and all(x.dtype != torch.float64 for x in xs):
        return torch.ops.ssm_reduce.apply_plan(xs, slot, [w.float() for w in weights], int(n_out))
    return reference.apply_plan(xs, slot, weights, n_out)


def _finish_scores(score_part, sq_part, channels: int, metric: str):
    total = score_part.sum(-1) / channels
    return (total.sqrt() if metric == "l2" else total), sq_part.sum(-1)


def _metric_code(metric: str) -> int:
    if metric not in METRIC_CODES:
        raise ValueError(f"metric={metric!r} is not supported; choose {', '.join(METRIC_CODES)}")
    return METRIC_CODES[metric]


def scan_score_mamba2(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None, dt_softplus=True,
                      dt_min=0.0, dt_max=float("inf"), metric="clip"):
    """See ``reference.scan_score_mamba2``."""
    kernel = scan_kernel(x, B.shape[-1], (dt, B, C, z), (A, D, dt_bias, initial_state), (x.shape[0], x.shape[2]),
                         mamba2=True)
    if kernel is Scan.TRITON:
        from . import ssd_triton

        y, state, part, sq = ssd_triton.scan_score_mamba2(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus,
                                                          dt_min, dt_max, metric)
        return (y, state, *_finish_scores(part, sq, x.shape[2] * x.shape[3], metric))
    if kernel is Scan.REFERENCE:
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
    if scan_kernel(u, A.shape[-1], (delta, B, C, z), (A, D, delta_bias, initial_state), (u.shape[0],),
                   mamba2=False) is Scan.REFERENCE:
        return reference.scan_score_mamba1(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, metric)
    as_f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    y, state, part, sq = torch.ops.ssm_reduce.scan_score_mamba1(
        u, delta, A.float().contiguous(), B, C, as_f32(D), z, as_f32(delta_bias),
        initial_state, bool(delta_softplus), _metric_code(metric),
    )
    return (y, state, *_finish_scores(part, sq, u.shape[1], metric))
