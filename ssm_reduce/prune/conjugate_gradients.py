"""Jacobi-preconditioned conjugate gradients for many rows at once, each on its own support, in float32 or
with a low-precision operator; the operators they apply and the choice of that precision (docs/mrp.md,
"Precision")."""

from __future__ import annotations

import time
from typing import Optional

import torch

from .settings import MRPSettings
from .workspace import CGBuffers, Memo


def jacobi_scaled(a: torch.Tensor, a32: Optional[torch.Tensor] = None):
    """(``D^-1/2 A D^-1/2`` in float32, ``D^-1/2`` as a (1, n) float32 row) for an (n, n) matrix with a
    positive diagonal, scaled in float32 (``a32``: A in float32 when the caller has it)."""
    scale = torch.diag(a).double().rsqrt().float()
    a32 = a.float() if a32 is None else a32
    return torch.mul(a32, scale[:, None]).mul_(scale[None, :]), scale[None, :]


def pcg32(b, support, a_hat, rel_tol, max_iter, buffers: CGBuffers):
    """Conjugate gradients for ``A_KK y = b_K`` on every row from y = 0, in float32, each row with its own
    support K (``support``: 1.0 on it, 0.0 off it, float32, the shape of b), until each row's residual norm
    is below ``rel_tol`` (a number or one per row) times its right-hand side's, or ``max_iter``. ``a_hat``
    is the Jacobi-scaled operator ``D^-1/2 A D^-1/2`` (unit diagonal) shared by all rows, so this is
    Jacobi-preconditioned CG in scaled variables: the caller scales ``b`` by ``D^-1/2`` going in and ``y``
    going out. A bfloat16 ``a_hat`` is applied in bfloat16 (the vectors stay float32; its rounding limits
    the attainable relative residual, which the caller's refinement accounts for). ``b`` must be zero off
    the support and is overwritten (it becomes the residual); ``y`` is a buffer of ``buffers``, valid until
    their next use. A row whose operator float32 sees as not positive definite stops where it is."""
    y = buffers.y.take(b).zero_()
    r = b  # overwritten: callers pass a temporary
    p = buffers.p.take(b).copy_(r)
    hp, tmp = buffers.hp.take(b), buffers.tmp.take(b)
    low = a_hat.dtype != torch.float32
    if low:
        p_low, hp_low = buffers.p_low.take(b, a_hat.dtype), buffers.hp_low.take(b, a_hat.dtype)
        support_low = buffers.support_low.take(b, a_hat.dtype).copy_(support)  # (0 and 1: exact)

    # row dot products as a product then a sum, squared norms by ``vector_norm`` (one pass, nothing written)
    def dot(u, v):
        return torch.mul(u, v, out=tmp).sum(1)

    def squared_norm(u):
        return torch.linalg.vector_norm(u, dim=1).square_()

    rr = squared_norm(r)
    target = rr * rel_tol**2
    for _ in range(max_iter):
        if bool((rr <= target).all()):
            break
        # masked: keeps r, and so p, on the support (a low-precision product is masked before conversion)
        if low:
            hp.copy_(torch.matmul(p_low.copy_(p), a_hat, out=hp_low).mul_(support_low))
        else:
            torch.matmul(p, a_hat, out=hp).mul_(support)
        curvature = dot(p, hp)
        # p A p <= 0 (or not finite): the row stops for good (rr = 0 from then on); the caller's float64
        # check or direct solve takes over
        live = (curvature > 0) & (rr > 0)
        alpha = torch.where(live, rr / torch.where(live, curvature, 1.0), 0.0)[:, None]
        y.addcmul_(alpha, p)
        r.addcmul_(alpha, hp, value=-1.0)
        rr_next = torch.where(live, squared_norm(r), 0.0)
        beta = torch.where(live, rr_next / torch.where(live, rr, 1.0), 0.0)[:, None]
        torch.addcmul(r, p, beta, out=p)  # p = r + beta p, in one pass
        rr = rr_next
    return y


def pcg_by_precision(b, support, low, a_low, a_hat, rel_tol, max_iter, buffers: CGBuffers):
    """``pcg32`` with the low-precision operator ``a_low`` for the rows where ``low`` (bool, one per row) is
    True and the float32 ``a_hat`` for the others (no row copies when all rows share one); ``rel_tol`` one
    per row."""
    correction = None
    for part, matrix in ((low, a_low), (~low, a_hat)):
        if not bool(part.any()):
            continue
        if bool(part.all()):
            return pcg32(b, support, matrix, rel_tol, max_iter, buffers)
        if correction is None:
            correction = buffers.split_y.take(b)
        rows = part.nonzero().flatten()  # (gathered into scratch buffers: no fresh pages)
        b_part = torch.index_select(b, 0, rows, out=buffers.split_b.take(b[: rows.numel()]))
        support_part = torch.index_select(support, 0, rows, out=buffers.split_support.take(b[: rows.numel()]))
        correction.index_copy_(0, rows, pcg32(b_part, support_part, matrix, rel_tol[rows], max_iter, buffers))
    return correction


def operators(matrix: torch.Tensor, memo: Memo, settings: MRPSettings):
    """(Jacobi-scaled float32 matrix, its (1, n) float32 scale, the scaled matrix in the low precision or
    None, the matrix in float32) for the inner solves on an (n, n) SPD ``matrix`` (H, or H^-1), kept in
    ``memo`` while the matrix is the same."""
    def build():
        m32 = matrix.float()
        m_hat, scale32 = jacobi_scaled(matrix, m32)
        auto_small = settings.low_precision == "auto" and matrix.shape[0] < settings.low_min_features
        dtype = None if auto_small else low_dtype(matrix.device, settings.low_precision)
        return m_hat, scale32, None if dtype is None else m_hat.to(dtype), m32

    return memo.get(matrix, build)


_LOW_FAST: dict = {}


def low_dtype(device: torch.device, low_precision) -> Optional[torch.dtype]:
    """The dtype of the inner solves' products on ``device`` for ``MRPSettings.low_precision``, or None for
    float32: "auto" takes bfloat16 on CUDA devices of compute capability 8.0+, and on CPUs where a one-time
    probe finds bfloat16 products clearly faster than float32's."""
    if low_precision is None or isinstance(low_precision, torch.dtype):
        return low_precision
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else None
    if device.type != "cpu":
        return None
    key = torch.get_num_threads()
    if key not in _LOW_FAST:
        _LOW_FAST[key] = _bfloat16_is_faster()
    return torch.bfloat16 if _LOW_FAST[key] else None


def _bfloat16_is_faster() -> bool:
    """Whether this CPU multiplies bfloat16 matrices clearly faster than float32 ones (native bfloat16
    instructions make them faster; without them a low-precision product can be far slower)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(512, 512, generator=gen)
    p = torch.randn(256, 512, generator=gen)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        aa, pp = a.to(dtype), p.to(dtype)
        torch.matmul(pp, aa)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            torch.matmul(pp, aa)
            times.append(time.perf_counter() - t0)
            if dtype is torch.bfloat16 and times[-1] > 4 * best[torch.float32]:
                break  # slow: emulated
        best[dtype] = min(times)
    return best[torch.bfloat16] < 0.75 * best[torch.float32]
