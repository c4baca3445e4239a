"""Mamba-2 scan with fused token scores in the chunked (state-space-duality) form, as Triton kernels.

The CUDA ``scan_score_mamba2`` kernel runs the recurrence step by step on the CUDA cores: at Mamba-2's
state size (N = 128) that costs about 3 * N float32 operations per channel and token, which bounds it
well above a chunked scan whose work goes through the tensor cores. This module computes the same op
(same arguments and outputs as ``reference.scan_score_mamba2``, scores as per-token partial sums that
``ssm_reduce.ops`` finishes) chunk by chunk, with Q tokens per chunk:

1. ``_chunk_dt``: dt' = clamp(softplus(dt + bias)) and the within-chunk cumulative sums of dt' A;
2. ``_chunk_state``: each chunk's own final state, sum_t exp(cs_last - cs_t) dt'_t x_t B_t^T (matrix
   products over the chunk's tokens);
3. ``_state_passing``: the states entering every chunk, chunk after chunk, from the initial state;
   the last one is the final state;
4. ``_chunk_output``: y_t = sum_{s <= t in the chunk} (C_t . B_s) exp(cs_t - cs_s) dt'_s x_s
   + exp(cs_t) C_t . S_in + D x_t, and in the same pass, per token, the sum over the head's channels of
   the importance term and of y^2 (before the gate), then the gate silu(z) and the store.

Products take their operands in the input's precision (bfloat16 / float16 on the tensor cores; exact
float32 products for float32 inputs); states and accumulation are float32. Selected with ``SSM_REDUCE_SCAN_BACKEND=triton`` (see
``ssm_reduce.ops``); runs under ``TRITON_INTERPRET=1`` on a CPU, which is how the tests check it
without a GPU. The algorithm is the standard chunked form of a linear recurrence; the code is ours.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import _metric_code  # the kernels' metric numbering, shared with the compiled ones

try:  # optional: triton comes with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None
    tl = None

CHUNK = 256  # tokens per chunk (the per-chunk float32 states are read and written once each)
BLOCK_T = 64  # token rows per program of the output kernel (and the inner loops' step)


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _dot(a, b, DOT: tl.constexpr):
        """a @ b accumulated in float32: exact float32 products (DOT 0), or the operands rounded to
        bfloat16 (1) / float16 (2), the inputs' own precision, for the tensor cores' full rate; 3: the
        operands rounded to bfloat16, multiplied in float32 (the same numbers: bfloat16 products are
        exact in float32), for Triton's interpreter, whose bfloat16 products are wrong."""
        if DOT == 1:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        elif DOT == 2:
            return tl.dot(a.to(tl.float16), b.to(tl.float16))
        elif DOT == 3:
            return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b, input_precision="ieee")

    @triton.jit
    def _chunk_dt(dt_ptr, bias_ptr, A_ptr, d_out, cs_out, seqlen, nheads, nchunks,
                  s_db, s_dl, s_dh, dt_min, dt_max,
                  HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, Q: tl.constexpr):
        c, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        t = c * Q + tl.arange(0, Q)
        valid = t < seqlen
        d = tl.load(dt_ptr + b * s_db + t * s_dl + h * s_dh, mask=valid, other=0.0).to(tl.float32)
        if HAS_BIAS:
            d = d + tl.load(bias_ptr + h)
        if SOFTPLUS:  # as torch's softplus (threshold 20), log1p(u) to float32 accuracy as
            u = tl.exp(tl.minimum(d, 20.0))  # log(w) u / (w - 1) with w = 1 + u (the rounding of w cancels)
            w = 1.0 + u
            d = tl.where(d > 20.0, d, tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0))))
        d = tl.where(d < dt_min, dt_min, d)  # as torch.clamp: NaN stays NaN
        d = tl.where(d > dt_max, dt_max, d)
        d = tl.where(valid, d, 0.0)  # tokens past the end: no decay, no input
        cs = tl.cumsum(d * tl.load(A_ptr + h), axis=0)
        off = ((b * nheads + h) * nchunks + c) * Q + tl.arange(0, Q)
        tl.store(d_out + off, d)
        tl.store(cs_out + off, cs)

    @triton.jit
    def _chunk_state(x_ptr, B_ptr, d_ptr, cs_ptr, st_ptr, seqlen, nheads, nchunks, headdim, dstate, heads_per_group,
                     s_xb, s_xl, s_xh, s_xp, s_Bb, s_Bl, s_Bg, s_Bn,
                     Q: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr):
        c, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        g = h // heads_per_group
        p = tl.arange(0, BP)
        n = tl.arange(0, BN)
        base = ((b * nheads + h) * nchunks + c) * Q
        cs_last = tl.load(cs_ptr + base + Q - 1)
        acc = tl.zeros((BP, BN), dtype=tl.float32)
        for k0 in range(0, Q, BT):
            k = k0 + tl.arange(0, BT)
            t = c * Q + k
            valid = t < seqlen
            w = tl.load(d_ptr + base + k) * tl.exp(cs_last - tl.load(cs_ptr + base + k))
            xk = tl.load(x_ptr + b * s_xb + t[:, None] * s_xl + h * s_xh + p[None, :] * s_xp,
                         mask=valid[:, None] & (p[None, :] < headdim), other=0.0).to(tl.float32)
            Bk = tl.load(B_ptr + b * s_Bb + t[:, None] * s_Bl + g * s_Bg + n[None, :] * s_Bn,
                         mask=valid[:, None] & (n[None, :] < dstate), other=0.0).to(tl.float32)
            acc += _dot(tl.trans(xk * w[:, None]), Bk, DOT)
        off = (((b * nchunks + c) * nheads + h) * headdim + p[:, None]) * dstate + n[None, :]
        tl.store(st_ptr + off, acc, mask=(p[:, None] < headdim) & (n[None, :] < dstate))

    @triton.jit
    def _state_passing(st_ptr, cs_ptr, init_ptr, final_ptr, nheads, nchunks, size,
                       Q: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK: tl.constexpr):
        blk, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        e = blk * BLOCK + tl.arange(0, BLOCK)
        inside = e < size
        if HAS_INIT:
            s = tl.load(init_ptr + (b * nheads + h) * size + e, mask=inside, other=0.0).to(tl.float32)
        else:
            s = tl.zeros((BLOCK,), dtype=tl.float32)
        for c in range(0, nchunks):
            off = ((b * nchunks + c) * nheads + h) * size + e
            own = tl.load(st_ptr + off, mask=inside, other=0.0)
            tl.store(st_ptr + off, s, mask=inside)  # the state entering chunk c
            s = tl.exp(tl.load(cs_ptr + ((b * nheads + h) * nchunks + c) * Q + Q - 1)) * s + own
        tl.store(final_ptr + (b * nheads + h) * size + e, s, mask=inside)

    @triton.jit
    def _chunk_output(x_ptr, z_ptr, B_ptr, C_ptr, D_ptr, d_ptr, cs_ptr, st_ptr, y_ptr, part_ptr, sq_ptr,
                      seqlen, nheads, nchunks, headdim, dstate, heads_per_group,
                      s_xb, s_xl, s_xh, s_xp, s_zb, s_zl, s_zh, s_zp,
                      s_Bb, s_Bl, s_Bg, s_Bn, s_Cb, s_Cl, s_Cg, s_Cn,
                      HAS_D: tl.constexpr, HAS_Z: tl.constexpr, METRIC: tl.constexpr, Q: tl.constexpr,
                      BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr):
        pid, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        per_chunk = Q // BT
        c, mb = pid // per_chunk, pid % per_chunk
        g = h // heads_per_group
        p = tl.arange(0, BP)
        n = tl.arange(0, BN)
        base = ((b * nheads + h) * nchunks + c) * Q
        rows = mb * BT + tl.arange(0, BT)  # positions in the chunk
        t = c * Q + rows
        valid = t < seqlen
        pmask, nmask = p < headdim, n < dstate
        cs_t = tl.load(cs_ptr + base + rows)
        Ct = tl.load(C_ptr + b * s_Cb + t[:, None] * s_Cl + g * s_Cg + n[None, :] * s_Cn,
                     mask=valid[:, None] & nmask[None, :], other=0.0).to(tl.float32)
        # the state entering the chunk (P, N), read along N (contiguous), used transposed
        S = tl.load(st_ptr + (((b * nchunks + c) * nheads + h) * headdim + p[:, None]) * dstate + n[None, :],
                    mask=pmask[:, None] & nmask[None, :], other=0.0)
        acc = _dot(Ct, tl.trans(S), DOT) * tl.exp(cs_t)[:, None]
        for k0 in range(0, (mb + 1) * BT, BT):
            k = k0 + tl.arange(0, BT)
            tk = c * Q + k
            kvalid = tk < seqlen
            Bk = tl.load(B_ptr + b * s_Bb + tk[:, None] * s_Bl + g * s_Bg + n[None, :] * s_Bn,
                         mask=kvalid[:, None] & nmask[None, :], other=0.0).to(tl.float32)
            xk = tl.load(x_ptr + b * s_xb + tk[:, None] * s_xl + h * s_xh + p[None, :] * s_xp,
                         mask=kvalid[:, None] & pmask[None, :], other=0.0).to(tl.float32)
            cs_k = tl.load(cs_ptr + base + k)
            d_k = tl.load(d_ptr + base + k)
            causal = k[None, :] <= rows[:, None]
            decay = tl.exp(tl.where(causal, cs_t[:, None] - cs_k[None, :], float("-inf")))
            M = _dot(Ct, tl.trans(Bk), DOT) * decay * d_k[None, :]
            acc += _dot(M, xk, DOT)
        xt = tl.load(x_ptr + b * s_xb + t[:, None] * s_xl + h * s_xh + p[None, :] * s_xp,
                     mask=valid[:, None] & pmask[None, :], other=0.0).to(tl.float32)
        if HAS_D:
            acc += tl.load(D_ptr + h) * xt
        # per token: the head's channels' importance term and squares, before the gate
        keep = valid[:, None] & pmask[None, :]
        y0 = tl.where(keep, acc, 0.0)
        if METRIC == 0:
            term = tl.maximum(y0, 0.0)
        elif METRIC == 1:
            term = tl.abs(y0)
        elif METRIC == 2:
            term = y0 * y0
        else:
            term = y0
        out = (b * seqlen + t) * nheads + h
        tl.store(part_ptr + out, tl.sum(term, axis=1), mask=valid)
        tl.store(sq_ptr + out, tl.sum(y0 * y0, axis=1), mask=valid)
        if HAS_Z:
            zt = tl.load(z_ptr + b * s_zb + t[:, None] * s_zl + h * s_zh + p[None, :] * s_zp,
                         mask=keep, other=0.0).to(tl.float32)
            acc = acc * zt / (1.0 + tl.exp(-zt))
        yoff = ((b * seqlen + t[:, None]) * nheads + h) * headdim + p[None, :]
        tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=keep)


INDEX_LIMIT = 2**31  # the kernels index in int32: every tensor they touch must have fewer elements


def fits(x: torch.Tensor, dstate: int, chunk: Optional[int] = None) -> bool:
    """Whether every array of a scan of ``x`` (B, L, H, P) with state size ``dstate`` stays within int32
    indexing (the per-chunk states are the largest: B * chunks * H * P * N)."""
    batch, seqlen, nheads, headdim = x.shape
    chunks = max(1, -(-seqlen // int(chunk or CHUNK)))
    reach = sum((size - 1) * stride for size, stride in zip(x.shape, x.stride())) + 1  # x's furthest element
    biggest = max(batch * seqlen * nheads * max(headdim, dstate), batch * chunks * nheads * headdim * dstate, reach)
    return biggest < INDEX_LIMIT


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << max(0, (int(n) - 1).bit_length()))


def scan_score_mamba2(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None, dt_softplus=True,
                      dt_min=0.0, dt_max=float("inf"), metric="clip", chunk: Optional[int] = None):
    """``reference.scan_score_mamba2``'s op in chunked form; returns (y, final_state, score_part, sq_part)
    with the per-token partial sums of shape (B, L, H) that ``ssm_reduce.ops`` turns into scores.
    ``chunk``: tokens per chunk (a power of two, at least 16; default ``CHUNK``)."""
    if triton is None:
        raise RuntimeError("the Triton scan needs the triton package")
    metric_code = _metric_code(metric)  # (checked before anything runs)
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    q = int(chunk or CHUNK)
    if q < 16 or q & (q - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {q}")
    bt = min(BLOCK_T, q)
    nchunks = max(1, -(-seqlen // q))
    dev = x.device
    f32 = dict(device=dev, dtype=torch.float32)
    y = torch.empty(batch, seqlen, nheads, headdim, device=dev, dtype=x.dtype)
    final = torch.empty(batch, nheads, headdim, dstate, **f32)
    part = torch.zeros(batch, seqlen, nheads, **f32)
    sq = torch.zeros(batch, seqlen, nheads, **f32)
    if batch == 0 or nheads == 0 or headdim == 0 or dstate == 0:
        final.zero_() if initial_state is None else final.copy_(initial_state)
        return y.zero_(), final, part, sq
    if seqlen == 0:
        final.zero_() if initial_state is None else final.copy_(initial_state)
        return y, final, part, sq
    A32 = A.float().contiguous()
    bias = dt_bias.float().contiguous() if dt_bias is not None else A32
    Dv = D.float().contiguous() if D is not None else A32
    init = initial_state.float().contiguous() if initial_state is not None else final
    d = torch.empty(batch, nheads, nchunks, q, **f32)
    cs = torch.empty_like(d)
    states = torch.empty(batch, nchunks, nheads, headdim, dstate, **f32)
    dot = {torch.bfloat16: 1, torch.float16: 2}.get(x.dtype, 0)
    if dot == 1 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        dot = 3
    bp, bn = _pow2(headdim), _pow2(dstate)
    warps = 8 if bp * bn >= 8192 else 4
    _chunk_dt[(nchunks, batch, nheads)](
        dt, bias, A32, d, cs, seqlen, nheads, nchunks, *dt.stride(), float(dt_min), float(dt_max),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), Q=q)
    _chunk_state[(nchunks, batch, nheads)](
        x, B, d, cs, states, seqlen, nheads, nchunks, headdim, dstate, nheads // ngroups,
        *x.stride(), *B.stride(), Q=q, BT=bt, BP=bp, BN=bn, DOT=dot, num_warps=warps)
    size = headdim * dstate
    block = min(1024, _pow2(size))
    _state_passing[(-(-size // block), batch, nheads)](
        states, cs, init, final, nheads, nchunks, size, Q=q, HAS_INIT=initial_state is not None, BLOCK=block)
    zz = z if z is not None else x
    _chunk_output[(nchunks * (q // bt), batch, nheads)](
        x, zz, B, C, Dv, d, cs, states, y, part, sq, seqlen, nheads, nchunks, headdim, dstate, nheads // ngroups,
        *x.stride(), *zz.stride(), *B.stride(), *C.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, METRIC=metric_code, Q=q, BT=bt, BP=bp, BN=bn, DOT=dot,
        num_warps=warps)
    return y, final, part, sq
