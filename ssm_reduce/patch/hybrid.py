"""Adapter for transformers' Mamba-attention hybrids (Granite 4.0-H, Nemotron-H, Falcon-H1, Zamba2, Bamba,
Jamba) and FalconMamba.

Anchors are Mamba layers. An anchor layer runs its norm and Mamba mixer, reduces the mixer's output (the
hidden stream) and the layer's input (the residual stream) with one plan, adds them, and runs the rest of
its layer (MLP, MoE) on the kept tokens; every later layer sees the kept tokens. Falcon-H1 layers run
Mamba and attention side by side: their combined output is the hidden stream. Zamba2's shared attention
blocks also read the input embeddings: those are reduced by the same plans.

Every layer after the first reduction is handed, in place of the host's shared arguments:

* Mamba layers: the reduced padding mask;
* attention layers: a causal mask over the kept tokens built with the host's own mask function
  (``create_causal_mask``) for that layer's cache, and rotary embeddings / position ids gathered at the
  kept tokens' original positions (a merged token sits at its latest member's position).

A forward that writes a cache after reducing leaves on it, per attention layer, which cached entries are
real (:class:`KVRecord`): decode steps and later prefills build each attention layer's mask from it, so
the cache holds only kept tokens and decoding continues at the original positions (the host's position
ids count the prompt's tokens: generate derives them from the attention mask, a forward without them from
layer 0's cache, which always sees every token).

y for ``importance_source="ssm"`` comes from the host's module-level scan function (``scan_calls``).
"""

from __future__ import annotations

import contextvars
import functools
import sys
from typing import Optional

import torch

from .. import ops
from ..ops.route import AnchorScan, Scan
from ..runtime import Runtime
from . import scan_calls
from .base import (Adapter, RoutedMixerMixin, add_hook, capture_hook, host_class, mixer_route, register, restore_class,
                   runtime_of, session_of, swap_class)
from .hybrid_layouts import LAYOUT_OF_UNIT, LAYOUTS, Layout, layout_of as _layout_of
from .hf import _BackboneMixin, _CausalLMMixin, _arguments, _register_output_capture, select_at_lm_head

MIN_TRANSFORMERS = (5, 25)
INDEX_ATTR = "_ssm_reduce_index"
RECORD_ATTR = "_ssm_reduce_kv"
# ----------------------------------------------------------------------------------------------------------
# What attention layers hold across forwards, and one forward's view of them.


class KVRecord:
    """Left on a cache by a forward that reduced: per attention layer, which cached entries are real
    ((B, T) bool); how many columns and real tokens the host's cache would hold (``dense_columns``,
    ``dense_real`` (B,))."""

    def __init__(self, dense_columns: int, dense_real: torch.Tensor):
        self.valid: dict[int, torch.Tensor] = {}
        self.dense_columns = dense_columns
        self.dense_real = dense_real


def kv_record(cache) -> Optional[KVRecord]:
    return None if cache is None else cache.__dict__.get(RECORD_ATTR)


class _Book:
    """One backbone forward of a patched hybrid: the arguments its layers need after a reduction."""

    def __init__(self, runtime: Runtime, layout: Layout, config, host_mask, batch: int, seq_len: int):
        self.runtime, self.layout, self.config = runtime, layout, config
        self.host_mask = host_mask if isinstance(host_mask, torch.Tensor) and host_mask.dim() == 2 else None
        self.batch, self.seq_len = batch, seq_len
        self.cache = None
        self.session = None  # the forward's session (None: it does not reduce), seen by its layers
        self.kv: dict[int, torch.Tensor] = {}  # attention layer -> (B, T) real entries after this forward
        self._past: dict = {}  # attention layer -> (B, T0) real entries before it (None: none)
        self._gathered: dict = {}

    def input_valid(self, device) -> torch.Tensor:
        """(B, L) real tokens of this forward's input."""
        if self.host_mask is None:
            return torch.ones(self.batch, self.seq_len, dtype=torch.bool, device=device)
        return self.host_mask[:, -self.seq_len:].to(device=device, dtype=torch.bool)

    def _past_valid(self, cache, index: int, device) -> Optional[torch.Tensor]:
        if cache is None:
            return None
        past_len = int(cache.get_seq_length(index))
        if not past_len:
            return None
        record = kv_record(cache)
        past = record.valid.get(index) if record is not None else None
        if past is None:
            if self.host_mask is not None and self.host_mask.shape[1] == past_len + self.seq_len:
                past = self.host_mask[:, :past_len].to(dtype=torch.bool)
            else:
                past = torch.ones(self.batch, past_len, dtype=torch.bool, device=device)
        if past.shape != (self.batch, past_len):
            raise RuntimeError(f"ssm_reduce: layer {index}'s cache holds {past_len} entries for {past.shape[0]} rows "
                               f"but its record says {tuple(past.shape)}; was the cache reordered or cropped?")
        return past.to(device)

    def attention_mask(self, index: int, hidden: torch.Tensor, host_mask, cache, session):
        """The mask attention layer ``index`` needs for ``hidden``: the host's until anything was reduced (in this
        forward or one before that wrote ``cache``), then one over the kept tokens and the layer's real entries."""
        if cache is not None:
            self.cache = cache
        new = session.state.valid.to(hidden.device) if session is not None else self.input_valid(hidden.device)
        past = self._past_valid(cache, index, hidden.device)
        full = new if past is None else torch.cat([past, new], 1)
        self.kv[index] = full
        self._past[index] = past
        if (session is None or not session.reduced) and kv_record(cache) is None:
            return host_mask
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=full, cache=cache,
                                  layer_idx=index)

    def gathered(self, name: str, value, session):
        """A per-position argument (position ids, rotary (cos, sin), an extra stream) at the kept tokens."""
        if value is None:
            return None
        key = (name, id(value), len(session.n_real_after))
        if key not in self._gathered:
            self._gathered[key] = (value, self._gather(name, value, session))
        return self._gathered[key][1]

    def _gather(self, name, value, session):
        if isinstance(value, (tuple, list)):
            return type(value)(self._gather(name, v, session) for v in value)
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[1] != self.seq_len:
            return value
        if name in self.layout.streams:  # a stream: the same merges as the residual stream
            for plan in session.plans.values():
                value = ops.apply_plan([value], plan.slot, [plan.residual_weight], plan.n_out)[0]
            return value
        columns = session.state.pos.clamp(min=0).to(value.device)
        rows = value.expand(columns.shape[0], *value.shape[1:]) if value.shape[0] == 1 else value
        if value.dim() == 2:
            return rows.gather(1, columns)
        return rows.gather(1, columns[..., None].expand(-1, -1, value.shape[-1]))

    def finish(self, session) -> None:
        """Leave this forward's record on its cache, and its attention statistics as this thread's latest."""
        cache = self.cache
        record = kv_record(cache)
        reduced = session is not None and session.reduced
        real = self.input_valid(next(iter(self.kv.values())).device if self.kv else "cpu").sum(1).double()
        if cache is not None and (record is not None or reduced):
            if record is None:
                past = int(cache.get_seq_length(0)) - self.seq_len
                record = KVRecord(past, torch.zeros_like(real) + past)
                cache.__dict__[RECORD_ATTR] = record
            record.valid.update(self.kv)
            record.dense_columns += self.seq_len
            record.dense_real = record.dense_real.to(real.device) + real
        if self.seq_len <= 1 or not self.kv:
            return
        stats = self.runtime.latest.stats
        if stats is None:
            return
        layers = {}
        for index, full in sorted(self.kv.items()):
            past = self._past.get(index)
            if record is not None:
                dense_real, dense_columns = record.dense_real, record.dense_columns
            else:  # nothing reduced before this forward: the past entries are the host's
                dense_real = real + (0 if past is None else past.sum(1).to(real))
                dense_columns = self.seq_len + (0 if past is None else past.shape[1])
            entry = {"attended_tokens": float(full.sum(1).double().mean()),
                     "dense_attended_tokens": float(dense_real.mean()),
                     "kv_cache_bytes": None, "dense_kv_cache_bytes": None}
            layer = cache.layers[index] if cache is not None and index < len(cache.layers) else None
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor) and keys.shape[-2] == full.shape[1]:
                size = keys.numel() * keys.element_size() + values.numel() * values.element_size()
                entry["kv_cache_bytes"] = int(size)
                entry["dense_kv_cache_bytes"] = int(round(size * dense_columns / max(1, full.shape[1])))
            layers[index] = entry
        stats["attention_layers"] = layers


_BOOK: contextvars.ContextVar = contextvars.ContextVar("ssm_reduce_hybrid_forward", default=None)


# ----------------------------------------------------------------------------------------------------------
# The patched classes.


class _HybridLMMixin(_CausalLMMixin):
    def forward(self, *args, **kwargs):
        runtime = runtime_of(self)
        if runtime is not None and runtime.resolved.anchors:
            asked = _arguments(self, args, kwargs).get("output_router_logits")
            if asked if asked is not None else getattr(self.config, "output_router_logits", False):
                raise ValueError("output_router_logits: the routers' load-balancing loss is a training loss over every "
                                 "token of every layer, and reduction gives later layers fewer tokens; turn it off "
                                 "(output_router_logits=False), or train the unpatched model (ssm_reduce.remove)")
        return super().forward(*args, **kwargs)

    def generate(self, *args, **kwargs):
        runtime = runtime_of(self)
        config = kwargs.get("generation_config") or getattr(self, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
        if runtime is not None and runtime.resolved.anchors and beams > 1:
            raise ValueError(f"num_beams={beams}: beam search reorders the attention caches, whose entries after a "
                             "reduced prefill are the kept tokens of each row; use greedy decoding or sampling "
                             "(num_beams=1) while reducing, or ssm_reduce.remove(model) first")
        return super().generate(*args, **kwargs)


class _HybridBackboneMixin(_BackboneMixin):
    def forward(self, *args, **kwargs):
        runtime: Optional[Runtime] = runtime_of(self)
        if runtime is None or not runtime.resolved.anchors:
            return super().forward(*args, **kwargs)
        named = _arguments(self, args, kwargs)
        tokens = named.get("input_ids") if named.get("input_ids") is not None else named.get("inputs_embeds")
        if tokens is None:
            return super().forward(*args, **kwargs)
        mask = named.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise ValueError("attention_mask: a hybrid model that reduces tokens needs the 2D padding mask "
                             f"(batch, length), got {type(mask).__name__}"
                             f"{'' if not isinstance(mask, torch.Tensor) else ' of shape ' + str(tuple(mask.shape))}; "
                             "its layers' masks are built over the kept tokens")
        cache = named.get("cache", named.get("past_key_values"))
        layers = getattr(cache, "layers", None) or ()
        if any(type(layer).__name__.startswith(("Static", "LinearAttentionAndStatic")) for layer in layers):
            raise ValueError("cache: a static cache cannot hold the kept tokens of a reduced prefill; use the default "
                             "dynamic cache (cache_implementation=None) while reducing")
        book = _Book(runtime, _layout_of(self), self.config, mask, *tokens.shape[:2])
        token = _BOOK.set(book)
        try:
            out = super().forward(*args, **kwargs)
        finally:
            _BOOK.reset(token)
        book.finish(book.session)
        return out


def _mix(session, adapter: "HybridAdapter", mixer, *args, **kwargs):
    """Call an anchor's Mamba mixer on the route ``ops.route.anchor_scan`` picks."""
    device = (args[0] if args else kwargs["hidden_states"]).device
    scan = session.scan_route(adapter.mixer_scan(mixer, device), device)
    with mixer_route(session, mixer, scan):
        return mixer(*args, **kwargs)


class _LayerMixin:
    """Every top-level layer: the arguments a reduction changes, and the anchor forward."""

    def forward(self, hidden_states, *args, **kwargs):
        book: Optional[_Book] = _BOOK.get()
        runtime = runtime_of(self)
        if book is None or runtime is None or book.runtime is not runtime:
            return super().forward(hidden_states, *args, **kwargs)
        session = book.session = runtime.session()
        layout, index = book.layout, self.__dict__[INDEX_ATTR]
        attends = layout.attends(self)
        if not attends and (session is None or (not session.reduced and index not in session.anchors)):
            return super().forward(hidden_states, *args, **kwargs)  # nothing of this layer's changes
        named = _arguments(self, (hidden_states, *args), kwargs)
        cache = named.get("cache")
        if session is not None and session.reduced:
            for name in ("position_ids", "position_embeddings", *layout.streams):
                if name in named:
                    named[name] = book.gathered(name, named[name], session)
        if session is not None and layout.mixer(self) is not None and layout.mamba_mask_arg in named:
            named[layout.mamba_mask_arg] = session.block_mask(named[layout.mamba_mask_arg], hidden_states.device)
        if attends:
            named[layout.attention_mask_arg] = book.attention_mask(index, hidden_states,
                                                                   named.get(layout.attention_mask_arg), cache, session)
        if layout.unit(self) is self and _anchor_reduces(session, index):
            return layout.anchor(self, named, session, index, functools.partial(_mix, session, ADAPTER))
        return super().forward(**named)


class _UnitMixin:
    """A Mamba unit inside a top-level layer (Zamba2's ``mamba_decoder``): the anchor forward."""

    def forward(self, hidden_states, *args, **kwargs):
        session = session_of(self)
        index = self.__dict__.get(INDEX_ATTR)
        if not _anchor_reduces(session, index):
            return super().forward(hidden_states, *args, **kwargs)
        named = _arguments(self, (hidden_states, *args), kwargs)
        named["attention_mask"] = session.block_mask(named.get("attention_mask"), hidden_states.device)
        return LAYOUT_OF_UNIT[host_class(self).__name__].anchor(self, named, session, index,
                                                                 functools.partial(_mix, session, ADAPTER))


def _anchor_reduces(session, index) -> bool:
    return session is not None and index in session.anchors and session.reduces_at(index)


class _MixerMixin(RoutedMixerMixin):
    """Anchor mixers: the host's forward on every route; on a route through ``ssm_reduce.ops`` the host's scan
    function is replaced for that call (``scan_calls``)."""

    def _ssm_reduce_ops_call(self, session, scan: Scan):
        return functools.partial(host_class(self).forward, self)


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def _scan_function(mixer) -> tuple[object, str]:
    """(host module, name) of the scan function a Mamba mixer calls."""
    module = sys.modules[host_class(mixer).__module__]
    for name in ("mamba2_scan_forward", "mamba_scan_forward"):
        if callable(getattr(module, name, None)):
            return module, name
    raise TypeError(f"ssm_reduce does not know the scan of {host_class(mixer).__name__} (module {module.__name__}); "
                    "this transformers version is not supported for token reduction of this model")


class HybridAdapter(Adapter):
    name = "transformers-hybrid"
    supported = tuple(name for layout in LAYOUTS for name in (*layout.lm, *layout.backbone))
    lm_mixin = _HybridLMMixin
    backbone_mixin = _HybridBackboneMixin
    mixer_mixin = _MixerMixin

    def matches(self, model) -> bool:
        return _layout_of(model) is not None

    def layout(self, model) -> Layout:
        return _layout_of(model)

    @staticmethod
    def backbone(model):
        if hasattr(model, "lm_head"):
            return getattr(model, model.base_model_prefix)
        return model

    def blocks(self, model):
        return list(enumerate(self.backbone(model).layers))

    def mamba_layers(self, model) -> list[int]:
        layout = self.layout(model)
        return [i for i, layer in self.blocks(model) if layout.mixer(layer) is not None]

    def check(self, model) -> None:
        version = transformers_version()
        found = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if found < MIN_TRANSFORMERS:
            raise ValueError(f"token reduction of {type(model).__name__} needs transformers >= "
                             f"{'.'.join(map(str, MIN_TRANSFORMERS))} (its layers take `cache` and its mixers call a "
                             f"module-level scan); found {version}")
        layout = self.layout(model)
        for index, layer in self.blocks(model):
            mixer = layout.mixer(layer)
            if mixer is not None:
                _scan_function(mixer)
        if not self.mamba_layers(model):
            raise ValueError(f"this {type(model).__name__} has no Mamba layers to reduce at")

    def check_config(self, model, config) -> None:
        layout = self.layout(model)
        if layout.reduces_streams and config.method == "tor-official":
            raise ValueError(f"method 'tor-official' cannot serve {type(model).__name__}: its shared attention blocks "
                             "re-read the input embeddings, which must be reduced by the same plans, and tor-official "
                             "makes none; use another method")

    def conv_kernel(self, model) -> int:
        layout = self.layout(model)
        mixer = next(layout.mixer(layer) for _, layer in self.blocks(model) if layout.mixer(layer) is not None)
        return int(mixer.conv1d.kernel_size[0])

    def mixer_scan(self, mixer, device) -> AnchorScan:
        module, name = _scan_function(mixer)
        if name == "mamba2_scan_forward":  # y is the scan function's output, read there
            return AnchorScan(mamba2=True, dstate=int(mixer.ssm_state_size), host_exposes_y=True, replaceable=False)
        host_scan = getattr(module, "mamba_selective_scan", None) if torch.device(device).type == "cuda" else None
        return AnchorScan(mamba2=False, dstate=int(mixer.ssm_state_size), host_exposes_y=False, host_scan=host_scan)

    def anchor_scan(self, block, device) -> AnchorScan:
        return self.mixer_scan(_mixer_of(block), device)

    def ssm_source(self, mixer):
        return None  # the scan function hands y over (scan_calls)

    def patch(self, model, runtime: Runtime) -> None:
        layout = self.layout(model)
        backbone = self.backbone(model)
        runtime.patched_whole_lm = backbone is not model
        if backbone is not model:
            swap_class(model, self.lm_mixin, runtime)
            add_hook(model, model.lm_head.register_forward_pre_hook(select_at_lm_head(runtime)))
        swap_class(backbone, self.backbone_mixin, runtime)
        for module in (model, backbone):
            _register_output_capture(module)
        for index, layer in self.blocks(model):
            swap_class(layer, _LayerMixin, runtime)
            layer.__dict__[INDEX_ATTR] = index
            mixer = layout.mixer(layer)
            if mixer is None:
                continue
            unit = layout.unit(layer)
            layer.__dict__["_ssm_reduce_mixer"] = mixer
            if unit is not layer:
                swap_class(unit, _UnitMixin, runtime)
                unit.__dict__[INDEX_ATTR] = index
            if index not in runtime.resolved.anchors:
                continue
            module, name = _scan_function(mixer)
            scan_calls.watch(module, name)
            swap_class(mixer, self.mixer_mixin, runtime)
            if "gated" in runtime.sources:
                add_hook(layer, mixer.out_proj.register_forward_pre_hook(capture_hook(runtime, "gated")))

    def unpatch(self, model) -> None:
        layout = self.layout(model)
        backbone = self.backbone(model)
        for _, layer in self.blocks(model):
            mixer = layout.mixer(layer)
            unit = layout.unit(layer)
            if mixer is not None:
                restore_class(mixer)
            for module in {id(layer): layer, id(unit): unit}.values():
                module.__dict__.pop(INDEX_ATTR, None)
                module.__dict__.pop("_ssm_reduce_mixer", None)
                restore_class(module)
        restore_class(backbone)
        if backbone is not model:
            restore_class(model)


def _mixer_of(block):
    unit = block.__dict__.get("_ssm_reduce_mixer")
    if unit is None:
        raise ValueError("not a Mamba layer")
    return unit


ADAPTER = register(HybridAdapter())
