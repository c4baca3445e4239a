"""Adapter for Hugging Face ``transformers`` Mamba and Mamba-2 models.

Patched pieces (class swaps, undone by ``remove``):

* the causal LM (``MambaForCausalLM`` / ``Mamba2ForCausalLM``): computes the loss for ``labels`` on the
  kept positions (each kept position predicts the token after it) and adds ``kept_positions`` to the
  output, sliced like the logits for ``logits_to_keep``;
* the backbone (``MambaModel`` / ``Mamba2Model``): opens a reduction session per multi-token forward;
* every block: after the first reduction it feeds the block the reduced padding mask; anchor blocks
  run norm -> mixer, then reduce the mixer output and the residual *separately* (with the same output
  positions) and only then add them — the host block returns their sum, so its forward is replaced.

Importance sources inside the mixer (forward pre-hooks on anchor layers only):

* Mamba-2 ``ssm``: the scan output y (with the D skip) entering the gated RMSNorm — the paper's Eq. 5.
* Mamba-1 ``ssm``: transformers' Mamba-1 scan applies the z gate inside the scan function, so y alone
  is never materialised; the nearest visible tensor is the input of ``out_proj`` (y * silu(z)), which is
  what ``ssm`` uses there (identical to ``gated``).
* ``gated``: the input of ``out_proj``.  ``block``: the mixer output.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch

from ..runtime import Runtime, kept_positions_for
from .base import PARENT_ATTR, Adapter, register, runtime_of

_CAUSAL_LM = ("MambaForCausalLM", "Mamba2ForCausalLM")
_BACKBONES = ("MambaModel", "Mamba2Model")


@lru_cache(maxsize=None)
def _signature(fn) -> inspect.Signature:
    return inspect.signature(fn)


def _arguments(module, args, kwargs) -> dict:
    """The host forward's arguments by name (positional ones included)."""
    parent = getattr(type(module), PARENT_ATTR)
    bound = _signature(parent.forward).bind_partial(module, *args, **kwargs)
    named = dict(bound.arguments)
    named.pop("self", None)
    named.update(named.pop("kwargs", {}) or {})
    return named


def _keep_columns(positions: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """Slice (B, N') positions the way transformers slices hidden states for ``logits_to_keep``."""
    if isinstance(logits_to_keep, int):
        return positions if logits_to_keep == 0 else positions[:, -logits_to_keep:]
    keep = logits_to_keep.to(positions.device)
    if keep.dtype == torch.bool:
        return positions[keep]
    if keep.dim() == 1:
        return positions[:, keep]
    return positions.gather(1, keep)


def _next_token_loss(logits: torch.Tensor, labels: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each kept column's logits against the label after its original position."""
    seq_len = labels.shape[1]
    target_pos = kept + 1
    usable = (kept >= 0) & (target_pos < seq_len)
    targets = labels.to(logits.device).gather(1, target_pos.clamp(max=seq_len - 1).clamp(min=0))
    targets = torch.where(usable, targets, torch.full_like(targets, -100))
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )


class _CausalLMMixin:
    def forward(self, *args, **kwargs):
        runtime: Runtime = runtime_of(self)
        named = _arguments(self, args, kwargs)
        labels = named.get("labels")
        logits_to_keep = named.get("logits_to_keep", 0)
        if labels is None or not runtime.resolved.anchors:
            out = super().forward(*args, **kwargs)
            loss = None
        else:
            named["labels"] = None
            out = super().forward(**named)
        kept = _keep_columns(runtime.last_kept, logits_to_keep)
        if labels is not None and runtime.resolved.anchors:
            logits = out.logits if hasattr(out, "logits") else out[0]
            loss = _next_token_loss(logits, labels, kept)
        if isinstance(out, tuple):
            return out if loss is None else (loss,) + out
        if loss is not None:
            out = type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})
        out["kept_positions"] = kept
        return out


class _BackboneMixin:
    def forward(self, *args, **kwargs):
        runtime: Runtime = runtime_of(self)
        named = _arguments(self, args, kwargs)
        tokens = named.get("input_ids")
        if tokens is None:
            tokens = named.get("inputs_embeds")
        if tokens is None:
            return super().forward(*args, **kwargs)
        batch, seq_len = tokens.shape[:2]
        mask = named.get("attention_mask")
        session = runtime.start(batch, seq_len, tokens.device, mask)
        try:
            out = super().forward(*args, **kwargs)
        except BaseException:
            runtime.session = None
            raise
        runtime.finish(session)
        runtime.last_kept = kept_positions_for(session, batch, seq_len, tokens.device, mask)
        if not isinstance(out, tuple):
            out["kept_positions"] = runtime.last_kept
        return out


class _BlockMixin:
    # Mamba-2 blocks forward their extra keyword arguments to the mixer, Mamba-1 blocks do not.
    _ssm_reduce_mixer_kwargs = True

    def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
        session = runtime_of(self).session
        if session is None:
            return super().forward(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
        attention_mask = session.block_mask(attention_mask, hidden_states.device)
        if self.layer_idx not in session.anchors:
            return super().forward(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
        residual = hidden_states
        hidden_states = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        mixer_kwargs = kwargs if self._ssm_reduce_mixer_kwargs else {}
        hidden_states = self.mixer(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **mixer_kwargs)
        hidden_states, residual = session.reduce(self.layer_idx, hidden_states, residual)
        return residual + hidden_states


class _MambaBlockMixin(_BlockMixin):
    _ssm_reduce_mixer_kwargs = False


class TransformersAdapter(Adapter):
    name = "transformers"
    supported = _CAUSAL_LM + _BACKBONES
    lm_mixin = _CausalLMMixin
    backbone_mixin = _BackboneMixin

    def conv_kernel(self, model) -> int:
        return int(model.config.conv_kernel)

    def block_mixin(self, model) -> type:
        mamba2 = type(model.config).__name__ == "Mamba2Config"
        return _BlockMixin if mamba2 else _MambaBlockMixin

    def ssm_source(self, mixer):
        # Mamba-2: y enters the gated RMSNorm. Mamba-1 gates inside the scan: the nearest is out_proj's input.
        return mixer.norm if hasattr(mixer, "norm") else mixer.out_proj


register(TransformersAdapter())
