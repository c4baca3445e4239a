"""Token-reduction configuration: the user-facing dataclass, layer schedules, FLOPs target -> keep ratio.

The FLOPs model is the one of the paper's official code ("Model Sparsity"): every layer costs the same
per token, so a forward's relative cost is the mean over layers of (tokens entering the layer / N),
and ``flops_reduction = 1 - that mean``. A reduction at anchor ``l`` happens after the mixer of layer
``l``, so it first pays off in layer ``l + 1``.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Optional, Sequence

logger = logging.getLogger("ssm_reduce")

from . import validation
from .methods import METHODS, get as get_method

IMPORTANCE_METRICS = ("clip", "l1", "l2", "mean")
SOURCES = ("ssm", "gated", "block")

# The official schedules of the paper's code for the depths of the public checkpoints.
PAPER_SCHEDULES = {
    64: tuple(range(12, 43, 5)),
    48: tuple(range(10, 36, 5)),
}


def default_schedule(num_layers: int) -> tuple[int, ...]:
    """The paper's anchor layers for a model of ``num_layers`` layers.

    64 layers: 12, 17, ..., 42; 48 layers: 10, 15, ..., 35. Other depths keep the same shape: the first
    anchor at about 0.19 L, a stride of about L / 12.8 and the last anchor at about 0.66 L.
    """
    if num_layers in PAPER_SCHEDULES:
        return PAPER_SCHEDULES[num_layers]
    if num_layers < 2:
        return tuple(range(num_layers))
    start = round(0.19 * num_layers)
    stride = max(1, round(num_layers / 12.8))
    end = max(start, min(num_layers - 1, round(0.66 * num_layers)))
    return tuple(range(start, end + 1, stride))


def hybrid_schedule(anchors: Sequence[int], mamba_layers: Sequence[int]) -> tuple[int, ...]:
    """The schedule ``anchors`` (over the whole layer stack) on a hybrid whose Mamba layers are ``mamba_layers``:
    each anchor moves to the nearest Mamba layer (the earlier one on a tie), duplicates dropped."""
    if not mamba_layers:
        return ()
    moved = [min(mamba_layers, key=lambda m: (abs(m - a), m)) for a in anchors]
    return tuple(sorted(set(moved)))


def relative_cost(keep_ratio: float, anchors: Sequence[int], num_layers: int) -> float:
    """Mean over layers of (tokens entering the layer / N) when every anchor keeps ``keep_ratio``."""
    total = 0.0
    for layer in range(num_layers):
        reductions_before = sum(1 for a in anchors if a < layer)
        total += keep_ratio**reductions_before
    return total / num_layers


def flops_reduction_for(keep_ratio: float, anchors: Sequence[int], num_layers: int) -> float:
    """FLOPs reduction ``1 - relative_cost`` of a keep ratio on a schedule."""
    return 1.0 - relative_cost(keep_ratio, anchors, num_layers)


def solve_keep_ratio(target: float, anchors: Sequence[int], num_layers: int) -> float:
    """The per-anchor keep ratio in (0, 1] whose FLOPs reduction equals ``target`` (bisection).

    Raises ``ValueError`` when the target cannot be reached even by removing every token.
    """
    if target <= 0.0:
        return 1.0
    reachable = flops_reduction_for(0.0, anchors, num_layers)
    if target >= reachable:
        raise ValueError(
            f"flops_reduction={target} cannot be reached with anchors {list(anchors)} in a "
            f"{num_layers}-layer model: even removing every token gives {reachable:.4f}; "
            "add earlier anchor layers or lower the target"
        )
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if flops_reduction_for(mid, anchors, num_layers) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _fraction(name: str, value, low: float, high: float, low_open: bool, high_open: bool) -> float:
    value = validation.real(name, value)
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if bad_low or bad_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}")


@dataclass(frozen=True)
class ReduceConfig:
    """What to reduce, where and how much. Validates itself on construction.

    Args:
        method: one of ``METHODS`` (``ssm_reduce.methods``).
        layers: anchor layer indices (reduction happens after the mixer of each); ``None`` = the
            paper's schedule for the model's depth (``default_schedule``).
        keep_ratio: fraction of the tokens entering an anchor that leave it, in (0, 1].
        flops_reduction: target FLOPs reduction F in [0, 1); solved into one keep ratio.
            Exactly one of ``keep_ratio`` / ``flops_reduction`` may be set; neither = no reduction.
        q_hidden: fraction of the removed tokens pruned (not merged) in the mixer-output stream (utr).
        q_residual: the same for the residual stream (0 = merge only, the paper's best setting).
        importance: metric over channels: ``clip`` (mean of max(0, v)), ``l1``, ``l2``, ``mean``.
        importance_source: ``ssm`` (the scan output y, before gating), ``gated`` (input of out_proj)
            or ``block`` (the mixer output).
        similarity_source: features for cosine matching, same choices.
        protect_last: the last k real tokens of every row are never removed; ``None`` = conv kernel - 1.
        protect_first: the first k real tokens of every row are never removed.
        causal: a merged token takes the later of its members' positions (never moves information
            backwards in time). ``False`` keeps the destination's position, as ToMe does.
        size_weighted: merges are means weighted by how many original tokens each member stands for.
        seed: seed of the ``random`` method.
    """

    method: str = "utr"
    layers: Optional[tuple[int, ...]] = None
    keep_ratio: Optional[float] = None
    flops_reduction: Optional[float] = None
    q_hidden: float = 0.5
    q_residual: float = 0.0
    importance: str = "clip"
    importance_source: str = "ssm"
    similarity_source: str = "block"
    protect_last: Optional[int] = None
    protect_first: int = 0
    causal: bool = True
    size_weighted: bool = True
    seed: int = 0

    def __post_init__(self):
        _check_choice("method", self.method, METHODS)
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
                layers = (layers,)
            if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
                raise ValueError(f"layers must be a list of layer indices or None, got {self.layers!r}")
            try:
                layers = tuple(validation.integer("layers", layer, 0) for layer in layers)
            except ValueError:
                raise ValueError(f"layers must hold non-negative integers, got {self.layers!r}") from None
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers must not repeat an index, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(layers)))
        if self.keep_ratio is not None and self.flops_reduction is not None:
            raise ValueError(
                f"set only one of keep_ratio ({self.keep_ratio}) and flops_reduction ({self.flops_reduction})"
            )
        numbers_in = {
            "keep_ratio": (0.0, 1.0, True, False),
            "flops_reduction": (0.0, 1.0, False, True),
            "q_hidden": (0.0, 1.0, False, False),
            "q_residual": (0.0, 1.0, False, False),
        }
        for name, bounds in numbers_in.items():
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _fraction(name, getattr(self, name), *bounds))
        _check_choice("importance", self.importance, IMPORTANCE_METRICS)
        _check_choice("importance_source", self.importance_source, SOURCES)
        _check_choice("similarity_source", self.similarity_source, SOURCES)
        for name in ("protect_last", "protect_first", "seed"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, validation.integer(name, getattr(self, name), 0))
        for name in ("causal", "size_weighted"):
            object.__setattr__(self, name, validation.boolean(name, getattr(self, name)))

    @property
    def enabled(self) -> bool:
        """Whether any reduction is requested (a keep ratio or a FLOPs target is set)."""
        return self.keep_ratio is not None or self.flops_reduction is not None

    def with_overrides(self, **overrides) -> "ReduceConfig":
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown ReduceConfig option(s) {unknown}; accepted: {sorted(names)}")
        if "keep_ratio" in overrides and overrides["keep_ratio"] is not None:
            overrides.setdefault("flops_reduction", None)
        if "flops_reduction" in overrides and overrides["flops_reduction"] is not None:
            overrides.setdefault("keep_ratio", None)
        return replace(self, **overrides)

    def stream_q(self) -> tuple[float, float]:
        """(q_hidden, q_residual) the method actually uses: ``prune`` is 1/1, ``merge`` and ``tome`` 0/0."""
        return get_method(self.method).streams or (self.q_hidden, self.q_residual)

    def resolve(self, num_layers: int, conv_kernel: int, mamba_layers: Optional[Sequence[int]] = None) -> "ResolvedConfig":
        """Bind the config to a model depth; raises ``ValueError`` for out-of-range anchors. ``mamba_layers``:
        the layers that can be anchors (a hybrid's Mamba layers; None = every layer): the paper's schedule
        moves each anchor to the nearest of them (``hybrid_schedule``), explicit ``layers`` must name them."""
        anchors = default_schedule(num_layers) if self.layers is None else self.layers
        bad = [a for a in anchors if a >= num_layers]
        if bad:
            raise ValueError(
                f"layers {bad} out of range: the model has {num_layers} layers (valid indices 0..{num_layers - 1})"
            )
        if mamba_layers is not None:
            if self.layers is None:
                anchors = hybrid_schedule(anchors, mamba_layers)
            else:
                bad = [a for a in anchors if a not in set(mamba_layers)]
                if bad:
                    raise ValueError(f"layers {bad} are not Mamba layers; anchors must be Mamba layers, which in this "
                                     f"model are {list(mamba_layers)}")
        keep_ratio = None
        if self.keep_ratio is not None:
            keep_ratio = float(self.keep_ratio)
        elif self.flops_reduction is not None:
            if not anchors:
                raise ValueError("flops_reduction needs at least one anchor layer; layers=[] was given")
            keep_ratio = solve_keep_ratio(float(self.flops_reduction), anchors, num_layers)
        below_half = get_method(self.method).below_half if keep_ratio is not None and keep_ratio < 0.5 else None
        if below_half == "cap":
            # the official code caps each anchor's removals at half of its tokens and runs: so does this mode
            logger.warning("%s: keep ratio %.4f < 0.5; as in the official code, each anchor removes at most half "
                           "of its tokens, so the realised reduction is lower than asked", self.method, keep_ratio)
        elif below_half == "refuse":
            asked = (
                f"keep_ratio={self.keep_ratio}" if self.keep_ratio is not None
                else f"flops_reduction={self.flops_reduction} (a keep ratio of {keep_ratio:.4f} per anchor)"
            )
            best = flops_reduction_for(0.5, anchors, num_layers)
            raise ValueError(
                f"{asked} is out of reach for method {self.method!r}, which removes at most half of the "
                f"candidate tokens per anchor (keep ratio >= 0.5, i.e. flops_reduction <= {best:.4f} with "
                "these layers); add anchor layers or use evit, random or recent"
            )
        protect_last = conv_kernel - 1 if self.protect_last is None else self.protect_last
        return ResolvedConfig(
            config=self,
            num_layers=num_layers,
            anchors=tuple(anchors) if keep_ratio is not None and keep_ratio < 1.0 else (),
            keep_ratio=keep_ratio,
            protect_last=protect_last,
        )


@dataclass(frozen=True)
class ResolvedConfig:
    """A ``ReduceConfig`` bound to a model: concrete anchors, keep ratio and protection."""

    config: ReduceConfig
    num_layers: int
    anchors: tuple[int, ...]
    keep_ratio: Optional[float]
    protect_last: int
    target_flops_reduction: float = field(init=False)

    def __post_init__(self):
        target = 0.0
        if self.anchors:
            target = flops_reduction_for(self.keep_ratio, self.anchors, self.num_layers)
        object.__setattr__(self, "target_flops_reduction", target)
