"""The chunked Triton Mamba-2 scan (ssm_reduce.ops.ssd_triton) against the step-by-step reference: on a
CPU through Triton's interpreter (tests/ssd_triton_interpreted.py, in a fresh interpreter), natively on
CUDA; and the backend switch SSM_REDUCE_SCAN_BACKEND."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ssm_reduce
from ssm_reduce import ops
from ssm_reduce.ops import reference as R
from ssm_reduce.ops import route

from .conftest import assert_close_to_max, mamba2_scan_args, random_tokens, tiny_mamba2

HAS_TRITON = importlib.util.find_spec("triton") is not None
NO_TRITON = "triton is not installed (`pip install triton` runs these checks on a CPU through its interpreter)"


def test_scan_backend_setting_is_checked(monkeypatch):
    monkeypatch.delenv("SSM_REDUCE_SCAN_BACKEND", raising=False)
    assert ops.scan_backend() == "cuda"
    monkeypatch.setenv("SSM_REDUCE_SCAN_BACKEND", "Triton ")
    assert ops.scan_backend() == "triton"
    monkeypatch.setenv("SSM_REDUCE_SCAN_BACKEND", "tpu")
    with pytest.raises(ValueError, match="SSM_REDUCE_SCAN_BACKEND must be one of cuda, triton"):
        ops.scan_backend()
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="SSM_REDUCE_SCAN_BACKEND"):
        ops.scan_score_mamba2(x, torch.randn(1, 4, 2), -torch.rand(2), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8))


def test_triton_backend_off_cuda_keeps_the_reference(monkeypatch):
    """Selected on a CPU without the interpreter, the Triton scan does not serve: the reference runs."""
    monkeypatch.setenv("SSM_REDUCE_SCAN_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gen = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(2, 9, 2, 8, generator=gen), dt=torch.randn(2, 9, 2, generator=gen), A=-torch.rand(2),
                B=torch.randn(2, 9, 1, 8, generator=gen), C=torch.randn(2, 9, 1, 8, generator=gen))
    for got, ref in zip(ops.scan_score_mamba2(**args), R.scan_score_mamba2(**args)):
        assert torch.equal(got, ref)
    anchor = route.AnchorScan(mamba2=True, dstate=8, host_exposes_y=True)
    assert route.anchor_scan(anchor, "cpu", needs_y=True) is route.Scan.HOST


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_triton_scan_interpreted_on_cpu():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("SSM_REDUCE_SCAN_BACKEND", None)
    proc = subprocess.run([sys.executable, "-m", "tests.ssd_triton_interpreted"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


CUDA_TRITON = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON),
                                 reason="the native Triton scan tests need a CUDA GPU and triton")
# float32 inputs take exact float32 products (compared element by element); 16-bit ones round the
# products' operands to their own precision (as the tensor cores do), so they are compared relative to
# each output's largest magnitude, as the interpreted checks do
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@CUDA_TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 2, 63, 64, 65, 127, 129, 1000, 4096])
@pytest.mark.parametrize("batch, groups, heads", [(1, 1, 4), (3, 8, 8), (16, 1, 8)])
def test_triton_scan_on_cuda(dtype, length, batch, groups, heads):
    from ssm_reduce.ops import ssd_triton

    p, n = 64, 128
    args = mamba2_scan_args(batch, length, heads, p, groups, n, dtype, "cuda", seed=length)
    args["z"] = torch.randn(batch, length, heads, p, device="cuda").to(dtype)
    args["initial_state"] = 0.1 * torch.randn(batch, heads, p, n, device="cuda")
    y, state, part, sq = ssd_triton.scan_score_mamba2(**args, metric="clip")
    got = (y, state, *ops._finish_scores(part, sq, heads * p, "clip"))
    ref = R.scan_score_mamba2(**args, metric="clip")
    if dtype == torch.float32:
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])
    else:
        assert_close_to_max(got, ref, TOL[dtype], f"{dtype} length {length}")


@CUDA_TRITON
@torch.no_grad()
def test_patched_model_same_with_triton_scan(monkeypatch):
    model = tiny_mamba2(layers=6).cuda()
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    ids = random_tokens(3, 200).cuda()
    monkeypatch.setenv("SSM_REDUCE_SCAN_BACKEND", "triton")
    with_triton = model(ids)
    monkeypatch.setenv("SSM_REDUCE_DISABLE_KERNELS", "1")
    without = model(ids)
    assert torch.equal(with_triton.kept_positions, without.kept_positions)
    torch.testing.assert_close(with_triton.logits, without.logits, atol=1e-4, rtol=1e-4)


def test_int32_indexing_limit():
    """The Triton kernels index in int32: scans whose arrays would pass 2^31 elements are not given to them."""
    from ssm_reduce.ops import ssd_triton

    def x(*shape):
        return torch.empty(*shape, device="meta")

    assert ssd_triton.fits(x(16, 8192, 80, 64), 128)  # mamba2-2.7b, batch 16: 1.3e9 elements at most
    assert not ssd_triton.fits(x(64, 8192, 80, 64), 128)  # y alone has 2.7e9
    assert not ssd_triton.fits(x(1, 8192, 80, 64).expand(2**20, -1, -1, -1), 128)  # a broadcast batch: its outputs would be huge
    assert not ssd_triton.fits(x(4, 2**20, 80, 64)[:, :2], 128)  # few elements, but x's strides reach far
