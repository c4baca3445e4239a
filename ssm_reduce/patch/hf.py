"""Adapter for Hugging Face ``transformers`` Mamba and Mamba-2 models.

Patched pieces (class swaps, undone by ``remove``):

* the causal LM (``MambaForCausalLM`` / ``Mamba2ForCausalLM``): computes the loss for ``labels`` on the
  kept positions (each kept position predicts the token after it) and adds ``kept_positions`` to the
  output, sliced like the logits for ``logits_to_keep``;
* the backbone (``MambaModel`` / ``Mamba2Model``): opens a reduction session per multi-token forward;
* every block: after the first reduction it feeds the block the reduced padding mask; anchor blocks
  run norm -> mixer, then reduce the mixer output and the residual *separately* (with the same output
  positions) and only then add them — the host block returns their sum, so its forward is replaced.

Importance sources inside the mixer (anchor layers only):

* ``ssm``: the scan output y (with the D skip) before the gate — the paper's Eq. 5. Mamba-2 exposes it
  at its gated RMSNorm (a forward pre-hook reads it). transformers' Mamba-1 scan applies the z gate
  inside, so Mamba-1 anchors that need y run the mixer through ``ssm_reduce.ops.scan_score_mamba1``,
  which returns y before the gate and its scores. Where the compiled kernels run (CUDA), every anchor
  mixer takes that path (``scan_score_mamba2`` for Mamba-2): the score comes out of the scan itself.
  ``ssm_reduce.ops.route.anchor_scan`` makes that choice; the blocks describe their anchor and follow it.
* ``gated``: the input of ``out_proj``.  ``block``: the mixer output.

An anchor that removes nothing in a forward (too few candidates) runs the host's block unchanged.
"""

from __future__ import annotations

import contextvars
import inspect
import numbers
import sys
import warnings
from functools import lru_cache
from typing import Optional

import torch

from .. import ops
from ..ops.route import AnchorScan
from ..runtime import Runtime, kept_positions_for
from .base import (PARENT_ATTR, Adapter, RoutedMixerMixin, add_hook, anchor_scan_mamba1, host_class, mixer_route,
                   register, runtime_of, session_of)

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


@lru_cache(maxsize=None)
def _cache_argument(host_class: type) -> str:
    """The name under which a host block or mixer takes the model's cache: ``cache`` (transformers 5.25+)
    or ``cache_params`` (earlier)."""
    return "cache" if "cache" in _signature(host_class.forward).parameters else "cache_params"


def _register_output_capture(module) -> None:
    """transformers 5.25+ finds what a model can record (``output_hidden_states`` ...) by the name of its
    class: give a patched class its host's entry (earlier versions have no such registry)."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:
        return
    recordable = getattr(module, "_can_record_outputs", None)
    if recordable is not None:
        _CAN_RECORD_REGISTRY[module] = recordable


def _keep_columns(positions: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """Slice (B, N') positions the way transformers slices hidden states for an integer or integer-tensor
    ``logits_to_keep`` (``slice_logits_to_keep``): the last k columns, or the given columns."""
    if isinstance(logits_to_keep, int):
        return positions if logits_to_keep == 0 else positions[:, -logits_to_keep:]
    keep = logits_to_keep.to(positions.device)
    if keep.dim() <= 1:  # columns (a 0-d tensor: one column, its axis dropped): ``hidden_states[:, keep]``
        return positions[:, keep]
    if keep.dtype == torch.bool:  # (B, N) mask: flattened, as transformers does
        return positions[keep]
    return positions.gather(1, keep)


def _as_int(logits_to_keep):
    """An integer ``logits_to_keep`` of any integer type as a Python int (tensors are left as they are)."""
    if isinstance(logits_to_keep, numbers.Integral) and not isinstance(logits_to_keep, bool):
        return int(logits_to_keep)
    if isinstance(logits_to_keep, torch.Tensor):
        return logits_to_keep
    raise TypeError(f"logits_to_keep must be an integer or a tensor, got {type(logits_to_keep).__name__}")


class _PositionSelection:
    """A boolean ``logits_to_keep`` over the input's N positions ((N,) for every row or (B, N)), applied to
    the hidden states that enter the LM head: where the forward removed nothing, exactly as transformers
    does; after a reduction, the columns whose original position it marks (every marked real position
    must have survived). ``kept`` is then the selected columns' positions."""

    def __init__(self, mask: torch.Tensor, seq_len: int, batch: int):
        if mask.dim() not in (1, 2) or mask.shape[-1] != seq_len or (mask.dim() == 2 and mask.shape[0] != batch):
            shape = f"({seq_len},) or ({batch}, {seq_len})"
            raise ValueError(f"logits_to_keep: a boolean mask must cover the input's positions, shape {shape}; "
                             f"got {tuple(mask.shape)}")
        self.mask, self.seq_len = mask, seq_len
        self.kept: Optional[torch.Tensor] = None

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(hidden.device)
        rows = mask.expand(positions.shape[0], -1) if mask.dim() == 1 else mask
        if hidden.shape[1] == self.seq_len:  # nothing removed: the host's own slicing
            self.kept = positions[:, mask] if mask.dim() == 1 else positions[mask]
            return hidden[:, mask] if mask.dim() == 1 else hidden[mask]
        chosen = (positions >= 0) & rows.gather(1, positions.clamp(min=0))
        missing = int(rows.sum()) - int(chosen.sum())
        if missing:
            raise ValueError(f"logits_to_keep marks {missing} position(s) that token reduction removed (or padding); "
                             "protect them with ssm_reduce.protect(model, mask), or pass an integer")
        if mask.dim() == 2:
            self.kept = positions[chosen]
            return hidden[chosen]
        counts = chosen.sum(1)
        columns = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, : int(counts[0])]
        self.kept = positions.gather(1, columns)
        return hidden.gather(1, columns[..., None].expand(-1, -1, hidden.shape[-1]))


# The position selection of the causal-LM forward running in this thread (applied at its LM head).
_SELECTION: contextvars.ContextVar = contextvars.ContextVar("ssm_reduce_logits_selection", default=None)


class select_at_lm_head:
    """A forward pre-hook on the LM head: applies this thread's ``_PositionSelection`` to its input. An
    object, not a closure: ``copy.deepcopy`` of a patched model gives the copy's hook the copy's runtime."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def __call__(self, module, args):
        selection = _SELECTION.get()
        if selection is None:
            return None
        return (selection(args[0], self.runtime.latest.kept), *args[1:])


def _reduced_loss(model, logits: torch.Tensor, kept: torch.Tensor, labels: torch.Tensor, loss_kwargs: dict):
    """The host's loss function on the kept columns: each scores the target of its original position (the
    label after it, or ``shift_labels`` at it); padding columns and positions without a target score
    nothing. Zero (finite, with a gradient) when no kept column has a target."""
    ignore = loss_kwargs.get("ignore_index", -100)
    shift_labels = loss_kwargs.get("shift_labels")
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore)
    shift_labels = shift_labels.to(logits.device)
    kept = kept.to(logits.device)
    targets = torch.where(kept >= 0, shift_labels.gather(1, kept.clamp(min=0)), torch.full_like(kept, ignore))
    if not bool((targets != ignore).any()):
        return logits.float().sum() * 0.0
    kwargs = {**loss_kwargs, "shift_labels": targets}
    return model.loss_function(logits=logits, labels=None, vocab_size=logits.shape[-1], **kwargs)


class _CausalLMMixin:
    def forward(self, *args, **kwargs):
        runtime: Optional[Runtime] = runtime_of(self)
        if runtime is None or not runtime.resolved.anchors:  # an unpatched instance, or nothing to reduce
            out = super().forward(*args, **kwargs)
            if runtime is not None and not isinstance(out, tuple):
                out["kept_positions"] = _keep_columns(runtime.latest.kept, _as_int(
                    _arguments(self, args, kwargs).get("logits_to_keep", 0)))
            return out
        named = _arguments(self, args, kwargs)
        labels = named.get("labels")
        logits_to_keep = _as_int(named.get("logits_to_keep", 0))
        selection = None
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dtype == torch.bool:
            tokens = named.get("input_ids") if named.get("input_ids") is not None else named.get("inputs_embeds")
            selection = _PositionSelection(logits_to_keep, tokens.shape[1], tokens.shape[0])
            named["logits_to_keep"] = 0
        named["labels"] = None
        token = _SELECTION.set(selection)
        try:
            out = super().forward(**named)
        finally:
            _SELECTION.reset(token)
        kept = selection.kept if selection is not None else _keep_columns(runtime.latest.kept, logits_to_keep)
        loss = None
        if labels is not None:
            logits = out.logits if hasattr(out, "logits") else out[0]
            if isinstance(logits_to_keep, int) and not logits_to_keep and _removed_nothing(runtime, labels.shape[1]):
                # the host's loss, as the host computes it
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                          **_loss_kwargs(self, named))
            else:
                loss = _reduced_loss(self, logits, kept, labels, _loss_kwargs(self, named))
        if isinstance(out, tuple):
            return out if loss is None else (loss,) + out
        if loss is not None:
            out = type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})
        out["kept_positions"] = kept
        return out

    def generate(self, *args, **kwargs):
        # Without a cache every step is a full forward, which would reduce prompt and generated tokens
        # anew at each step: generate with the cache instead (prefill reduced, decode untouched; a dense
        # model gives the same tokens either way).
        runtime: Optional[Runtime] = runtime_of(self)
        config = kwargs.get("generation_config") or getattr(self, "generation_config", None)
        if (runtime is not None and runtime.resolved.anchors
                and kwargs.get("use_cache", getattr(config, "use_cache", True)) is False):
            warnings.warn("ssm_reduce: generate(use_cache=False) would reduce the whole sequence again at every "
                          "step; generating with use_cache=True (prefill reduced, decode untouched)", stacklevel=2)
            kwargs["use_cache"] = True
        return super().generate(*args, **kwargs)


def _removed_nothing(runtime: Runtime, seq_len: int) -> bool:
    """Whether this thread's latest forward, over ``seq_len`` tokens, kept every real token of every row."""
    stats = runtime.latest.stats
    return seq_len <= 1 or (stats is not None and stats["kept_per_row"] == stats["input_tokens_per_row"])


def _loss_kwargs(model, named: dict) -> dict:
    """The forward's keyword arguments that are not its own parameters: the host hands them to its loss
    function (``num_items_in_batch``, ``ignore_index``, ``shift_labels`` ...)."""
    own = _signature(getattr(type(model), PARENT_ATTR).forward).parameters
    return {k: v for k, v in named.items() if k not in own}


class _BackboneMixin:
    def forward(self, *args, **kwargs):
        runtime: Optional[Runtime] = runtime_of(self)
        if runtime is None:  # an unpatched instance of a patched class
            return super().forward(*args, **kwargs)
        named = _arguments(self, args, kwargs)
        tokens = named.get("input_ids")
        if tokens is None:
            tokens = named.get("inputs_embeds")
        if tokens is None:
            return super().forward(*args, **kwargs)
        batch, seq_len = tokens.shape[:2]
        mask = named.get("attention_mask")
        with runtime.forward(batch, seq_len, tokens.device, mask) as session:
            if session is not None and torch.is_grad_enabled() and any(
                    getattr(block, "gradient_checkpointing", False) and block.training for block in self.layers):
                raise ValueError(
                    "gradient checkpointing while reducing tokens is not supported: the blocks recomputed in the "
                    "backward pass would not see this forward's reduction. Turn it off "
                    "(model.gradient_checkpointing_disable()) or run under torch.no_grad(), or train the unpatched "
                    "model (ssm_reduce.remove(model))"
                )
            out = super().forward(*args, **kwargs)
        kept = kept_positions_for(session, batch, seq_len, tokens.device, mask)
        runtime.record(session, kept)
        if not isinstance(out, tuple):
            out["kept_positions"] = kept
        return out


def _causal_conv(mixer, host, xbc, cache, attention_mask):
    """The host mixer's causal conv of (B, C, L) ``xbc`` in prefill form, caching its conv state;
    returns (B, L, C) with padding zeroed."""
    seq_len = xbc.shape[-1]
    if cache is not None:
        xbc = cache.update_conv_state(xbc, mixer.layer_idx, conv_kernel_size=mixer.conv_kernel_size)
    xbc = host.causal_conv1d_fn(xbc, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, activation=mixer.activation)
    return host.apply_mask_to_padding_states(xbc[:, :, -seq_len:].transpose(1, 2), attention_mask)


def _previous_recurrent_state(cache, layer: int):
    """The SSM state a Mamba-2 layer's cache already holds (None when empty), across transformers
    versions: ``get_recurrent_state`` (5.2x) or the cache layer's ``recurrent_states`` (5.1x)."""
    if cache is None:
        return None
    getter = getattr(cache, "get_recurrent_state", None)
    if getter is not None:
        return getter(layer, state_idx=0)
    if cache.has_previous_state(layer):
        return cache.layers[layer].recurrent_states[0]
    return None


def _ops_mamba2_mixer(mixer, hidden_states, cache, attention_mask, session, scan):
    """transformers' Mamba2Mixer forward (prefill form) with the scan through ``ops.scan_score_mamba2``:
    the fused kernel on CUDA returns the token scores with y. Caches are updated as the host does."""
    host = sys.modules[host_class(mixer).__module__]
    batch, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    layer = mixer.layer_idx
    recurrent_state = _previous_recurrent_state(cache, layer)
    projected = mixer.in_proj(host.apply_mask_to_padding_states(hidden_states, attention_mask))
    gate, xbc, dt = projected.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    xbc = _causal_conv(mixer, host, xbc.transpose(1, 2), cache, attention_mask)
    groups_state = mixer.n_groups * mixer.ssm_state_size
    x, b, c = torch.split(xbc, [mixer.intermediate_size, groups_state, groups_state], dim=-1)
    metric = session.runtime.config.importance
    y, final_state, score, _ = ops.scan_score_mamba2(
        x.reshape(batch, seq_len, mixer.num_heads, mixer.head_dim), dt, -torch.exp(mixer.A_log.float()),
        b.reshape(batch, seq_len, mixer.n_groups, -1), c.reshape(batch, seq_len, mixer.n_groups, -1),
        D=mixer.D, dt_bias=mixer.dt_bias, initial_state=recurrent_state, dt_softplus=True,
        dt_min=float(mixer.time_step_limit[0]), dt_max=float(mixer.time_step_limit[1]), metric=metric,
    )
    if cache is not None:
        cache.update_recurrent_state(final_state, layer_idx=layer)
    y = y.reshape(batch, seq_len, -1)
    session.capture("ssm", y)
    session.capture_score("ssm", metric, score)
    return mixer.out_proj(mixer.norm(y, gate).to(dtype))


def _host_selective_scan(host, hidden_states):
    """transformers' Mamba-1 scan function for anchors to call without its gate: on CUDA (mamba_ssm's
    kernel where installed); None on a CPU, where its torch fallback is slower than the reference."""
    return getattr(host, "mamba_selective_scan", None) if hidden_states.is_cuda else None


def _ops_mamba_mixer(mixer, hidden_states, cache, attention_mask, session, scan):
    """transformers' MambaMixer forward (prefill form) with the scan through ``ops.scan_score_mamba1``
    (or, on the ``host_scan`` route, the host's scan without its gate), which exposes the scan output y
    before the z gate (the host's mixer gates inside its scan)."""
    host = sys.modules[host_class(mixer).__module__]
    dtype = hidden_states.dtype
    projected = mixer.in_proj(host.apply_mask_to_padding_states(hidden_states, attention_mask)).transpose(1, 2)
    xbc, gate = projected.chunk(2, dim=1)
    xbc = _causal_conv(mixer, host, xbc, cache, attention_mask)
    time_step, b, c = torch.split(
        mixer.x_proj(xbc), [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1
    )
    time_step = mixer.dt_proj.weight @ time_step.transpose(1, 2)
    xbc = xbc.transpose(1, 2)
    y, final_state = anchor_scan_mamba1(session, scan, _host_selective_scan(host, hidden_states), xbc, time_step, -torch.exp(mixer.A_log.float()),
                                        b.transpose(1, 2), c.transpose(1, 2), mixer.D.float(), gate,
                                        mixer.dt_proj.bias)
    if cache is not None:
        cache.update_recurrent_state(final_state, mixer.layer_idx)
    return mixer.out_proj(y.transpose(1, 2).to(dtype))


class _MixerMixin(RoutedMixerMixin):
    """transformers anchor mixers: the ops route as ``_ops_mamba2_mixer`` / ``_ops_mamba_mixer``, called as
    the block calls the host's mixer."""

    def _ssm_reduce_ops_call(self, session, scan):
        ops_mixer = _ops_mamba2_mixer if hasattr(self, "num_heads") else _ops_mamba_mixer

        def call(hidden_states, attention_mask=None, **cache):
            return ops_mixer(self, hidden_states, next(iter(cache.values()), None), attention_mask, session, scan)

        return call


class _BlockMixin:
    # Mamba-2 blocks forward their extra keyword arguments to the mixer, Mamba-1 blocks do not.
    _ssm_reduce_mixer_kwargs = True

    def _ssm_reduce_anchor(self, hidden_states) -> AnchorScan:
        # Mamba-2: y enters the gated RMSNorm, where a hook reads it
        return AnchorScan(mamba2=True, dstate=self.mixer.ssm_state_size, host_exposes_y=True)

    def forward(self, hidden_states, *args, **kwargs):
        session = session_of(self)
        if session is None:
            return super().forward(hidden_states, *args, **kwargs)
        # (transformers passes everything but hidden_states by keyword: no signature binding in the
        # per-block hot path unless positional arguments come)
        named = _arguments(self, (hidden_states, *args), kwargs) if args else dict(kwargs)
        named.pop("hidden_states", None)
        cache_name = _cache_argument(getattr(type(self), PARENT_ATTR))
        cache = named.pop(cache_name, None)
        attention_mask = session.block_mask(named.pop("attention_mask", None), hidden_states.device)
        if self.layer_idx not in session.anchors or not session.reduces_at(self.layer_idx):
            return super().forward(hidden_states, **{cache_name: cache}, attention_mask=attention_mask, **named)
        residual = hidden_states
        hidden_states = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        scan = session.scan_route(self._ssm_reduce_anchor(hidden_states), hidden_states.device)
        mixer_kwargs = named if self._ssm_reduce_mixer_kwargs and not scan.through_ops else {}
        with mixer_route(session, self.mixer, scan):  # the mixer's own hooks fire on every route
            hidden_states = self.mixer(hidden_states, **{_cache_argument(host_class(self.mixer)): cache},
                                       attention_mask=attention_mask, **mixer_kwargs)
        hidden_states, residual = session.reduce(self.layer_idx, hidden_states, residual)
        return residual + hidden_states


class _MambaBlockMixin(_BlockMixin):
    _ssm_reduce_mixer_kwargs = False

    def _ssm_reduce_anchor(self, hidden_states) -> AnchorScan:
        # Mamba-1: the host's scan gates y inside (no pre-gate y to read); its scan function can run ungated
        host = sys.modules[host_class(self.mixer).__module__]
        return AnchorScan(mamba2=False, dstate=self.mixer.ssm_state_size, host_exposes_y=False,
                          host_scan=_host_selective_scan(host, hidden_states))


class TransformersAdapter(Adapter):
    name = "transformers"
    supported = _CAUSAL_LM + _BACKBONES
    lm_mixin = _CausalLMMixin
    backbone_mixin = _BackboneMixin
    mixer_mixin = _MixerMixin

    def patch(self, model, runtime: Runtime) -> None:
        super().patch(model, runtime)
        if self.backbone(model) is not model:
            add_hook(model, model.lm_head.register_forward_pre_hook(select_at_lm_head(runtime)))
        for module in (model, self.backbone(model)):  # (the same module twice for a bare backbone: harmless)
            _register_output_capture(module)

    def conv_kernel(self, model) -> int:
        return int(model.config.conv_kernel)

    def block_mixin(self, model) -> type:
        mamba2 = type(model.config).__name__ == "Mamba2Config"
        return _BlockMixin if mamba2 else _MambaBlockMixin

    def anchor_scan(self, block, device) -> AnchorScan:
        return block._ssm_reduce_anchor(torch.empty(0, device=device))

    def ssm_source(self, mixer):
        # Mamba-2: y enters the gated RMSNorm. Mamba-1 anchors scan through ssm_reduce.ops, which
        # captures y itself (the host's scan gates it inside).
        return mixer.norm if hasattr(mixer, "norm") else None


register(TransformersAdapter())
