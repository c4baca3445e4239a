"""The Triton Mamba-2 scan (ssm_reduce.ops.ssd_triton) checked on a CPU through Triton's interpreter.

Run by tests/test_ssd_triton.py in a fresh interpreter, because TRITON_INTERPRET must be set before
the kernels are defined: ``TRITON_INTERPRET=1 python -m tests.ssd_triton_interpreted``. Exits non-zero
(with the failing case) when a check fails; prints one line per check.
"""

from __future__ import annotations

import os
import sys

import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1 (the kernels run on the CPU only through Triton's interpreter)")

import ssm_reduce  # noqa: E402
from ssm_reduce import ops  # noqa: E402
from ssm_reduce.ops import reference as R  # noqa: E402
from ssm_reduce.ops import ssd_triton  # noqa: E402

from .conftest import assert_close_to_max as close  # noqa: E402
from .conftest import mamba2_scan_args as m2_args  # noqa: E402
from .conftest import random_tokens, tiny_mamba2  # noqa: E402


def check_kernels():
    cases = [
        # (b, l, h, p, g, n, chunk, options)
        (2, 1, 2, 16, 1, 16, 16, {}),
        (2, 2, 2, 16, 1, 16, 16, {"z": True}),
        (3, 63, 4, 20, 2, 16, 16, {"z": True, "init": True}),  # P, N not powers of two (masked)
        (1, 65, 2, 32, 1, 24, 32, {"noncontiguous": True}),
        (2, 129, 8, 8, 8, 8, 64, {"init": True, "metric": "l2"}),  # G = H
        (2, 130, 2, 16, 2, 16, 128, {"z": True, "metric": "l1", "dt_limits": (0.01, 0.5)}),
        (1, 300, 2, 16, 1, 32, 128, {"metric": "mean", "no_softplus": True}),  # three chunks, the last partial
        (2, 40, 2, 16, 1, 16, 32, {"dt_shift": -12.0}),  # softplus of very negative dt (log1p's range)
    ]
    for b, l, h, p, g, n, chunk, opt in cases:
        # 16-bit inputs: products of operands rounded to the input's precision (as on the tensor cores)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
            args = m2_args(b, l, h, p, g, n, dtype, noncontiguous=opt.get("noncontiguous", False))
            if opt.get("z"):
                args["z"] = torch.randn(b, l, h, p).to(dtype)
            if opt.get("init"):
                args["initial_state"] = 0.1 * torch.randn(b, h, p, n)
            if "dt_limits" in opt:
                args["dt_min"], args["dt_max"] = opt["dt_limits"]
            if "dt_shift" in opt:
                args["dt"] = (args["dt"].float() + opt["dt_shift"]).to(dtype)
            if opt.get("no_softplus"):
                args["dt"] = args["dt"].abs()
                args["dt_softplus"] = False
            metric = opt.get("metric", "clip")
            y, state, part, sq = ssd_triton.scan_score_mamba2(**args, metric=metric, chunk=chunk)
            got = (y, state, *ops._finish_scores(part, sq, h * p, metric))
            ref = R.scan_score_mamba2(**args, metric=metric)
            close(got, ref, tol, f"{(b, l, h, p, g, n)} chunk {chunk} {dtype} {opt}")
            assert y.dtype == dtype and state.dtype == torch.float32
    print(f"kernels: {len(cases)} shapes x 3 dtypes match the step-by-step reference")


def check_front_door_and_model():
    args = m2_args(2, 70, 4, 16, 1, 16)
    os.environ["SSM_REDUCE_SCAN_BACKEND"] = "triton"
    calls = []
    original = ssd_triton.scan_score_mamba2

    def counted(*a, **k):
        calls.append(1)
        return original(*a, **k)

    ssd_triton.scan_score_mamba2 = counted
    try:
        got = ops.scan_score_mamba2(**args, metric="l2")
        assert calls, "SSM_REDUCE_SCAN_BACKEND=triton did not route ops.scan_score_mamba2 to the Triton scan"
        close(got, R.scan_score_mamba2(**args, metric="l2"), 1e-5, "front door")
        assert ops.kernel_status()["scan_backend"] == "triton"
        # a patched tiny Mamba-2 model: anchors scan through the Triton kernels, as they would on CUDA
        model = tiny_mamba2(layers=6).eval()
        ids = random_tokens(3, 150)
        with torch.no_grad():
            ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
            calls.clear()
            triton_out = model(ids)
            assert calls, "the patched model's anchors did not take the Triton scan"
            os.environ["SSM_REDUCE_SCAN_BACKEND"] = "cuda"  # on a CPU: the host's path and the reference
            calls.clear()
            host_out = model(ids)
            assert not calls
        assert torch.equal(triton_out.kept_positions, host_out.kept_positions), "kept positions differ"
        torch.testing.assert_close(triton_out.logits, host_out.logits, atol=1e-4, rtol=1e-4)
        print(f"front door and a patched tiny Mamba-2 model: the Triton scan ran at the anchors, kept positions "
              f"and logits equal the host path's ({len(calls)} calls on the host path)")
    finally:
        ssd_triton.scan_score_mamba2 = original
        os.environ.pop("SSM_REDUCE_SCAN_BACKEND", None)


if __name__ == "__main__":
    torch.manual_seed(0)
    check_kernels()
    check_front_door_and_model()
    print("ok")
