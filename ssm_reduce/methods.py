"""The token-reduction methods: one registry entry each.

An entry says what a method needs (scores, similarity features), how many tokens each row removes at an
anchor (its budget), and which ones (its selection, or for ``tor-official`` its whole reduction).
Config validation, the runtime, the CLI and the lm-eval model all read this table; adding a method means
adding one entry. The token algebra the entries point to lives in ``ssm_reduce.reduce``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import reduce
from .reduce import Selection, TokenState

__all__ = ["Method", "METHODS", "REGISTRY", "get", "register", "budgets", "select"]


@dataclass(frozen=True)
class Method:
    """One reduction method.

    name: what ``ReduceConfig(method=...)`` takes.   summary: one line for listings.
    budget: ``(state, keep_ratio) -> (B,)`` real tokens each row removes at an anchor.
    select: ``(state, r, importance, features, seed, layer) -> Selection``; None when ``reduce`` is set.
    matches: the selection pairs tokens by cosine similarity (it needs the similarity features).
    streams: the (q_hidden, q_residual) prune fractions the method fixes; None = the config's.
    below_half: what a keep ratio below 0.5 does: ``"refuse"`` (the method removes at most half of the
        candidates: a clear error), ``"cap"`` (each anchor removes at most half, with a warning) or None.
    reduce: ``(hidden, residual, state, r, metric) -> (hidden', residual', state')``, the whole reduction
        of an anchor in place of ``select`` and a plan (no plan to replay).
    reads_sources: the method scores the config's ``importance_source`` (False: it reads the mixer
        output only, as the official code does).
    protects: the method honours protection (``protect_first`` / ``protect_last`` / ``ssm_reduce.protect``).
    """

    name: str
    summary: str
    budget: Callable[[TokenState, float], torch.Tensor]
    select: Optional[Callable[..., Selection]] = None
    matches: bool = False
    streams: Optional[tuple[float, float]] = None
    below_half: Optional[str] = None
    reduce: Optional[Callable] = None
    reads_sources: bool = True
    protects: bool = True

    def __post_init__(self):
        if (self.select is None) == (self.reduce is None):
            raise ValueError(f"method {self.name!r}: give exactly one of select and reduce")
        if self.below_half not in (None, "refuse", "cap"):
            raise ValueError(f"method {self.name!r}: below_half must be None, 'refuse' or 'cap'")

    def sources(self, importance_source: str, similarity_source: str) -> frozenset[str]:
        """The mixer-internal tensors (``ssm``, ``gated``) an anchor must capture for this method."""
        if not self.reads_sources:
            return frozenset()
        needed = {importance_source} | ({similarity_source} if self.matches else set())
        return frozenset(needed - {"block"})


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"a reduction method named {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


register(Method("utr", "the paper's method: match the less important half to the rest, prune q, merge the others",
                reduce.budget_source_half, reduce.select_by_importance_halves, matches=True, below_half="refuse"))
register(Method("prune", "utr's selection, every removed token pruned", reduce.budget_source_half,
                reduce.select_by_importance_halves, matches=True, streams=(1.0, 1.0), below_half="refuse"))
register(Method("merge", "utr's selection, every removed token merged", reduce.budget_source_half,
                reduce.select_by_importance_halves, matches=True, streams=(0.0, 0.0), below_half="refuse"))
register(Method("evit", "prune the least important tokens", reduce.budget_all_but_one,
                reduce.select_least_important))
register(Method("tome", "ToMe / PuMer: alternate split, merge the most similar pairs", reduce.budget_alternate_half,
                reduce.select_alternate, matches=True, streams=(0.0, 0.0), below_half="refuse"))
register(Method("random", "prune random tokens (seeded)", reduce.budget_all_but_one, reduce.select_random))
register(Method("recent", "prune the oldest tokens", reduce.budget_all_but_one, reduce.select_oldest))
register(Method("tor-official", "the official code's selection, quirks included", reduce.budget_official,
                reduce=reduce.official_reduce, below_half="cap", reads_sources=False, protects=False))

METHODS = tuple(REGISTRY)


def get(name: str) -> Method:
    """The registered method ``name``; ``ValueError`` naming the accepted ones otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"method={name!r} is not supported; choose one of {', '.join(map(repr, REGISTRY))}") from None


def budgets(state: TokenState, keep_ratio: float, method: str) -> torch.Tensor:
    """(B,) real tokens each row removes at an anchor under ``method``."""
    return get(method).budget(state, keep_ratio)


def select(method: str, state: TokenState, r: torch.Tensor, importance: torch.Tensor,
           features: Optional[torch.Tensor], seed: int = 0, layer: int = 0) -> Selection:
    """``method``'s selection: exactly ``r[b]`` tokens of row b removed, protected and padding never."""
    entry = get(method)
    if entry.select is None:
        raise ValueError(f"method {method!r} has no selection of its own (it reduces in one step)")
    return entry.select(state, r, importance, features, seed, layer)
