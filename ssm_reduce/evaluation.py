"""Perplexity under token reduction: the windowed protocol.

Rolling perplexity scores every token, which leaves nothing to reduce. Here the text is cut into
windows of ``window`` tokens; in each window the first ``window - scored`` tokens are context that
the model may reduce, and the last ``scored`` tokens are protected (never removed, never merged into)
and scored: each predicts the token after it. Dense and reduced models are scored on exactly the same
windows and positions, so their perplexities compare directly.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from tqdm.auto import tqdm

from .config import ReduceConfig
from .patch import apply, check, is_patched, protect, remove, stats


class ScoredPositionsRemoved(RuntimeError):
    """A reduced forward removed positions the protocol scores (a method that protects none)."""


def windows_of(tokens: torch.Tensor, window: int, stride: Optional[int] = None, max_windows: Optional[int] = None):
    """(W_count, window + 1) token windows (inputs plus the next token) from a 1-D stream."""
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
    stride = stride or window
    if window < 2 or stride < 1:
        raise ValueError(f"window must be >= 2 and stride >= 1, got window={window}, stride={stride}")
    starts = list(range(0, len(tokens) - window, stride))
    if not starts:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {window} + 1")
    if max_windows is not None:
        starts = starts[:max_windows]
    return torch.stack([tokens[s : s + window + 1] for s in starts])


@torch.no_grad()
def windowed_perplexity(
    model,
    tokens: torch.Tensor,
    window: int = 1024,
    scored: int = 128,
    stride: Optional[int] = None,
    batch_size: int = 8,
    max_windows: Optional[int] = None,
    progress: bool = False,
) -> dict:
    """Perplexity of the last ``scored`` tokens of each window, with the model as it is (dense or
    patched). Returns ``nll`` (mean, nats), ``perplexity``, ``bits_per_token``, ``scored_tokens``,
    ``windows`` and, for a patched model, ``realised_flops_reduction`` (mean over windows). With a
    ``stride`` below ``scored`` windows overlap in their scored tokens, and each counts once per window.
    """
    if not 1 <= scored < window:
        raise ValueError(f"scored must be in [1, window), got scored={scored}, window={window}")
    chunks = windows_of(tokens, window, stride, max_windows)
    device = next(model.parameters()).device
    total, count, reductions = 0.0, 0, []
    batches = chunks.split(batch_size)
    for batch in tqdm(batches, desc="perplexity windows", disable=not progress):
        batch = batch.to(device)
        inputs, targets = batch[:, :-1], batch[:, -scored:]
        mask = torch.zeros_like(inputs, dtype=torch.bool)
        mask[:, -scored:] = True
        if is_patched(model):
            with protect(model, mask):
                out = model(inputs, logits_to_keep=scored, use_cache=False)
            expected = torch.arange(window - scored, window, device=device).expand(len(batch), scored)
            if not torch.equal(out.kept_positions, expected):
                raise ScoredPositionsRemoved("scored positions were not kept; the protection failed")
            reductions.append((stats(model)["realised_flops_reduction"], len(batch)))
        else:
            out = model(inputs, logits_to_keep=scored, use_cache=False)
        logits = out.logits.float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total += nll.item()
        count += targets.numel()
    mean = total / count
    result = {
        "nll": mean,
        "perplexity": math.exp(mean),
        "bits_per_token": mean / math.log(2),
        "scored_tokens": count,
        "windows": len(chunks),
        "window": window,
        "scored": scored,
    }
    if reductions:
        result["realised_flops_reduction"] = sum(f * n for f, n in reductions) / sum(n for _, n in reductions)
    return result


def compare_perplexity(model, tokens: torch.Tensor, config: ReduceConfig, **kwargs) -> dict:
    """Dense and reduced windowed perplexity on the same windows; the model ends unpatched. The reduction
    and the windows are validated before the dense pass."""
    check(model, config)
    windows_of(tokens, kwargs.get("window", 1024), kwargs.get("stride"), kwargs.get("max_windows"))
    remove(model)
    dense = windowed_perplexity(model, tokens, **kwargs)
    apply(model, config)
    try:
        reduced = windowed_perplexity(model, tokens, **kwargs)
    finally:
        remove(model)
    return {"dense": dense, "reduced": reduced}
