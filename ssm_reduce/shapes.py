"""Configurations of the public Mamba / Mamba-2 checkpoints (``state-spaces/mamba*``), for building
randomly initialised models of the real shapes in benchmarks (speed does not depend on the weights)."""

from __future__ import annotations

from typing import Optional

import torch

# name -> (family, layers, d_model)
PUBLIC_SHAPES = {
    "mamba2-130m": ("mamba2", 24, 768),
    "mamba2-370m": ("mamba2", 48, 1024),
    "mamba2-780m": ("mamba2", 48, 1536),
    "mamba2-1.3b": ("mamba2", 48, 2048),
    "mamba2-2.7b": ("mamba2", 64, 2560),
    "mamba-130m": ("mamba", 24, 768),
    "mamba-370m": ("mamba", 48, 1024),
    "mamba-790m": ("mamba", 48, 1536),
    "mamba-1.4b": ("mamba", 48, 2048),
    "mamba-2.8b": ("mamba", 64, 2560),
}


def shape_config(name: str, num_layers: Optional[int] = None):
    """The transformers config of a public checkpoint's shape (``num_layers`` overrides the depth)."""
    if name not in PUBLIC_SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(PUBLIC_SHAPES)}")
    family, layers, d_model = PUBLIC_SHAPES[name]
    layers = num_layers or layers
    if family == "mamba2":
        from transformers import Mamba2Config

        return Mamba2Config(
            vocab_size=50288, hidden_size=d_model, num_hidden_layers=layers, state_size=128, head_dim=64,
            num_heads=2 * d_model // 64, n_groups=1, expand=2, conv_kernel=4, chunk_size=256,
            tie_word_embeddings=True, residual_in_fp32=True,
        )
    from transformers import MambaConfig

    return MambaConfig(
        vocab_size=50280, hidden_size=d_model, num_hidden_layers=layers, state_size=16, expand=2,
        conv_kernel=4, tie_word_embeddings=True, residual_in_fp32=True,
    )


def random_model(name: str, device="cpu", dtype=torch.float32, seed: int = 0, num_layers: Optional[int] = None):
    """A randomly initialised causal LM with the shape of public checkpoint ``name``, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = shape_config(name, num_layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
