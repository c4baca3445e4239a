"""Tiny random models of every hybrid class the transformers-hybrid adapter serves, built from configs."""

import torch

from .conftest import VOCAB

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=1)
_MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16)


def _granite(t, common):
    return t.GraniteMoeHybridForCausalLM(t.GraniteMoeHybridConfig(
        **common, **_MAMBA2, intermediate_size=32, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32, position_embedding_type="rope",
        layer_types=["mamba", "mamba", "attention", "mamba", "attention", "mamba"], mamba_expand=2))


def _nemotron(t, common):
    return t.NemotronHForCausalLM(t.NemotronHConfig(
        **common, layers_block_type=["mamba", "mamba", "attention", "mlp", "mamba", "attention"], num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=64, ssm_state_size=8, mamba_num_heads=4,
        mamba_head_dim=16, n_groups=1, chunk_size=16, expand=2))


def _falcon_h1(t, common):
    return t.FalconH1ForCausalLM(t.FalconH1Config(
        **common, **_MAMBA2, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        mamba_d_ssm=64))


def _zamba2(t, common):
    return t.Zamba2ForCausalLM(t.Zamba2Config(
        **common, num_hidden_layers=6, layers_block_type=["mamba", "mamba", "hybrid", "mamba", "hybrid", "mamba"],
        mamba_d_state=8, n_mamba_heads=4, mamba_headdim=16, chunk_size=16, num_attention_heads=4,
        intermediate_size=64, use_mem_rope=True))


def _bamba(t, common):
    return t.BambaForCausalLM(t.BambaConfig(
        **common, **_MAMBA2, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        attn_layer_indices=[2, 4]))


def _jamba(t, common):
    return t.JambaForCausalLM(t.JambaConfig(
        **common, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        attn_layer_period=3, attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1, num_experts=4,
        num_experts_per_tok=2, mamba_d_state=8, mamba_expand=2))


def _falcon_mamba(t, common):
    return t.FalconMambaForCausalLM(t.FalconMambaConfig(**common, num_hidden_layers=6, state_size=8, expand=2))


BUILDERS = {"granite": _granite, "nemotron_h": _nemotron, "falcon_h1": _falcon_h1, "zamba2": _zamba2,
            "bamba": _bamba, "jamba": _jamba, "falcon_mamba": _falcon_mamba}
HYBRIDS = tuple(BUILDERS)
# The layers with attention, and the Mamba layers, of each tiny model.
ATTENTION = {"granite": [2, 4], "nemotron_h": [2, 5], "falcon_h1": [0, 1, 2, 3], "zamba2": [2, 4], "bamba": [2, 4],
             "jamba": [2, 5], "falcon_mamba": []}
MAMBA = {"granite": [0, 1, 3, 5], "nemotron_h": [0, 1, 4], "falcon_h1": [0, 1, 2, 3], "zamba2": [0, 1, 2, 3, 4, 5],
         "bamba": [0, 1, 3, 5], "jamba": [0, 1, 3, 4], "falcon_mamba": [0, 1, 2, 3, 4, 5]}


def tiny_hybrid(name: str, seed: int = 0, dtype=torch.float32, **common):
    """``common``: overrides of the shared config fields (vocab_size, token ids, hidden_size)."""
    import transformers

    torch.manual_seed(seed)
    return BUILDERS[name](transformers, {**_COMMON, **common}).to(dtype).eval()


def hybrids_unsupported() -> str:
    """Why the hybrid tests cannot run here ('' when they can): the adapter needs transformers >= 5.25."""
    from ssm_reduce.patch.hybrid import MIN_TRANSFORMERS, transformers_version

    found = tuple(int(p) for p in transformers_version().split(".")[:2] if p.isdigit())
    if found < MIN_TRANSFORMERS:
        return f"the hybrid adapter needs transformers >= 5.25, found {transformers_version()}"
    return ""
