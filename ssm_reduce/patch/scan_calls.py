"""The scan functions of transformers' hybrid model modules, seen from an anchor.

transformers 5.25 mixers call a module-level scan (``mamba2_scan_forward`` for Mamba-2 mixers, which returns
y before the gate; ``mamba_scan_forward`` for Mamba-1 mixers, which gates y inside). ``watch`` wraps such a
function once per host module. The wrapper is transparent for every call but one made by an anchor mixer
inside its block's reduction (``base.mixer_route``): there it hands y to the forward's session — for a
Mamba-2 scan the host's own output; for a Mamba-1 scan it runs the scan on the route
``ssm_reduce.ops.route.anchor_scan`` chose (``base.anchor_scan_mamba1``), which exposes y before the gate,
and updates the cache as the host does. Nothing changes for calls from other threads or unpatched models.
"""

from __future__ import annotations

import functools
import threading

import torch

from ..ops.route import Scan
from .base import anchor_scan_mamba1

ORIGINAL_ATTR = "_ssm_reduce_original"
_LOCK = threading.Lock()


def _route(mixer):
    """(scan, session) of this thread's forward at an anchor mixer inside its reduction, or None."""
    route = getattr(mixer, "_ssm_reduce_route", None)
    return None if route is None else route()


def _mamba2_call(original):
    @functools.wraps(original)
    def scan(mixer, *args, **kwargs):
        y = original(mixer, *args, **kwargs)
        route = _route(mixer)
        if route is not None and "ssm" in route[1].runtime.sources:
            route[1].capture("ssm", y)
        return y

    return scan


def _mamba1_call(original, module):
    @functools.wraps(original)
    def scan(mixer, hidden_states, time_step, B, C, gate, cache, **kwargs):
        route = _route(mixer)
        if route is None or not route[0].through_ops:
            return original(mixer, hidden_states, time_step, B, C, gate, cache, **kwargs)
        scan_route, session = route
        layer = mixer.layer_idx
        initial = None
        if cache is not None and cache.has_previous_state(layer):
            initial = cache.get_recurrent_state(layer, state_idx=0)
        host_scan = getattr(module, "mamba_selective_scan", None) if hidden_states.is_cuda else None
        if scan_route is Scan.HOST_SCAN and (host_scan is None or initial is not None):
            scan_route = Scan.REFERENCE  # (the host's scan takes no initial state)
        bias = mixer.dt_proj.bias.float() if mixer.dt_proj.bias is not None else None
        y, final_state = anchor_scan_mamba1(
            session, scan_route, host_scan, hidden_states, time_step, -torch.exp(mixer.A_log.float()),
            B.transpose(1, 2), C.transpose(1, 2), mixer.D.float(), gate, bias, initial_state=initial)
        if cache is not None:
            cache.update_recurrent_state(final_state, layer)
        return y

    return scan


def watch(module, name: str) -> None:
    """Wrap ``module.<name>`` (a Mamba-2 ``mamba2_scan_forward`` or Mamba-1 ``mamba_scan_forward``), once."""
    with _LOCK:
        current = getattr(module, name, None)
        if current is None:
            raise TypeError(f"{module.__name__} has no {name}; this transformers version is not supported for "
                            "token reduction of this model (see docs/compatibility.md)")
        if getattr(current, ORIGINAL_ATTR, None) is not None:
            return
        wrapped = _mamba2_call(current) if name == "mamba2_scan_forward" else _mamba1_call(current, module)
        setattr(wrapped, ORIGINAL_ATTR, current)
        setattr(module, name, wrapped)
