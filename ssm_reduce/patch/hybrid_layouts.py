"""Layouts of transformers' Mamba-attention hybrids: where each family keeps its Mamba mixer and its
attention, and what its anchor layer computes around the reduction (``session.reduce``)."""

from __future__ import annotations

from typing import Optional

import torch

from .base import host_class

# Arguments the anchor forwards pass to the mixer themselves.
_OWN = ("hidden_states", "attention_mask", "mamba_attention_mask", "causal_mask", "cache", "use_cache",
        "position_embeddings", "position_ids", "original_hidden_states", "layer_idx", "transformer_hidden_states")


def rest(named: dict) -> dict:
    return {k: v for k, v in named.items() if k not in _OWN}


class Layout:
    lm: tuple[str, ...] = ()
    backbone: tuple[str, ...] = ()
    mamba_mask_arg = "attention_mask"  # the argument that carries a Mamba layer's padding mask
    attention_mask_arg = "attention_mask"  # ... and an attention layer's mask
    streams: tuple[str, ...] = ()  # per-token arguments besides hidden_states that layers read (reduced too)
    reduces_streams = False

    def mixer(self, layer) -> Optional[torch.nn.Module]:
        return getattr(layer, "mamba", None)

    def attends(self, layer) -> bool:
        return getattr(layer, "self_attn", None) is not None

    def unit(self, layer) -> torch.nn.Module:
        """The module whose forward an anchor replaces."""
        return layer

    def anchor(self, unit, a: dict, session, index: int, mix):
        raise NotImplementedError


class _Granite(Layout):
    lm, backbone = ("GraniteMoeHybridForCausalLM",), ("GraniteMoeHybridModel",)

    def anchor(self, layer, a, session, index, mix):
        x = a["hidden_states"]
        h = mix(layer.mamba, hidden_states=layer.input_layernorm(x), cache=a.get("cache"),
                attention_mask=a.get("attention_mask"), **rest(a))
        h, residual = session.reduce(index, h * layer.residual_multiplier, x)
        x = residual + h
        h = layer.post_attention_layernorm(x)
        h = layer.block_sparse_moe(h) + layer.shared_mlp(h) if layer.has_experts else layer.shared_mlp(h)
        return x + h * layer.residual_multiplier


class _Bamba(Layout):
    lm, backbone = ("BambaForCausalLM",), ("BambaModel",)

    def anchor(self, layer, a, session, index, mix):
        x = a["hidden_states"]
        h = mix(layer.mamba, hidden_states=layer.input_layernorm(x), cache=a.get("cache"),
                attention_mask=a.get("attention_mask"), **rest(a))
        h, residual = session.reduce(index, h, x)
        x = residual + h
        return x + layer.feed_forward(layer.pre_ff_layernorm(x)), None


class _Jamba(Layout):
    lm, backbone = ("JambaForCausalLM",), ("JambaModel",)

    def anchor(self, layer, a, session, index, mix):
        x = a["hidden_states"]
        h = mix(layer.mamba, hidden_states=layer.input_layernorm(x), cache=a.get("cache"),
                attention_mask=a.get("attention_mask"))
        h, residual = session.reduce(index, h, x)
        x = residual + h
        return x + layer.feed_forward(layer.pre_ff_layernorm(x))


class _NemotronH(Layout):
    lm, backbone = ("NemotronHForCausalLM",), ("NemotronHModel",)

    def mixer(self, layer):
        return layer.mixer if layer.block_type in ("mamba", "linear_attention") else None

    def attends(self, layer):
        return layer.block_type in ("attention", "full_attention")

    def anchor(self, layer, a, session, index, mix):
        x = a["hidden_states"]
        h = mix(layer.mixer, layer.norm(x.to(dtype=layer.norm.weight.dtype)), cache=a.get("cache"),
                attention_mask=a.get("attention_mask"), **rest(a))
        h, residual = session.reduce(index, h, x)
        return residual + h


class _FalconH1(Layout):
    lm, backbone = ("FalconH1ForCausalLM",), ("FalconH1Model",)
    mamba_mask_arg = "mamba_attention_mask"

    def anchor(self, layer, a, session, index, mix):
        x = a["hidden_states"]
        cache = a.get("cache")
        h = layer.input_layernorm(x)
        m = mix(layer.mamba, hidden_states=h, cache=cache, attention_mask=a.get("mamba_attention_mask"), **rest(a))
        att, _ = layer.self_attn(hidden_states=h * layer.attention_in_multiplier, attention_mask=a.get("attention_mask"),
                                 position_ids=a.get("position_ids"), cache=cache, use_cache=a.get("use_cache", False),
                                 position_embeddings=a.get("position_embeddings"), **rest(a))
        h, residual = session.reduce(index, m * layer.ssm_out_multiplier + att * layer.attn_out_multiplier, x)
        x = residual + h
        return (x + layer.feed_forward(layer.pre_ff_layernorm(x)),)


class _Zamba2(Layout):
    lm, backbone = ("Zamba2ForCausalLM",), ("Zamba2Model",)
    attention_mask_arg = "causal_mask"
    streams = ("original_hidden_states",)
    reduces_streams = True

    def mixer(self, layer):
        return self.unit(layer).mamba

    def attends(self, layer):
        return getattr(layer, "shared_transformer", None) is not None

    def unit(self, layer):
        return getattr(layer, "mamba_decoder", layer)

    def anchor(self, unit, a, session, index, mix):
        x = a["hidden_states"]
        t = a.get("transformer_hidden_states")
        h = unit.input_layernorm(x + t if t is not None else x)
        h = mix(unit.mamba, hidden_states=h, cache=a.get("cache"), attention_mask=a.get("attention_mask"), **rest(a))
        h, residual = session.reduce(index, h, x)
        return residual + h


class _FalconMamba(Layout):
    lm, backbone = ("FalconMambaForCausalLM",), ("FalconMambaModel",)

    def mixer(self, layer):
        return layer.mixer

    def attends(self, layer):
        return False

    def anchor(self, block, a, session, index, mix):
        x = a["hidden_states"]
        residual = x.to(torch.float32) if block.residual_in_fp32 else x
        h = mix(block.mixer, block.norm(x.to(dtype=block.norm.weight.dtype)), cache=a.get("cache"),
                attention_mask=a.get("attention_mask"))
        h, residual = session.reduce(index, h, residual)
        return residual + h


LAYOUTS = (_Granite(), _NemotronH(), _FalconH1(), _Zamba2(), _Bamba(), _Jamba(), _FalconMamba())


_LAYOUT_OF = {name: layout for layout in LAYOUTS for name in (*layout.lm, *layout.backbone)}
LAYOUT_OF_UNIT = {"Zamba2MambaDecoderLayer": LAYOUTS[3]}


def layout_of(model) -> Optional[Layout]:
    """The layout of a model (or of a subclass of a supported class)."""
    for cls in host_class(model).__mro__:
        if cls.__name__ in _LAYOUT_OF:
            return _LAYOUT_OF[cls.__name__]
    return None
