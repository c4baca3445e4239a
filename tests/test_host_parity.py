"""A patched model behaves like its host everywhere except where reduction must differ.

Each test pins one place where a patched model used to part from the transformers model it patches.
"""

import io

import numpy as np
import pytest
import torch

import ssm_reduce

from .conftest import FAMILIES, left_padded, random_tokens, tiny_mamba2
from .test_patch_mamba_ssm import stand_in_classes


@torch.no_grad()
def test_models_built_from_a_patched_class_are_the_host_model(family, tmp_path):
    """``type(model)(config)``, ``type(model).from_pretrained`` and ``type(model.backbone)(config)`` give
    unpatched models that compute what the host does; ``apply`` and ``remove`` work on them."""
    model = FAMILIES[family]()
    ids = random_tokens(2, 40)
    dense = model(ids).logits
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    reduced = model(ids)
    twin = type(model)(model.config).eval()
    twin.load_state_dict(model.state_dict())
    assert not ssm_reduce.is_patched(twin) and torch.equal(twin(ids).logits, dense)
    backbone = type(model.backbone)(model.config).eval()
    host_backbone = type(model.backbone).__mro__[2](model.config).eval()  # (patched class, mixin, host class)
    for built in (backbone, host_backbone):
        built.load_state_dict(model.backbone.state_dict())
    assert not ssm_reduce.is_patched(backbone)
    assert torch.equal(backbone(ids).last_hidden_state, host_backbone(ids).last_hidden_state)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(ids).logits, dense)
    ssm_reduce.apply(loaded, method="utr", keep_ratio=0.7)
    out = loaded(ids)
    assert torch.equal(out.logits, reduced.logits) and torch.equal(out.kept_positions, reduced.kept_positions)
    for built in (loaded, twin):
        ssm_reduce.remove(built)
        assert type(built) is type(model).__mro__[2] and torch.equal(built(ids).logits, dense)


def _loss_parts(out, labels, shift_labels=None):
    """Per-column targets of a reduced forward: the label after each kept position (or shift_labels at it)."""
    kept = out.kept_positions
    per_position = shift_labels if shift_labels is not None else torch.nn.functional.pad(labels[:, 1:], (0, 1),
                                                                                         value=-100)
    return torch.where(kept >= 0, per_position.gather(1, kept.clamp(min=0)), -100)


def test_shift_labels_and_the_host_loss_arguments_are_honoured():
    model = tiny_mamba2()
    ids = random_tokens(2, 40)
    shift = torch.roll(ids, 3, dims=1)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    out = model(ids, labels=ids, shift_labels=shift)
    targets = _loss_parts(out, ids, shift)
    logits = out.logits.flatten(0, 1)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, targets.flatten()))
    assert not torch.allclose(out.loss, model(ids, labels=ids).loss)
    summed = model(ids, labels=ids, num_items_in_batch=torch.tensor(7))
    expected = torch.nn.functional.cross_entropy(logits, _loss_parts(out, ids).flatten(), reduction="sum") / 7
    torch.testing.assert_close(summed.loss, expected)


@torch.no_grad()
def test_loss_equals_the_host_when_nothing_is_removed_and_is_never_nan(family):
    model = FAMILIES[family]()
    ids, mask = left_padded(3, 30, [0, 5, 30])  # the last row is padding only
    host = model(ids, attention_mask=mask, labels=ids).loss
    ssm_reduce.apply(model, method="utr", keep_ratio=0.99)
    out = model(ids, attention_mask=mask, labels=ids)
    assert ssm_reduce.stats(model)["kept_per_row"] == ssm_reduce.stats(model)["input_tokens_per_row"]
    assert torch.equal(out.loss, host) and torch.isfinite(out.loss)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.6)
    reduced = model(ids, attention_mask=mask, labels=ids).loss
    assert torch.isfinite(reduced)
    kept = model(ids, attention_mask=mask).kept_positions[0].tolist()
    removed = next(p for p in range(29) if p not in kept)
    labels = torch.full_like(ids, -100)
    labels[0, removed + 1] = ids[0, removed + 1]  # the one target follows a position the reduction removed
    loss = model(ids, attention_mask=mask, labels=labels).loss
    assert torch.isfinite(loss) and float(loss) == 0.0


@torch.no_grad()
def test_logits_to_keep_tensors_as_the_host(family):
    model = FAMILIES[family]()
    ids = random_tokens(2, 40)
    host = {name: model(ids, logits_to_keep=keep).logits for name, keep in
            (("zero_d", torch.tensor(2)), ("mask", torch.arange(40) % 9 == 0), ("rows", torch.rand(2, 40) > 0.8))}
    ssm_reduce.apply(model, method="utr")  # patched, reduction off
    assert torch.equal(model(ids, logits_to_keep=torch.tensor(2)).logits, host["zero_d"])
    ssm_reduce.apply(model, method="utr", keep_ratio=0.99, layers=[2])  # reducing, nothing removed here
    assert torch.equal(model(ids, logits_to_keep=torch.arange(40) % 9 == 0).logits, host["mask"])
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    plain = model(ids)
    marked = torch.zeros(40, dtype=torch.bool)
    marked[[6, 21, 39]] = True
    with ssm_reduce.protect(model, marked.expand(2, -1)):
        full = model(ids)
        out = model(ids, logits_to_keep=marked)
    assert out.kept_positions.tolist() == [[6, 21, 39]] * 2
    columns = [[full.kept_positions[b].tolist().index(p) for p in (6, 21, 39)] for b in range(2)]
    torch.testing.assert_close(out.logits, torch.stack([full.logits[b, columns[b]] for b in range(2)]))
    per_row = torch.zeros(2, 40, dtype=torch.bool)
    per_row[0, 39], per_row[1, [21, 39]] = True, True
    with ssm_reduce.protect(model, per_row):
        flat = model(ids, logits_to_keep=per_row)
    assert flat.logits.shape == (3, 64) and flat.kept_positions.tolist() == [39, 21, 39]
    removed = sorted(set(range(40)) - set(full.kept_positions[0].tolist()))
    unprotected = torch.zeros(40, dtype=torch.bool)
    unprotected[removed[0]] = True
    with pytest.raises(ValueError, match=r"logits_to_keep marks \d+ position\(s\) that token reduction removed"):
        model(ids, logits_to_keep=unprotected)
    with pytest.raises(ValueError, match=r"logits_to_keep: a boolean mask must cover the input's positions"):
        model(ids, logits_to_keep=torch.ones(12, dtype=torch.bool))
    assert torch.equal(model(ids).logits, plain.logits)  # the errors left the model as it was


@torch.no_grad()
def test_mixer_hooks_fire_at_every_layer(family):
    model = FAMILIES[family]()
    calls = []
    for index, block in enumerate(model.backbone.layers):
        block.mixer.register_forward_hook(lambda module, args, out, i=index: calls.append((i, out.shape[1])))
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7, layers=[1, 3])
    model(random_tokens(2, 40))
    assert [i for i, _ in calls] == list(range(len(model.backbone.layers)))
    assert [n for i, n in calls if i <= 1] == [40, 40] and all(n < 40 for i, n in calls if i > 1)


def test_perplexity_validates_the_reduction_before_the_dense_pass(monkeypatch):
    from ssm_reduce import evaluation

    model = tiny_mamba2()
    passes = []
    monkeypatch.setattr(evaluation, "windowed_perplexity", lambda *a, **k: passes.append(1))
    with pytest.raises(ValueError, match="flops_reduction=0.9 cannot be reached"):
        evaluation.compare_perplexity(model, torch.arange(200) % 60, ssm_reduce.ReduceConfig(flops_reduction=0.9),
                                      window=64, scored=8)
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluation.compare_perplexity(model, torch.arange(20), ssm_reduce.ReduceConfig(flops_reduction=0.1),
                                      window=64, scored=8)
    assert not passes and not ssm_reduce.is_patched(model)


def test_numpy_and_torch_integers_are_accepted_where_integers_are_asked():
    config = ssm_reduce.ReduceConfig(protect_last=np.int64(3), layers=np.array([2, 3]), seed=np.int32(1),
                                     keep_ratio=np.float32(0.75), protect_first=torch.tensor(1), causal=np.bool_(True))
    assert config == ssm_reduce.ReduceConfig(protect_last=3, layers=(2, 3), seed=1, keep_ratio=0.75, protect_first=1)
    assert all(type(v) is int for v in (config.protect_last, config.seed, config.protect_first, *config.layers))
    with pytest.raises(ValueError, match=r"protect_last must be an integer >= 0, got 2.5"):
        ssm_reduce.ReduceConfig(protect_last=2.5)
    model = tiny_mamba2()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = random_tokens(4, 16)
    with pytest.raises(ValueError, match=r"nsamples must be an integer >= 1 \(calibration windows\), got 2.5"):
        ssm_reduce.prune(model, calib, sparsity=0.5, method="magnitude", nsamples=2.5)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    report = ssm_reduce.prune(model, calib, sparsity=0.5, method="magnitude", nsamples=np.int64(2),
                              seqlen=np.int32(8), batch_size=np.int16(2), swap_rounds=np.int8(0))
    assert report.layers


def test_pickling_and_gradient_checkpointing_say_what_to_do(tmp_path):
    model = tiny_mamba2()
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    with pytest.raises(TypeError, match=r"cannot be pickled .* save_pretrained|ssm_reduce.remove\(model\) first"):
        torch.save(model, io.BytesIO())
    torch.save(model.state_dict(), tmp_path / "weights.pt")  # the weights save as always
    ssm_reduce.remove(model)
    torch.save(model, io.BytesIO())
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    model.train()
    model.gradient_checkpointing_enable()
    ids = random_tokens(2, 40)
    with pytest.raises(ValueError, match="gradient checkpointing while reducing tokens is not supported"):
        model(ids, labels=ids)
    with torch.no_grad():
        assert model(ids).logits.shape[1] < 40  # inference is unaffected
    model.gradient_checkpointing_disable()
    model(ids, labels=ids).loss.backward()


def test_mamba_ssm_models_built_from_a_patched_class_and_pickling():
    hf = tiny_mamba2(layers=4)
    ssm = stand_in_classes()(hf).eval()
    ids = random_tokens(2, 40)
    with torch.no_grad():
        dense = ssm(ids).logits
        ssm_reduce.apply(ssm, method="utr", keep_ratio=0.7)
        twin = type(ssm)(hf).eval()
        assert not ssm_reduce.is_patched(twin) and torch.equal(twin(ids).logits, dense)
    with pytest.raises(TypeError, match="cannot be pickled"):
        torch.save(ssm, io.BytesIO())
