"""Switches for tests of patched models, kept out of the forwards of everyone else.

Each context applies to the calling thread's forwards of one patched model; outside them a forward runs
the plain :class:`~ssm_reduce.runtime.Session`, which knows nothing of these switches.

    with ssm_reduce.testing.force_scan(model, through_ops=True):   # every anchor mixer through ssm_reduce.ops
        model(ids)
    plans = ssm_reduce.testing.latest_plans(model)                  # the prefill's plans
    with ssm_reduce.testing.replay(model, plans):                   # the same plans on a longer input
        model(longer_ids)
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch

from .ops import extension, route
from .patch.base import runtime_of
from .reduce import Plan
from .runtime import SESSION_CLASS, Session

__all__ = ["force_scan", "replay", "latest_plans", "use_standin_extension"]

# (runtime, option, value) entries in force for this thread, innermost last.
_OPTIONS: contextvars.ContextVar = contextvars.ContextVar("ssm_reduce_testing_options", default=())


class _TestingSession(Session):
    def _option(self, name: str):
        for runtime, key, value in reversed(_OPTIONS.get()):
            if runtime is self.runtime and key == name:
                return value
        return None

    def scan_route(self, anchor: route.AnchorScan, device) -> route.Scan:
        forced = self._option("force_scan")
        if forced is None:
            return super().scan_route(anchor, device)
        return route.anchor_scan(anchor, device, self.needs_y, forced=forced)

    def reduces_at(self, layer: int) -> bool:
        plans = self._option("replay")
        return super().reduces_at(layer) if plans is None else layer in plans

    def _plan(self, layer, state, r, hidden) -> Plan:
        plans = self._option("replay")
        return super()._plan(layer, state, r, hidden) if plans is None else plans[layer].extend(state)


def _runtime(model: torch.nn.Module):
    runtime = runtime_of(model)
    if runtime is None:
        raise ValueError("this model is not patched; call ssm_reduce.apply(model, ...) first")
    return runtime


@contextlib.contextmanager
def _option(model: torch.nn.Module, name: str, value):
    options = _OPTIONS.set(_OPTIONS.get() + ((_runtime(model), name, value),))
    session_class = SESSION_CLASS.set(_TestingSession)
    try:
        yield
    finally:
        SESSION_CLASS.reset(session_class)
        _OPTIONS.reset(options)


def force_scan(model: torch.nn.Module, through_ops: Optional[bool]):
    """Route every anchor mixer of ``model`` through ``ssm_reduce.ops`` (True: whichever of its scans
    serves, the reference where none does) or the host's mixer (False); None: the normal route."""
    return _option(model, "force_scan", through_ops)


def replay(model: torch.nn.Module, plans: dict[int, Plan]):
    """Reduce at exactly the anchors of ``plans`` with those plans (extra trailing tokens are kept): to
    check that decoding after a reduced prefill equals a full forward reduced by the prefill's plans."""
    return _option(model, "replay", plans)


def latest_plans(model: torch.nn.Module) -> dict[int, Plan]:
    """The plans of the calling thread's latest multi-token forward of ``model``, by anchor."""
    return dict(_runtime(model).latest.plans)


def use_standin_extension(module, device_types=("cpu", "cuda")) -> None:
    """Serve the kernel front door from ``module`` (the compiled extension's calling convention) on
    ``device_types``, for the rest of the process: to test the Python half of the kernels without CUDA.
    ``SSM_REDUCE_DISABLE_KERNELS=1`` still turns it off."""
    extension.register_custom_ops(module)
    extension._served.update(module=module, device_types=tuple(device_types))
