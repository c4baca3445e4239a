"""Public patching API: ``apply``, ``remove``, ``stats``, ``protect`` over the host adapters."""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch

from ..config import ReduceConfig, ResolvedConfig
from ..ops import route
from ..runtime import Runtime
from . import hf, hybrid, mamba_ssm  # noqa: F401  (register the transformers, hybrid and mamba_ssm adapters)
from .base import adapter_for, host_class, runtime_of, supported_hosts

__all__ = ["apply", "check", "remove", "stats", "protect", "is_patched", "scan_routes", "supported_hosts"]

logger = logging.getLogger("ssm_reduce")


def apply(model: torch.nn.Module, config: Optional[ReduceConfig] = None, **overrides) -> torch.nn.Module:
    """Patch ``model`` in place for token reduction and return it.

    ``config`` is a :class:`ReduceConfig` (default: ``ReduceConfig()``); keyword ``overrides`` replace its
    fields, e.g. ``apply(model, method="utr", flops_reduction=0.2)``. Applying again replaces the
    previous patch (idempotent). Everything is validated before the model is touched: on an error the
    model is left exactly as it was.
    """
    resolved = check(model, config, **overrides)
    adapter = adapter_for(model)
    config = resolved.config
    if _touched(model):
        adapter.unpatch(model)
    adapter.patch(model, Runtime(resolved))
    if resolved.anchors:
        logger.info(
            "ssm_reduce: %s at layers %s, keep ratio %.4f per anchor (target FLOPs reduction %.2f%%)",
            config.method, list(resolved.anchors), resolved.keep_ratio, 100 * resolved.target_flops_reduction,
        )
    else:
        logger.info("ssm_reduce: patched without reduction (no keep_ratio / flops_reduction set)")
    return model


def check(model: torch.nn.Module, config: Optional[ReduceConfig] = None, **overrides) -> ResolvedConfig:
    """Everything ``apply(model, config, **overrides)`` validates, without touching the model: raises what
    ``apply`` would raise, else returns the config bound to the model (anchors, keep ratio, protection)."""
    adapter = adapter_for(model)
    if config is None:
        config = ReduceConfig()
    elif not isinstance(config, ReduceConfig):
        raise TypeError(f"config must be a ssm_reduce.ReduceConfig or None, got {type(config).__name__}")
    if overrides:
        config = config.with_overrides(**overrides)
    adapter.check(model)
    adapter.check_config(model, config)
    adapter.check_ownership(model)
    return config.resolve(adapter.num_layers(model), adapter.conv_kernel(model), adapter.mamba_layers(model))


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply``: the model behaves exactly as before it was patched. A no-op if it is not patched."""
    adapter = adapter_for(model)
    adapter.check_ownership(model)
    if _touched(model):
        adapter.unpatch(model)
    return model


def _touched(model: torch.nn.Module) -> bool:
    """Patched, or an instance of a patched class (``type(patched)(config)``), whose class ``remove`` restores."""
    return runtime_of(model) is not None or host_class(model) is not type(model)


def is_patched(model: torch.nn.Module) -> bool:
    return runtime_of(model) is not None


def _runtime(model) -> Runtime:
    adapter_for(model)
    runtime = runtime_of(model)
    if runtime is None:
        raise ValueError("this model is not patched; call ssm_reduce.apply(model, ...) first")
    return runtime


def scan_routes(model: torch.nn.Module) -> dict[int, route.Scan]:
    """The scan each anchor of a patched model runs in a forward where it removes tokens, on the device of
    its weights and with the environment as it is now (``ssm_reduce.ops.route.anchor_scan``), by layer."""
    adapter = adapter_for(model)
    runtime = _runtime(model)
    routes = {}
    for index, block in adapter.blocks(model):
        if index in runtime.resolved.anchors:
            device = next(block.parameters()).device
            routes[index] = route.anchor_scan(adapter.anchor_scan(block, device), device, "ssm" in runtime.sources)
    return routes


def stats(model: torch.nn.Module) -> dict:
    """Statistics of the latest multi-token forward that the *calling thread* ran on the model
    (single-token decode steps never reduce and do not overwrite them; other threads' forwards never
    do).

    Keys: ``tokens_per_layer`` (mean real tokens entering each layer), ``realised_flops_reduction``
    (``1 - mean over layers of tokens entering / input tokens``, the target's definition),
    ``target_flops_reduction``, ``kept_per_row`` and ``input_tokens_per_row`` (real tokens per row after
    the last layer / at the input), ``kept_positions`` ((B, N') original indices, -1 = padding),
    ``anchors``, ``keep_ratio``, ``method``. Before any such forward the lists are empty.
    """
    runtime = _runtime(model)
    latest = runtime.latest.stats
    if latest is None:
        return {
            "tokens_per_layer": [],
            "realised_flops_reduction": 0.0,
            "target_flops_reduction": runtime.resolved.target_flops_reduction,
            "kept_per_row": [],
            "input_tokens_per_row": [],
            "kept_positions": None,
            "anchors": list(runtime.resolved.anchors),
            "keep_ratio": runtime.resolved.keep_ratio,
            "method": runtime.config.method,
        }
    return dict(latest)


@contextlib.contextmanager
def protect(model: torch.nn.Module, mask):
    """Within the block, positions where ``mask`` (bool [B, N]) is True survive every anchor: never
    removed, never merged into. Every multi-token forward the calling thread runs inside must have input
    shape [B, N]; other threads' forwards are not affected.
    On an unpatched (dense) model nothing is ever removed, so this only validates ``mask``.
    The one exception is ``method="tor-official"``, which reproduces the official code and, like it,
    protects nothing (the lm-eval model and ``windowed_perplexity`` refuse a batch where it removed a
    scored position).
    """
    adapter_for(model)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor of shape [batch, seq_len], got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [batch, seq_len], got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"mask must be boolean (or 0/1 integers), got dtype {mask.dtype}")
        mask = mask.bool()
    runtime = runtime_of(model)
    if runtime is None:
        yield
        return
    with runtime.protecting(mask):
        yield
