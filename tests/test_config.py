"""ReduceConfig validation, layer schedules and the FLOPs-target solver."""

import pytest

from ssm_reduce import ReduceConfig, default_schedule, flops_reduction_for, solve_keep_ratio


def test_paper_schedules():
    assert default_schedule(64) == (12, 17, 22, 27, 32, 37, 42)
    assert default_schedule(48) == (10, 15, 20, 25, 30, 35)


@pytest.mark.parametrize("layers", [12, 24, 32, 40, 80])
def test_other_depths_keep_the_shape(layers):
    anchors = default_schedule(layers)
    assert len(anchors) >= 3
    assert all(0 <= a < layers for a in anchors)
    assert list(anchors) == sorted(set(anchors))
    assert abs(anchors[0] - 0.19 * layers) <= 1
    assert anchors[-1] <= 0.7 * layers


def test_official_model_sparsity_figure():
    # The official code reports 29.84% "Model Sparsity" for keep 0.905 at [12..42] of 64 layers.
    assert flops_reduction_for(0.905, default_schedule(64), 64) == pytest.approx(0.2984, abs=5e-5)


@pytest.mark.parametrize(
    "layers, expected",
    [(64, (0.9729, 0.9415, 0.9043)), (48, (0.9651, 0.9248, 0.8768))],
)
def test_solved_keep_ratios_match_the_derived_paper_ratios(layers, expected):
    anchors = default_schedule(layers)
    for target, ratio in zip((0.1, 0.2, 0.3), expected):
        solved = solve_keep_ratio(target, anchors, layers)
        assert solved == pytest.approx(ratio, abs=1e-4)
        assert flops_reduction_for(solved, anchors, layers) == pytest.approx(target, abs=1e-9)


def test_flops_by_hand():
    # 4 layers, one anchor after layer 1 keeping half: layers 0,1 see N, layers 2,3 see N/2.
    assert flops_reduction_for(0.5, [1], 4) == pytest.approx(1 - (1 + 1 + 0.5 + 0.5) / 4)


def test_unreachable_target():
    with pytest.raises(ValueError, match="cannot be reached"):
        solve_keep_ratio(0.9, [10], 12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="bogus"), "method='bogus' is not supported"),
        (dict(keep_ratio=0.0), r"keep_ratio must be in \(0.0, 1.0\]"),
        (dict(keep_ratio=1.5), r"keep_ratio must be in"),
        (dict(flops_reduction=1.0), r"flops_reduction must be in \[0.0, 1.0\)"),
        (dict(flops_reduction=-0.1), r"flops_reduction must be in"),
        (dict(keep_ratio=0.9, flops_reduction=0.2), "set only one of keep_ratio"),
        (dict(q_hidden=1.5), r"q_hidden must be in \[0.0, 1.0\]"),
        (dict(q_residual=-0.5), r"q_residual must be in"),
        (dict(importance="max"), "importance='max' is not supported"),
        (dict(importance_source="x"), "importance_source='x' is not supported"),
        (dict(similarity_source="x"), "similarity_source='x' is not supported"),
        (dict(layers=[1, 1]), "must not repeat"),
        (dict(layers=[-1]), "non-negative integers"),
        (dict(layers="3"), "list of layer indices"),
        (dict(protect_last=-1), "protect_last must be an integer >= 0"),
        (dict(protect_first=1.5), "protect_first must be an integer >= 0"),
        (dict(causal="yes"), "causal must be True or False"),
        (dict(keep_ratio=float("nan")), "keep_ratio must be a number"),
    ],
)
def test_bad_values_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReduceConfig(**kwargs)


def test_layers_normalised():
    assert ReduceConfig(layers=[5, 2, 9]).layers == (2, 5, 9)
    assert ReduceConfig(layers=3).layers == (3,)


def test_overrides_switch_ratio_kind():
    cfg = ReduceConfig(keep_ratio=0.9)
    assert cfg.with_overrides(flops_reduction=0.2).keep_ratio is None
    with pytest.raises(TypeError, match="unknown ReduceConfig option"):
        cfg.with_overrides(ratio=0.5)


def test_resolve():
    cfg = ReduceConfig(flops_reduction=0.2)
    resolved = cfg.resolve(num_layers=64, conv_kernel=4)
    assert resolved.anchors == default_schedule(64)
    assert resolved.protect_last == 3
    assert resolved.target_flops_reduction == pytest.approx(0.2)
    assert ReduceConfig().resolve(24, 4).anchors == ()  # nothing requested: no reduction
    assert ReduceConfig(keep_ratio=1.0).resolve(24, 4).anchors == ()
    with pytest.raises(ValueError, match=r"layers \[30\] out of range: the model has 24 layers"):
        ReduceConfig(keep_ratio=0.9, layers=[3, 30]).resolve(24, 4)
    with pytest.raises(ValueError, match="removes at most half"):
        ReduceConfig(keep_ratio=0.3).resolve(24, 4)
    assert ReduceConfig(method="evit", keep_ratio=0.3).resolve(24, 4).keep_ratio == 0.3
    assert ReduceConfig(method="tor-official", keep_ratio=0.3).resolve(24, 4).keep_ratio == 0.3  # capped as upstream


def test_stream_q_per_method():
    assert ReduceConfig().stream_q() == (0.5, 0.0)
    assert ReduceConfig(method="prune").stream_q() == (1.0, 1.0)
    assert ReduceConfig(method="merge").stream_q() == (0.0, 0.0)
    assert ReduceConfig(q_hidden=0.25, q_residual=0.75).stream_q() == (0.25, 0.75)
