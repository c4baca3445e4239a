"""The torch twins of the kernels (ssm_reduce.ops.reference) against transformers' own scans."""

import pytest
import torch

from ssm_reduce import ops
from ssm_reduce.ops import reference as R
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
    fits = ops._scan_kernel_fits
    assert fits(x, 16, (dt, bc, bc, None), (a, d, None, None))
    assert [n for n in range(1, 300) if fits(x, n, (dt, bc, bc, None), (a, d, None, None))] == list(ops.KERNEL_DSTATES)
    assert not fits(x, 16, (dt.float(), bc, bc, None), (a, d, None, None))
    assert not fits(x, 16, (dt, bc, bc, torch.zeros(1, 4, 2, 8)), (a, d, None, None))
    meta = torch.zeros(2, device="meta")
    assert not fits(x, 16, (dt, bc, bc, None), (meta, d, None, None))
