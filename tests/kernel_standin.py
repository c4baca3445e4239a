"""The Python half of the compiled kernels, checked on CPU.

``ssm_reduce.ops`` registers the extension's functions as ``torch.library`` custom ops (with fake
implementations for ``torch.compile``) and post-processes what they return (the scans hand back
per-tile partial sums that the wrapper reduces to scores). All of that normally runs only where the
extension is built. Here a stand-in module with the extension's exact calling convention and output
layout — written in torch, from the references — is registered through the same code, and the front
door is told to use it on CPU; then:

* ``torch.library.opcheck`` on every op (schema, fake implementation against the real outputs,
  dispatch);
* the front door's results (scores rebuilt from the partials, the two-stream ``apply_plan``) equal the
  references;
* ``torch.compile(fullgraph=True)`` traces a function that calls every op.

The registration is process-wide, so this runs in its own interpreter::

    python -m tests.kernel_standin      # prints one JSON line, exits non-zero on a failure
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections import Counter

import torch
import torch.nn.functional as F

TILE = 32  # channels per CTA tile in the scan kernels: one partial sum per tile and token


def _tile_sums(term: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (..., ceil(C / TILE)) sums over tiles of TILE channels (missing channels count 0)."""
    pad = -term.shape[-1] % TILE
    term = F.pad(term, (0, pad))
    return term.reshape(*term.shape[:-1], -1, TILE).sum(-1)


def _term(y: torch.Tensor, code: int) -> torch.Tensor:
    return [y.clamp(min=0), y.abs(), y * y, y][code]


def _standin_module():
    from ssm_reduce.ops import reference as R

    metric_names = ("clip", "l1", "l2", "mean")

    def scan_score_mamba2(x, dt, A, B, C, D, z, dt_bias, initial_state, dt_softplus, dt_min, dt_max, metric):
        f = lambda t: None if t is None else t.float()  # noqa: E731  float32 in, pre-gate float32 y out
        y, state, _, _ = R.scan_score_mamba2(f(x), f(dt), A, f(B), f(C), D, None, dt_bias, initial_state,
                                             dt_softplus, dt_min, dt_max, metric_names[metric])
        b, l, h, p = y.shape
        part = _tile_sums(_term(y, metric)).reshape(b, l, -1)
        sq = _tile_sums(y * y).reshape(b, l, -1)
        out = y * F.silu(z.float()) if z is not None else y
        return [out.to(x.dtype), state, part, sq]

    def scan_score_mamba1(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, metric):
        f = lambda t: None if t is None else t.float()  # noqa: E731
        y, state, _, _ = R.scan_score_mamba1(f(u), f(delta), A, f(B), f(C), D, None, delta_bias, initial_state,
                                             delta_softplus, metric_names[metric])
        yt = y.transpose(1, 2)  # (B, L, D)
        part, sq = _tile_sums(_term(yt, metric)), _tile_sums(yt * yt)
        out = y * F.silu(z.float()) if z is not None else y
        return [out.to(u.dtype), state, part, sq]

    def match(src, dst, src_mask, dst_mask):
        return list(R.match(src, dst, src_mask, dst_mask))

    def apply_plan(xs, slot, weights, n_out):
        assert all(w.dtype == torch.float32 for w in weights), "the front door hands the kernel float32 weights"
        return [out.contiguous() for out in R.apply_plan(xs, slot, weights, n_out)]  # the kernel's layout

    module = types.ModuleType("ssm_reduce_standin")
    module.calls = Counter()

    def counted(fn):
        def wrapper(*args):
            module.calls[fn.__name__] += 1
            return fn(*args)
        return wrapper

    for fn in (scan_score_mamba2, scan_score_mamba1, match, apply_plan):
        setattr(module, fn.__name__, counted(fn))
    return module


def main() -> dict:
    from torch.library import opcheck

    from ssm_reduce import ops
    from ssm_reduce.ops import reference as R
    from ssm_reduce.testing import use_standin_extension
    from ssm_reduce.methods import budgets, select
    from ssm_reduce.reduce import TokenState, build_plan

    module = _standin_module()
    # the front door now treats CPU tensors as the kernels' (SSM_REDUCE_DISABLE_KERNELS=1 still turns them off)
    use_standin_extension(module)
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    result = {}

    # Mamba-2: P = 40 spans two tiles (one partial), two groups, every option, every metric
    b, l, h, p, g, n = 2, 19, 4, 40, 2, 16
    m2 = dict(x=r(b, l, h, p), dt=r(b, l, h), A=-torch.rand(h, generator=gen), B=r(b, l, g, n), C=r(b, l, g, n),
              D=r(h), z=r(b, l, h, p), dt_bias=r(h), initial_state=0.1 * r(b, h, p, n))
    for metric in ("clip", "l1", "l2", "mean"):
        got = ops.scan_score_mamba2(**m2, dt_min=0.01, dt_max=5.0, metric=metric)
        ref = R.scan_score_mamba2(**m2, dt_min=0.01, dt_max=5.0, metric=metric)
        for a, e in zip(got, ref):
            assert a.shape == e.shape and a.dtype == e.dtype, (metric, a.shape, e.shape)
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    m2_bf16 = {k: (v.bfloat16() if k in ("x", "dt", "B", "C", "z") else v) for k, v in m2.items()}
    for a, e in zip(ops.scan_score_mamba2(**m2_bf16), R.scan_score_mamba2(**m2_bf16)):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a.float(), e.float(), atol=1e-2, rtol=1e-2)
    try:
        ops.scan_score_mamba2(**m2, metric="median")
        raise AssertionError("an unknown metric must raise ValueError")
    except ValueError as err:
        assert "median" in str(err)
    opcheck(torch.ops.ssm_reduce.scan_score_mamba2.default,
            (m2["x"], m2["dt"], m2["A"], m2["B"], m2["C"], m2["D"], m2["z"], m2["dt_bias"], m2["initial_state"], True,
             0.0, float("inf"), 2))
    result["scan_score_mamba2"] = "ok"

    # Mamba-1: D = 70 channels (three tiles)
    b, d, l, n = 2, 70, 13, 8
    m1 = dict(u=r(b, d, l), delta=r(b, d, l), A=-torch.rand(d, n, generator=gen), B=r(b, n, l), C=r(b, n, l), D=r(d),
              z=r(b, d, l), delta_bias=r(d), initial_state=0.1 * r(b, d, n))
    for metric in ("clip", "l2"):
        for a, e in zip(ops.scan_score_mamba1(**m1, metric=metric), R.scan_score_mamba1(**m1, metric=metric)):
            assert a.shape == e.shape and a.dtype == e.dtype
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    opcheck(torch.ops.ssm_reduce.scan_score_mamba1.default,
            (m1["u"], m1["delta"], m1["A"], m1["B"], m1["C"], m1["D"], None, m1["delta_bias"], None, True, 0))
    result["scan_score_mamba1"] = "ok"

    src, dst = r(2, 30, 24), r(2, 20, 24)
    masks = torch.rand(2, 30, generator=gen) > 0.2, torch.rand(2, 20, generator=gen) > 0.3
    for a, e in zip(ops.match(src, dst, *masks), R.match(src, dst, *masks)):
        assert torch.equal(a, e)
    opcheck(torch.ops.ssm_reduce.match.default, (src, dst, *masks))
    result["match"] = "ok"

    # both streams of a real plan at once: bf16 hidden states, float32 residual
    state = TokenState.initial(2, 40, torch.device("cpu"), protect_last=1)
    imp, feats = torch.rand(2, 40, generator=gen), r(2, 40, 8)
    plan = build_plan(state, select("utr", state, budgets(state, 0.6, "utr"), imp, feats), imp, 0.5, 0.0)
    hidden, residual = r(2, 40, 12).bfloat16(), r(2, 40, 12)
    got = plan.apply(hidden, residual)
    ref = R.apply_plan([hidden, residual], plan.slot, [plan.hidden_weight, plan.residual_weight], plan.n_out)
    assert all(torch.equal(a, e) for a, e in zip(got, ref)) and got[0].dtype == torch.bfloat16
    opcheck(torch.ops.ssm_reduce.apply_plan.default,
            ([hidden, residual], plan.slot, [plan.hidden_weight, plan.residual_weight], plan.n_out))
    result["apply_plan"] = "ok"

    # torch.compile traces every op through its fake implementation
    def step(x, dt, A, B, C, src, dst, m_src, m_dst, hidden, residual, slot, w_h, w_r):
        y, _, score, _ = ops.scan_score_mamba2(x, dt, A, B, C, metric="l2")
        sim, idx = ops.match(src, dst, m_src, m_dst)
        h2, r2 = ops.apply_plan([hidden, residual], slot, [w_h, w_r], plan.n_out)
        return y.sum() + score.sum() + sim.clamp(min=-1).sum() + idx.sum() + h2.float().sum() + r2.sum()

    args = (m2["x"], m2["dt"], m2["A"], m2["B"], m2["C"], src, dst, *masks, hidden, residual, plan.slot,
            plan.hidden_weight, plan.residual_weight)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), step(*args))
    result["torch_compile"] = "ok"

    # patched models on the kernels' route (the anchors' mixers through ops, the score out of the scan)
    # against the references' route: same kept positions, logits and greedy tokens
    import ssm_reduce
    from tests.conftest import random_tokens, tiny_mamba, tiny_mamba2

    for name, factory in (("mamba2", tiny_mamba2), ("mamba", tiny_mamba)):
        model = factory(layers=6)
        ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
        ids = random_tokens(3, 90)
        module.calls.clear()
        with torch.no_grad():
            with_kernels = model(ids)
            tokens = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        scan = "scan_score_mamba2" if name == "mamba2" else "scan_score_mamba1"
        assert module.calls[scan] >= 2 and module.calls["apply_plan"] >= 2 and module.calls["match"] >= 2, module.calls
        os.environ["SSM_REDUCE_DISABLE_KERNELS"] = "1"
        try:
            module.calls.clear()
            with torch.no_grad():
                without = model(ids)
                tokens_ref = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert not module.calls, module.calls
        finally:
            del os.environ["SSM_REDUCE_DISABLE_KERNELS"]
        assert torch.equal(with_kernels.kept_positions, without.kept_positions)
        torch.testing.assert_close(with_kernels.logits, without.logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(tokens, tokens_ref)
        result[f"patched_{name}"] = "ok"
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
    sys.exit(0)
