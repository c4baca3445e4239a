"""prune_model: model-level runs on Mamba, Mamba-2 and transformers models, the report, calibration, the
replay of every block with its own arguments, saving, and errors that change nothing."""

import json

import pytest
import torch

import ssm_reduce

from .conftest import FAMILIES, random_tokens, state_dict_copy
from .test_prune import CUDA_REASON


def test_model_level_errors_change_nothing():
    model = FAMILIES["mamba2"](layers=2)
    before = state_dict_copy(model)
    calib = random_tokens(1, 600)[0]
    with pytest.raises(ValueError, match="calib is too short: 600 tokens"):
        ssm_reduce.prune(model, calib, sparsity=0.5, seqlen=1024)
    with pytest.raises(TypeError, match=r"only torch.nn.Linear layers \(and transformers' Conv1D\) can be pruned"):
        ssm_reduce.prune(model, calib, sparsity=0.5, seqlen=64, filter_fn=lambda m, n: n.endswith("norm") or n.endswith("proj"))
    with pytest.raises(TypeError, match="filter_fn must be callable"):
        ssm_reduce.prune(model, calib, sparsity=0.5, seqlen=64, filter_fn="in_proj")
    with pytest.raises(ValueError, match="need a tokenizer"):
        ssm_reduce.prune(model, ["some text"], sparsity=0.5, seqlen=64)
    with pytest.raises(ValueError, match="needs in_features divisible by 3; mixer.in_proj has 32"):
        ssm_reduce.prune(model, calib, pattern="1:3", seqlen=64, filter_fn=lambda m, n: n.endswith("in_proj"))
    with pytest.raises(ValueError, match="no Linear layer has in_features divisible by 5"):
        ssm_reduce.prune(model, calib, pattern="1:5", seqlen=64)
    for kwargs, match in [(dict(batch_size=0), "batch_size must be an integer >= 1"),
                          (dict(batch_size=-1), "batch_size must be an integer >= 1"),
                          (dict(device="nowhere"), "device='nowhere' is not a device")]:
        with pytest.raises(ValueError, match=match):
            ssm_reduce.prune(model, calib, sparsity=0.5, seqlen=64, **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            ssm_reduce.prune(model, calib, sparsity=0.5, seqlen=64, device="cuda")
    vocab = model.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match=rf"token ids outside the model's vocabulary \[0, {vocab}\): min \d+, max {vocab}"):
        ssm_reduce.prune(model, torch.cat([torch.tensor([vocab]), calib]), sparsity=0.5, seqlen=64)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_model_level_error_midway_says_so_and_restores_the_mode(monkeypatch):
    """An error in the middle of the run (here: a non-finite Hessian from the second layer on) names the
    layer, says how many layers were already pruned, and leaves the model in the mode it was in."""
    from ssm_reduce.prune import driver

    model = FAMILIES["mamba2"](layers=2).train()
    real, calls = driver.prune_linear, []

    def failing(weight, hessian, **kwargs):
        calls.append(1)
        return real(weight, hessian if len(calls) == 1 else hessian * float("nan"), **kwargs)

    monkeypatch.setattr(driver, "prune_linear", failing)
    with pytest.raises(ValueError, match=r"backbone.layers.0.mixer.out_proj: hessian has non-finite entries") as info:
        ssm_reduce.prune(model, random_tokens(1, 600)[0], sparsity=0.5, seqlen=64, nsamples=2, progress=False)
    assert "stopped after pruning 1 Linear layers in place" in "".join(info.value.__notes__)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_prune_model_passes_its_settings_to_every_layer(monkeypatch):
    """``prune(..., settings=...)`` reaches every prune_linear call (with ``swap_trial_rows=0`` no layer
    runs a swap trial, so none reports skipped swaps)."""
    from ssm_reduce.prune import MRPSettings, driver

    real, seen = driver.prune_linear, []

    def record(weight, hessian, **kwargs):
        seen.append(kwargs["settings"])
        return real(weight, hessian, **kwargs)

    monkeypatch.setattr(driver, "prune_linear", record)
    settings = MRPSettings(swap_trial_rows=0)
    report = ssm_reduce.prune(FAMILIES["mamba2"](layers=2), random_tokens(1, 600)[0], pattern="2:4", seqlen=64,
                              nsamples=2, progress=False, settings=settings)
    assert len(seen) == len(report.layers) == 4 and all(s is settings for s in seen)
    assert not any(layer.swaps_skipped for layer in report.layers)


def test_report_says_which_layers_skipped_their_swaps(monkeypatch):
    """The per-layer report carries mrp's swap-trial outcome (field, note, JSON) as prune_linear gave it."""
    from ssm_reduce.prune import driver

    real, count = driver.prune_linear, []

    def second_skips(weight, hessian, **kwargs):
        new, mask, stats = real(weight, hessian, **kwargs)
        count.append(1)
        if len(count) == 2:
            stats.swaps_skipped = True
            stats.notes.append("swap rounds skipped: test")
        return new, mask, stats

    monkeypatch.setattr(driver, "prune_linear", second_skips)
    report = ssm_reduce.prune(FAMILIES["mamba2"](layers=2), random_tokens(1, 600)[0], sparsity=0.5, seqlen=64,
                              nsamples=2, progress=False)
    assert [layer.swaps_skipped for layer in report.layers] == [False, True, False, False]
    assert "swap rounds skipped: test" in str(report)
    assert [layer["swaps_skipped"] for layer in json.loads(report.to_json())["layers"]] == [False, True, False, False]


def test_short_calibration_stream_gives_its_windows_once():
    from ssm_reduce.prune.driver import calibration_tokens

    stream = torch.arange(1000)
    windows = calibration_tokens(stream, None, nsamples=128, seqlen=300, seed=0)
    assert torch.equal(windows, stream[:900].view(3, 300))
    long = calibration_tokens(torch.arange(100000), None, nsamples=8, seqlen=300, seed=0)
    assert long.shape == (8, 300) and all(bool((row[1:] - row[:-1] == 1).all()) for row in long)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=256)).eval()


@pytest.mark.parametrize("name", ["mamba2", "mamba", "llama", "gpt2"])
@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(pattern="2:4")], ids=["50%", "2:4"])
def test_model_level(name, target):
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2}.get(name, lambda: FAMILIES[name](layers=3))()
    calib = random_tokens(1, 3000, seed=4)[0]
    lm_head = model.lm_head.weight.clone()
    embed = model.get_input_embeddings().weight.clone()
    report = ssm_reduce.prune(model, calib, method="mrp", nsamples=6, seqlen=96, progress=False, **target)
    expected = {"mamba2": {"in_proj", "out_proj"}, "mamba": {"in_proj", "x_proj", "dt_proj", "out_proj"},
                "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
                "gpt2": {"c_attn", "c_proj", "c_fc"}}[name]  # GPT-2's transformers Conv1D layers
    if name == "mamba" and "pattern" in target:  # the tiny model's dt_proj has 2 inputs: no 2:4 fits
        expected = expected - {"dt_proj"}
        assert len(report.skipped) == 3 and "dt_proj" in report.skipped[0]
    assert {l.name.rsplit(".", 1)[1] for l in report.layers} == expected
    assert report.sparsity == pytest.approx(0.5, abs=0.02)
    named = dict(model.named_modules())
    for layer in report.layers:
        weight = named[layer.name].weight
        if name == "gpt2":  # Conv1D stores (in, out): rows and N:M groups run along its first dimension
            weight = weight.T
        assert tuple(weight.shape) == layer.shape
        assert float((weight == 0).float().mean()) >= layer.sparsity - 1e-6
        assert layer.sparsity == pytest.approx(0.5, abs=0.05)
        if "pattern" in target:
            assert bool(((weight == 0).view(weight.shape[0], -1, 4).sum(-1) >= 2).all())
        else:
            assert bool(((weight == 0).sum(1) >= weight.shape[1] // 2).all())
    assert torch.equal(model.lm_head.weight, lm_head) and torch.equal(model.get_input_embeddings().weight, embed)
    with torch.no_grad():
        assert torch.isfinite(model(random_tokens(2, 40)).logits).all()
    text = str(report)
    assert "overall sparsity" in text and report.layers[0].name in text
    assert '"method": "mrp"' in report.to_json()


def test_save_and_reload_keep_zeros(tmp_path):
    model = FAMILIES["mamba2"](layers=2)
    ssm_reduce.prune(model, random_tokens(1, 2000)[0], pattern="2:4", method="sparsegpt", nsamples=4, seqlen=64,
                     progress=False)
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    w = reloaded.backbone.layers[0].mixer.in_proj.weight
    assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())


def test_prune_composes_with_token_reduction():
    calib = random_tokens(1, 2000)[0]
    ids = random_tokens(2, 48)
    first = FAMILIES["mamba2"]()
    ssm_reduce.prune(first, calib, sparsity=0.5, method="wanda", nsamples=4, seqlen=64, progress=False)
    ssm_reduce.apply(first, method="utr", keep_ratio=0.7)
    second = FAMILIES["mamba2"]()
    ssm_reduce.apply(second, method="utr", keep_ratio=0.7)  # patched first, pruned second
    ssm_reduce.prune(second, calib, sparsity=0.5, method="wanda", nsamples=4, seqlen=64, progress=False)
    assert ssm_reduce.is_patched(second)
    with torch.no_grad():
        a, b = first(ids), second(ids)
    assert a.logits.shape[1] < 48
    assert torch.equal(a.kept_positions, b.kept_positions)
    torch.testing.assert_close(a.logits, b.logits)


def test_texts_with_tokenizer():
    from ssm_reduce.embedded import byte_tokenizer

    model = FAMILIES["mamba2"](layers=2, vocab_size=257, pad_token_id=256, bos_token_id=256, eos_token_id=256)
    report = ssm_reduce.prune(model, ["def f(x):\n    return x\n" * 40, "class A:\n    pass\n" * 40],
                              tokenizer=byte_tokenizer(), sparsity=0.5, method="magnitude", nsamples=4, seqlen=128,
                              progress=False)
    assert report.calibration == {"samples": 4, "seqlen": 128, "tokens": 512}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparse weights need a CUDA GPU")
def test_semi_structured_conversion_on_gpu():
    model = FAMILIES["mamba2"](layers=2, hidden_size=128, head_dim=32, num_heads=8).half().cuda()
    ssm_reduce.prune(model, random_tokens(1, 2000)[0], pattern="2:4", method="sparsegpt", nsamples=4, seqlen=64,
                     progress=False)
    ids = random_tokens(2, 64).cuda()
    with torch.no_grad():
        dense = model(ids).logits
    result = ssm_reduce.prune.to_semi_structured(model)
    # out_proj (128 x 256) converts; in_proj (536 x 128: 536 is not a multiple of 16) stays dense, with why
    assert result.converted == [f"backbone.layers.{i}.mixer.out_proj" for i in range(2)], result
    assert sorted(result.skipped) == [f"backbone.layers.{i}.mixer.in_proj" for i in range(2)], result
    assert all("multiples of" in why for why in result.skipped.values())
    assert type(model.backbone.layers[0].mixer.out_proj.weight.data).__name__.startswith("SparseSemiStructuredTensor")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, atol=2e-2, rtol=2e-2)


def test_semi_structured_conversion_refuses_before_any_change():
    """On a CPU (or in float32) the conversion raises, naming the layer, and no layer is converted;
    a model with no 2:4 layer is left alone."""
    model = FAMILIES["mamba2"](layers=2)
    assert not ssm_reduce.prune.to_semi_structured(model)  # dense weights: nothing to convert, no error
    ssm_reduce.prune(model, random_tokens(1, 2000)[0], pattern="2:4", method="magnitude", nsamples=2, seqlen=32,
                     progress=False)
    before = {name: p for name, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="no layer was converted"):
        ssm_reduce.prune.to_semi_structured(model)
    assert {name: p for name, p in model.named_parameters()} == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
@pytest.mark.parametrize("method", ["sparsegpt", "mrp"])
def test_model_level_on_cuda(method):
    model = FAMILIES["mamba2"](layers=2).cuda()
    report = ssm_reduce.prune(model, random_tokens(1, 3000, seed=4)[0], sparsity=0.5, method=method,
                              nsamples=4, seqlen=128, progress=False)
    assert report.sparsity == pytest.approx(0.5)
    assert all(layer.sparsity == pytest.approx(0.5) for layer in report.layers)
    for layer in report.layers:
        weight = model.get_submodule(layer.name).weight
        assert weight.is_cuda and float((weight == 0).float().mean()) >= 0.5
    with torch.no_grad():
        logits = model(random_tokens(2, 64).cuda()).logits
    assert torch.isfinite(logits).all()


def test_hessian_in_float32_products_matches_float64(monkeypatch):
    """Where the Hessian's products run in float32 (GPUs), each batch's Gram matrix is summed in float64:
    the result is the float64 Hessian up to float32 rounding, and the user's float32 matmul precision
    setting is left as it was."""
    from ssm_reduce.prune import driver

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 300, 48, generator=gen) * torch.linspace(0.1, 5.0, 48) for _ in range(3)]
    reference = driver._HessianHook(48, "cpu")
    for x in batches:
        reference.add(x)
    x_all = torch.cat([x.reshape(-1, 48) for x in batches]).double()
    direct = 2 * x_all.T @ x_all / x_all.shape[0]
    scale = torch.diag(direct).sqrt()

    def relative(a):  # entrywise difference from ``direct``, relative to sqrt(H_ii H_jj)
        return float(((a - direct) / (scale[:, None] * scale[None, :])).abs().max())

    assert relative(reference.h) < 1e-13
    monkeypatch.setattr(driver, "GRAM_FLOAT32_DEVICES", ("cpu",))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        fast = driver._HessianHook(48, "cpu")
        for x in batches:
            fast.add(x)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert fast.h.dtype == torch.float64 and fast.n == reference.n == 3600
    assert relative(fast.h) < 1e-5
    assert not torch.equal(fast.h, reference.h)  # the float32 path was taken


# ---------------------------------------------------------------------------------------------------
# the driver replays every block as the model itself calls it


def _hessians_from_driver(model, calib, monkeypatch, **kwargs):
    """{name: H} as ``prune`` accumulates them, with a prune_linear that changes nothing."""
    from ssm_reduce.prune import driver

    seen, real = [], driver.prune_linear

    def record(weight, hessian, **options):
        seen.append(hessian.clone())
        return weight.clone(), torch.zeros(weight.shape, dtype=torch.bool), real(
            weight, hessian, sparsity=0.0, method="magnitude")[2]

    monkeypatch.setattr(driver, "prune_linear", record)
    report = ssm_reduce.prune(model, calib, sparsity=0.5, method="magnitude", progress=False, **kwargs)
    return dict(zip([layer.name for layer in report.layers], seen))


def _hessians_from_a_forward(model, tokens, names, batch_size):
    """{name: H} from plain forwards of the whole model with hooks on the Linears: the reference."""
    from ssm_reduce.prune.driver import _HessianHook

    hooks, handles = {}, []
    for name in names:
        linear = model.get_submodule(name)
        hooks[name] = _HessianHook(linear.in_features, "cpu")
        handles.append(linear.register_forward_hook(lambda m, a, o, h=hooks[name]: h.add(a[0])))
    with torch.no_grad():
        for batch in tokens.split(batch_size):
            model(batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: hook.h for name, hook in hooks.items()}


def _per_layer_models():
    """Tiny models whose layers the model calls with different arguments (sliding-window and full
    attention; Mamba-2 and attention layers), or whose layers return a 1-tuple, with a plain LLaMA."""
    import transformers as T

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    yield "llama", T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=3, **small))
    gemma = T.Gemma2Config(num_hidden_layers=4, head_dim=8, sliding_window=8, **small)
    gemma._attn_implementation = "eager"
    yield "gemma2 (sliding and full attention)", T.Gemma2ForCausalLM(gemma)
    bamba = T.BambaConfig(num_hidden_layers=3, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=8,
                          mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16,
                          **small)
    bamba._attn_implementation = "eager"  # its attention layer then needs its own (causal) mask
    yield "bamba (Mamba-2 and attention layers)", T.BambaForCausalLM(bamba)
    falcon = T.FalconH1Config(num_hidden_layers=3, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                              mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=16, **small)
    yield "falcon-h1 (layers return a 1-tuple)", T.FalconH1ForCausalLM(falcon)
    jamba = T.JambaConfig(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                          expert_layer_offset=1, num_experts=2, num_experts_per_tok=1, mamba_d_state=8, mamba_d_conv=4,
                          mamba_expand=2, mamba_dt_rank=4, **small)
    yield "jamba (Mamba and attention layers of two classes)", T.JambaForCausalLM(jamba)


def test_every_block_is_replayed_with_its_own_arguments(monkeypatch):
    """The Hessians ``prune`` accumulates for every Linear equal those of plain forwards of the model:
    each block gets the attention mask the model makes for its own layer type."""
    calib = torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(1))
    checked = 0
    for label, model in _per_layer_models():
        model.eval()
        driven = _hessians_from_driver(model, calib, monkeypatch, nsamples=4, seqlen=64, batch_size=2)
        monkeypatch.undo()
        from ssm_reduce.prune.driver import calibration_tokens

        reference = _hessians_from_a_forward(model, calibration_tokens(calib, None, 4, 64, 0), driven, 2)
        assert len(driven) >= 6, label
        for name, h in driven.items():
            if name.endswith("mamba.dt_proj"):  # applied by its weight: its inputs come from x_proj's outputs
                continue
            assert torch.allclose(h, reference[name], rtol=0, atol=1e-9 * float(reference[name].abs().max())), \
                f"{label}: {name}"
            checked += 1
    assert checked > 40


def test_blocks_returning_hidden_and_residual_get_both(monkeypatch):
    """Blocks that return ``(hidden, residual)`` and take both (mamba_ssm's layout, here the stand-in
    model of test_patch_mamba_ssm built from transformers' Mamba-2 mixer): every block after the first
    is replayed with the residual stream of the block before, as in a forward of the model."""
    from .conftest import tiny_mamba2
    from .test_patch_mamba_ssm import stand_in_classes

    model = stand_in_classes()(tiny_mamba2(layers=3)).eval()
    calib = torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(1))
    driven = _hessians_from_driver(model, calib, monkeypatch, nsamples=4, seqlen=64, batch_size=2)
    monkeypatch.undo()
    from ssm_reduce.prune.driver import calibration_tokens

    reference = _hessians_from_a_forward(model, calibration_tokens(calib, None, 4, 64, 0), driven, 2)
    assert len(driven) == 6
    for name, h in driven.items():
        torch.testing.assert_close(h, reference[name], rtol=0, atol=1e-9 * float(reference[name].abs().max()))


def test_a_model_of_one_block(monkeypatch):
    """One block: its inputs from every calibration batch (batches of 2 windows), as a forward gives."""
    from ssm_reduce.prune.driver import calibration_tokens

    model = FAMILIES["mamba2"](layers=1).eval()
    calib = torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(1))
    driven = _hessians_from_driver(model, calib, monkeypatch, nsamples=5, seqlen=64, batch_size=2)
    monkeypatch.undo()
    reference = _hessians_from_a_forward(model, calibration_tokens(calib, None, 5, 64, 0), driven, 2)
    assert sorted(driven) == ["backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.out_proj"]
    for name, h in driven.items():
        torch.testing.assert_close(h, reference[name], rtol=0, atol=1e-9 * float(reference[name].abs().max()))


def test_a_filter_that_skips_the_first_blocks():
    model = FAMILIES["mamba2"]()
    report = ssm_reduce.prune(model, random_tokens(4, 32), sparsity=0.5, method="sparsegpt", progress=True,
                              filter_fn=lambda module, name: isinstance(module, torch.nn.Linear)
                              and module is model.backbone.layers[3].mixer.in_proj)
    assert [layer.name for layer in report.layers] == ["backbone.layers.3.mixer.in_proj"]
    assert float((model.backbone.layers[3].mixer.in_proj.weight == 0).float().mean()) == 0.5


def test_a_target_that_gets_no_inputs_is_skipped_and_reported():
    """A selected Linear its block never calls (an expert no calibration token reached, say) is left as
    it is and listed in ``skipped``; the others are pruned."""
    model = FAMILIES["mamba2"]()
    for block in model.backbone.layers:
        block.unused = torch.nn.Linear(8, 8)
    before = model.backbone.layers[0].unused.weight.clone()
    report = ssm_reduce.prune(model, random_tokens(4, 32), sparsity=0.5, method="wanda", progress=False,
                              filter_fn=lambda module, name: name in ("unused", "mixer.in_proj"))
    assert len(report.layers) == len(model.backbone.layers)
    assert all(name.endswith("mixer.in_proj") for name in (layer.name for layer in report.layers))
    assert len(report.skipped) == len(model.backbone.layers) and "no calibration inputs" in report.skipped[0]
    assert torch.equal(model.backbone.layers[0].unused.weight, before)


def test_prune_restores_every_module_mode():
    model = FAMILIES["mamba"]()
    model.eval()
    model.backbone.layers[1].train()  # a mix of modes, restored as it was
    modes = {name: module.training for name, module in model.named_modules()}
    ssm_reduce.prune(model, random_tokens(4, 32), sparsity=0.5, method="magnitude", progress=False)
    assert {name: module.training for name, module in model.named_modules()} == modes


def test_prune_refuses_meta_and_mamba_ssm_models_before_any_change():
    model = FAMILIES["mamba2"]()
    reference = state_dict_copy(model)
    with pytest.raises(ValueError, match="device='meta' holds no data"):
        ssm_reduce.prune(model, random_tokens(4, 32), sparsity=0.5, device="meta", progress=False)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    host = type("MambaLMHeadModel", (torch.nn.Module,), {"__module__": "mamba_ssm.models.mixer_seq_simple"})
    fake = host()
    fake.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
    with pytest.raises(TypeError, match="ssm_reduce.load_model"):
        ssm_reduce.prune(fake, random_tokens(4, 32), sparsity=0.5, progress=False)


def test_windows_longer_than_learned_positions_are_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
    reference = state_dict_copy(model)
    with pytest.raises(ValueError, match="at most 32 positions: lower seqlen"):
        ssm_reduce.prune(model, random_tokens(2, 64), sparsity=0.5, method="magnitude", progress=False)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
