"""Token reduction in transformers' Mamba-attention hybrids and FalconMamba (tiny random models, CPU)."""

import copy

import pytest
import torch

import ssm_reduce
from ssm_reduce.config import hybrid_schedule
from ssm_reduce.patch.hybrid import kv_record
from ssm_reduce.testing import latest_plans, replay

from .conftest import assert_same_model, left_padded, random_tokens, state_dict_copy
from .hybrids import ATTENTION, HYBRIDS, MAMBA, hybrids_unsupported, tiny_hybrid

pytestmark = pytest.mark.skipif(bool(hybrids_unsupported()), reason=hybrids_unsupported() or "")


@pytest.fixture(params=HYBRIDS)
def name(request):
    return request.param


def _anchors(name):
    """Two anchors: the second Mamba layer and one after the first attention layer where there is one."""
    mamba = MAMBA[name]
    first_attention = ATTENTION[name][0] if ATTENTION[name] else -1
    later = [m for m in mamba if m > mamba[1] and m > first_attention]
    return [mamba[1], later[0]]


def _generate(model, ids, mask, steps, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=steps, pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_reduction_off_is_bit_identical(name, dtype):
    """No ratio, or keep ratio 1: every logit and every generated token as the unpatched model's."""
    model = tiny_hybrid(name, dtype=dtype)
    ids, mask = left_padded(2, 30, [0, 6], seed=3)
    ref = model(ids, attention_mask=mask).logits
    ref_gen = _generate(model, ids, mask, 4, do_sample=False)
    for settings in ({}, {"keep_ratio": 1.0}):
        ssm_reduce.apply(model, method="utr", **settings)
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)
        gen = _generate(model, ids, mask, 4, do_sample=False)
        assert torch.equal(gen.sequences, ref_gen.sequences)
        assert all(torch.equal(a, b) for a, b in zip(gen.logits, ref_gen.logits))
        ssm_reduce.remove(model)


@torch.no_grad()
def test_remove_restores_exactly(name):
    model = tiny_hybrid(name)
    host_class, state = type(model), state_dict_copy(model)
    ids, mask = left_padded(2, 30, [0, 5], seed=2)
    ref = model(ids, attention_mask=mask).logits
    ssm_reduce.apply(model, method="utr", keep_ratio=0.6, layers=_anchors(name))
    reduced = model(ids, attention_mask=mask)
    assert reduced.logits.shape[1] < 30
    ssm_reduce.remove(model)
    assert_same_model(model, state, host_class)
    assert all(type(m).__dict__.get("_ssm_reduce_parent") is None for m in model.modules())
    assert not any(k.startswith("_ssm_reduce") for m in model.modules() for k in m.__dict__)
    assert torch.equal(model(ids, attention_mask=mask).logits, ref)


@pytest.mark.parametrize("method", ["utr", "evit"])
@torch.no_grad()
def test_decoding_after_reduced_prefill_matches_full_forward(name, method):
    """Greedy decode after a reduced, left-padded prefill = one forward over prompt + generated tokens with
    the prompt reduced by the prefill's plans: the attention caches hold the kept tokens, the new tokens sit
    at the original positions, every Mamba cache holds the state of what its layer saw."""
    model = tiny_hybrid(name)
    ssm_reduce.apply(model, method=method, keep_ratio=0.6, layers=_anchors(name))
    ids, mask = left_padded(2, 32, [0, 7], seed=11)
    steps = 5
    gen = _generate(model, ids, mask, steps, do_sample=False)
    plans = latest_plans(model)
    assert sorted(plans) == _anchors(name)
    full_mask = torch.cat([mask, torch.ones(2, steps, dtype=mask.dtype)], 1)
    with replay(model, plans):
        full = model(gen.sequences, attention_mask=full_mask)
    assert torch.equal(full.kept_positions[:, -steps:], torch.arange(32, 32 + steps).expand(2, steps))
    torch.testing.assert_close(full.logits[:, -steps - 1:-1], torch.stack(gen.logits, 1), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_attention_caches_hold_the_kept_tokens(name):
    """After a reduced prefill, each attention layer's cache has one entry per token that layer saw (the kept
    tokens of the anchors before it), and stats report its tokens and bytes against the dense model's."""
    if not ATTENTION[name]:
        pytest.skip(f"{name} has no attention layers")
    model = tiny_hybrid(name)
    ids, mask = left_padded(2, 40, [0, 9], seed=5)
    dense = model(ids, attention_mask=mask, use_cache=True).cache
    anchors = _anchors(name)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.6, layers=anchors)
    out = model(ids, attention_mask=mask, use_cache=True)
    cache, stats = out.cache, ssm_reduce.stats(model)
    plans = latest_plans(model)
    for layer in ATTENTION[name]:
        before = [a for a in anchors if a < layer]
        columns = plans[before[-1]].state.pos.shape[1] if before else 40
        assert cache.layers[layer].keys.shape[-2] == columns
        valid = kv_record(cache).valid[layer]
        real = plans[before[-1]].state.valid.sum(1) if before else mask.sum(1)
        assert torch.equal(valid.sum(1), real)
        entry = stats["attention_layers"][layer]
        assert entry["attended_tokens"] == pytest.approx(float(real.double().mean()))
        assert entry["dense_attended_tokens"] == pytest.approx(float(mask.sum(1).double().mean()))
        keys, values = dense.layers[layer].keys, dense.layers[layer].values
        assert entry["dense_kv_cache_bytes"] == keys.numel() * keys.element_size() * 2 == \
            values.numel() * values.element_size() * 2
        assert entry["kv_cache_bytes"] == entry["dense_kv_cache_bytes"] * columns // 40


_ROTARY = {"granite": "self_attn", "falcon_h1": "self_attn", "bamba": "self_attn", "zamba2": "shared_transformer"}


@pytest.mark.parametrize("name", sorted(_ROTARY))
@torch.no_grad()
def test_attention_sees_the_kept_tokens_original_positions(name):
    """Rotary embeddings after an anchor are the host's at each kept token's original position (a merged
    token at its latest member's): computed here from the kept positions with the host's rotary module."""
    model = tiny_hybrid(name)
    anchors = _anchors(name)
    ssm_reduce.apply(model, method="tome", keep_ratio=0.6, layers=anchors)
    ids = random_tokens(2, 36, seed=8)
    seen = {}
    layer = ATTENTION[name][-1]
    module = getattr(model.model.layers[layer], _ROTARY[name])
    def hook(module, args, kwargs):
        seen["cos"] = kwargs["position_embeddings"][0]

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    model(ids, use_cache=True)
    handle.remove()
    kept = latest_plans(model)[max(a for a in anchors if a < layer)].state.pos
    assert int((kept < 0).sum()) == 0 and bool((kept.diff(dim=1) > 0).all())
    expected, _ = model.model.rotary_emb(torch.zeros(2, 1, 32), kept)
    torch.testing.assert_close(seen["cos"], expected, atol=0, rtol=0)
    ssm_reduce.remove(model)


@torch.no_grad()
def test_rows_do_not_depend_on_their_batch(name):
    """A row's kept positions and logits are those it gets alone, left-padded in any batch."""
    model = tiny_hybrid(name)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.6, layers=_anchors(name))
    ids, mask = left_padded(3, 34, [0, 6, 11], seed=4)
    batch = model(ids, attention_mask=mask)
    for row in range(3):
        pad = int((mask[row] == 0).sum())
        alone = model(ids[row:row + 1, pad:])
        got = batch.kept_positions[row]
        real = got >= 0
        assert torch.equal(got[real] - pad, alone.kept_positions[0])
        torch.testing.assert_close(batch.logits[row][real], alone.logits[0], atol=2e-5, rtol=2e-5)


@torch.no_grad()
def test_sampling_and_batched_generation(name):
    """Sampling with a seed gives the same tokens twice; a batched, left-padded generate gives each row what
    it gets alone (greedy)."""
    model = tiny_hybrid(name)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.6, layers=_anchors(name))
    ids, mask = left_padded(2, 30, [0, 8], seed=6)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=8,
                                   pad_token_id=0))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (2, 36)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row in range(2):
        pad = int((mask[row] == 0).sum())
        alone = model.generate(ids[row:row + 1, pad:], max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 30 - pad:]
        assert torch.equal(batched[row, 30:30 + len(alone)], alone)  # (a row alone stops at its end of sequence)


@torch.no_grad()
def test_loss_and_bf16_forward(name):
    """A reduced forward with labels gives a finite loss on the kept positions; bf16 runs and reduces alike."""
    model = tiny_hybrid(name)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.6, layers=_anchors(name))
    ids, mask = left_padded(2, 30, [0, 4], seed=9)
    out = model(ids, attention_mask=mask, labels=ids)
    assert torch.isfinite(out.loss)
    half = tiny_hybrid(name, dtype=torch.bfloat16)
    host_dtype = half(ids, attention_mask=mask).logits.dtype
    ssm_reduce.apply(half, method="utr", keep_ratio=0.6, layers=_anchors(name))
    low = half(ids, attention_mask=mask)
    assert low.logits.dtype == host_dtype and low.logits.shape[1] == out.logits.shape[1]
    assert torch.isfinite(low.logits.float()).all()


@torch.no_grad()
def test_stats_and_flops_target(name):
    model = tiny_hybrid(name)
    ssm_reduce.apply(model, method="utr", flops_reduction=0.2)
    model(random_tokens(2, 256, seed=2), use_cache=False)
    stats = ssm_reduce.stats(model)
    assert set(stats["anchors"]) <= set(MAMBA[name])
    assert stats["realised_flops_reduction"] == pytest.approx(0.2, abs=0.02)
    assert len(stats["tokens_per_layer"]) == len(model.model.layers if hasattr(model, "model") else
                                                 model.backbone.layers)
    assert sorted(stats.get("attention_layers", {})) == ATTENTION[name]
    for layer, entry in stats.get("attention_layers", {}).items():  # no cache: tokens only
        assert entry["dense_attended_tokens"] == 256 and entry["kv_cache_bytes"] is None
        assert entry["attended_tokens"] == stats["tokens_per_layer"][layer]


def test_hybrid_schedule_moves_anchors_to_mamba_layers():
    assert hybrid_schedule((2, 4, 6), [0, 1, 3, 5, 7]) == (1, 3, 5)  # ties go to the earlier layer
    assert hybrid_schedule((3, 4), [0, 1, 3, 5]) == (3,)  # duplicates dropped
    assert hybrid_schedule((3,), []) == ()
    resolved = ssm_reduce.check(tiny_hybrid("granite"), method="utr", keep_ratio=0.7)
    assert resolved.anchors == (1, 3)


@torch.no_grad()
def test_bad_inputs_leave_the_model_as_it_was(name):
    model = tiny_hybrid(name)
    host_class, state = type(model), state_dict_copy(model)
    not_mamba = sorted(set(range(len(MAMBA[name]) + len(ATTENTION[name]) + 2)) - set(MAMBA[name]))
    layers = len(model.model.layers) if hasattr(model, "model") else len(model.backbone.layers)
    not_mamba = [i for i in not_mamba if i < layers]
    if not_mamba:
        with pytest.raises(ValueError, match=r"not Mamba layers.*" + str(MAMBA[name][0])):
            ssm_reduce.apply(model, method="utr", keep_ratio=0.7, layers=[not_mamba[0]])
        assert_same_model(model, state, host_class)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.6, layers=_anchors(name))
    ids = random_tokens(2, 24, seed=1)
    with pytest.raises(ValueError, match="num_beams=2"):
        model.generate(ids, max_new_tokens=2, num_beams=2, pad_token_id=0)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 1, 24, 24))
    if name in ("granite", "jamba"):
        with pytest.raises(ValueError, match="output_router_logits"):
            model(ids, output_router_logits=True)
    ssm_reduce.remove(model)
    assert_same_model(model, state, host_class)


def test_unsupported_models_are_refused_naming_the_supported():
    import transformers

    config = transformers.ZambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                      attention_hidden_size=64, intermediate_size=32, mamba_d_state=8,
                                      n_mamba_heads=2, layers_block_type=["hybrid", "mamba", "hybrid"])
    model = transformers.ZambaForCausalLM(config)
    with pytest.raises(TypeError, match=r"ZambaForCausalLM.*GraniteMoeHybridForCausalLM.*FalconMambaForCausalLM"):
        ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    assert not ssm_reduce.is_patched(model)


def test_zamba2_refuses_tor_official():
    model = tiny_hybrid("zamba2")
    with pytest.raises(ValueError, match="tor-official"):
        ssm_reduce.apply(model, method="tor-official", keep_ratio=0.7)
    assert not ssm_reduce.is_patched(model)


@torch.no_grad()
def test_copies_and_threads(name):
    """A deep copy reduces as the original; two threads' forwards give what each gives alone."""
    import threading

    model = tiny_hybrid(name)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.6, layers=_anchors(name))
    inputs = [left_padded(2, 28, [0, 5], seed=1), left_padded(3, 36, [4, 0, 9], seed=2)]
    alone = [model(ids, attention_mask=mask).logits for ids, mask in inputs]
    twin = copy.deepcopy(model)
    assert torch.equal(twin(*inputs[0][:1], attention_mask=inputs[0][1]).logits, alone[0])
    errors = []

    def run(k):
        for _ in range(4):
            got = model(inputs[k][0], attention_mask=inputs[k][1]).logits
            if not torch.equal(got, alone[k]):
                errors.append(k)

    threads = [threading.Thread(target=run, args=(k % 2,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("name", ["granite", "zamba2", "falcon_h1"])
@torch.no_grad()
def test_a_second_prefill_and_decode_continue_the_record(name):
    """A prompt fed in two forwards, then a decode step: each attention layer's record of real entries stays
    as long as its cache, and the dense length counts every token."""
    model = tiny_hybrid(name)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.6)
    ids, mask = left_padded(2, 60, [0, 5], seed=1)
    first = model(ids[:, :30], attention_mask=mask[:, :30], use_cache=True)
    second = model(ids[:, 30:], attention_mask=mask, cache=first.cache, use_cache=True)
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    last = model(ids[:, :1], attention_mask=step_mask, cache=second.cache, use_cache=True)
    record = kv_record(last.cache)
    assert record.dense_columns == 61 and int(last.cache.get_seq_length(0)) == 61
    for layer in ATTENTION[name]:
        assert record.valid[layer].shape == (2, last.cache.layers[layer].keys.shape[-2])
        assert bool(record.valid[layer][:, -1].all())  # the decode token is real
    assert record.valid[ATTENTION[name][-1]].shape[1] < 61


def test_older_transformers_are_refused(monkeypatch):
    from ssm_reduce.patch import hybrid

    model = tiny_hybrid("granite")
    monkeypatch.setattr(hybrid, "transformers_version", lambda: "5.23.0")
    with pytest.raises(ValueError, match=r"needs transformers >= 5.25.*found 5.23.0"):
        ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    assert not ssm_reduce.is_patched(model)


@torch.no_grad()
def test_prune_then_reduce(name):
    """Weight pruning and token reduction compose: the pruned model reduces, and reduction off gives the
    pruned model's logits exactly."""
    model = tiny_hybrid(name)
    ids, mask = left_padded(2, 40, [0, 6], seed=3)
    report = ssm_reduce.prune(model, random_tokens(4, 48, seed=5), sparsity=0.5, method="wanda", progress=False)
    assert report.layers
    pruned = model(ids, attention_mask=mask).logits
    ssm_reduce.apply(model, method="utr", keep_ratio=1.0)
    assert torch.equal(model(ids, attention_mask=mask).logits, pruned)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.6, layers=_anchors(name))
    assert model(ids, attention_mask=mask).logits.shape[1] < 40


def test_windowed_perplexity_dense_and_reduced(name):
    from ssm_reduce import ReduceConfig
    from ssm_reduce.evaluation import compare_perplexity

    model = tiny_hybrid(name)
    tokens = random_tokens(1, 400, seed=7)[0]
    result = compare_perplexity(model, tokens, ReduceConfig(method="utr", flops_reduction=0.2), window=128,
                                scored=32, batch_size=2)
    assert result["dense"]["bits_per_token"] > 0 and result["reduced"]["bits_per_token"] > 0
    assert result["reduced"]["realised_flops_reduction"] > 0.05
    assert not ssm_reduce.is_patched(model)


def test_an_unknown_mamba_mixer_is_refused(monkeypatch):
    """A supported class whose mixer no longer calls the scan function the adapter reads is refused."""
    import sys

    model = tiny_hybrid("granite")
    module = sys.modules[type(model.model.layers[0].mamba).__module__]
    monkeypatch.delattr(module, "mamba2_scan_forward")
    with pytest.raises(TypeError, match="GraniteMoeHybridMambaLayer"):
        ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    assert not ssm_reduce.is_patched(model)


@torch.no_grad()
def test_right_padded_rows_equal_their_rows_alone(name):
    model = tiny_hybrid(name)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.6, layers=_anchors(name))
    ids, mask = left_padded(2, 34, [0, 9], seed=12)
    lengths = mask.sum(1).tolist()
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for row, n in enumerate(lengths):  # the same rows, padded on the right
        right_ids[row, :n], right_mask[row, :n] = ids[row, 34 - n:], 1
    batch = model(right_ids, attention_mask=right_mask)
    for row, n in enumerate(lengths):
        alone = model(right_ids[row:row + 1, :n])
        got = batch.kept_positions[row]
        real = got >= 0
        assert torch.equal(got[real], alone.kept_positions[0])
        torch.testing.assert_close(batch.logits[row][real], alone.logits[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["granite", "falcon_h1", "zamba2", "jamba"])
@torch.no_grad()
def test_eager_and_sdpa_attention_agree_after_a_reduction(name):
    """The masks built over the kept tokens come in the kind each attention implementation expects: eager
    (additive) and SDPA (boolean) give the same reduced logits on a left-padded batch, as the host's do."""
    ids, mask = left_padded(2, 36, [0, 8], seed=14)
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = tiny_hybrid(name)
        model.set_attn_implementation(implementation)
        ssm_reduce.apply(model, method="utr", keep_ratio=0.6, layers=_anchors(name))
        outputs[implementation] = model(ids, attention_mask=mask, use_cache=True)
    assert torch.equal(outputs["eager"].kept_positions, outputs["sdpa"].kept_positions)
    real = outputs["eager"].kept_positions >= 0
    torch.testing.assert_close(outputs["eager"].logits[real], outputs["sdpa"].logits[real], atol=1e-5, rtol=1e-5)
