"""The real ``mamba_ssm`` package on a CPU, its kernels swapped for reference implementations, checked
against the transformers adapter on the same weights.

mamba_ssm only imports on CUDA machines: it imports its compiled selective-scan extension
unconditionally and its Triton kernels need a GPU. But what the mamba_ssm adapter touches is the
package's Python: ``MambaLMHeadModel``, ``MixerModel``, ``Block``, the ``Mamba`` / ``Mamba2`` mixers
with their fast-path flags and ``inference_params`` cache, and the ``generate`` loop. mamba_ssm ships
torch reference versions of its kernels (``selective_scan_ref``, ``mamba_inner_ref``,
``mamba_split_conv1d_scan_ref``, ``rms_norm_ref``, ``layer_norm_ref``) and torch fallbacks for its
decode steps; this module puts those in place of the kernels (plus a depthwise causal conv for
``causal_conv1d_fn`` and a scan-with-final-state for ``mamba_chunk_scan_combined``, both written from
their documented semantics), so the real classes run on CPU with every code path the adapter
selects: the fused fast path at ordinary layers, the unfused path at anchors, prefill into the
generation cache, single-token decode steps.

The swaps are process-wide, so the check runs in its own interpreter::

    python -m tests.mamba_ssm_cpu WORKDIR      # prints one JSON line, exits non-zero on a failure

It needs the mamba_ssm *sources* (an unpacked ``mamba-ssm`` sdist: they are never built here) and an
importable ``triton`` (its modules are imported, never launched); ``SSM_REDUCE_MAMBA_SSM_SOURCE``
lists the directories to put in front of ``sys.path`` (``os.pathsep``-separated), e.g. the sdist
directory and a ``pip install --target`` directory holding triton. ``tests/test_patch_mamba_ssm.py``
runs it when that variable is set; on a CUDA machine the real kernels are tested there directly.
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

ENV = "SSM_REDUCE_MAMBA_SSM_SOURCE"
CALLS: Counter = Counter()  # kernel name -> calls since the last reset


def _causal_conv1d(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                   final_states_out=None, activation=None):
    """causal_conv1d_fn: depthwise causal convolution of x (B, D, L) with weight (D, W), then SiLU."""
    if seq_idx is not None or initial_states is not None or return_final_states:
        raise NotImplementedError("the CPU stand-in covers plain causal convolutions only")
    width = weight.shape[1]
    out = F.conv1d(x, weight[:, None, :], bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation in ("silu", "swish") else out


def _attention_with_kv_cache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, softmax_scale=None,
                             causal=False, **kwargs):
    """flash_attn_with_kvcache for decode steps, from its documented semantics: writes k, v at each row's
    ``cache_seqlens`` (an int here) and attends over the cache up to and including them."""
    start = int(cache_seqlens)
    new = k.shape[1]
    k_cache[:, start:start + new], v_cache[:, start:start + new] = k, v
    keys, values = k_cache[:, :start + new], v_cache[:, :start + new]
    repeat = q.shape[2] // keys.shape[2]
    keys, values = keys.repeat_interleave(repeat, dim=2), values.repeat_interleave(repeat, dim=2)
    mask = None
    if causal and new > 1:
        mask = torch.ones(new, start + new, dtype=torch.bool, device=q.device).tril(start)
    return F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                          attn_mask=mask, scale=softmax_scale).transpose(1, 2)


def install(paths) -> None:
    """Import mamba_ssm from ``paths`` and swap its kernels for references (idempotent)."""
    # transformers resolves mamba_ssm kernels when its modeling modules are imported; import them
    # first so the transformers models keep their torch paths.
    import transformers.models.mamba.modeling_mamba  # noqa: F401
    import transformers.models.mamba2.modeling_mamba2  # noqa: F401

    sys.path[:0] = [p for p in paths if p not in sys.path]
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))  # only its autograd fns use it
    from einops import rearrange, repeat

    import mamba_ssm  # noqa: F401  (imports every module below)
    import mamba_ssm.models.mixer_seq_simple  # noqa: F401
    import mamba_ssm.modules.block  # noqa: F401
    import mamba_ssm.utils.generation as generation
    from mamba_ssm.ops import selective_scan_interface as ssi
    from mamba_ssm.ops.triton import layer_norm as ln
    from mamba_ssm.ops.triton import layernorm_gated as lng
    from mamba_ssm.ops.triton import ssd_combined as ssd

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            CALLS[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    def chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                   cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
                   return_varlen_states=False):
        """mamba_chunk_scan_combined through selective_scan_ref (one scalar decay per head)."""
        if initial_states is not None or seq_idx is not None or cu_seqlens is not None or return_varlen_states:
            raise NotImplementedError("the CPU stand-in covers dense, unpacked sequences only")
        p, n = x.shape[-1], B.shape[-1]
        dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
        dt = (F.softplus(dt) if dt_softplus else dt).clamp(*dt_limit)
        d = None if D is None else (repeat(D, "h -> (h p)", p=p) if D.dim() == 1 else rearrange(D, "h p -> (h p)"))
        out = ssi.selective_scan_ref(
            rearrange(x, "b l h p -> b (h p) l"), repeat(dt, "b l h -> b (h p) l", p=p),
            repeat(A.float(), "h -> (h p) n", p=p, n=n), rearrange(B, "b l g n -> b g n l"),
            rearrange(C, "b l g n -> b g n l"), D=d, z=None if z is None else rearrange(z, "b l h p -> b (h p) l"),
            return_last_state=return_final_states,
        )
        y, last = out if return_final_states else (out, None)
        y = rearrange(y, "b (h p) l -> b l h p", p=p)
        return (y, rearrange(last, "b (h p) n -> b h p n", p=p)) if return_final_states else y

    def split_conv1d_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None,
                          seq_idx=None, dt_limit=(0.0, float("inf")), return_final_states=False, **kwargs):
        """mamba_split_conv1d_scan_combined (the fused Mamba-2 path) through its reference."""
        if initial_states is not None or seq_idx is not None or return_final_states or kwargs.get("ngroups", 1) != 1:
            # (the reference normalises over all heads at once: the real kernel's grouped norm only
            # agrees with it for one group)
            raise NotImplementedError("the CPU stand-in covers dense sequences, one group, no states only")
        return ssd.mamba_split_conv1d_scan_ref(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                               dt_limit=dt_limit, **kwargs)

    def add_norm(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                 rowscale=None, prenorm=False, residual_in_fp32=False, is_rms_norm=False, return_dropout_mask=False):
        """layer_norm_fn / rms_norm_fn: optional residual add (kept in fp32 if asked), then the norm."""
        if x1 is not None or weight1 is not None or dropout_p or rowscale is not None or return_dropout_mask:
            raise NotImplementedError("the CPU stand-in covers the inference-time add + norm only")
        res = x if residual is None else x + residual
        if residual_in_fp32:
            res = res.float()
        out = (ln.rms_norm_ref if is_rms_norm else ln.layer_norm_ref)(res, weight, bias, eps=eps, upcast=True)
        return (out.to(x.dtype), res) if prenorm else out.to(x.dtype)

    def rms_norm(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                 rowscale=None, prenorm=False, residual_in_fp32=False, return_dropout_mask=False):
        return add_norm(x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
                        residual_in_fp32, True, return_dropout_mask)

    def gated_rms_norm(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
        return lng.rms_norm_ref(x, weight, bias, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)

    swaps = {
        "selective_scan_fn": ssi.selective_scan_ref,
        "mamba_inner_fn": ssi.mamba_inner_ref,
        "causal_conv1d_fn": _causal_conv1d,
        "selective_state_update": None,  # the mixers' own torch decode steps
        "mamba_chunk_scan_combined": chunk_scan,
        "mamba_split_conv1d_scan_combined": split_conv1d_scan,
        "layer_norm_fn": add_norm,
        "rms_norm_fn": rms_norm,
        "rmsnorm_fn": gated_rms_norm,
    }
    for name, module in list(sys.modules.items()):
        if name == "mamba_ssm" or name.startswith("mamba_ssm."):
            for attr, value in swaps.items():
                if attr in vars(module) and not name.startswith(("mamba_ssm.ops.tilelang", "mamba_ssm.ops.cute")):
                    setattr(module, attr, value)
    # the mixers' own calls are counted: which path each layer took
    from mamba_ssm.modules import mamba2, mamba_simple

    mamba_simple.mamba_inner_fn = counted("mamba_inner", ssi.mamba_inner_ref)  # Mamba-1 fused fast path
    mamba_simple.selective_scan_fn = counted("selective_scan", ssi.selective_scan_ref)  # Mamba-1 slow path
    mamba2.mamba_split_conv1d_scan_combined = counted("split_conv1d_scan", split_conv1d_scan)  # fused
    mamba2.mamba_chunk_scan_combined = counted("chunk_scan", chunk_scan)  # Mamba-2 unfused path
    from mamba_ssm.modules import mha

    mha.flash_attn_with_kvcache = counted("attention_decode", _attention_with_kv_cache)  # MHA decode steps
    import ssm_reduce.ops

    for name in ("scan_score_mamba1", "scan_score_mamba2"):  # anchors through ssm_reduce.ops
        setattr(ssm_reduce.ops, name, counted("ops_scan", getattr(ssm_reduce.ops, name)))
    if not torch.cuda.is_available():  # decode() builds CUDA timing events even when timing is off
        generation.torch = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
        generation.torch.cuda = types.SimpleNamespace(Event=lambda **kwargs: None, synchronize=lambda: None)


@torch.no_grad()
def check(layer: str, workdir: Path) -> dict:
    """The real mamba_ssm model against the transformers model on one checkpoint, unpatched and patched."""
    import ssm_reduce
    from ssm_reduce.testing import force_scan

    from .conftest import random_tokens
    from .test_loading import mamba_ssm_checkpoint

    ckpt = workdir / layer
    mamba_ssm_checkpoint(ckpt, layer, n_layer=4)
    hf = ssm_reduce.load_model(ckpt)
    real = ssm_reduce.load_model(ckpt, host="mamba_ssm")
    assert type(real).__name__ == "MambaLMHeadModel", type(real)
    fused = "split_conv1d_scan" if layer == "Mamba2" else "mamba_inner"
    # where anchors compute y without ssm_reduce's kernels: Mamba-2's unfused host path; Mamba-1's
    # anchors call the host's scan without its gate
    unfused = "chunk_scan" if layer == "Mamba2" else "selective_scan"
    if layer == "Mamba2" and os.environ.get("SSM_REDUCE_SCAN_BACKEND") == "triton":
        unfused = "ops_scan"  # the Triton scan (interpreted here) serves Mamba-2 anchors
    ids = random_tokens(2, 90)
    result = {"layer": layer}

    CALLS.clear()
    dense = real(ids).logits
    assert CALLS == Counter({fused: 4}), f"unpatched forward: every layer on the fused path, got {dict(CALLS)}"
    result["dense_max_abs_diff"] = float((dense - hf(ids).logits).abs().max())
    torch.testing.assert_close(dense, hf(ids).logits, atol=1e-4, rtol=1e-4)

    for model in (hf, real):
        ssm_reduce.apply(model, method="utr", keep_ratio=0.7, layers=[1, 2])
    a = hf(ids)
    CALLS.clear()
    b = real(ids)
    assert CALLS == Counter({fused: 2, unfused: 2}), f"anchors 1, 2 unfused, the rest fused; got {dict(CALLS)}"
    flags = [getattr(block.mixer, "use_mem_eff_path", getattr(block.mixer, "use_fast_path", None)) for block in real.backbone.layers]
    assert all(flags), f"fast-path flags restored after the forward, got {flags}"
    assert torch.equal(a.kept_positions, b.kept_positions), "kept positions differ from the transformers adapter"
    assert b.logits.shape[1] < ids.shape[1]
    result["reduced_tokens"] = [ids.shape[1], b.logits.shape[1]]
    result["reduced_max_abs_diff"] = float((a.logits - b.logits).abs().max())
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
    assert ssm_reduce.stats(real)["tokens_per_layer"] == ssm_reduce.stats(hf)["tokens_per_layer"]


    protected = torch.zeros_like(ids, dtype=torch.bool)
    protected[:, 10:30] = True  # a span utr would otherwise thin out
    with ssm_reduce.protect(hf, protected), ssm_reduce.protect(real, protected):
        pa, pb = hf(ids), real(ids)
    assert torch.equal(pa.kept_positions, pb.kept_positions), "protect(): kept positions differ"
    assert all(set(range(10, 30)) <= set(row.tolist()) for row in pb.kept_positions), "protect(): a protected position was removed"
    assert not torch.equal(pb.kept_positions, b.kept_positions)
    torch.testing.assert_close(pb.logits, pa.logits, atol=1e-4, rtol=1e-4)

    last = real(ids, num_last_tokens=1)
    torch.testing.assert_close(last.logits, b.logits[:, -1:], atol=1e-5, rtol=1e-5)
    assert torch.equal(last.kept_positions, b.kept_positions[:, -1:])

    new = 6
    out = real.generate(ids, max_length=ids.shape[1] + new, cg=False, return_dict_in_generate=True, output_scores=True)
    assert ssm_reduce.stats(real)["kept_per_row"] == [b.logits.shape[1]] * 2, "the prefill was not reduced"
    ref = hf.generate(ids, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True,
                      pad_token_id=0)
    assert torch.equal(out.sequences, ref.sequences), "greedy tokens differ from the transformers adapter"
    scores, ref_scores = torch.stack(out.scores, 1), torch.stack(ref.logits, 1)[..., : out.scores[0].shape[-1]]
    result["generate_max_abs_diff"] = float((scores - ref_scores).abs().max())
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)

    # the route CUDA anchors take (the mixer through ssm_reduce.ops, the scan scoring y itself) gives
    # the same results, the generation cache included
    forcing = force_scan(real, True)
    forcing.__enter__()
    CALLS.clear()
    c = real(ids)
    assert CALLS == Counter({fused: 2, "ops_scan": 2}), dict(CALLS)
    assert torch.equal(c.kept_positions, b.kept_positions)
    torch.testing.assert_close(c.logits, b.logits, atol=1e-4, rtol=1e-4)
    CALLS.clear()
    out_ops = real.generate(ids, max_length=ids.shape[1] + new, cg=False, return_dict_in_generate=True,
                            output_scores=True)
    assert CALLS["ops_scan"] == 2, dict(CALLS)  # the anchors' prefill filled the cache through ops
    forcing.__exit__(None, None, None)
    assert torch.equal(out_ops.sequences, out.sequences)
    torch.testing.assert_close(torch.stack(out_ops.scores, 1), scores, atol=1e-4, rtol=1e-4)

    ssm_reduce.remove(real)
    assert type(real).__name__ == "MambaLMHeadModel" and not ssm_reduce.is_patched(real)
    assert torch.equal(real(ids).logits, dense), "remove() must restore the unpatched model exactly"

    # the loader's host="mamba_ssm" from both checkpoint formats written by save_model
    ssm_reduce.remove(hf)
    for fmt in ("hf", "mamba_ssm"):
        saved = ssm_reduce.save_model(hf, workdir / f"{layer}-{fmt}", format=fmt)
        again = ssm_reduce.load_model(saved, host="mamba_ssm")
        assert type(again).__name__ == "MambaLMHeadModel"
        assert torch.equal(again(ids).logits, dense), f"save_model(format={fmt!r}) -> host='mamba_ssm' changed the logits"
    return result


@torch.no_grad()
def check_unusual_mamba2() -> dict:
    """Mamba-2 options with no transformers counterpart: no gated norm (the scan gates y), per-channel
    D, two groups. Anchors must still score y before the gate, by either scan, with equal results."""
    import ssm_reduce
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from ssm_reduce.testing import force_scan

    from .conftest import random_tokens

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=4, vocab_size=64, pad_vocab_size_multiple=8, ssm_cfg={
        "layer": "Mamba2", "d_state": 16, "headdim": 8, "ngroups": 2, "rmsnorm": False, "D_has_hdim": True,
        "chunk_size": 16})
    model = MambaLMHeadModel(cfg).eval()
    for block in model.backbone.layers:
        block.mixer.use_mem_eff_path = False  # the fused stand-in covers one group only
        block.mixer.D.data.normal_()  # per-channel skips that differ across channels
    ids = random_tokens(2, 70)
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7, layers=[1, 2])
    results = {}
    for forced in (None, True):  # the host's scan without its gate / ssm_reduce.ops
        CALLS.clear()
        with force_scan(model, forced):
            results[forced] = model(ids)
        assert CALLS.get("ops_scan" if forced else "chunk_scan", 0) >= 2, dict(CALLS)
    a, b = results[None], results[True]
    assert a.logits.shape[1] < ids.shape[1] and torch.equal(a.kept_positions, b.kept_positions)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    ssm_reduce.remove(model)
    return {"layer": "Mamba2 (no gated norm, per-channel D, 2 groups)",
            "reduced_tokens": [ids.shape[1], a.logits.shape[1]],
            "reduced_max_abs_diff": float((a.logits - b.logits).abs().max())}


@torch.no_grad()
def check_attention() -> dict:
    """A mamba_ssm hybrid (an MHA layer without rotary embeddings between Mamba-2 layers): reduction off is
    exact; greedy decoding after a reduced prefill equals one forward over prompt + generated tokens with the
    prompt reduced by the same plans (the attention layer's cache holds the kept tokens, decoded at its own
    length)."""
    import ssm_reduce
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from ssm_reduce.testing import latest_plans, replay

    from .conftest import random_tokens

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=5, vocab_size=64, pad_vocab_size_multiple=8, attn_layer_idx=[3],
                      attn_cfg={"num_heads": 4, "causal": True},
                      ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 8, "chunk_size": 16})
    model = MambaLMHeadModel(cfg).eval()
    ids, new = random_tokens(2, 60), 5
    dense = model(ids).logits
    dense_gen = model.generate(ids, max_length=ids.shape[1] + new, cg=False, return_dict_in_generate=True,
                               output_scores=True)
    ssm_reduce.apply(model, method="utr", keep_ratio=1.0)
    assert torch.equal(model(ids).logits, dense), "keep ratio 1 must be exact"
    ssm_reduce.apply(model, method="utr", keep_ratio=0.6, layers=[1, 2])
    CALLS.clear()
    out = model.generate(ids, max_length=ids.shape[1] + new, cg=False, return_dict_in_generate=True,
                         output_scores=True)
    assert CALLS["attention_decode"] == new - 1, dict(CALLS)
    plans = latest_plans(model)
    kept = plans[2].state.pos.shape[1]
    assert kept < ids.shape[1] and sorted(plans) == [1, 2]
    with replay(model, plans):
        full = model(out.sequences)
    torch.testing.assert_close(full.logits[:, -new - 1:-1], torch.stack(out.scores, 1), atol=1e-4, rtol=1e-4)
    assert not torch.equal(out.sequences, dense_gen.sequences) or kept < ids.shape[1]
    ssm_reduce.remove(model)
    assert torch.equal(model(ids).logits, dense)
    return {"layer": "Mamba2 + MHA (no rotary)", "reduced_tokens": [ids.shape[1], kept],
            "decode_max_abs_diff": float((full.logits[:, -new - 1:-1] - torch.stack(out.scores, 1)).abs().max())}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tests.mamba_ssm_cpu WORKDIR", file=sys.stderr)
        return 2
    install([p for p in os.environ.get(ENV, "").split(os.pathsep) if p])
    workdir = Path(argv[0])
    results = [check(layer, workdir) for layer in ("Mamba1", "Mamba2")] + [check_unusual_mamba2(), check_attention()]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
