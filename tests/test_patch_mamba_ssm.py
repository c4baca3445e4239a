"""The mamba_ssm adapter.

mamba_ssm imports only on CUDA machines (its kernels are compiled there). On CPU the adapter's
plumbing is exercised on a stand-in with mamba_ssm's class names, block structure (add -> norm ->
mixer, returning (mixer_out, residual)) and forward signatures, whose mixers are transformers' torch
Mamba-2 mixers. The real package runs in two further tests: on CPU with its kernels swapped for its
own torch references when its sources are provided (``tests/mamba_ssm_cpu.py``), and as installed on
a CUDA machine.
"""

import importlib.util
import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from torch import nn

import ssm_reduce
from ssm_reduce.ops.route import Scan
from ssm_reduce.patch.base import runtime_of
from ssm_reduce.testing import force_scan

from . import mamba_ssm_cpu
from .conftest import assert_captured_pre_gate_y, ops_anchor_setup, random_tokens, tiny_mamba, tiny_mamba2

LMOutput = namedtuple("LMOutput", ["logits"])


def stand_in_classes():
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    class Mamba2(Mamba2Mixer):
        def __init__(self, config, layer_idx):
            super().__init__(config, layer_idx)
            self.use_mem_eff_path = True
            self.d_conv = config.conv_kernel
            self.d_state = config.state_size
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
def test_num_last_tokens_slices_kept_positions_as_the_host_slices_logits(pair):
    """mamba_ssm slices only when ``num_last_tokens`` is positive (a 0-d tensor counts)."""
    _, ssm = pair
    ids = random_tokens(2, 40)
    ssm_reduce.apply(ssm, method="utr", keep_ratio=0.6)
    full = ssm(ids)
    for last in (0, -2, torch.tensor(1), 3):
        out = ssm(ids, num_last_tokens=last)
        k = int(last)
        assert out.kept_positions.shape[1] == out.logits.shape[1] == (full.logits.shape[1] if k <= 0 else k)
        assert torch.equal(out.kept_positions, full.kept_positions[:, -out.logits.shape[1]:])


@torch.no_grad()
def test_rows_that_would_keep_different_lengths_are_refused(pair):
    """mamba_ssm mixers take no padding mask: protection masks that leave the rows with different numbers
    of tokens are a clear error (the padding would run through every later mixer into the real tokens);
    the same protection size in every row works, and the model keeps working after the error."""
    hf, ssm = pair
    ids = random_tokens(2, 50)
    for model in (hf, ssm):
        ssm_reduce.apply(model, method="utr", keep_ratio=0.6, layers=[1, 2])
    uneven = torch.zeros(2, 50, dtype=torch.bool)
    uneven[1, 20:45] = True
    with ssm_reduce.protect(ssm, uneven), pytest.raises(ValueError, match="rows kept different numbers of tokens"):
        ssm(ids)
    assert ssm_reduce.stats(ssm)["kept_per_row"] == []  # no forward was recorded
    even = uneven.clone()
    even[0, 5:30] = True
    with ssm_reduce.protect(ssm, even), ssm_reduce.protect(hf, even):
        a, b = hf(ids), ssm(ids)
    assert torch.equal(a.kept_positions, b.kept_positions) and bool((b.kept_positions >= 0).all())
    torch.testing.assert_close(b.logits, a.logits, atol=2e-5, rtol=1e-4)
    with ssm_reduce.protect(hf, uneven):  # the transformers model takes a padding mask: it reduces such rows
        assert hf(ids).kept_positions.shape[0] == 2


@torch.no_grad()
def test_packed_sequences_are_refused_while_reducing(pair):
    _, ssm = pair
    ids = random_tokens(1, 40)
    seq_idx = torch.cat([torch.zeros(1, 20), torch.ones(1, 20)], 1).int()
    ssm_reduce.apply(ssm, method="utr", keep_ratio=0.6)
    with pytest.raises(ValueError, match="seq_idx: packed variable-length sequences are not supported"):
        ssm(ids, seq_idx=seq_idx)
    ssm_reduce.apply(ssm)  # no reduction: passed on as they are
    assert ssm(ids, seq_idx=seq_idx).logits.shape[1] == 40


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
    assert runtime_of(ssm).session() is None


def test_unsupported_mixers_are_refused_before_any_change(pair):
    _, ssm = pair

    class Mamba3(nn.Module):  # a mamba_ssm mixer the adapter does not know, by class name
        pass

    class MHA(nn.Module):  # mamba_ssm's attention mixer with rotary embeddings
        rotary_emb_dim = 16

    original = ssm.backbone.layers[3].mixer
    for mixer, message in ((Mamba3(), "layer 3 is a mamba_ssm Mamba3 layer"), (MHA(), "layer 3 is a mamba_ssm MHA "
                                                                                       "layer with rotary")):
        ssm.backbone.layers[3].mixer = mixer
        with pytest.raises(ValueError, match=message):
            ssm_reduce.apply(ssm, method="utr", keep_ratio=0.7)
        assert not ssm_reduce.is_patched(ssm) and type(ssm).__name__ == "MambaLMHeadModel"
    ssm.backbone.layers[3].mixer = original


def _as_mamba_ssm_mixer(mixer):
    """Give a transformers mixer the attribute names mamba_ssm's Mamba / Mamba2 use (same layouts)."""
    names = {"d_conv": "conv_kernel_size", "d_state": "ssm_state_size"}
    if hasattr(mixer, "num_heads"):
        names.update(nheads="num_heads", headdim="head_dim", d_ssm="intermediate_size", ngroups="n_groups",
                     dt_limit="time_step_limit")
        mixer.rmsnorm = True
    else:
        names.update(dt_rank="time_step_rank")
    for ours, theirs in names.items():
        setattr(mixer, ours, getattr(mixer, theirs))
    return mixer


@pytest.mark.parametrize("family_name", ["mamba2", "mamba"])
@torch.no_grad()
def test_ops_anchor_mixers_compute_the_host_mixer(family_name):
    """The anchor mixers that scan through ssm_reduce.ops (CUDA anchors with the kernels; anchors whose
    host has no scan to call without its gate) compute the mixer's output and capture y before the
    gate with its scores."""
    from ssm_reduce.patch.mamba_ssm import _ops_mamba1, _ops_mamba2

    model = (tiny_mamba2 if family_name == "mamba2" else tiny_mamba)()
    mixer = _as_mamba_ssm_mixer(model.backbone.layers[1].mixer)
    x, session = ops_anchor_setup()
    fn = _ops_mamba2 if family_name == "mamba2" else _ops_mamba1
    torch.testing.assert_close(fn(mixer, session, x, None, Scan.REFERENCE), mixer(x), atol=1e-5, rtol=1e-5)
    y = assert_captured_pre_gate_y(session, mixer, x, family_name == "mamba2")
    assert y.shape == (2, 37, 64)


@torch.no_grad()
def test_ops_path_anchors_match_the_host_path_and_keep_instance_forwards(pair):
    """Anchors forced through ssm_reduce.ops (CUDA's route) pick the same tokens as the host path, and
    an instance-level ``forward`` on the mixer (as accelerate installs) is still there afterwards."""
    _, ssm = pair
    for block in ssm.backbone.layers:
        _as_mamba_ssm_mixer(block.mixer)
    ids = random_tokens(2, 60)
    ssm_reduce.apply(ssm, method="utr", keep_ratio=0.7, layers=[2, 4])
    host = ssm(ids)
    mixer = ssm.backbone.layers[2].mixer
    bound, seen = mixer.forward, []

    def wrapper(*args, **kwargs):
        seen.append(1)
        return bound(*args, **kwargs)

    mixer.forward = wrapper
    with force_scan(ssm, True):
        forced = ssm(ids)
    assert torch.equal(forced.kept_positions, host.kept_positions)
    torch.testing.assert_close(forced.logits, host.logits, atol=1e-5, rtol=1e-5)
    assert mixer.__dict__["forward"] is wrapper and not seen  # bypassed at the anchor, and still there
    ssm_reduce.remove(ssm)
    ssm(ids)
    assert seen


@pytest.mark.skipif(not os.environ.get(mamba_ssm_cpu.ENV),
                    reason=f"set {mamba_ssm_cpu.ENV} to an unpacked mamba-ssm sdist (and a triton install) to run "
                           "the real mamba_ssm classes on CPU with their reference kernels (eval/gpu_setup.md)")
def test_real_mamba_ssm_classes_on_cpu_with_reference_kernels(tmp_path):
    """The real mamba_ssm package (its kernels swapped for its own torch references, in a separate
    interpreter) against the transformers adapter: dense and reduced logits, kept positions, the
    fused / unfused / ops path of every layer, num_last_tokens, protect, greedy generate, remove, the
    loader; and a norm-less, per-channel-D, two-group Mamba-2 through both anchor scans."""
    _run_mamba_ssm_cpu(tmp_path, {})


@pytest.mark.skipif(not os.environ.get(mamba_ssm_cpu.ENV) or importlib.util.find_spec("triton") is None,
                    reason=f"set {mamba_ssm_cpu.ENV} (see above) and install triton to run the real mamba_ssm classes "
                           "with the Triton Mamba-2 scan at their anchors, through Triton's interpreter")
def test_real_mamba_ssm_classes_on_cpu_with_the_triton_scan(tmp_path):
    """As above, with SSM_REDUCE_SCAN_BACKEND=triton: mamba_ssm's Mamba-2 anchors scan through the Triton
    kernels (interpreted on the CPU) and still match the transformers adapter."""
    _run_mamba_ssm_cpu(tmp_path, {"SSM_REDUCE_SCAN_BACKEND": "triton", "TRITON_INTERPRET": "1"})


def _run_mamba_ssm_cpu(tmp_path, env):
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "tests.mamba_ssm_cpu", str(tmp_path)], cwd=root,
                          capture_output=True, text=True, timeout=900, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["layer"] for r in results][:2] == ["Mamba1", "Mamba2"] and len(results) == 4
    assert results[3]["decode_max_abs_diff"] < 1e-4  # the attention hybrid (check_attention)
    assert all(r["reduced_tokens"][1] < r["reduced_tokens"][0] for r in results)


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
    # generate, with and without CUDA graphs: prefill reduced, decode untouched, the same greedy tokens
    # as the transformers adapter (its decode reads the cache the reduced prefill wrote)
    ref = hf.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    outs = {}
    for cg in (False, True):
        outs[cg] = real.generate(ids, max_length=ids.shape[1] + 8, cg=cg, return_dict_in_generate=True,
                                 output_scores=True)
        assert ssm_reduce.stats(real)["kept_per_row"] == [a.logits.shape[1]] * 2, f"cg={cg}: prefill not reduced"
        assert torch.equal(outs[cg].sequences, ref.sequences), f"cg={cg}: greedy tokens differ"
    torch.testing.assert_close(torch.stack(outs[True].scores, 1), torch.stack(outs[False].scores, 1),
                               atol=1e-4, rtol=1e-4)
