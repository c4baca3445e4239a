"""prune_linear, every method: exact sparsity and valid patterns, the error statistic, error ordering,
validation and edge inputs, settings and the solver table. Shared problems and checks for the other
prune tests live here too."""

import pytest
import torch

import ssm_reduce
from ssm_reduce.prune import METHODS, MRPSettings, parse_pattern, prune_linear, relative_error

from .conftest import FAMILIES, random_tokens, state_dict_copy


def correlated_problem(out=96, inp=64, tokens=2048, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=gen) / inp**0.5
    x = torch.randn(tokens, inp, generator=gen) @ mix + 0.3 * torch.randn(tokens, inp, generator=gen)
    x = x * torch.linspace(0.2, 3.0, inp)  # input channels of very different scales, as in real models
    return torch.randn(out, inp, generator=gen), 2 * x.T @ x / tokens


TARGETS = [dict(sparsity=0.5), dict(sparsity=0.7), dict(sparsity=0.3), dict(pattern="2:4"), dict(pattern="4:8"), dict(pattern="1:4")]


def damped_reference(h, damp=0.01):
    """The damped Hessian every second-order method solves with (``damp`` times the mean diagonal added),
    computed here independently of the solvers, in float64."""
    h = h.double()
    return h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)


def power_law_problem(out=32, inp=96, tokens=384, alpha=1.0, seed=0):
    """Inputs with a power-law spectrum and spread channel scales (strongly correlated features, as in
    real models): the kept blocks of H are far worse conditioned than the removed blocks of H^-1."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(inp, inp, generator=gen))
    x = (torch.randn(tokens, inp, generator=gen) * torch.arange(1, inp + 1) ** -alpha) @ q.T
    x = x * torch.exp(torch.randn(inp, generator=gen))
    return torch.randn(out, inp, generator=gen), 2 * x.T @ x / tokens


def spy_inner_solves(monkeypatch):
    """Record (operator dtype, rows) of every inner conjugate-gradient solve (the exact solve's and the
    sweep's)."""
    from ssm_reduce.prune import conjugate_gradients, mrp_sweep

    calls, real = [], conjugate_gradients.pcg32

    def spy(b, support, a_hat, *args, **kwargs):
        calls.append((a_hat.dtype, b.shape[0]))
        return real(b, support, a_hat, *args, **kwargs)

    for module in (conjugate_gradients, mrp_sweep):
        monkeypatch.setattr(module, "pcg32", spy)
    return calls


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: str(list(t.values())[0]))
def test_exact_sparsity_and_valid_patterns(method, target):
    w, h = correlated_problem()
    new, mask, stats = prune_linear(w, h, method=method, **target)
    assert new.shape == w.shape and new.dtype == w.dtype
    assert torch.equal(new[mask], torch.zeros(int(mask.sum())))
    assert_target_met(mask, target)
    assert stats.sparsity == pytest.approx(float(mask.float().mean()))
    assert stats.relative_error == pytest.approx(relative_error(w, new, h))
    if method in ("magnitude", "wanda"):
        assert torch.equal(new[~mask], w[~mask])  # no update of kept weights


@pytest.mark.parametrize("variant", [dict(method="mrp", swap_rounds=0), dict(method="mrp", swap_rounds=2),
                                     dict(method="sparsegpt")], ids=["mrp-noswap", "mrp-2swaps", "sparsegpt"])
@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(pattern="2:4")], ids=["50%", "2:4"])
def test_error_statistic_equals_the_direct_formula_with_dead_inputs(variant, target):
    """mrp reports its error from the products it already has, sparsegpt from its sweep's summed OBS
    losses (H damped, dead inputs patched); both must equal ||WX - W'X||^2 / ||WX||^2 computed directly
    with the undamped Hessian."""
    w, h = correlated_problem(seed=3)
    w, h = w.double(), h.double()
    h[5, :] = h[:, 5] = 0  # an input that never fires
    new, _, stats = prune_linear(w, h, **variant, **target)
    # mrp's products are float64; sparsegpt's sweep (as the reference) and so its summed losses float32
    rel = 1e-9 if variant["method"] == "mrp" else 1e-5
    assert stats.relative_error == pytest.approx(relative_error(w, new, h), rel=rel, abs=1e-15)


def test_error_helpers_leave_float64_arrays_alone():
    """The row-chunk error helpers convert rows with ``.double()``, a view for float64 arrays: they must
    not write into them (the fallback to the direct formula then sees the true weights)."""
    from ssm_reduce.prune.layer_error import relative_error_from_losses, weighted_square_sum

    w, h = correlated_problem(seed=8)
    w = w.double()
    damped = damped_reference(h)
    new = w.masked_fill(torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.5, 0.0)
    w_before, new_before = w.clone(), new.clone()
    direct = relative_error(w, new, h)
    assert weighted_square_sum(w, damped, minus=new) > 0
    # loss 0 forces the fallback to the direct formula
    assert relative_error_from_losses(w, new, 0.0, weighted_square_sum(w, damped), damped, h) == pytest.approx(direct)
    assert torch.equal(w, w_before) and torch.equal(new, new_before)


@pytest.mark.parametrize("method", METHODS)
def test_inputs_are_left_alone(method):
    """prune_linear returns new tensors: the weight and Hessian passed in (float32 or float64, which some
    methods use without a conversion) keep their values."""
    from ssm_reduce.prune import Workspace

    w, h = correlated_problem(seed=5)
    for dtype in (torch.float32, torch.float64):
        weight, hessian = w.to(dtype), h.to(dtype)
        weight_before, hessian_before = weight.clone(), hessian.clone()
        new, _, _ = prune_linear(weight, hessian, method=method, pattern="2:4", workspace=Workspace())
        assert torch.equal(weight, weight_before) and torch.equal(hessian, hessian_before)
        assert new.data_ptr() != weight.data_ptr()


@pytest.mark.parametrize("method", ["sparsegpt", "mrp"])
def test_error_statistic_over_row_chunks(method):
    """The error's float64 sums go through the weight a few rows at a time (``row_pass_elements``): in
    chunks of 1, 3 or all rows, float32 or float64 weights, the same statistic as the direct formula."""
    w, h = correlated_problem(seed=4)
    for dtype in (torch.float32, torch.float64):
        for elements in (1, 3 * w.shape[1], 1 << 18):
            settings = MRPSettings(row_pass_elements=elements)
            new, _, stats = prune_linear(w.to(dtype), h, method=method, sparsity=0.5, settings=settings)
            rel = 1e-9 if method == "mrp" else 1e-5
            assert stats.relative_error == pytest.approx(relative_error(w.to(dtype), new, h), rel=rel)


def _independent_solve(w, mask, damped):
    out = torch.zeros_like(w, dtype=torch.float64)
    for row in range(w.shape[0]):
        kept = (~mask[row]).nonzero().flatten()
        out[row, kept] = torch.linalg.solve(damped[kept][:, kept], (w[row].double() @ damped)[kept])
    return out


def max_row_error(got, want) -> float:
    """The largest relative distance ``|got_i - want_i| / |want_i|`` over rows, in float64."""
    got, want = got.double(), want.double()
    return float(((got - want).norm(dim=1) / want.norm(dim=1)).max())


def assert_target_met(mask, target):
    """Every row lost exactly its share (``sparsity``), or every group of M kept N (``pattern``)."""
    rows, cols = mask.shape
    if "sparsity" in target:
        assert bool((mask.sum(1) == int(target["sparsity"] * cols)).all())
    else:
        n, m = parse_pattern(target["pattern"])
        assert bool((mask.reshape(rows, -1, m).sum(-1) == m - n).all())


@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(pattern="2:4")], ids=["50%", "2:4"])
def test_error_ordering_on_correlated_inputs(target):
    w, h = correlated_problem(out=128, inp=128, tokens=4096)
    err = {m: prune_linear(w, h, method=m, **target)[2].relative_error for m in METHODS}
    assert err["mrp"] <= err["sparsegpt"] < err["wanda"] < err["magnitude"]
    assert err["mrp"] <= 0.95 * err["sparsegpt"]
    # without swap rounds: same mask sweep and exact solve, never better than with them
    no_swap = prune_linear(w, h, method="mrp", swap_rounds=0, **target)[2].relative_error
    assert err["mrp"] <= no_swap <= 0.95 * err["sparsegpt"]


def test_cholesky_failure_retries_with_more_damping():
    w = torch.randn(8, 4)
    h = torch.diag(torch.tensor([1.0, 1.0, -0.5, 1.0]))
    new, mask, stats = prune_linear(w, h, sparsity=0.5, method="sparsegpt")
    assert stats.cholesky_retries >= 1 and "retrying" in stats.notes[0]
    assert stats.damp > 0.01 and torch.isfinite(new).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0), r"sparsity must be a number in \[0, 1\)"),
        (dict(sparsity=-0.1), r"sparsity must be a number in \[0, 1\)"),
        (dict(pattern="2-4"), "pattern must look like 'N:M'"),
        (dict(pattern="a:b"), "pattern must look like 'N:M'"),
        (dict(pattern="4:4"), "must keep 0 < N < M"),
        (dict(pattern="5:4"), "must keep 0 < N < M"),
        (dict(pattern="0:4"), "must keep 0 < N < M"),
        (dict(), "set exactly one of sparsity"),
        (dict(sparsity=0.5, pattern="2:4"), "set exactly one of sparsity"),
        (dict(sparsity=0.5, method="obs"), "method='obs' is not supported"),
        (dict(sparsity=0.5, swap_rounds=-1), r"swap_rounds must be an integer >= 0"),
        (dict(sparsity=0.5, swap_rounds=1.5), r"swap_rounds must be an integer >= 0"),
        (dict(sparsity=0.5, blocksize=0), r"blocksize must be an integer >= 1"),
        (dict(sparsity=0.5, blocksize=-1), r"blocksize must be an integer >= 1"),
        (dict(sparsity=0.5, damp=-0.5), r"damp must be a finite number >= 0"),
        (dict(sparsity=0.5, damp=float("nan")), r"damp must be a finite number >= 0"),
        (dict(sparsity=0.5, damp="0.01"), r"damp must be a finite number >= 0"),
        (dict(pattern="8:24"), r"mrp scores all C\(24, 8\) = 735471 removal sets"),
    ],
)
def test_bad_targets(kwargs, match):
    w, h = correlated_problem(out=8, inp=16)
    with pytest.raises(ValueError, match=match):
        prune_linear(w, h, **{"method": "mrp", **kwargs})
    model = FAMILIES["mamba2"](layers=2)
    before = state_dict_copy(model)
    with pytest.raises(ValueError, match=match):
        ssm_reduce.prune(model, random_tokens(1, 600)[0], seqlen=64, nsamples=2, **{"method": "mrp", **kwargs})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_solver_edge_inputs():
    """Inputs at the edges: numpy scalars as sparsity, no rows, non-finite inputs (a clear error before
    anything is computed, where the error would otherwise read 0), damp=0 on a singular Hessian (the retry
    starts from 1e-3, not 10 x 0), and half-precision weights' error measured after rounding."""
    import numpy as np

    w, h = correlated_problem(out=16, inp=32)
    for sparsity in (np.float32(0.5), np.float64(0.5)):
        assert prune_linear(w, h, method="mrp", sparsity=sparsity)[2].sparsity == 0.5
    assert prune_linear(w, h, method="wanda", sparsity=np.int64(0))[2].sparsity == 0.0
    for method in METHODS:
        new, mask, stats = prune_linear(torch.zeros(0, 32), h, method=method, sparsity=0.5)
        assert new.shape == mask.shape == (0, 32) and stats.relative_error == 0.0
        for bad_w, bad_h, name in [(w, h * float("nan"), "hessian"), (w.clone().fill_(float("inf")), h, "weight")]:
            with pytest.raises(ValueError, match=f"{name} has non-finite entries"):
                prune_linear(bad_w, bad_h, method=method, sparsity=0.5)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    singular = 2 * x.T @ x  # rank 8 of 32
    for method in ("sparsegpt", "mrp"):
        new, mask, stats = prune_linear(w, singular, method=method, sparsity=0.5, damp=0.0)
        assert stats.cholesky_retries >= 1 and stats.damp >= 1e-3
        assert "Cholesky failed with damp=0; retrying with damp=0.001" in stats.notes[0]
        assert torch.isfinite(new).all() and stats.sparsity == 0.5
    for dtype in (torch.bfloat16, torch.float16):
        for method in ("sparsegpt", "mrp"):
            new, _, stats = prune_linear(w.to(dtype), h, method=method, sparsity=0.5)
            assert new.dtype == dtype
            assert stats.relative_error == pytest.approx(relative_error(w.to(dtype), new, h), rel=1e-9)


@pytest.mark.parametrize("pattern, blocksize", [("1:3", 128), ("2:6", 128), ("2:3", 128), ("2:4", 3), ("2:4", 10),
                                                ("2:4", 50)])
def test_sparsegpt_groups_never_straddle_blocks(pattern, blocksize):
    """N:M groups whose M does not divide the lazy block width: every method still gives valid groups
    (the sweeps round the block to whole groups)."""
    w, h = correlated_problem(out=16, inp=96)
    for method in METHODS:
        new, mask, stats = prune_linear(w, h, method=method, pattern=pattern, blocksize=blocksize)
        assert_target_met(mask, dict(pattern=pattern))
        assert torch.equal(new == 0, mask | (w == 0))


@pytest.mark.parametrize("method", ["sparsegpt", "mrp"])
def test_second_order_methods_do_not_depend_on_the_hessian_scale_with_dead_inputs(method):
    """H and s*H describe the same problem; inputs that never fire must not bring a fixed scale in."""
    w, h = correlated_problem(seed=5)
    w, h = w.double(), h.double()
    h[3, :] = h[:, 3] = 0
    h[40, :] = h[:, 40] = 0
    a, mask_a, stats_a = prune_linear(w, h, method=method, sparsity=0.5)
    b, mask_b, stats_b = prune_linear(w, 1e-4 * h, method=method, sparsity=0.5)
    assert torch.equal(mask_a, mask_b)
    if method == "mrp":
        # the same optimum, each row within weight_tol of it (the solves' rounding differs with the scale)
        assert max_row_error(b, a) <= 2 * MRPSettings().weight_tol
    else:
        # sparsegpt sweeps in float32 (as the reference implementation): equal up to float32 rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert stats_a.relative_error == pytest.approx(stats_b.relative_error, rel=1e-6)


CUDA_REASON = "the GPU path of the solvers needs a CUDA device"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("problem", ["spread", "power-law"])
@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(pattern="2:4")], ids=["50%", "2:4"])
def test_mrp_on_cuda_is_exact_and_as_good_as_on_the_cpu(target, problem, dtype, monkeypatch):
    """On a GPU, mrp takes its CUDA path (bfloat16 inner products on compute capability 8.0+, 512 inputs
    here so that "auto" uses them) and still ends every row at its mask's optimum; its masks may differ
    from the CPU run's by rounding, its error may not."""
    if problem == "spread":
        w, h = correlated_problem(out=64, inp=512, tokens=4096, seed=3)
    else:
        w, h = power_law_problem(out=64, inp=512, tokens=4096, seed=3)
    w = w.to(dtype)
    calls = spy_inner_solves(monkeypatch)
    new, mask, stats = prune_linear(w.cuda(), h.cuda(), method="mrp", **target)
    assert new.is_cuda and mask.is_cuda and new.dtype == dtype
    new, mask = new.cpu(), mask.cpu()
    capability = torch.cuda.get_device_capability()[0]
    assert {op_dtype for op_dtype, _ in calls} >= ({torch.bfloat16} if capability >= 8 else {torch.float32})
    # exact sparsity per row, or valid N:M groups
    assert_target_met(mask, target)
    assert bool((new[mask] == 0).all())
    # every row at its mask's optimum (independent float64 solve on the CPU), up to the solve's
    # tolerance and the rounding of the stored weights
    optimum = _independent_solve(w.double(), mask, damped_reference(h))
    eps = torch.finfo(dtype).eps
    bound = MRPSettings().weight_tolerance(dtype) + (eps / 2 if dtype != torch.float32 else 1e-6)
    assert max_row_error(new, optimum) < bound
    # the reported error is the direct formula's (before the weights are rounded to their dtype), and
    # matches the CPU run's
    if dtype == torch.float32:
        assert stats.relative_error == pytest.approx(relative_error(w, new, h), rel=1e-3)
    cpu = prune_linear(w, h, method="mrp", **target)[2]
    assert stats.relative_error == pytest.approx(cpu.relative_error, rel=0.02)
    assert stats.relative_error <= 0.95 * prune_linear(w.cuda(), h.cuda(), method="sparsegpt", **target)[2].relative_error


def test_sparsity_counts_do_not_round_down_below_the_product():
    """0.29 x 100 is 28.999999999999996 in floating point: every method still removes 29 per row."""
    w, h = correlated_problem(out=8, inp=100)
    for method in METHODS:
        _, mask, stats = prune_linear(w, h, sparsity=0.29, method=method)
        assert mask.sum(1).tolist() == [29] * 8, method


def test_an_ill_conditioned_hessian_without_damping_still_gets_the_optimum():
    """damp=0 on a positive definite but ill-conditioned Hessian (as many tokens as inputs): rows the
    float32 factorisations cannot refine are solved in float64, so mrp's kept weights are still the
    least-squares optimum; a singular one has its damping raised and noted."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 128, generator=gen, dtype=torch.float64)  # condition number ~4e8
    h = 2 * x.T @ x
    w = torch.randn(16, 128, generator=gen, dtype=torch.float64)
    new, mask, stats = prune_linear(w, h, sparsity=0.5, method="mrp", damp=0.0, swap_rounds=0)
    assert stats.damp == 0.0
    for i in range(16):
        k = (~mask[i]).nonzero().flatten()
        ref = torch.linalg.solve(h[k][:, k], (w[i] @ h)[k])
        assert float((new[i, k] - ref).norm() / ref.norm()) < 1e-4
    singular = 2 * x[:100].T @ x[:100]  # rank 100 of 128
    for method in ("sparsegpt", "mrp"):
        _, _, stats = prune_linear(w, singular, pattern="2:4", method=method, damp=0.0)
        assert stats.damp > 0 and stats.cholesky_retries >= 1 and stats.notes


def test_hessian_and_weight_types_are_checked_before_any_work():
    w, h = correlated_problem(out=8, inp=64)
    with pytest.raises(ValueError, match="hessian must be symmetric"):
        prune_linear(w, h + torch.triu(torch.ones_like(h)), sparsity=0.5)
    nearly = h.clone()
    nearly[0, 1] += 1e-7 * float(h.abs().max())  # float32 rounding of X^T X: its symmetric part is used
    a = prune_linear(w, nearly, sparsity=0.5, method="sparsegpt")[0]
    b = prune_linear(w, (nearly + nearly.T) / 2, sparsity=0.5, method="sparsegpt")[0]
    assert torch.equal(a, b)
    for bad in (w.long(), w.bool(), w.to(torch.complex64)):
        with pytest.raises(TypeError, match="weight must be a real floating-point tensor"):
            prune_linear(bad, h, sparsity=0.5)


def test_methods_come_from_the_solver_table():
    from ssm_reduce.prune import SOLVERS

    assert METHODS == tuple(SOLVERS) == ("magnitude", "wanda", "sparsegpt", "mrp")
    w, h = correlated_problem(out=8, inp=16)
    with pytest.raises(ValueError, match="choose one of 'magnitude', 'wanda', 'sparsegpt', 'mrp'"):
        prune_linear(w, h, sparsity=0.5, method="obs")


@pytest.mark.parametrize("field, value", [("weight_tol", 0.0), ("sweep_tol", float("inf")), ("refinements", 1.5),
                                          ("chunk_elements", 0), ("swap_trial_rows", -1), ("swap_min_gain", 2.0),
                                          ("solve_space", "both"), ("low_precision", "fast"),
                                          ("low_precision", torch.int8)])
def test_settings_are_checked_on_construction(field, value):
    with pytest.raises(ValueError, match=f"MRPSettings.{field} must be"):
        MRPSettings(**{field: value})


def test_settings_and_workspace_must_be_their_types():
    """A settings object is frozen; a dict in place of the settings or of the workspace is refused before
    any work, by prune_linear and by prune_model (nothing changed)."""
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        MRPSettings().weight_tol = 1e-3
    w, h = correlated_problem(out=8, inp=16)
    with pytest.raises(TypeError, match="settings must be an ssm_reduce.prune.MRPSettings or None, got dict"):
        prune_linear(w, h, sparsity=0.5, settings={"weight_tol": 1e-3})
    with pytest.raises(TypeError, match="workspace must be an ssm_reduce.prune.Workspace or None, got dict"):
        prune_linear(w, h, sparsity=0.5, workspace={})
    model = FAMILIES["mamba2"](layers=2)
    before = state_dict_copy(model)
    with pytest.raises(TypeError, match="settings must be an ssm_reduce.prune.MRPSettings"):
        ssm_reduce.prune(model, random_tokens(1, 600)[0], sparsity=0.5, seqlen=64, nsamples=2, settings=0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
