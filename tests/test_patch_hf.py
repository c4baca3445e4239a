"""Patching transformers Mamba / Mamba-2 models: exactness, invariances, generation, errors."""

import sys

import pytest
import torch

import ssm_reduce
from ssm_reduce.ops.route import Scan
from ssm_reduce.patch.base import runtime_of
from ssm_reduce.testing import force_scan, latest_plans, replay

from .conftest import (FAMILIES, assert_captured_pre_gate_y, assert_same_model, left_padded, ops_anchor_setup,
                       random_tokens, state_dict_copy)

METHODS = ssm_reduce.METHODS


@torch.no_grad()
def test_no_reduction_is_bit_identical(model):
    ids, mask = left_padded(3, 40, [0, 5, 11])
    ref = model(ids, attention_mask=mask).logits
    ssm_reduce.apply(model)  # neither keep_ratio nor flops_reduction: no reduction
    assert ssm_reduce.stats(model)["kept_per_row"] == []  # no forward yet
    out = model(ids, attention_mask=mask)
    assert torch.equal(out.logits, ref)
    assert torch.equal(out.kept_positions, torch.where(mask.bool(), torch.arange(40), -1))
    stats = ssm_reduce.stats(model)  # the forward is recorded all the same
    assert stats["kept_per_row"] == stats["input_tokens_per_row"] == [40, 35, 29]
    assert stats["tokens_per_layer"] == [pytest.approx(104 / 3)] * len(model.backbone.layers)
    assert stats["realised_flops_reduction"] == 0.0 and torch.equal(stats["kept_positions"], out.kept_positions)
    ssm_reduce.apply(model, keep_ratio=1.0)
    assert torch.equal(model(ids, attention_mask=mask).logits, ref)


@torch.no_grad()
def test_deepcopy_of_a_patched_model_is_independent(model):
    """A deep copy of a patched model reduces on its own (its capture hooks feed its own runtime), and
    removing the patch from the copy leaves the original patched."""
    import copy

    ids = random_tokens(2, 48)
    dense = model(ids).logits
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7, layers=[1, 3])
    reduced = model(ids)
    twin = copy.deepcopy(model)
    out = twin(ids)
    assert torch.equal(out.logits, reduced.logits) and torch.equal(out.kept_positions, reduced.kept_positions)
    assert ssm_reduce.stats(twin)["kept_per_row"] == ssm_reduce.stats(model)["kept_per_row"]
    ssm_reduce.remove(twin)
    assert torch.equal(twin(ids).logits, dense)
    assert torch.equal(model(ids).logits, reduced.logits)


@torch.no_grad()
def test_remove_restores_exactly(model):
    cls, state = type(model), state_dict_copy(model)
    ids = random_tokens(2, 48)
    ref = model(ids).logits
    hooks_before = {name: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in model.named_modules()}
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    assert model(ids).logits.shape[1] < 48
    ssm_reduce.remove(model)
    assert_same_model(model, state, cls)
    assert all(type(m).__module__.startswith("transformers") for m in model.modules() if hasattr(m, "mixer"))
    hooks_after = {name: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in model.named_modules()}
    assert hooks_after == hooks_before
    out = model(ids)
    assert torch.equal(out.logits, ref)
    assert "kept_positions" not in out


@torch.no_grad()
def test_apply_is_idempotent(model):
    ids = random_tokens(2, 60)
    ssm_reduce.apply(model, method="evit", keep_ratio=0.6)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.8)
    twice = model(ids)
    twice_stats = ssm_reduce.stats(model)
    ssm_reduce.remove(model)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.8)
    once = model(ids)
    assert torch.equal(twice.logits, once.logits)
    assert torch.equal(twice.kept_positions, once.kept_positions)
    assert twice_stats["tokens_per_layer"] == ssm_reduce.stats(model)["tokens_per_layer"]
    ssm_reduce.remove(model)
    assert not ssm_reduce.is_patched(model)


@torch.no_grad()
def test_layers_before_first_anchor_untouched(model):
    ids = random_tokens(2, 50)
    ref = model(ids, output_hidden_states=True).hidden_states
    # entry i is the output of layer i, after the embeddings' entry from transformers 5.25 on
    first = 1 if torch.equal(ref[0], model.get_input_embeddings()(ids)) else 0
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7, layers=[3, 4])
    out = model(ids, output_hidden_states=True).hidden_states
    assert len(out) == len(ref)
    for layer in range(3):
        assert torch.equal(out[first + layer], ref[first + layer])
    assert out[first + 3].shape[1] < 50  # layer 3 is the first anchor: its output is reduced
    stats = ssm_reduce.stats(model)
    assert stats["tokens_per_layer"][:4] == [50.0] * 4
    assert stats["tokens_per_layer"][4] == 50 - round(50 * 0.3)


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_every_method_runs_and_keeps_its_promises(family, method):
    model = FAMILIES[family]()
    ids, mask = left_padded(3, 64, [0, 9, 20])
    user_protect = torch.zeros(3, 64, dtype=torch.bool)
    user_protect[:, 30] = True
    ssm_reduce.apply(model, method=method, keep_ratio=0.7)
    with ssm_reduce.protect(model, user_protect):
        out = model(ids, attention_mask=mask)
    stats = ssm_reduce.stats(model)
    kept = out.kept_positions
    assert out.logits.shape[:2] == kept.shape
    assert torch.isfinite(out.logits).all()
    for b in range(3):
        real = kept[b][kept[b] >= 0]
        assert bool((real[1:] > real[:-1]).all()), "order kept"
        assert bool((kept[b, -len(real):] >= 0).all()), "left padding kept"
        assert len(real) == stats["kept_per_row"][b] < int(mask[b].sum())
        if method != "tor-official":  # the official code knows no protection
            assert kept[b, -1].item() == 63, "the last real token is protected"
            for p in (30, 61, 62, 63):  # user mask and protect_last = conv_kernel - 1
                assert p in real.tolist()
    assert stats["realised_flops_reduction"] > 0.1


@pytest.mark.parametrize("method", ["utr", "evit", "tome", "random"])
@torch.no_grad()
def test_rows_do_not_depend_on_the_batch(family, method):
    model = FAMILIES[family]()
    ssm_reduce.apply(model, method=method, keep_ratio=0.75)
    ids = random_tokens(4, 56, seed=3)
    batched = model(ids)
    for b in [0, 3]:
        alone = model(ids[b : b + 1])
        assert torch.equal(alone.kept_positions[0], batched.kept_positions[b])
        torch.testing.assert_close(alone.logits[0], batched.logits[b], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["evit", "random", "recent"])
@torch.no_grad()
def test_a_row_never_loses_all_its_tokens(family, method):
    """Aggressive ratios with nothing protected: every row keeps at least one real token at every anchor
    (a short row in a padded batch too), and the forward and generate run."""
    model = FAMILIES[family]()
    ssm_reduce.apply(model, method=method, keep_ratio=0.3, layers=[1, 2, 3], protect_last=0)
    out = model(random_tokens(1, 10))
    assert out.logits.shape[1] >= 1 and ssm_reduce.stats(model)["kept_per_row"] == [1]
    ids = random_tokens(2, 30)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :24] = 0  # row 1: 6 real tokens
    out = model(ids, attention_mask=mask)
    assert min(ssm_reduce.stats(model)["kept_per_row"]) >= 1
    assert int(out.kept_positions[1].max()) >= 24  # a real token of the short row
    assert model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0).shape == (2, 32)


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padding_does_not_change_a_row(family, side):
    model = FAMILIES[family]()
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    short = random_tokens(1, 40, seed=5)
    long = random_tokens(1, 52, seed=6)
    pad = torch.zeros(1, 12, dtype=torch.long)
    if side == "left":
        ids = torch.cat([torch.cat([pad, short], 1), long])
        mask = torch.cat([torch.cat([pad, torch.ones_like(short)], 1), torch.ones_like(long)])
    else:
        ids = torch.cat([torch.cat([short, pad], 1), long])
        mask = torch.cat([torch.cat([torch.ones_like(short), pad], 1), torch.ones_like(long)])
    padded = model(ids, attention_mask=mask)
    alone = model(short)
    kept = padded.kept_positions[0]
    real = kept >= 0
    offset = 12 if side == "left" else 0
    assert torch.equal(kept[real] - offset, alone.kept_positions[0])
    if side == "left":
        assert bool(real[-alone.logits.shape[1]:].all()) and not bool(real[: -alone.logits.shape[1]].any())
    else:
        assert bool(real[: alone.logits.shape[1]].all()) and not bool(real[alone.logits.shape[1]:].any())
    torch.testing.assert_close(padded.logits[0][real], alone.logits[0], atol=2e-5, rtol=1e-4)
    # the long row is unaffected by its neighbour's padding
    torch.testing.assert_close(padded.logits[1], model(long).logits[0][-padded.logits.shape[1]:] if side == "left"
                               else model(long).logits[0][: padded.logits.shape[1]], atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_a_row_of_padding_only_changes_no_other_row(family):
    """A left-padded batch stays left-padded when one of its rows is all padding: the other rows keep
    their last real token in the last column, and their logits and generated tokens are those of the
    batch without the empty row."""
    model = FAMILIES[family]()
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    ids, mask = left_padded(3, 30, [0, 20, 30], seed=4)
    with_empty = model(ids, attention_mask=mask, logits_to_keep=1)
    without = model(ids[:2], attention_mask=mask[:2], logits_to_keep=1)
    assert with_empty.kept_positions[:2].tolist() == without.kept_positions.tolist() == [[29], [29]]
    torch.testing.assert_close(with_empty.logits[:2], without.logits, atol=2e-5, rtol=1e-4)
    full = model(ids, attention_mask=mask)
    assert bool((full.kept_positions[:2, -1] == 29).all())
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    alone = model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[:2], alone)


@torch.no_grad()
def test_logits_to_keep_as_a_tensor_slices_like_transformers(model):
    """``logits_to_keep`` as 1-D indices or a 1-D boolean mask selects columns, as transformers does
    (``hidden_states[:, keep]``), unpatched and patched without reduction; while reducing, indices select
    columns of the reduced output (boolean masks: ``test_boolean_logits_to_keep_selects_original_positions``)."""
    ids = random_tokens(2, 40)
    columns = torch.tensor([0, 5, 39])
    flags = torch.zeros(40, dtype=torch.bool)
    flags[columns] = True
    dense = model(ids).logits
    unpatched = [model(ids, logits_to_keep=keep).logits for keep in (columns, flags)]
    for logits in unpatched:
        torch.testing.assert_close(logits, dense[:, columns])
    ssm_reduce.apply(model, method="utr")  # patched, no reduction: bit-identical
    for keep, logits in zip((columns, flags), unpatched):
        out = model(ids, logits_to_keep=keep)
        assert torch.equal(out.logits, logits) and out.kept_positions.tolist() == [[0, 5, 39]] * 2
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    full = model(ids)
    n = full.logits.shape[1]
    columns = torch.tensor([0, n // 2, n - 1])
    out = model(ids, logits_to_keep=columns)
    assert torch.equal(out.kept_positions, full.kept_positions[:, columns])
    torch.testing.assert_close(out.logits, full.logits[:, columns])


def test_a_model_and_its_backbone_are_not_patched_separately(family):
    """One patch per model: a backbone patched on its own blocks patching its causal LM, and a backbone
    patched as part of its LM cannot be re-patched or removed alone; the errors change nothing."""
    model = FAMILIES[family]()
    ids = random_tokens(1, 40)
    ssm_reduce.apply(model.backbone, method="utr", keep_ratio=0.7)
    lm_class, backbone_class = type(model), type(model.backbone)
    with pytest.raises(ValueError, match="backbone of this .* is patched on its own"):
        ssm_reduce.apply(model, method="utr", keep_ratio=0.9)
    assert type(model) is lm_class and type(model.backbone) is backbone_class
    assert not ssm_reduce.is_patched(model)
    ssm_reduce.remove(model.backbone)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.9)
    with torch.no_grad():
        before = model(ids)
    backbone_class = type(model.backbone)
    for call in (lambda: ssm_reduce.apply(model.backbone, method="utr", keep_ratio=0.6),
                 lambda: ssm_reduce.remove(model.backbone)):
        with pytest.raises(ValueError, match="patched as part of its causal LM"):
            call()
        assert type(model.backbone) is backbone_class
    with torch.no_grad():
        after = model(ids)
    assert torch.equal(after.kept_positions, before.kept_positions) and torch.equal(after.logits, before.logits)
    assert ssm_reduce.stats(model)["keep_ratio"] == 0.9


@pytest.mark.parametrize("target", [0.1, 0.2, 0.3])
@torch.no_grad()
def test_flops_target_is_realised_on_long_inputs(target):
    model = FAMILIES["mamba2"](layers=12)
    ssm_reduce.apply(model, method="utr", flops_reduction=target)
    model(random_tokens(2, 1024))
    stats = ssm_reduce.stats(model)
    assert stats["target_flops_reduction"] == pytest.approx(target)
    assert stats["realised_flops_reduction"] == pytest.approx(target, abs=0.01)
    assert len(stats["tokens_per_layer"]) == 12


@pytest.mark.parametrize("method", ["utr", "tome", "evit"])
@torch.no_grad()
def test_decoding_after_reduced_prefill_matches_full_forward(family, method):
    """generate = prefill reduced + untouched decode; the same as one forward over prompt + generated
    tokens in which the prompt is reduced by the prefill's plans and every new token is kept."""
    model = FAMILIES[family]()
    ssm_reduce.apply(model, method=method, keep_ratio=0.7)
    ids, mask = left_padded(2, 36, [0, 7], seed=11)
    steps = 5
    gen = model.generate(
        ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, output_logits=True,
        return_dict_in_generate=True, pad_token_id=0,
    )
    plans = latest_plans(model)  # decode steps never reduce, so these are the prefill's
    assert plans, "the prefill reduced"
    full_ids = gen.sequences
    full_mask = torch.cat([mask, torch.ones(2, steps, dtype=mask.dtype)], 1)
    with replay(model, plans):
        full = model(full_ids, attention_mask=full_mask)
    assert torch.equal(full.kept_positions[:, -steps:], torch.arange(36, 36 + steps).expand(2, steps))
    step_logits = torch.stack(gen.logits, 1)
    torch.testing.assert_close(full.logits[:, -steps - 1 : -1], step_logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_generate_without_cache_reduces_only_the_prompt(family):
    """generate(use_cache=False) would run a full forward per step, reducing the generated tokens too: it
    generates with the cache instead (with a warning), so the tokens are those of use_cache=True."""
    model = FAMILIES[family]()
    ids, mask = left_padded(2, 30, [0, 5], seed=4)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.6)
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    prompt_stats = ssm_reduce.stats(model)["kept_per_row"]
    with pytest.warns(UserWarning, match=r"generate\(use_cache=False\) would reduce"):
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                  use_cache=False)
    assert torch.equal(uncached, cached)
    assert ssm_reduce.stats(model)["kept_per_row"] == prompt_stats  # stats describe the prompt


@torch.no_grad()
def test_generate_greedy_sampling_batched(family):
    model = FAMILIES[family]()
    ids, mask = left_padded(3, 30, [0, 4, 10], seed=2)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert greedy.shape == (3, 36) and torch.equal(greedy[:, :30], ids)
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=10, pad_token_id=0)
    assert sampled.shape == (3, 36)
    stats = ssm_reduce.stats(model)
    assert stats["input_tokens_per_row"] == [30, 26, 20]  # the prefill's, not a decode step's


@torch.no_grad()
def test_logits_to_keep_and_kept_positions(model):
    ids = random_tokens(2, 40)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    full = model(ids)
    last = model(ids, logits_to_keep=1)
    assert last.logits.shape[1] == 1
    assert last.kept_positions.tolist() == [[39], [39]]
    torch.testing.assert_close(last.logits[:, 0], full.logits[:, -1])
    two = model(ids, logits_to_keep=2)
    assert torch.equal(two.kept_positions, full.kept_positions[:, -2:])


def test_labels_loss_uses_kept_positions(model):
    ids = random_tokens(2, 40)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    out = model(ids, labels=ids)
    kept = out.kept_positions
    logits = out.logits
    targets = torch.full_like(kept, -100)
    for b in range(2):
        for j, p in enumerate(kept[b].tolist()):
            if 0 <= p < 39:
                targets[b, j] = ids[b, p + 1]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    assert out[0] is out.loss
    out.loss.backward()  # gradients flow through the reduced forward


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_low_precision(family, dtype):
    model = FAMILIES[family]().to(dtype)
    ids = random_tokens(2, 48)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    out = model(ids)
    assert torch.isfinite(out.logits).all()
    assert out.kept_positions.shape[1] < 48
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7, q_hidden=0.0)
    assert torch.isfinite(model(ids).logits).all()


@torch.no_grad()
def test_importance_sources_differ_and_work(model):
    ids = random_tokens(1, 64)
    kept = {}
    for source in ("ssm", "gated", "block"):
        ssm_reduce.apply(model, method="evit", keep_ratio=0.7, importance_source=source)
        kept[source] = model(ids).kept_positions
    assert not torch.equal(kept["gated"], kept["block"])
    assert not torch.equal(kept["ssm"], kept["gated"])  # y before the gate vs the gated input of out_proj


@pytest.mark.parametrize("family_name", ["mamba2", "mamba"])
@torch.no_grad()
def test_ops_mixer_equals_the_host_mixer(family_name):
    """The anchor path that scans through ssm_reduce.ops (the fused kernels on CUDA) computes the
    host mixer's output and scores y before its gate."""
    from ssm_reduce.patch.hf import _ops_mamba2_mixer, _ops_mamba_mixer

    model = FAMILIES[family_name]()
    mixer = model.backbone.layers[1].mixer
    x, session = ops_anchor_setup()
    fn = _ops_mamba2_mixer if family_name == "mamba2" else _ops_mamba_mixer
    torch.testing.assert_close(fn(mixer, x, None, None, session, Scan.REFERENCE), mixer(x), atol=1e-5, rtol=1e-5)
    assert_captured_pre_gate_y(session, mixer, x, family_name == "mamba2")


@torch.no_grad()
def test_mamba2_anchors_through_ops_equal_the_host_path():
    model = FAMILIES["mamba2"]()
    ids, mask = left_padded(2, 48, [0, 6], seed=9)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7, similarity_source="ssm")
    results = []
    for use_ops in (False, True):
        with force_scan(model, use_ops):
            out = model(ids, attention_mask=mask)
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
        results.append((out, gen))
    (a, ga), (b, gb) = results
    assert torch.equal(a.kept_positions, b.kept_positions)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(ga.sequences, gb.sequences)
    torch.testing.assert_close(torch.stack(gb.logits), torch.stack(ga.logits), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_mamba1_ssm_source_needs_the_ops_path():
    model = FAMILIES["mamba"]()
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    with force_scan(model, False), pytest.raises(RuntimeError, match="'ssm' source was not captured"):
        model(random_tokens(1, 40))  # the host's Mamba-1 scan gates y inside: nothing to read
    assert model(random_tokens(1, 40)).logits.shape[1] < 40
@torch.no_grad()
def test_backbone_only(family):
    model = FAMILIES[family]()
    backbone = model.backbone
    ids = random_tokens(2, 40)
    ref = backbone(ids).last_hidden_state
    ssm_reduce.apply(backbone, method="utr", keep_ratio=0.7)
    out = backbone(ids)
    assert out.last_hidden_state.shape[1] == out.kept_positions.shape[1] < 40
    ssm_reduce.remove(backbone)
    assert torch.equal(backbone(ids).last_hidden_state, ref)


@torch.no_grad()
def test_return_dict_false(model):
    ids = random_tokens(1, 40)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    out = model(ids, return_dict=False)
    assert isinstance(out, tuple)
    assert out[0].shape[1] == ssm_reduce.stats(model)["kept_positions"].shape[1]


@torch.no_grad()
def test_short_sequences_pass_through(model):
    """A prompt no longer than the default protection (conv kernel - 1) has nothing to remove and passes
    through; a sequence shorter than protection the caller asked for is an error that changes nothing."""
    ids = random_tokens(2, 3)  # all three protected by protect_last
    ref = model(ids).logits
    ssm_reduce.apply(model, method="utr", keep_ratio=0.5)
    out = model(ids)
    assert torch.equal(out.logits, ref)
    assert torch.equal(model(ids[:, :2]).logits, model.lm_head(model.backbone(ids[:, :2]).last_hidden_state))
    ssm_reduce.apply(model, method="utr", keep_ratio=0.5, protect_first=2, protect_last=4)
    with pytest.raises(ValueError, match="the input has 5 tokens, fewer than protect_first \\+ protect_last = 6"):
        model(random_tokens(2, 5))
    assert model(random_tokens(2, 6)).logits.shape[1] == 6  # all protected: nothing removed
    assert model(random_tokens(2, 40)).logits.shape[1] < 40


# ---------------------------------------------------------------------------------------------------
# bad input: a clear error, and the model exactly as it was


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="fastest"), ValueError, "method='fastest' is not supported"),
        (dict(keep_ratio=0.0), ValueError, "keep_ratio must be in"),
        (dict(keep_ratio=1.2), ValueError, "keep_ratio must be in"),
        (dict(keep_ratio=0.9, flops_reduction=0.1), ValueError, "set only one"),
        (dict(keep_ratio=0.9, layers=[2, 99]), ValueError, r"layers \[99\] out of range"),
        (dict(keep_ratio=0.9, q_hidden=2.0), ValueError, "q_hidden must be in"),
        (dict(keep_ratio=0.9, q_residual=-1), ValueError, "q_residual must be in"),
        (dict(keep_ratio=0.9, speed="max"), TypeError, "unknown ReduceConfig option"),
    ],
)
def test_bad_config_leaves_model_unchanged(family, kwargs, error, match):
    model = FAMILIES[family]()
    ssm_reduce.apply(model, method="evit", keep_ratio=0.8)
    patched_class = type(model)
    ids = random_tokens(1, 40)
    with torch.no_grad():
        before = model(ids)
    with pytest.raises(error, match=match):
        ssm_reduce.apply(model, **kwargs)
    assert type(model) is patched_class
    with torch.no_grad():
        after = model(ids)
    assert torch.equal(before.logits, after.logits)
    # and on an unpatched model
    fresh = FAMILIES[family]()
    cls, state = type(fresh), state_dict_copy(fresh)
    with pytest.raises(error, match=match):
        ssm_reduce.apply(fresh, **kwargs)
    assert_same_model(fresh, state, cls)


def test_unsupported_model_type():
    with pytest.raises(TypeError, match="does not support Linear; supported models: .*Mamba2ForCausalLM"):
        ssm_reduce.apply(torch.nn.Linear(2, 2), keep_ratio=0.9)
    with pytest.raises(TypeError, match="does not support"):
        ssm_reduce.remove(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="config must be a ssm_reduce.ReduceConfig"):
        ssm_reduce.apply(FAMILIES["mamba2"](), config={"keep_ratio": 0.9})


def test_protect_mask_errors(model):
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    ids = random_tokens(2, 40)
    with pytest.raises(ValueError, match=r"protect mask has shape \(2, 39\) but this forward's input is \(2, 40\)"):
        with ssm_reduce.protect(model, torch.ones(2, 39, dtype=torch.bool)):
            model(ids)
    with pytest.raises(ValueError, match=r"mask must have shape \[batch, seq_len\]"):
        with ssm_reduce.protect(model, torch.ones(40, dtype=torch.bool)):
            pass
    with pytest.raises(ValueError, match="mask must be boolean"):
        with ssm_reduce.protect(model, torch.full((2, 40), 0.5)):
            pass
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        with ssm_reduce.protect(model, [[True]]):
            pass
    # the failed forward left nothing behind
    assert runtime_of(model).protect_mask is None and runtime_of(model).session() is None
    with torch.no_grad():
        assert model(ids).logits.shape[1] < 40


def test_protect_everything_means_no_reduction(model):
    ssm_reduce.apply(model, method="utr", keep_ratio=0.6)
    ids = random_tokens(2, 40)
    with torch.no_grad(), ssm_reduce.protect(model, torch.ones(2, 40, dtype=torch.bool)):
        out = model(ids)
    assert torch.equal(out.kept_positions, torch.arange(40).expand(2, 40))


def test_stats_before_forward_and_unpatched(model):
    with pytest.raises(ValueError, match="not patched"):
        ssm_reduce.stats(model)
    ssm_reduce.apply(model, flops_reduction=0.2, layers=[1, 2, 3])
    assert ssm_reduce.stats(model)["tokens_per_layer"] == []


def test_save_pretrained_while_patched(tmp_path, model):
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    model.save_pretrained(tmp_path)
    import json

    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [type(model).__name__]
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded).__module__.startswith("transformers")


@torch.no_grad()
def test_inputs_embeds_path(model):
    ids = random_tokens(2, 40)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    by_ids = model(ids)
    by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids))
    assert torch.equal(by_ids.kept_positions, by_embeds.kept_positions)
    torch.testing.assert_close(by_ids.logits, by_embeds.logits)


@torch.no_grad()
def test_mamba1_anchors_through_the_host_scan_equal_the_reference_scan(monkeypatch):
    """Where the compiled kernels do not serve on CUDA, Mamba-1 anchors call the host's own scan without
    its gate (mamba_ssm's kernel where installed); forced here on CPU, it must pick the same tokens and
    fill the same cache as the reference scan."""
    from ssm_reduce.patch import hf as hf_adapter

    host = sys.modules[type(FAMILIES["mamba"]().backbone.layers[0].mixer).__module__]
    scan, calls = host.mamba_selective_scan, []
    monkeypatch.setattr(host, "mamba_selective_scan", lambda *a, **k: calls.append(1) or scan(*a, **k))
    model = FAMILIES["mamba"]()
    ids, mask = left_padded(2, 48, [0, 6], seed=4)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    results, counts = [], []
    for host_scan in (False, True):
        monkeypatch.setattr(hf_adapter, "_host_selective_scan",
                            lambda host, hidden, v=host_scan: host.mamba_selective_scan if v else None)
        calls.clear()
        out = model(ids, attention_mask=mask)
        counts.append(len(calls))
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        results.append((out, gen))
    (a, ga), (b, gb) = results
    assert counts[1] == counts[0] + len(runtime_of(model).resolved.anchors)  # the anchors took the host scan
    assert a.logits.shape[1] < 48 and torch.equal(a.kept_positions, b.kept_positions)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(ga.sequences, gb.sequences)
    torch.testing.assert_close(torch.stack(gb.logits), torch.stack(ga.logits), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_mamba2_ops_anchors_continue_from_a_filled_cache():
    """A multi-token forward on top of a cache (chunked prefill) starts the ops-path anchors from the
    layer's cached SSM state, as the host mixer does."""
    model = FAMILIES["mamba2"]()
    ids = random_tokens(2, 60)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7, similarity_source="ssm")
    results = []
    for use_ops in (False, True):
        with force_scan(model, use_ops):
            first = model(ids[:, :40], use_cache=True)
            # (the cache's name: ``cache`` from transformers 5.25, ``cache_params`` before)
            name = "cache" if "cache" in first else "cache_params"
            results.append(model(ids[:, 40:], **{name: first[name]}, use_cache=True))
    host, via_ops = results
    assert host.logits.shape[1] < 20 and torch.equal(host.kept_positions, via_ops.kept_positions)
    torch.testing.assert_close(via_ops.logits, host.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_patched_blocks_take_positional_and_keyword_arguments(family):
    """Patched blocks called with everything by position (the host signature's order) give what they give
    by keyword, as transformers calls them (that path skips binding the signature)."""
    import inspect

    from ssm_reduce.patch.base import PARENT_ATTR

    model = FAMILIES[family]()
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7, layers=[1, 3])
    ids = random_tokens(2, 40)
    by_keyword = model(ids)
    order = list(inspect.signature(getattr(type(model.backbone.layers[0]), PARENT_ATTR).forward).parameters)[2:]
    calls = []
    for block in model.backbone.layers:
        patched = block.forward  # (bound method of the patched class)

        def positional(hidden_states, _patched=patched, **kwargs):
            calls.append(1)
            assert set(kwargs) <= set(order), (order, list(kwargs))
            last = max((order.index(k) for k in kwargs), default=-1)
            return _patched(hidden_states, *[kwargs.get(name) for name in order[: last + 1]])

        block.forward = positional
    try:
        by_position = model(ids)
    finally:
        for block in model.backbone.layers:
            del block.forward
    assert len(calls) == len(model.backbone.layers)
    assert torch.equal(by_position.kept_positions, by_keyword.kept_positions)
    assert torch.equal(by_position.logits, by_keyword.logits)
