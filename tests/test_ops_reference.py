"""The torch twins of the kernels (ssm_reduce.ops.reference) against transformers' own scans."""

import pytest
import torch

from ssm_reduce import ops
from ssm_reduce.ops import reference as R
from ssm_reduce.ops import route
from ssm_reduce.reduce import importance_scores


def mamba2_inputs(b=2, l=37, h=4, p=8, g=2, n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(x=r(b, l, h, p), dt=r(b, l, h), A=-torch.rand(h, generator=gen) - 0.1, B=r(b, l, g, n), C=r(b, l, g, n),
                D=r(h), dt_bias=0.1 * r(h)), r(b, l, h, p), 0.1 * r(b, h, p, n)


@pytest.mark.parametrize("with_init", [False, True])
def test_mamba2_reference_equals_transformers_chunk_scan(with_init):
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    args, _, init = mamba2_inputs()
    init = init if with_init else None
    y, state, score, sqnorm = R.scan_score_mamba2(**args, initial_state=init)
    ref_y, ref_state = mamba2_chunk_scan(args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size=16,
                                         D=args["D"], dt_bias=args["dt_bias"], dt_softplus=True,
                                         initial_states=init, return_final_states=True)
    torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, ref_state, atol=1e-4, rtol=1e-4)
    flat = y.reshape(*y.shape[:2], -1)
    for metric in ("clip", "l1", "l2", "mean"):
        score = R.scan_score_mamba2(**args, initial_state=init, metric=metric)[2]
        assert torch.allclose(score, importance_scores(flat, metric), atol=1e-6)
    torch.testing.assert_close(sqnorm, flat.pow(2).sum(-1))


def test_mamba2_gate_and_scores_before_the_gate():
    args, z, _ = mamba2_inputs()
    plain = R.scan_score_mamba2(**args)
    gated = R.scan_score_mamba2(**args, z=z)
    torch.testing.assert_close(gated[0], plain[0] * torch.nn.functional.silu(z))
    assert torch.equal(gated[2], plain[2])  # the score reads y before the gate


def test_mamba1_reference_equals_transformers_selective_scan():
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    gen = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    b, d, l, n = 2, 12, 41, 8
    u, delta, A = r(b, d, l), r(b, d, l), -torch.rand(d, n, generator=gen)
    B, C, D, z, bias = r(b, n, l), r(b, n, l), r(d), r(b, d, l), 0.1 * r(d)
    y, state, score, _ = R.scan_score_mamba1(u, delta, A, B, C, D=D, z=z, delta_bias=bias)
    ref_y, ref_state = mamba_selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True,
                                            return_last_state=True)
    torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, ref_state, atol=1e-4, rtol=1e-4)
    pre_gate = R.scan_score_mamba1(u, delta, A, B, C, D=D, delta_bias=bias)[0]
    assert torch.allclose(score, importance_scores(pre_gate.transpose(1, 2), "clip"), atol=1e-6)


def test_cpu_inputs_dispatch_to_the_references():
    args, _, _ = mamba2_inputs(l=5)
    for a, b in zip(ops.scan_score_mamba2(**args), R.scan_score_mamba2(**args)):
        assert torch.equal(a, b)
    assert ops.kernel_status()["loaded"] in (True, False)


def test_scan_kernel_takes_only_operands_it_reads_exactly():
    """The compiled scan is instantiated for N in KERNEL_DSTATES and reads dt, B, C, z as x's dtype;
    anything else (N = 24, an fp32 dt next to bf16 x, an operand on another device) runs the reference."""
    x = torch.zeros(1, 4, 2, 8, dtype=torch.bfloat16)
    dt, bc = torch.zeros(1, 4, 2, dtype=torch.bfloat16), torch.zeros(1, 4, 1, 16, dtype=torch.bfloat16)
    a, d = torch.zeros(2), torch.zeros(2)
    fits = lambda n, streamed, fixed, grid=(1, 2): route._fits_compiled(x, n, streamed, fixed, grid)  # noqa: E731
    assert fits(16, (dt, bc, bc, None), (a, d, None, None))
    assert [n for n in range(1, 300) if fits(n, (dt, bc, bc, None), (a, d, None, None))] == list(ops.KERNEL_DSTATES)
    assert not fits(16, (dt.float(), bc, bc, None), (a, d, None, None))
    assert not fits(16, (dt, bc, bc, torch.zeros(1, 4, 2, 8)), (a, d, None, None))
    meta = torch.zeros(2, device="meta")
    assert not fits(16, (dt, bc, bc, None), (meta, d, None, None))
    assert not fits(16, (dt, bc, bc, None), (a, d, None, None), grid=(1, route.GRID_YZ_LIMIT + 1))


def test_kernel_bindings_on_cpu_through_a_standin_module():
    """The Python half of the compiled kernels (custom-op registration with fake implementations, the
    front door's post-processing of the scans' per-tile partial sums, the two-stream apply_plan,
    torch.compile tracing, patched models taking the kernels' route) run against a torch stand-in with
    the extension's calling convention, in its own interpreter (tests/kernel_standin.py); on CUDA the
    real extension goes through the same code."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "tests.kernel_standin"], cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "scan_score_mamba2": "ok", "scan_score_mamba1": "ok", "match": "ok", "apply_plan": "ok", "torch_compile": "ok",
        "patched_mamba2": "ok", "patched_mamba": "ok"}


def test_match_reference_edge_cases():
    """NaN similarities never win (one bad token does not stop its row from merging; a NaN source gets
    -inf), and an empty destination set gives -inf / 0 like a fully masked one."""
    gen = torch.Generator().manual_seed(3)
    src, dst = torch.randn(2, 6, 8, generator=gen), torch.randn(2, 7, 8, generator=gen)
    masks = torch.ones(2, 6, dtype=torch.bool), torch.ones(2, 7, dtype=torch.bool)
    clean_sim, clean_idx = R.match(src, dst, *masks)
    dst[0, int(clean_idx[0, 0]), 2] = float("nan")  # source 0's best destination turns NaN
    src[1, 4, 0] = float("nan")
    sim, idx = R.match(src, dst, *masks)
    assert bool(torch.isfinite(sim[0]).all()) and not bool((idx[0] == clean_idx[0, 0]).any())
    expected = torch.nn.functional.normalize(src[0], dim=-1) @ torch.nn.functional.normalize(dst[0], dim=-1).T
    expected[:, int(clean_idx[0, 0])] = float("-inf")
    torch.testing.assert_close(sim[0], expected.max(-1).values)
    assert bool(torch.isneginf(sim[1, 4])) and int(idx[1, 4]) == 0
    assert bool(torch.isfinite(sim[1, torch.arange(6) != 4]).all())
    sim, idx = R.match(src, dst[:, :0], masks[0], masks[1][:, :0])
    assert sim.shape == (2, 6) and bool(torch.isneginf(sim).all()) and not bool(idx.any())
