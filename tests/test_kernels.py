"""CUDA kernels against their torch twins (ssm_reduce.ops.reference). Skipped without CUDA or without
the compiled extension (build it with SSM_REDUCE_BUILD_CUDA=1; see eval/gpu_setup.md)."""

import pytest
import torch

import ssm_reduce
from ssm_reduce import ops
from ssm_reduce.ops import reference as R

from .conftest import mamba2_scan_args, random_tokens, tiny_mamba, tiny_mamba2

if not torch.cuda.is_available():
    pytest.skip("the kernel tests need a CUDA GPU", allow_module_level=True)
if not ops.kernel_status()["loaded"]:
    pytest.skip(f"the ssm_reduce._C extension is not loaded: {ops.kernel_status()['reason']}", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) per dtype for the scan outputs, relative to a float32 reference fed the same
# (rounded) inputs; the state and scores are float32 in both.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}
LENGTHS = [1, 2, 63, 64, 65, 127, 129, 1000, 4096]


def m2_args(b, l, h, p, g, n, dtype, seed=0, noncontiguous=False):
    return mamba2_scan_args(b, l, h, p, g, n, dtype, "cuda", seed, noncontiguous)


def assert_scan_close(got, ref, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got[0].float(), ref[0].float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(got[1], ref[1], rtol=rtol, atol=atol)
    torch.testing.assert_close(got[2], ref[2], rtol=rtol, atol=atol)
    torch.testing.assert_close(got[3], ref[3], rtol=max(rtol, 1e-3), atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", LENGTHS)
def test_scan_score_mamba2_lengths_dtypes(dtype, length):
    args = m2_args(3, length, 4, 40, 2, 16, dtype)
    assert_scan_close(ops.scan_score_mamba2(**args), R.scan_score_mamba2(**args), dtype)


@pytest.mark.parametrize("batch, groups", [(1, 1), (3, 8), (16, 1), (16, 8)])
@pytest.mark.parametrize("with_z, with_init, noncontiguous", [(False, False, False), (True, True, False), (True, False, True)])
@pytest.mark.parametrize("metric", ["clip", "l2"])
def test_scan_score_mamba2_options(batch, groups, with_z, with_init, noncontiguous, metric):
    args = m2_args(batch, 129, 8, 64, groups, 128, torch.float32, noncontiguous=noncontiguous)
    if with_z:
        args["z"] = torch.randn_like(args["x"])
    if with_init:
        args["initial_state"] = 0.1 * torch.randn(batch, 8, 64, 128, device="cuda")
    args["metric"] = metric
    assert_scan_close(ops.scan_score_mamba2(**args), R.scan_score_mamba2(**args), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 65, 1000])
@pytest.mark.parametrize("with_z, with_init", [(False, False), (True, True)])
def test_scan_score_mamba1(dtype, length, with_z, with_init):
    gen = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda")  # noqa: E731
    b, d, n = 3, 96, 16
    args = dict(u=r(b, d, length).to(dtype), delta=r(b, d, length).to(dtype), A=-torch.rand(d, n, device="cuda"),
                B=r(b, n, length).to(dtype), C=r(b, n, length).to(dtype), D=r(d), delta_bias=0.1 * r(d))
    if with_z:
        args["z"] = r(b, d, length).to(dtype)
    if with_init:
        args["initial_state"] = 0.1 * r(b, d, n)
    assert_scan_close(ops.scan_score_mamba1(**args), R.scan_score_mamba1(**args), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ns, nd", [(1, 1), (2, 63), (129, 127), (1000, 1000), (4096, 64)])
def test_match(dtype, ns, nd):
    gen = torch.Generator(device="cuda").manual_seed(ns)
    src = torch.randn(3, ns, 96, generator=gen, device="cuda").to(dtype)
    dst = torch.randn(3, nd, 96, generator=gen, device="cuda").to(dtype)
    src_mask = torch.rand(3, ns, generator=gen, device="cuda") > 0.2  # padding / protected sources
    dst_mask = torch.rand(3, nd, generator=gen, device="cuda") > 0.3
    sim, idx = ops.match(src, dst, src_mask, dst_mask)
    ref_sim, ref_idx = R.match(src, dst, src_mask, dst_mask)
    torch.testing.assert_close(sim, ref_sim, atol=2e-3 if dtype != torch.float32 else 1e-5, rtol=0)
    finite = torch.isfinite(ref_sim)
    if dtype == torch.float32:
        assert bool((idx[finite] == ref_idx[finite]).float().mean() > 0.999)
    # whatever index the kernel picked, its similarity is the best one
    picked = torch.nn.functional.normalize(src.float(), dim=-1).mul(
        torch.nn.functional.normalize(dst.float(), dim=-1).gather(1, idx[..., None].expand(-1, -1, 96))).sum(-1)
    torch.testing.assert_close(picked[finite], ref_sim[finite], atol=5e-3, rtol=0)
    assert bool(torch.isneginf(sim[~finite]).all())


def test_match_noncontiguous():
    src = torch.randn(2, 300, 128, device="cuda")[:, :, ::2]
    dst = torch.randn(2, 200, 64, device="cuda").transpose(0, 1).contiguous().transpose(0, 1)
    masks = torch.ones(2, 300, dtype=torch.bool, device="cuda"), torch.ones(2, 200, dtype=torch.bool, device="cuda")
    sim, idx = ops.match(src, dst, *masks)
    ref_sim, ref_idx = R.match(src, dst, *masks)
    torch.testing.assert_close(sim, ref_sim, atol=1e-5, rtol=0)
    assert bool((idx == ref_idx).float().mean() > 0.999)


@pytest.mark.parametrize("ns, nd, dim", [(64, 65, 17), (65, 64, 100), (3, 5, 1)])
def test_match_odd_widths(ns, nd, dim):
    gen = torch.Generator(device="cuda").manual_seed(dim)
    src, dst = (torch.randn(2, n, dim, generator=gen, device="cuda") for n in (ns, nd))
    masks = torch.ones(2, ns, dtype=torch.bool, device="cuda"), torch.ones(2, nd, dtype=torch.bool, device="cuda")
    sim, idx = ops.match(src, dst, *masks)
    ref_sim, ref_idx = R.match(src, dst, *masks)
    torch.testing.assert_close(sim, ref_sim, atol=1e-5, rtol=0)
    assert bool((idx == ref_idx).float().mean() > 0.99)


def test_match_unusual_layouts_nan_and_huge_batch():
    # one row per batch with a stride the rows do not imply (is_contiguous() is True for such views)
    src = torch.randn(3, 5, 1, device="cuda").transpose(1, 2)  # (3, 1, 5), strides (5, 1, 1)
    dst = torch.randn(3, 4, 5, device="cuda")
    m_src, m_dst = torch.ones(3, 1, dtype=torch.bool, device="cuda"), torch.ones(3, 4, dtype=torch.bool, device="cuda")
    for got, ref in zip(ops.match(src, dst, m_src, m_dst), R.match(src, dst, m_src, m_dst)):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # a NaN destination never wins; a NaN source matches nothing
    src, dst = torch.randn(2, 6, 8, device="cuda"), torch.randn(2, 7, 8, device="cuda")
    dst[0, 3, 2] = float("nan")
    src[1, 4, 0] = float("nan")
    masks = torch.ones(2, 6, dtype=torch.bool, device="cuda"), torch.ones(2, 7, dtype=torch.bool, device="cuda")
    sim, idx = ops.match(src, dst, *masks)
    ref_sim, ref_idx = R.match(src, dst, *masks)
    torch.testing.assert_close(sim, ref_sim, atol=1e-5, rtol=0)
    assert torch.equal(idx, ref_idx) and not bool((idx[0] == 3).any()) and bool(torch.isneginf(sim[1, 4]))
    # more batch rows than a grid dimension holds
    src, dst = torch.randn(70000, 2, 8, device="cuda"), torch.randn(70000, 3, 8, device="cuda")
    masks = torch.ones(70000, 2, dtype=torch.bool, device="cuda"), torch.ones(70000, 3, dtype=torch.bool, device="cuda")
    sim, idx = ops.match(src, dst, *masks)
    ref_sim, ref_idx = R.match(src, dst, *masks)
    torch.testing.assert_close(sim, ref_sim, atol=1e-5, rtol=0)
    assert bool((idx == ref_idx).float().mean() > 0.999)
    # no destinations at all
    sim, idx = ops.match(src, dst[:, :0], masks[0], masks[1][:, :0])
    assert bool(torch.isneginf(sim).all()) and not bool(idx.any())


def test_apply_plan_huge_batch():
    slot = torch.tensor([[0, 0, 1]], device="cuda").expand(70000, 3).contiguous()
    weight = torch.tensor([[0.25, 0.75, 1.0]], device="cuda").expand(70000, 3).contiguous()
    x = torch.randn(70000, 3, 5, device="cuda")
    (got,) = ops.apply_plan([x], slot, [weight], 2)
    (ref,) = R.apply_plan([x], slot, [weight], 2)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 127, 1000])
def test_apply_plan(dtype, n):
    from ssm_reduce.methods import budgets, select
    from ssm_reduce.reduce import TokenState, build_plan

    gen = torch.Generator(device="cuda").manual_seed(n)
    mask = torch.ones(3, n, dtype=torch.bool, device="cuda")
    mask[1, : n // 3] = False
    state = TokenState.initial(3, n, torch.device("cuda"), attention_mask=mask, protect_last=1)
    imp = torch.rand(3, n, generator=gen, device="cuda")
    feats = torch.randn(3, n, 16, generator=gen, device="cuda")
    sel = select("utr", state, budgets(state, 0.7, "utr"), imp, feats)
    plan = build_plan(state, sel, imp, 0.5, 0.0)
    weights = [plan.hidden_weight, plan.residual_weight]
    tol = dict(zip(("rtol", "atol"), TOL[dtype]))
    # hidden in the model's dtype next to a float32 residual (residual_in_fp32), widths not a multiple of 32
    for xs in ([torch.randn(3, n, 256, generator=gen, device="cuda").to(dtype),
                torch.randn(3, n, 256, generator=gen, device="cuda")],
               [torch.randn(3, n, 100, generator=gen, device="cuda").to(dtype),
                torch.randn(3, n, 512, device="cuda").to(dtype)[..., ::2]]):  # non-contiguous
        got, ref = ops.apply_plan(xs, plan.slot, weights, plan.n_out), R.apply_plan(xs, plan.slot, weights, plan.n_out)
        for g, r, x in zip(got, ref, xs):
            assert g.dtype == x.dtype and g.shape == r.shape
            torch.testing.assert_close(g.float(), r.float(), **tol)
        kept_alone = (plan.hidden_weight == 1) & (plan.slot >= 0)  # copied bit for bit, subnormals included
        b_idx, i_idx = kept_alone.nonzero(as_tuple=True)
        assert torch.equal(got[0][b_idx, plan.slot[b_idx, i_idx]], xs[0][b_idx, i_idx])


def test_operands_the_kernels_cannot_read_exactly_fall_back_or_fail_cleanly():
    """N outside the instantiated sizes and mixed dtypes run the reference; a CPU operand raises a
    device error (from the reference, or the binding's own check) instead of reaching a kernel."""
    args = m2_args(2, 70, 4, 16, 1, 24, torch.float32)  # N = 24: no kernel instance
    assert_scan_close(ops.scan_score_mamba2(**args), R.scan_score_mamba2(**args), torch.float32)
    args = m2_args(2, 70, 4, 16, 1, 16, torch.bfloat16)
    args["dt"] = args["dt"].float()  # fp32 dt next to bf16 x: read at full precision by the reference
    ref = R.scan_score_mamba2(**args)
    for a, b in zip(ops.scan_score_mamba2(**args), ref):
        assert torch.equal(a, b)
    args = m2_args(2, 70, 4, 16, 1, 16, torch.float32)
    args["D"] = args["D"].cpu()
    with pytest.raises(RuntimeError):
        ops.scan_score_mamba2(**args)
    with pytest.raises(RuntimeError, match="must be on"):
        torch.ops.ssm_reduce.scan_score_mamba2(args["x"], args["dt"], args["A"], args["B"], args["C"], args["D"],
                                              None, None, None, True, 0.0, float("inf"), 0)
    torch.cuda.synchronize()  # the context is still usable


def test_opcheck():
    from torch.library import opcheck

    args = m2_args(2, 33, 2, 32, 1, 16, torch.float32)
    opcheck(torch.ops.ssm_reduce.scan_score_mamba2.default,
            (args["x"], args["dt"], args["A"], args["B"], args["C"], args["D"], None, args["dt_bias"], None, True, 0.0,
             float("inf"), 0))
    u = torch.randn(2, 64, 33, device="cuda")
    opcheck(torch.ops.ssm_reduce.scan_score_mamba1.default,
            (u, torch.randn_like(u), -torch.rand(64, 16, device="cuda"), torch.randn(2, 16, 33, device="cuda"),
             torch.randn(2, 16, 33, device="cuda"), None, None, None, None, True, 0))
    src, dst = torch.randn(2, 50, 32, device="cuda"), torch.randn(2, 40, 32, device="cuda")
    opcheck(torch.ops.ssm_reduce.match.default,
            (src, dst, torch.ones(2, 50, dtype=torch.bool, device="cuda"), torch.ones(2, 40, dtype=torch.bool, device="cuda")))
    slot = torch.arange(40, device="cuda").expand(2, 40).contiguous()
    opcheck(torch.ops.ssm_reduce.apply_plan.default,
            ([dst, dst.double()], slot, [torch.ones(2, 40, device="cuda"), torch.full((2, 40), 0.5, device="cuda")], 40))


@pytest.mark.parametrize("factory", [tiny_mamba2, tiny_mamba])
@torch.no_grad()
def test_patched_model_same_with_and_without_kernels(factory, monkeypatch):
    model = factory(layers=6).cuda()
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    ids = random_tokens(3, 200).cuda()
    with_kernels = model(ids)
    monkeypatch.setenv("SSM_REDUCE_DISABLE_KERNELS", "1")
    without = model(ids)
    assert torch.equal(with_kernels.kept_positions, without.kept_positions)
    torch.testing.assert_close(with_kernels.logits, without.logits, atol=1e-4, rtol=1e-4)
