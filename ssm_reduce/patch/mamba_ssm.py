"""Adapter for ``mamba_ssm`` models: ``MambaLMHeadModel`` / ``MixerModel`` with Mamba-1 or Mamba-2 layers.

Recognised by class name, so importing ``ssm_reduce`` never imports ``mamba_ssm``.

mamba_ssm blocks run add -> norm -> mixer and return ``(mixer_out, residual)``; the next block adds
them. An anchor block is therefore wrapped *around* its output: both streams are reduced with the same
plan and handed on, exactly where the transformers adapter reduces inside its block.

* ``MambaLMHeadModel.forward``: ``num_last_tokens`` keeps working; the returned named tuple gains
  ``kept_positions`` (sliced like the logits).
* ``MixerModel.forward``: one reduction session per multi-token forward. mamba_ssm takes no padding
  mask, so every token is real. A decode step (``inference_params.seqlen_offset > 0``) never reduces;
  the cache of every layer holds the states of the sequence it saw, so ``generate`` (with or without
  CUDA graphs, which only capture decode steps) needs nothing else.
* Importance from the SSM output y: Mamba-2's default path fuses conv, scan, gated norm and out_proj
  into one kernel, so at anchor layers only the mixer runs its unfused path (``use_mem_eff_path``
  off: separate conv, ``mamba_chunk_scan_combined``, gated RMSNorm, out_proj — about the cost of one
  extra read and write of the layer's activations) and y is read at the gated norm's input. Mamba-1's
  fast path fuses out_proj the same way; its anchors run the slow path and, as in the transformers
  adapter, use the input of ``out_proj`` (y * silu(z)) as ``ssm``. Every other layer keeps the fast path.
"""

from __future__ import annotations

from collections import namedtuple

from ..runtime import Runtime, kept_positions_for
from .base import Adapter, register, runtime_of
from .hf import _keep_columns

ReducedLMOutput = namedtuple("ReducedLMOutput", ["logits", "kept_positions"])
# Attributes that select a mixer's fused fast path (Mamba-2, Mamba-1).
_FAST_PATH_FLAGS = ("use_mem_eff_path", "use_fast_path")


def _is_decode(inference_params) -> bool:
    return inference_params is not None and getattr(inference_params, "seqlen_offset", 0) > 0


class _LMHeadMixin:
    def forward(self, input_ids, position_ids=None, inference_params=None, num_last_tokens=0, **mixer_kwargs):
        out = super().forward(input_ids, position_ids=position_ids, inference_params=inference_params,
                              num_last_tokens=num_last_tokens, **mixer_kwargs)
        runtime: Runtime = runtime_of(self)
        return ReducedLMOutput(logits=out.logits, kept_positions=_keep_columns(runtime.last_kept, num_last_tokens))


class _MixerModelMixin:
    def forward(self, input_ids, inference_params=None, **mixer_kwargs):
        runtime: Runtime = runtime_of(self)
        batch, seq_len = input_ids.shape[:2]
        session = None if _is_decode(inference_params) else runtime.start(batch, seq_len, input_ids.device, None)
        try:
            out = super().forward(input_ids, inference_params=inference_params, **mixer_kwargs)
        except BaseException:
            runtime.session = None
            raise
        runtime.finish(session)
        runtime.last_kept = kept_positions_for(session, batch, seq_len, input_ids.device, None)
        return out


class _BlockMixin:
    def forward(self, hidden_states, residual=None, inference_params=None, **mixer_kwargs):
        session = runtime_of(self).session
        if session is None or self.layer_idx not in session.anchors or not session.reduces_at(self.layer_idx):
            return super().forward(hidden_states, residual, inference_params=inference_params, **mixer_kwargs)
        mixer = self.mixer
        flags = {name: getattr(mixer, name) for name in _FAST_PATH_FLAGS if hasattr(mixer, name)}
        for name in flags:
            setattr(mixer, name, False)
        try:
            hidden_states, residual = super().forward(
                hidden_states, residual, inference_params=inference_params, **mixer_kwargs
            )
        finally:
            for name, value in flags.items():
                setattr(mixer, name, value)
        return session.reduce(self.layer_idx, hidden_states, residual)


class MambaSsmAdapter(Adapter):
    name = "mamba_ssm"
    supported = ("MambaLMHeadModel", "MixerModel")
    lm_mixin = _LMHeadMixin
    backbone_mixin = _MixerModelMixin

    def conv_kernel(self, model) -> int:
        return int(getattr(self.backbone(model).layers[0].mixer, "d_conv", 4))

    def block_mixin(self, model) -> type:
        return _BlockMixin

    def ssm_source(self, mixer):
        # Mamba-2 (unfused path): y enters the gated RMSNorm; Mamba-1: out_proj's input, y * silu(z).
        norm = getattr(mixer, "norm", None)
        return norm if norm is not None else mixer.out_proj


register(MambaSsmAdapter())
