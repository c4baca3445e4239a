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
* Importance from the SSM output y (before the gate, the paper's Eq. 5), at anchor layers only; every
  other layer keeps the host's fastest path. Mamba-2's default path fuses conv, scan, gated norm and
  out_proj into one kernel, so y is not visible there. Anchors therefore either run the host's
  unfused path (``use_mem_eff_path`` off for that call: separate conv, ``mamba_chunk_scan_combined``,
  gated RMSNorm, out_proj — about one extra read and write of the layer's activations), with y read
  at the gated norm's input; or run the mixer through ``ssm_reduce.ops`` (in_proj, conv,
  ``scan_score_mamba2`` / ``scan_score_mamba1``, gate, out_proj), which returns y and its scores from
  the scan itself. The ops path is taken where the compiled kernels run (CUDA, state sizes
  ``ops.KERNEL_DSTATES``), and wherever the host has no pre-gate y to read: Mamba-1 (its scan gates y
  inside, and its fast path also fuses out_proj) and Mamba-2 without the gated norm
  (``rmsnorm=False``); where the compiled kernel does not serve, those mixers call the host's own
  scan function without its gate and gate y themselves (``ssm_reduce.ops.route.anchor_scan`` decides).
  The block's own add + norm always run as the host wrote them; only the mixer call takes the route:
  anchor mixers' classes are swapped for one whose ``forward`` and fast-path flags are properties that
  answer the calling forward's route (an instance-level ``forward``, e.g. an accelerate hook, is
  bypassed for that call only), so no module attribute changes while a forward runs. The generation
  cache (conv and SSM states in ``inference_params``) is filled exactly as the host mixer fills it.
  Per-channel D (``D_has_hdim``) is added outside the scan.
"""

from __future__ import annotations

import sys
from collections import namedtuple

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.route import AnchorScan, Scan
from ..runtime import Runtime, kept_positions_for
from .base import (Adapter, RoutedMixerMixin, anchor_scan_mamba1, class_names, host_class, mixer_route, register,
                   runtime_of, session_of, swap_class)

ReducedLMOutput = namedtuple("ReducedLMOutput", ["logits", "kept_positions"])
# Mixer classes the adapter supports (mamba_ssm.modules: Mamba-1, Mamba-2).
_MIXERS = ("Mamba", "Mamba2")
# Attributes that select a mixer's fused fast path (Mamba-2, Mamba-1).
_FAST_PATH_FLAGS = ("use_mem_eff_path", "use_fast_path")
# Mixer arguments of packed variable-length batches (several documents in one row).
_PACKED = ("seq_idx", "cu_seqlens")


def _is_decode(inference_params) -> bool:
    return inference_params is not None and getattr(inference_params, "seqlen_offset", 0) > 0


class _LMHeadMixin:
    def forward(self, input_ids, position_ids=None, inference_params=None, num_last_tokens=0, **mixer_kwargs):
        out = super().forward(input_ids, position_ids=position_ids, inference_params=inference_params,
                              num_last_tokens=num_last_tokens, **mixer_kwargs)
        runtime = runtime_of(self)
        if runtime is None:  # an unpatched instance of a patched class
            return out
        kept = runtime.latest.kept
        last = int(num_last_tokens)  # (the host slices only when it is positive; a 0-d tensor counts)
        kept = kept if last <= 0 else kept[:, -last:]
        return ReducedLMOutput(logits=out.logits, kept_positions=kept)


class _MixerModelMixin:
    def forward(self, input_ids, inference_params=None, **mixer_kwargs):
        runtime: Runtime = runtime_of(self)
        if runtime is None:  # an unpatched instance of a patched class
            return super().forward(input_ids, inference_params=inference_params, **mixer_kwargs)
        batch, seq_len = input_ids.shape[:2]
        packed = [name for name in _PACKED if mixer_kwargs.get(name) is not None]
        if packed and runtime.resolved.anchors and seq_len > 1 and not _is_decode(inference_params):
            raise ValueError(
                f"{packed[0]}: packed variable-length sequences are not supported with token reduction (merges "
                "would cross document boundaries); pass one sequence per row, or ssm_reduce.remove(model) first"
            )
        with runtime.forward(batch, seq_len, input_ids.device, None, reduce=not _is_decode(inference_params)) as session:
            out = super().forward(input_ids, inference_params=inference_params, **mixer_kwargs)
        runtime.record(session, kept_positions_for(session, batch, seq_len, input_ids.device, None))
        return out


def _conv(mixer, x, seqlen):
    """The host mixer's causal conv + activation of (B, C, L) ``x`` (its own kernel when it has one)."""
    fn = getattr(_host_module(mixer), "causal_conv1d_fn", None)
    if fn is not None and mixer.activation in ("silu", "swish"):
        return fn(x, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, activation=mixer.activation)
    return mixer.act(mixer.conv1d(x)[..., :seqlen])


def _host_scan(mixer):
    """The host module's scan function that runs without the gate (None when it has none)."""
    name = "mamba_chunk_scan_combined" if _is_mamba2(mixer) else "selective_scan_fn"
    return getattr(_host_module(mixer), name, None)


def _host_module(mixer):
    """The module that defines the host's mixer class (anchor mixers' classes are swapped)."""
    return sys.modules[host_class(mixer).__module__]


def _is_mamba2(mixer) -> bool:
    return "Mamba2" in class_names(mixer)


def _anchor(mixer, mixer_kwargs) -> AnchorScan:
    """What the scan route needs to know of an anchor mixer. Mamba-2 with its gated norm shows y at the
    norm's input; Mamba-1 and norm-less Mamba-2 gate y inside. Extra mixer arguments and tensor
    parallelism (Mamba-2 ``process_group``) keep the host's path."""
    mamba2 = _is_mamba2(mixer)
    parallel = mamba2 and getattr(mixer, "process_group", None) is not None
    return AnchorScan(mamba2=mamba2, dstate=mixer.d_state, host_exposes_y=mamba2 and getattr(mixer, "rmsnorm", True),
                      host_scan=_host_scan(mixer), replaceable=not mixer_kwargs and not parallel)


def _ops_mamba2(mixer, session, u, inference_params, scan: Scan):
    """mamba_ssm ``Mamba2.forward`` (prefill form) with the scan through ``ops.scan_score_mamba2`` (or, on
    the ``host_scan`` route, the host's scan without its gate); y is captured before the gate."""
    batch, seqlen, _ = u.shape
    conv_state = ssm_state = None
    if inference_params is not None:
        conv_state, ssm_state = mixer._get_states_from_cache(inference_params, batch)
    zxbcdt = mixer.in_proj(u)
    groups_state = mixer.ngroups * mixer.d_state
    d_mlp = (zxbcdt.shape[-1] - 2 * mixer.d_ssm - 2 * groups_state - mixer.nheads) // 2
    z0, x0, z, xbc, dt = torch.split(zxbcdt, [d_mlp, d_mlp, mixer.d_ssm, mixer.d_ssm + 2 * groups_state, mixer.nheads], dim=-1)
    xbc = xbc.transpose(1, 2)
    if conv_state is not None:
        conv_state.copy_(F.pad(xbc, (mixer.d_conv - seqlen, 0)))
    xbc = _conv(mixer, xbc, seqlen).transpose(1, 2)
    x, b, c = torch.split(xbc, [mixer.d_ssm, groups_state, groups_state], dim=-1)
    metric = session.runtime.config.importance
    x = x.reshape(batch, seqlen, mixer.nheads, mixer.headdim)
    b, c = b.reshape(batch, seqlen, mixer.ngroups, -1), c.reshape(batch, seqlen, mixer.ngroups, -1)
    A = -torch.exp(mixer.A_log.float())
    per_channel_d = getattr(mixer, "D_has_hdim", False)  # D (H * P): added here, not by the scan
    score = None
    if scan is not Scan.HOST_SCAN:
        y, final_state, score, _ = ops.scan_score_mamba2(
            x, dt, A, b, c, D=None if per_channel_d else mixer.D, dt_bias=mixer.dt_bias, dt_softplus=True,
            dt_min=float(mixer.dt_limit[0]), dt_max=float(mixer.dt_limit[1]), metric=metric,
        )
    else:  # no compiled kernel here: the host's own scan without its gate (y is scored by the session)
        y, final_state = _host_scan(mixer)(x, dt, A, b, c, chunk_size=mixer.chunk_size, D=None if per_channel_d else mixer.D,
                                   dt_bias=mixer.dt_bias, dt_softplus=True, dt_limit=tuple(mixer.dt_limit),
                                   return_final_states=True)
    if per_channel_d:
        y, score = y + x * mixer.D.view(mixer.nheads, mixer.headdim).to(x.dtype), None
    if ssm_state is not None:
        ssm_state.copy_(final_state)
    y = y.reshape(batch, seqlen, -1)
    session.capture("ssm", y)
    if score is not None:
        session.capture_score("ssm", metric, score)
    y = mixer.norm(y, z) if mixer.rmsnorm else y * F.silu(z)
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return mixer.out_proj(y.to(u.dtype))


def _ops_mamba1(mixer, session, u, inference_params, scan: Scan):
    """mamba_ssm ``Mamba.forward`` (prefill form) with the scan through ``ops.scan_score_mamba1`` (or, on
    the ``host_scan`` route, the host's ``selective_scan_fn`` without its gate), which exposes y before
    the z gate."""
    batch, seqlen, _ = u.shape
    conv_state = ssm_state = None
    if inference_params is not None:
        conv_state, ssm_state = mixer._get_states_from_cache(inference_params, batch)
    x, z = mixer.in_proj(u).transpose(1, 2).chunk(2, dim=1)
    if conv_state is not None:
        conv_state.copy_(F.pad(x, (mixer.d_conv - seqlen, 0)))
    x = _conv(mixer, x, seqlen)
    dt, b, c = torch.split(mixer.x_proj(x.transpose(1, 2)), [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    y, final_state = anchor_scan_mamba1(
        session, scan, _host_scan(mixer), x, mixer.dt_proj.weight @ dt.transpose(1, 2),
        -torch.exp(mixer.A_log.float()), b.transpose(1, 2), c.transpose(1, 2), mixer.D.float(), z,
        None if mixer.dt_proj.bias is None else mixer.dt_proj.bias.float(),
    )
    if ssm_state is not None:
        ssm_state.copy_(final_state)
    return mixer.out_proj(y.transpose(1, 2).to(u.dtype))


class _MixerMixin(RoutedMixerMixin):
    """mamba_ssm anchor mixers: the ops route as ``_ops_mamba2`` / ``_ops_mamba1``; on the host's route the
    fast-path flags read False for that call (the fused kernels hide y)."""

    def _ssm_reduce_ops_call(self, session, scan: Scan):
        ops_mixer = _ops_mamba2 if _is_mamba2(self) else _ops_mamba1
        return lambda u, inference_params=None: ops_mixer(self, session, u, inference_params, scan)


def _fast_path_flag(name: str) -> property:
    """A mixer flag that selects its fused fast path, off for the call of an anchor on the host's route
    (the fused kernels hide y)."""

    def get(self):
        if name not in self.__dict__:
            raise AttributeError(name)
        route = self._ssm_reduce_route()
        return False if route is not None and not route[0].through_ops else self.__dict__[name]

    def put(self, value):
        self.__dict__[name] = value

    return property(get, put)


for _flag in _FAST_PATH_FLAGS:
    setattr(_MixerMixin, _flag, _fast_path_flag(_flag))


class _BlockMixin:
    def forward(self, hidden_states, residual=None, inference_params=None, **mixer_kwargs):
        session = session_of(self)
        if session is None or self.layer_idx not in session.anchors or not session.reduces_at(self.layer_idx):
            return super().forward(hidden_states, residual, inference_params=inference_params, **mixer_kwargs)
        mixer = self.mixer
        # the block's add + norm run as the host wrote them; only the mixer call takes the anchor's route
        with mixer_route(session, mixer, session.scan_route(_anchor(mixer, mixer_kwargs), hidden_states.device)):
            hidden_states, residual = super().forward(hidden_states, residual, inference_params=inference_params,
                                                      **mixer_kwargs)
        return _reduce_unpadded(session, self.layer_idx, hidden_states, residual)


KV_ATTR = "_ssm_reduce_kv"


class _Offset:
    """``inference_params`` as one attention layer sees it after a reduced prefill: its own cache length as
    the offset (the host's counts the prompt's tokens; this layer's cache holds the tokens it saw)."""

    def __init__(self, params, offset: int):
        self._params, self.seqlen_offset, self.lengths_per_sample = params, offset, None

    def __getattr__(self, name):
        return getattr(self._params, name)


class _AttentionMixin:
    """mamba_ssm MHA layers: after a reduced prefill, each keeps its own cache length (``KV_ATTR`` on the call's
    ``inference_params``) and decodes at it. Without rotary embeddings (``check``) positions do not enter."""

    def forward(self, x, inference_params=None, **kwargs):
        runtime = runtime_of(self)
        if runtime is None or inference_params is None:
            return super().forward(x, inference_params=inference_params, **kwargs)
        record = inference_params.__dict__.get(KV_ATTR)
        if inference_params.seqlen_offset == 0:
            out = super().forward(x, inference_params=inference_params, **kwargs)
            session = runtime.session()
            if session is not None and session.reduced:
                inference_params.__dict__.setdefault(KV_ATTR, {})[self.layer_idx] = x.shape[1]
            elif record is not None:
                record.pop(self.layer_idx, None)
            return out
        if record is None or self.layer_idx not in record:
            return super().forward(x, inference_params=inference_params, **kwargs)
        if inference_params.lengths_per_sample is not None:
            raise ValueError("inference_params.lengths_per_sample: per-row cache lengths are not supported after a "
                             "reduced prefill")
        offset = record[self.layer_idx]
        out = super().forward(x, inference_params=_Offset(inference_params, offset), **kwargs)
        record[self.layer_idx] = offset + x.shape[1]
        return out


def _reduce_unpadded(session, layer: int, hidden_states, residual):
    """``session.reduce``, refusing a plan that leaves rows of different lengths: mamba_ssm mixers take no
    padding mask, so padding columns would run through every later conv and scan into the real tokens
    after them (only per-row protection masks of different sizes make the rows' budgets differ)."""
    hidden_states, residual = session.reduce(layer, hidden_states, residual)
    if not bool(session.state.valid.all()):
        kept = session.state.valid.sum(1).tolist()
        raise ValueError(
            f"mask: at layer {layer} the rows kept different numbers of tokens ({kept}), because their protection "
            "masks differ; mamba_ssm models take no padding mask, so every row must keep as many. Protect as "
            "many positions in every row, or run the transformers model (ssm_reduce.load_model)"
        )
    return hidden_states, residual


class MambaSsmAdapter(Adapter):
    name = "mamba_ssm"
    supported = ("MambaLMHeadModel", "MixerModel")
    lm_mixin = _LMHeadMixin
    backbone_mixin = _MixerModelMixin
    mixer_mixin = _MixerMixin

    def check(self, model) -> None:
        for index, block in enumerate(self.backbone(model).layers):
            name = type(block.mixer).__name__
            if class_names(block.mixer) & set(_MIXERS):
                continue
            if name == "MHA":
                rotary = int(getattr(block.mixer, "rotary_emb_dim", 0) or 0)
                if rotary:
                    raise ValueError(
                        f"model: layer {index} is a mamba_ssm MHA layer with rotary embeddings (rotary_emb_dim="
                        f"{rotary}); its positions come from the cache offset, not from the tokens, so the kept "
                        "tokens would attend at wrong positions. Token reduction serves mamba_ssm attention layers "
                        "without rotary embeddings; for rotary hybrids use a transformers hybrid (docs/hybrids.md)"
                    )
                continue
            raise ValueError(
                f"model: layer {index} is a mamba_ssm {name} layer; token reduction supports models whose "
                f"layers are {' or '.join(_MIXERS)}, or MHA without rotary embeddings"
            )
        if self.mamba_layers(model) == []:
            raise ValueError("model: it has no Mamba layers to reduce at")

    def mamba_layers(self, model):
        layers = self.backbone(model).layers
        mamba = [i for i, block in enumerate(layers) if class_names(block.mixer) & set(_MIXERS)]
        return None if len(mamba) == len(layers) else mamba

    def conv_kernel(self, model) -> int:
        first = next(b for b in self.backbone(model).layers if class_names(b.mixer) & set(_MIXERS))
        return int(getattr(first.mixer, "d_conv", 4))

    def patch(self, model, runtime: Runtime) -> None:
        super().patch(model, runtime)
        for block in self.backbone(model).layers:
            if type(block.mixer).__name__ == "MHA":
                swap_class(block.mixer, _AttentionMixin, runtime)

    def block_mixin(self, model) -> type:
        return _BlockMixin


    def anchor_scan(self, block, device) -> AnchorScan:
        return _anchor(block.mixer, {})

    def ssm_source(self, mixer):
        # Mamba-2 (unfused path): y enters the gated RMSNorm. Mamba-1 and norm-less Mamba-2 anchors run
        # through ssm_reduce.ops, which captures y itself.
        return getattr(mixer, "norm", None)


register(MambaSsmAdapter())
