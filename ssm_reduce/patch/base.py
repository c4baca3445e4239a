"""Machinery shared by the host adapters: class swapping, hook bookkeeping, the adapter registry.

Patching swaps a module's ``__class__`` to a subclass built at runtime (named like the original, so
``save_pretrained`` records the right architecture), which keeps weights, state-dict keys and user
hooks intact; ``unpatch`` swaps it back. Host classes are recognised by name, so no host library has
to be imported to find its adapter.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import types
from typing import Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.route import AnchorScan, Scan
from ..runtime import Runtime

RUNTIME_ATTR = "_ssm_reduce_runtime"
HOOKS_ATTR = "_ssm_reduce_hooks"
PARENT_ATTR = "_ssm_reduce_parent"

_SUBCLASSES: dict[tuple[type, type], type] = {}


def swap_class(module: torch.nn.Module, mixin: type, runtime: Runtime) -> None:
    """Make ``module`` an instance of ``mixin`` + its host class, sharing ``runtime``."""
    parent = host_class(module)
    key = (parent, mixin)
    if key not in _SUBCLASSES:
        attrs = {PARENT_ATTR: parent, "__qualname__": parent.__qualname__, "__reduce_ex__": _refuse_pickling,
                 "__deepcopy__": _deepcopy}
        forward = next((c.__dict__["forward"] for c in mixin.__mro__ if "forward" in c.__dict__), None)
        if isinstance(forward, types.FunctionType):
            attrs["forward"] = _forward_with_parent_signature(forward, parent.forward)
        _SUBCLASSES[key] = type(parent.__name__, (mixin, parent), attrs)
    module.__class__ = _SUBCLASSES[key]
    setattr(module, RUNTIME_ATTR, runtime)


def _refuse_pickling(self, protocol):
    raise TypeError(
        f"a {type(self).__name__} patched by ssm_reduce cannot be pickled (torch.save(model) pickles the module "
        "object, and the patch is not part of it): save its weights with model.save_pretrained(dir) or "
        "torch.save(model.state_dict(), path), or call ssm_reduce.remove(model) first"
    )


def _deepcopy(self, memo):
    """``copy.deepcopy`` as for any module (pickling is refused, and deepcopy would otherwise go through it)."""
    twin = type(self).__new__(type(self))
    memo[id(self)] = twin
    twin.__setstate__(copy.deepcopy(self.__dict__, memo))
    return twin


def _forward_with_parent_signature(mixin_forward, parent_forward):
    """The mixin's forward, advertising the host's signature: ``generate`` inspects it (for example
    to pass ``logits_to_keep=1``), and a ``*args, **kwargs`` signature would hide those options."""

    @functools.wraps(parent_forward)
    def forward(self, *args, **kwargs):
        return mixin_forward(self, *args, **kwargs)

    return forward


def restore_class(module: torch.nn.Module) -> None:
    """Undo ``swap_class`` and drop the runtime reference and hooks."""
    parent = type(module).__dict__.get(PARENT_ATTR)
    if parent is not None:
        module.__class__ = parent
    for handle in module.__dict__.pop(HOOKS_ATTR, []):
        handle.remove()
    module.__dict__.pop(RUNTIME_ATTR, None)


def add_hook(owner: torch.nn.Module, handle) -> None:
    """Remember a hook handle on ``owner`` so ``restore_class(owner)`` removes it."""
    owner.__dict__.setdefault(HOOKS_ATTR, []).append(handle)


def runtime_of(module: torch.nn.Module) -> Optional[Runtime]:
    return module.__dict__.get(RUNTIME_ATTR)


def session_of(module: torch.nn.Module):
    """The session of the forward running in this thread through ``module``'s patch; None outside one, or
    for an instance of a patched class that is not patched itself (built by ``type(model)(config)``)."""
    runtime = module.__dict__.get(RUNTIME_ATTR)
    return None if runtime is None else runtime.session()


def host_class(module: torch.nn.Module) -> type:
    """The host's class of ``module``, whether or not its class is one ``swap_class`` made."""
    return type(module).__dict__.get(PARENT_ATTR, type(module))


def class_names(module: torch.nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def anchor_scan_mamba1(session, scan: Scan, host_fn, u, delta, A, B, C, D, z, delta_bias, initial_state=None):
    """The scan of a Mamba-1 anchor mixer on route ``scan`` (``Session.scan_route``), (B, D, L) operands as
    in ``ops.scan_score_mamba1``: captures y before the z gate (and its score, when the scan computes it)
    and returns (gated y, final state). ``host_fn``: the host's selective scan, called without its gate on
    the ``host_scan`` route."""
    config = session.resolved.config
    if scan is not Scan.HOST_SCAN:
        need_y = config.similarity_source == "ssm"  # y itself, not only its score, is needed for matching
        y, final_state, score, _ = ops.scan_score_mamba1(
            u, delta, A, B, C, D=D, z=None if need_y else z, delta_bias=delta_bias, initial_state=initial_state,
            delta_softplus=True, metric=config.importance,
        )
        session.capture_score("ssm", config.importance, score)
    else:  # the session scores y itself
        need_y = True
        y, final_state = host_fn(u, delta, A, B, C, D=D, z=None, delta_bias=delta_bias, delta_softplus=True,
                                 return_last_state=True)
    if need_y:
        session.capture("ssm", y.transpose(1, 2))
        y = y * F.silu(z)
    return y, final_state


class RoutedMixerMixin:
    """Anchor mixers. For the forward whose block at this anchor asked for a route through ``ssm_reduce.ops``
    (``Session.mixer_routes``), the mixer's call runs ``_ssm_reduce_ops_call``; every other call, and every
    instance-level ``forward`` someone installs (an accelerate hook), is the host's. The module's own hooks
    fire either way, and nothing on the module changes per call, so concurrent forwards do not see each
    other's routes."""

    def _ssm_reduce_route(self):
        """(scan, session) of this thread's forward at this mixer, or None."""
        session = session_of(self)
        return None if session is None else session.mixer_routes.get(id(self))

    def _ssm_reduce_ops_call(self, session, scan: Scan):
        """The callable that replaces ``forward`` for this call (adapters define it)."""
        raise NotImplementedError

    @property
    def forward(self):
        route = self._ssm_reduce_route()
        if route is not None and route[0].through_ops:
            return self._ssm_reduce_ops_call(route[1], route[0])
        instance = self.__dict__.get("forward")
        return instance if instance is not None else super().forward

    @forward.setter
    def forward(self, value):
        self.__dict__["forward"] = value

    @forward.deleter
    def forward(self):
        if self.__dict__.pop("forward", None) is None:
            raise AttributeError("forward")


@contextlib.contextmanager
def mixer_route(session, mixer: torch.nn.Module, scan: Scan):
    """Within the block, this forward's calls of ``mixer`` take route ``scan``."""
    session.mixer_routes[id(mixer)] = (scan, session)
    try:
        yield
    finally:
        session.mixer_routes.pop(id(mixer), None)


class capture_hook:
    """A forward pre-hook that hands its module's first input to the open session as ``name``. An object,
    not a closure: ``copy.deepcopy`` of a patched model then gives the copy's hooks the copy's runtime."""

    def __init__(self, runtime: Runtime, name: str):
        self.runtime, self.name = runtime, name

    def __call__(self, module, args):
        session = self.runtime.session()
        if session is not None:
            session.capture(self.name, args[0])


class Adapter:
    """One host library's model family: a causal LM wrapping a backbone whose ``layers`` are blocks
    with a ``mixer``. Subclasses name their mixins and where y is visible."""

    name: str = ""
    supported: tuple[str, ...] = ()
    lm_mixin: type = object
    backbone_mixin: type = object
    mixer_mixin: type = RoutedMixerMixin

    def matches(self, model: torch.nn.Module) -> bool:
        return bool(class_names(model) & set(self.supported))

    @staticmethod
    def backbone(model):
        return model.backbone if hasattr(model, "backbone") and hasattr(model, "lm_head") else model

    def num_layers(self, model) -> int:
        return len(self.backbone(model).layers)

    def check(self, model) -> None:
        """Raise ``ValueError`` if this adapter cannot patch ``model`` (called before anything changes)."""

    def check_config(self, model, config) -> None:
        """Raise ``ValueError`` if ``config`` cannot serve ``model`` (called before anything changes)."""

    def mamba_layers(self, model) -> Optional[list[int]]:
        """The layers that can be anchors; None: every layer."""
        return None

    def blocks(self, model) -> list:
        """(layer index, block) of a patched model's layers."""
        return [(block.layer_idx, block) for block in self.backbone(model).layers]

    def conv_kernel(self, model) -> int:
        raise NotImplementedError

    def block_mixin(self, model) -> type:
        raise NotImplementedError

    def anchor_scan(self, block: torch.nn.Module, device) -> AnchorScan:
        """What the scan route needs to know of a patched anchor ``block`` whose input is on ``device``."""
        raise NotImplementedError

    def ssm_source(self, mixer: torch.nn.Module) -> Optional[torch.nn.Module]:
        """The module whose input is the scan output y (``importance_source="ssm"``), or None when the
        adapter's anchor path captures y itself."""
        raise NotImplementedError

    def check_ownership(self, model) -> None:
        """Raise ``ValueError`` if ``model``'s patch belongs to another module: a backbone patched as part of
        its causal LM, or a causal LM whose backbone was patched on its own (one runtime per model)."""
        runtime = runtime_of(model)
        backbone = self.backbone(model)
        if runtime is not None and backbone is model and runtime.patched_whole_lm:
            raise ValueError(
                f"this {type(model).__name__} was patched as part of its causal LM; call ssm_reduce.apply / "
                "remove on that model instead"
            )
        if backbone is not model and runtime_of(backbone) is not None and runtime_of(backbone) is not runtime:
            raise ValueError(
                f"the backbone of this {type(model).__name__} is patched on its own; call "
                "ssm_reduce.remove(model.backbone) first, then patch the whole model"
            )

    def patch(self, model, runtime: Runtime) -> None:
        backbone = self.backbone(model)
        needed = runtime.sources
        runtime.patched_whole_lm = backbone is not model
        if backbone is not model:
            swap_class(model, self.lm_mixin, runtime)
        swap_class(backbone, self.backbone_mixin, runtime)
        block_mixin = self.block_mixin(model)
        for index, block in enumerate(backbone.layers):
            if getattr(block, "layer_idx", None) is None:
                block.layer_idx = index
            swap_class(block, block_mixin, runtime)
            if block.layer_idx not in runtime.resolved.anchors:
                continue
            swap_class(block.mixer, self.mixer_mixin, runtime)
            for source in sorted(needed):
                target = self.ssm_source(block.mixer) if source == "ssm" else block.mixer.out_proj
                if target is not None:  # None: the adapter captures y itself
                    add_hook(block, target.register_forward_pre_hook(capture_hook(runtime, source)))

    def unpatch(self, model) -> None:
        backbone = self.backbone(model)
        for block in backbone.layers:
            restore_class(block.mixer)
            restore_class(block)
        restore_class(backbone)
        if backbone is not model:
            restore_class(model)


_ADAPTERS: list[Adapter] = []


def register(adapter: Adapter) -> Adapter:
    _ADAPTERS.append(adapter)
    return adapter


def adapter_for(model) -> Adapter:
    """The adapter that supports ``model``; ``TypeError`` naming what is supported otherwise."""
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return adapter
    supported = ", ".join(name for a in _ADAPTERS for name in a.supported)
    raise TypeError(f"ssm_reduce does not support {type(model).__name__}; supported models: {supported}")


def supported_hosts() -> dict[str, tuple[str, ...]]:
    return {a.name: a.supported for a in _ADAPTERS}
