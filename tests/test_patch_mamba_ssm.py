"""The mamba_ssm adapter.

mamba_ssm imports only on CUDA machines (its kernels are compiled there). On CPU the adapter's
plumbing is exercised on a stand-in with mamba_ssm's class names, block structure (add -> norm ->
mixer, returning (mixer_out, residual)) and forward signatures, whose mixers are transformers' torch
Mamba-2 mixers; the real package is tested in the GPU suite below.
"""

import importlib.util
from collections import namedtuple

import pytest
import torch
from torch import nn

import ssm_reduce
from ssm_reduce.patch.base import runtime_of

from .conftest import random_tokens, tiny_mamba2

LMOutput = namedtuple("LMOutput", ["logits"])


def stand_in_classes():
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    class Mamba2(Mamba2Mixer):
        def __init__(self, config, layer_idx):
            super().__init__(config, layer_idx)
            self.use_mem_eff_path = True
            self.d_conv = config.conv_kernel
            self.fast_path_calls = 0

        def forward(self, u, inference_params=None, **kwargs):
            if self.use_mem_eff_path and inference_params is None:
                self.fast_path_calls += 1  # the fused kernel would hide y here
            return super().forward(u)

    class Block(nn.Module):
        def __init__(self, config, layer_idx, norm):
            super().__init__()
            self.norm, self.mixer, self.layer_idx, self.residual_in_fp32 = norm, Mamba2(config, layer_idx), layer_idx, True

        def forward(self, hidden_states, residual=None, inference_params=None, **mixer_kwargs):
            residual = (hidden_states + residual) if residual is not None else hidden_states
            hidden_states = self.norm(residual.to(dtype=self.norm.weight.dtype))
            residual = residual.to(torch.float32)
            return self.mixer(hidden_states, inference_params=inference_params, **mixer_kwargs), residual

    class MixerModel(nn.Module):
        def __init__(self, hf_backbone, config):
            super().__init__()
            self.embedding = hf_backbone.embeddings
            self.layers = nn.ModuleList()
            for i, hf_block in enumerate(hf_backbone.layers):
                block = Block(config, i, hf_block.norm)
                block.mixer.load_state_dict(hf_block.mixer.state_dict())
                self.layers.append(block)
            self.norm_f = hf_backbone.norm_f

        def forward(self, input_ids, inference_params=None, **mixer_kwargs):
            hidden_states, residual = self.embedding(input_ids), None
            for layer in self.layers:
                hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params)
            residual = (hidden_states + residual) if residual is not None else hidden_states
            return self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))

    class MambaLMHeadModel(nn.Module):
        def __init__(self, hf_model):
            super().__init__()
            self.backbone = MixerModel(hf_model.backbone, hf_model.config)
            self.lm_head = hf_model.lm_head

        def forward(self, input_ids, position_ids=None, inference_params=None, num_last_tokens=0, **mixer_kwargs):
            hidden_states = self.backbone(input_ids, inference_params=inference_params, **mixer_kwargs)
            if num_last_tokens > 0:
                hidden_states = hidden_states[:, -num_last_tokens:]
            return LMOutput(logits=self.lm_head(hidden_states))

    return MambaLMHeadModel


@pytest.fixture
def pair():
    hf = tiny_mamba2(layers=6)
    return hf, stand_in_classes()(hf).eval()


@torch.no_grad()
def test_same_weights_same_result_as_the_transformers_adapter(pair):
    hf, ssm = pair
    ids = random_tokens(3, 70)
    assert torch.allclose(ssm(ids).logits, hf(ids).logits, atol=1e-5)  # the stand-in is faithful
    for method in ("utr", "evit", "tome", "tor-official"):
        ssm_reduce.apply(hf, method=method, keep_ratio=0.7)
        ssm_reduce.apply(ssm, method=method, keep_ratio=0.7)
        a, b = hf(ids), ssm(ids)
        assert torch.equal(a.kept_positions, b.kept_positions), method
        torch.testing.assert_close(b.logits, a.logits, atol=2e-5, rtol=1e-4)
        assert ssm_reduce.stats(ssm)["tokens_per_layer"] == ssm_reduce.stats(hf)["tokens_per_layer"]


@torch.no_grad()
def test_no_reduction_and_remove_are_exact(pair):
    _, ssm = pair
    ids = random_tokens(2, 50)
    ref = ssm(ids).logits
    ssm_reduce.apply(ssm)
    assert torch.equal(ssm(ids).logits, ref)
    ssm_reduce.apply(ssm, method="utr", keep_ratio=0.6)
    out = ssm(ids, num_last_tokens=2)
    assert out.logits.shape[1] == 2 and out.kept_positions.tolist() == [[48, 49], [48, 49]]
    ssm_reduce.remove(ssm)
    assert type(ssm).__name__ == "MambaLMHeadModel" and not ssm_reduce.is_patched(ssm)
    assert torch.equal(ssm(ids).logits, ref)


@torch.no_grad()
def test_anchor_mixers_leave_the_fused_path_only_while_reducing(pair):
    _, ssm = pair
    ssm_reduce.apply(ssm, method="utr", keep_ratio=0.7, layers=[2, 4])
    ssm(random_tokens(1, 40))
    calls = [block.mixer.fast_path_calls for block in ssm.backbone.layers]
    assert calls[2] == calls[4] == 0 and all(c == 1 for i, c in enumerate(calls) if i not in (2, 4))
    assert all(block.mixer.use_mem_eff_path for block in ssm.backbone.layers)  # flags restored


@torch.no_grad()
def test_decode_steps_never_reduce(pair):
    _, ssm = pair
    ssm_reduce.apply(ssm, method="utr", keep_ratio=0.6)
    params = type("InferenceParams", (), {"seqlen_offset": 12})()
    ids = random_tokens(1, 20)
    ssm(ids)
    before = ssm_reduce.stats(ssm)
    out = ssm(ids, inference_params=params)
    assert out.kept_positions.shape == (1, 20)
    assert ssm_reduce.stats(ssm) == before
    assert runtime_of(ssm).session is None


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None or not torch.cuda.is_available(),
                    reason="mamba_ssm needs a CUDA machine (pip install 'ssm_reduce[mamba]' there)")
@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
@torch.no_grad()
def test_real_mamba_ssm_against_transformers(layer, tmp_path):
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    from .test_loading import mamba_ssm_checkpoint

    mamba_ssm_checkpoint(tmp_path, layer)
    hf = ssm_reduce.load_model(tmp_path).cuda()
    real = ssm_reduce.load_model(tmp_path, host="mamba_ssm").cuda()
    assert isinstance(real, MambaLMHeadModel)
    ids = random_tokens(2, 96).cuda()
    torch.testing.assert_close(real(ids).logits.float(), hf(ids).logits.float(), atol=1e-3, rtol=1e-3)
    for model in (hf, real):
        ssm_reduce.apply(model, method="utr", keep_ratio=0.7)
    a, b = hf(ids), real(ids)
    assert torch.equal(a.kept_positions, b.kept_positions)
    torch.testing.assert_close(b.logits.float(), a.logits.float(), atol=1e-3, rtol=1e-3)
    out = real.generate(ids, max_length=ids.shape[1] + 8, cg=False, return_dict_in_generate=True)
    assert out.sequences.shape[1] == ids.shape[1] + 8
