"""Property tests of the token algebra (ssm_reduce.reduce) on random states, budgets and features."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssm_reduce.methods import METHODS, budgets, select
from ssm_reduce.ops import reference
from ssm_reduce.reduce import TokenState, build_plan, importance_scores

GENERIC = [m for m in METHODS if m != "tor-official"]


@st.composite
def scenarios(draw):
    batch = draw(st.integers(1, 3))
    n = draw(st.integers(1, 24))
    left = draw(st.booleans())
    pads = [draw(st.integers(0, n - 1)) for _ in range(batch)]
    mask = torch.ones(batch, n, dtype=torch.bool)
    for b, p in enumerate(pads):
        if p:
            if left:
                mask[b, :p] = False
            else:
                mask[b, n - p :] = False
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    protect = torch.rand(batch, n, generator=gen) < draw(st.sampled_from([0.0, 0.1, 0.4]))
    state = TokenState.initial(
        batch, n, torch.device("cpu"), attention_mask=mask, protect_mask=protect,
        protect_first=draw(st.integers(0, 2)), protect_last=draw(st.integers(0, 3)),
    )
    # Give tokens sizes as if earlier anchors had merged some.
    sizes = torch.randint(1, 4, (batch, n), generator=gen).float()
    state.size = torch.where(state.valid, sizes, 0.0)
    # Distinct importances and features avoid exact ties, which have no meaningful order.
    importance = torch.rand(batch, n, generator=gen)
    features = torch.randn(batch, n, 5, generator=gen)
    return dict(
        state=state,
        importance=importance,
        features=features,
        method=draw(st.sampled_from(GENERIC)),
        keep_ratio=draw(st.floats(0.05, 1.0)),
        q_hidden=draw(st.sampled_from([0.0, 0.5, 1.0, 0.3])),
        q_residual=draw(st.sampled_from([0.0, 0.5, 1.0])),
        causal=draw(st.booleans()),
        size_weighted=draw(st.booleans()),
        seed=seed,
    )


def run(s):
    state = s["state"]
    r = budgets(state, s["keep_ratio"], s["method"])
    sel = select(s["method"], state, r, s["importance"], s["features"], seed=s["seed"], layer=3)
    from ssm_reduce.config import ReduceConfig

    q_h, q_r = ReduceConfig(method=s["method"], q_hidden=s["q_hidden"], q_residual=s["q_residual"]).stream_q()
    plan = build_plan(state, sel, s["importance"], q_h, q_r, s["causal"], s["size_weighted"])
    return r, sel, plan


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_plan_invariants(s):
    state = s["state"]
    r, sel, plan = run(s)
    out = plan.state
    batch, n = state.valid.shape
    candidates = state.valid & ~state.protected
    for b in range(batch):
        n_real = int(state.valid[b].sum())
        n_cand = int(candidates[b].sum())
        # budget: round(n (1 - keep)) capped by what the method can remove
        wanted = math.floor(n_real * (1 - s["keep_ratio"]) + 0.5)
        assert int(r[b]) <= wanted
        assert int(r[b]) <= n_cand
        # exact counts: the row removes exactly r[b] real tokens
        assert int(sel.removed[b].sum()) == int(r[b])
        assert int(out.valid[b].sum()) == n_real - int(r[b])
        assert int(out.valid[b].sum()) >= min(1, n_real)  # a row never loses all of its tokens
        # only candidates are removed: never padding, never protected
        assert not bool((sel.removed[b] & ~candidates[b]).any())
        # destinations are kept, real, unprotected tokens
        merged = sel.removed[b] & (sel.dst[b] >= 0)
        for i in merged.nonzero().flatten().tolist():
            d = int(sel.dst[b, i])
            assert bool(candidates[b, d]) and not bool(sel.removed[b, d])
        # order kept: output positions strictly increase over the real columns
        pos = out.pos[b][out.valid[b]]
        assert bool((pos[1:] > pos[:-1]).all())
        # padding side kept, padding columns carry -1
        k = int(out.valid[b].sum())
        if state.left_padded:
            assert bool(out.valid[b, plan.n_out - k :].all())
        else:
            assert bool(out.valid[b, :k].all())
        assert bool((out.pos[b][~out.valid[b]] == -1).all())
        # nothing moves to an earlier position; causal groups sit at their latest member
        for i in range(n):
            slot = int(plan.slot[b, i])
            if slot < 0:
                continue
            assert bool(state.valid[b, i])
            if s["causal"]:
                assert int(out.pos[b, slot]) >= int(state.pos[b, i])
        if s["causal"]:
            for slot in range(plan.n_out):
                members = (plan.slot[b] == slot).nonzero().flatten()
                if len(members):
                    assert int(out.pos[b, slot]) == int(state.pos[b, members].max())
        # protected tokens survive alone, with their position and size
        for i in (state.protected[b]).nonzero().flatten().tolist():
            slot = int(plan.slot[b, i])
            assert slot >= 0 and int(out.pos[b, slot]) == int(state.pos[b, i])
            assert int((plan.slot[b] == slot).sum()) == 1
            assert bool(out.protected[b, slot])
        # sizes: a column's size is the sum of its members'; only fully pruned tokens lose size
        dropped = state.valid[b] & (plan.slot[b] < 0)
        total_in = float(state.size[b].sum())
        assert float(out.size[b].sum()) == pytest.approx(total_in - float(state.size[b][dropped].sum()))
        if s["method"] in ("merge", "tome"):
            assert float(out.size[b].sum()) == pytest.approx(total_in)
        # per stream, the weights of every real column sum to one
        for w in (plan.hidden_weight[b], plan.residual_weight[b]):
            sums = torch.zeros(plan.n_out + 1).index_add_(0, torch.where(plan.slot[b] < 0, plan.n_out, plan.slot[b]), w)
            assert torch.allclose(sums[:plan.n_out][out.valid[b]], torch.ones(k))


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_rows_are_independent(s):
    """A row's plan does not depend on the other rows of its batch."""
    state = s["state"]
    if state.valid.shape[0] < 2:
        return
    _, _, plan = run(s)
    for b in range(state.valid.shape[0]):
        one = dict(s)
        row = lambda t: t[b : b + 1]  # noqa: E731
        one["state"] = TokenState(row(state.pos), row(state.size), row(state.valid), row(state.protected), state.left_padded)
        one["importance"], one["features"] = row(s["importance"]), row(s["features"])
        _, _, alone = run(one)
        got = plan.state.pos[b][plan.state.valid[b]]
        assert torch.equal(got, alone.state.pos[0][alone.state.valid[0]])
        assert torch.equal(plan.state.size[b][plan.state.valid[b]], alone.state.size[0][alone.state.valid[0]])


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_apply_plan_is_a_weighted_mean(s):
    _, _, plan = run(s)
    x = torch.randn(*plan.slot.shape, 3)
    y = plan.apply(x)
    x64 = torch.randn(*plan.slot.shape, 3, dtype=torch.float64) / 3  # (not representable in float32)
    y64 = plan.apply(x64)
    assert y64.dtype == torch.float64
    for b in range(x.shape[0]):  # float64 tokens kept alone are copied bit for bit too
        for slot in range(plan.n_out):
            members = (plan.slot[b] == slot).nonzero().flatten()
            if len(members) == 1:
                assert torch.equal(y64[b, slot], x64[b, members[0]])
    batch = x.shape[0]
    expected = torch.zeros(batch, plan.n_out, 3)
    for b in range(batch):
        for i in range(x.shape[1]):
            slot = int(plan.slot[b, i])
            if slot >= 0:
                expected[b, slot] += plan.hidden_weight[b, i] * x[b, i]
    assert torch.allclose(y, expected, atol=1e-6)
    # a token kept alone is copied bit for bit
    for b in range(batch):
        for slot in range(plan.n_out):
            members = (plan.slot[b] == slot).nonzero().flatten()
            if len(members) == 1:
                assert torch.equal(y[b, slot], x[b, members[0]])


def test_size_weighted_merge_by_hand():
    # Tokens 0..3; utr with one removal: importance makes {0, 1} sources and {2, 3} destinations.
    state = TokenState.initial(1, 4, torch.device("cpu"))
    state.size = torch.tensor([[3.0, 1.0, 1.0, 1.0]])
    importance = torch.tensor([[0.1, 0.2, 0.9, 0.8]])
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.0, -1.0]]])  # 0 ~ 2 (cos 0.995)
    r = torch.tensor([1])
    sel = select("utr", state, r, importance, feats)
    assert sel.removed.tolist() == [[True, False, False, False]]
    assert sel.dst[0, 0].item() == 2
    plan = build_plan(state, sel, importance, q_hidden=0.0, q_residual=0.0)
    x = torch.tensor([[[4.0], [7.0], [8.0], [9.0]]])
    y = plan.apply(x)
    # token 0 (size 3) merges into token 2 (size 1), placed at position 2: (3*4 + 8) / 4 = 5
    assert plan.state.pos.tolist() == [[1, 2, 3]]
    assert y.flatten().tolist() == [7.0, 5.0, 9.0]
    assert plan.state.size.tolist() == [[1.0, 4.0, 1.0]]
    # q = 1 prunes instead: the destination keeps its own value and position
    plan = build_plan(state, sel, importance, q_hidden=1.0, q_residual=1.0)
    assert plan.state.pos.tolist() == [[1, 2, 3]]
    assert plan.apply(x).flatten().tolist() == [7.0, 8.0, 9.0]
    # non-causal placement keeps the destination's position: same here since 2 > 0;
    # a later source moved onto an earlier destination would keep the earlier one.
    plan = build_plan(state, sel, importance, 0.0, 0.0, causal=False)
    assert plan.state.pos.tolist() == [[1, 2, 3]]


def test_later_source_moves_group_forward():
    state = TokenState.initial(1, 4, torch.device("cpu"))
    importance = torch.tensor([[0.9, 0.8, 0.1, 0.2]])  # sources {2, 3}, destinations {0, 1}
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [1.0, 0.05]]])  # 3 ~ 0
    sel = select("utr", state, torch.tensor([1]), importance, feats)
    assert sel.removed.tolist() == [[False, False, False, True]] and sel.dst[0, 3].item() == 0
    causal = build_plan(state, sel, importance, 0.0, 0.0, causal=True)
    # the group {0, 3} sits at position 3, after token 2: information never moves back in time
    assert causal.state.pos.tolist() == [[1, 2, 3]]
    non_causal = build_plan(state, sel, importance, 0.0, 0.0, causal=False)
    assert non_causal.state.pos.tolist() == [[0, 1, 2]]


def test_hybrid_split_prunes_least_important():
    # 8 candidates, remove 4: q=0.5 prunes the 2 least important of the removed in the hidden stream
    state = TokenState.initial(1, 8, torch.device("cpu"))
    importance = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.7, 0.6]])
    feats = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(0))
    sel = select("utr", state, torch.tensor([4]), importance, feats)
    assert sel.removed[0, :4].all() and not sel.removed[0, 4:].any()
    plan = build_plan(state, sel, importance, q_hidden=0.5, q_residual=0.0)
    assert plan.hidden_weight[0, :2].tolist() == [0.0, 0.0]  # importance 0.1, 0.2: pruned
    assert (plan.hidden_weight[0, 2:4] > 0).all()  # 0.3, 0.4: merged
    assert (plan.residual_weight[0, :4] > 0).all()  # residual: merge only
    assert (plan.slot[0, :4] >= 0).all()  # same output columns in both streams


@pytest.mark.parametrize("metric, expected", [("clip", 0.75), ("l1", 1.25), ("l2", math.sqrt(2.25)), ("mean", 0.25)])
def test_importance_metrics_by_hand(metric, expected):
    v = torch.tensor([[[1.0, -2.0, 0.5, 1.5]]])  # mean |v| = 1.25, mean v^2 = (1+4+.25+2.25)/4
    if metric == "l2":
        expected = math.sqrt((1 + 4 + 0.25 + 2.25) / 4)
    assert importance_scores(v, metric).item() == pytest.approx(expected)


def test_match_reference_tiles_agree_with_dense():
    gen = torch.Generator().manual_seed(0)
    src, dst = torch.randn(2, 1100, 16, generator=gen), torch.randn(2, 700, 16, generator=gen)
    src_mask = torch.rand(2, 1100, generator=gen) > 0.1
    dst_mask = torch.rand(2, 700, generator=gen) > 0.3
    sim, idx = reference.match(src, dst, src_mask, dst_mask)
    dense = torch.nn.functional.normalize(src, dim=-1) @ torch.nn.functional.normalize(dst, dim=-1).transpose(1, 2)
    dense = dense.masked_fill(~dst_mask[:, None, :], float("-inf"))
    best, arg = dense.max(-1)
    assert torch.equal(idx[src_mask], arg[src_mask])
    assert torch.allclose(sim[src_mask], best[src_mask], atol=1e-6)
    assert torch.isneginf(sim[~src_mask]).all()
