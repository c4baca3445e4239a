"""Host-independent state of a patched model: its resolved config and the per-forward session.

Adapters (``ssm_reduce.patch.*``) call :meth:`Runtime.start` when a backbone forward begins,
:meth:`Session.reduce` inside every anchor block and :meth:`Runtime.finish` at the end; everything
about *what* is reduced lives in ``ssm_reduce.reduce``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch

from .config import ResolvedConfig
from .reduce import (
    Plan,
    TokenState,
    budgets,
    build_plan,
    importance_scores,
    official_reduce,
    select,
)

logger = logging.getLogger(__name__)

MATCHING_METHODS = ("utr", "prune", "merge", "tome")


class Session:
    """One multi-token forward of a patched model."""

    def __init__(self, runtime: "Runtime", state: TokenState, mask_dtype: torch.dtype):
        self.runtime = runtime
        self.state = state
        self.mask_dtype = mask_dtype
        self.reduced = False
        self.n_real_after: dict[int, torch.Tensor] = {}
        self.n_real_input = state.n_real
        self.captured: dict[str, torch.Tensor] = {}
        self.captured_scores: dict[tuple[str, str], torch.Tensor] = {}
        self.plans: dict[int, Plan] = {}

    @property
    def anchors(self) -> tuple[int, ...]:
        return self.runtime.resolved.anchors

    def block_mask(self, host_mask: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
        """The padding mask a block on ``device`` must see: the host's until the first reduction, then
        ours (``None`` when no padding is left, as the hosts do for all-ones masks)."""
        if not self.reduced:
            return host_mask
        if bool(self.state.valid.all()):
            return None
        return self.state.valid.to(device=device, dtype=self.mask_dtype)

    def capture(self, name: str, value: torch.Tensor) -> None:
        self.captured[name] = value

    def capture_score(self, source: str, metric: str, score: torch.Tensor) -> None:
        """A (B, N) importance already computed for ``source`` with ``metric`` (by the fused scan)."""
        self.captured_scores[(source, metric)] = score

    def _importance(self, config, hidden: torch.Tensor) -> torch.Tensor:
        score = self.captured_scores.get((config.importance_source, config.importance))
        if score is not None:
            return score.float()
        return importance_scores(self._source(config.importance_source, hidden), config.importance)

    def _source(self, name: str, block_output: torch.Tensor) -> torch.Tensor:
        if name == "block":
            return block_output
        if name not in self.captured:
            raise RuntimeError(f"the {name!r} source was not captured in this layer; is the mixer patched?")
        return self.captured[name]

    def reduces_at(self, layer: int) -> bool:
        """Whether anchor ``layer`` removes any token in this forward (known before its mixer runs:
        budgets depend only on the tokens entering it). Anchors that remove nothing run the host's
        block unchanged."""
        runtime = self.runtime
        if runtime.replay_plans is not None:
            return layer in runtime.replay_plans
        state, ratio = self.state, runtime.resolved.keep_ratio
        if runtime.config.method == "tor-official":
            n = state.n_real
            return int(torch.minimum(n - torch.ceil(n.double() * ratio).long(), n // 2).max()) > 0
        return int(budgets(state, ratio, runtime.config.method).max()) > 0

    def reduce(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor):
        """Reduce the mixer output ``hidden`` and the ``residual`` (both (B, N, D)) after anchor ``layer``
        (which ``reduces_at`` said removes tokens)."""
        runtime = self.runtime
        config = runtime.resolved.config
        try:
            state = self.state = self.state.to(hidden.device)
            if runtime.replay_plans is not None:
                plan = runtime.replay_plans[layer].extend(state)
            elif config.method == "tor-official":
                hidden, residual, self.state = official_reduce(hidden, residual, state, runtime.resolved.keep_ratio,
                                                               config.importance)
                self._after_reduction(layer)
                return hidden, residual
            else:
                r = budgets(state, runtime.resolved.keep_ratio, config.method)
                with torch.no_grad():
                    importance = self._importance(config, hidden)
                    features = None
                    if config.method in MATCHING_METHODS:
                        features = self._source(config.similarity_source, hidden)
                    selection = select(config.method, state, r, importance, features, config.seed, layer)
                    q_hidden, q_residual = config.stream_q()
                    plan = build_plan(
                        state, selection, importance, q_hidden, q_residual, config.causal, config.size_weighted
                    )
            hidden, residual = plan.apply(hidden, residual)
            self.state = plan.state
            self.plans[layer] = plan
            self._after_reduction(layer)
            return hidden, residual
        finally:
            self.captured.clear()
            self.captured_scores.clear()

    def _after_reduction(self, layer: int) -> None:
        self.reduced = True
        self.n_real_after[layer] = self.state.n_real

    def summary(self) -> dict:
        """Statistics of this forward (see ``ssm_reduce.stats``)."""
        resolved = self.runtime.resolved
        current = self.n_real_input.double()
        per_layer = []
        for layer in range(resolved.num_layers):
            per_layer.append(current)
            if layer in self.n_real_after:
                current = self.n_real_after[layer].double()
        return forward_stats(resolved, torch.stack(per_layer), self.n_real_input, self.state.n_real, self.state.pos)


def forward_stats(resolved, entering: torch.Tensor, n_input: torch.Tensor, n_kept: torch.Tensor,
                  positions: torch.Tensor) -> dict:
    """``ssm_reduce.stats`` of one forward: ``entering`` (L, B) real tokens entering each layer,
    ``n_input`` / ``n_kept`` (B,) real tokens at the input / after the last layer, ``positions`` the
    kept positions."""
    total_input = float(n_input.sum())
    realised = 0.0
    if total_input > 0:
        realised = 1.0 - float(entering.double().sum()) / (resolved.num_layers * total_input)
    return {
        "tokens_per_layer": entering.double().mean(1).tolist(),
        "realised_flops_reduction": realised,
        "target_flops_reduction": resolved.target_flops_reduction,
        "kept_per_row": n_kept.tolist(),
        "input_tokens_per_row": n_input.tolist(),
        "kept_positions": positions,
        "anchors": list(resolved.anchors),
        "keep_ratio": resolved.keep_ratio,
        "method": resolved.config.method,
    }


class Runtime:
    """Config and scratch shared by the patched modules of one model."""

    def __init__(self, resolved: ResolvedConfig):
        self.resolved = resolved
        self.protect_mask: Optional[torch.Tensor] = None
        self.session: Optional[Session] = None
        self.last_stats: Optional[dict] = None
        self.last_plans: dict[int, Plan] = {}
        self.replay_plans: Optional[dict[int, Plan]] = None
        # Run anchor mixers through ssm_reduce.ops (fused scan + score): None = where the kernels run.
        self.ops_mixer: Optional[bool] = None
        # (B, N') original indices of the output columns of the latest forward, decode steps included.
        self.last_kept: Optional[torch.Tensor] = None
        # Patched through the causal LM (which owns the patch of its backbone) or a bare backbone.
        self.patched_whole_lm = False

    @property
    def config(self):
        return self.resolved.config

    def start(self, batch: int, seq_len: int, device, attention_mask: Optional[torch.Tensor]) -> Optional[Session]:
        """Open a session for a forward over (batch, seq_len) tokens, or ``None`` when this forward
        cannot reduce (no anchors, or a single-token decode step)."""
        if not self.resolved.anchors or seq_len <= 1:
            return None
        protect = self.protect_mask
        if protect is not None and tuple(protect.shape) != (batch, seq_len):
            raise ValueError(
                f"the protect mask has shape {tuple(protect.shape)} but this forward's input is "
                f"{(batch, seq_len)}; pass one boolean mask of shape [batch, seq_len] per forward"
            )
        # A sequence shorter than the protection asked for is bad input (the defaults, protect_last =
        # conv kernel - 1, are not asked for: a shorter prompt has nothing to remove and passes through).
        asked = self.config.protect_first + (self.config.protect_last or 0)
        if seq_len < asked:
            raise ValueError(
                f"the input has {seq_len} tokens, fewer than protect_first + protect_last = {asked} protect; "
                "lower them or give longer inputs"
            )
        mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = attention_mask[:, -seq_len:]
        state = TokenState.initial(
            batch,
            seq_len,
            device,
            attention_mask=mask,
            protect_mask=protect,
            protect_first=self.config.protect_first,
            protect_last=self.resolved.protect_last,
        )
        mask_dtype = attention_mask.dtype if attention_mask is not None else torch.long
        self.session = Session(self, state, mask_dtype)
        return self.session

    def finish(self, session: Optional[Session], positions: Optional[torch.Tensor] = None) -> None:
        """Close the session; keep its statistics and plans as the last forward's. A multi-token forward
        of a model with nothing to reduce (no anchors) is recorded too, from ``positions``, its
        (B, N) kept positions (``kept_positions_for``)."""
        self.session = None
        if session is None:
            if positions is not None and not self.resolved.anchors and positions.shape[1] > 1:
                real = (positions >= 0).sum(1)
                entering = real.expand(self.resolved.num_layers, -1)
                self.last_stats = forward_stats(self.resolved, entering, real, real, positions)
                self.last_plans = {}
            return
        self.last_stats = session.summary()
        self.last_plans = dict(session.plans)


def kept_positions_for(session: Optional[Session], batch: int, seq_len: int, device, attention_mask) -> torch.Tensor:
    """(B, N') original indices of the output columns of a forward (-1 for padding columns)."""
    if session is not None:
        return session.state.pos
    positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
    if attention_mask is not None and attention_mask.dim() == 2:
        positions = torch.where(attention_mask[:, -seq_len:].to(device).bool(), positions, -1)
    return positions


@contextlib.contextmanager
def replay(runtime: Runtime, plans: dict[int, Plan]):
    """Force recorded plans at their anchors (extra trailing tokens are kept). Used to check that
    decoding after a reduced prefill equals a full forward reduced by the prefill's plans."""
    previous = runtime.replay_plans
    runtime.replay_plans = plans
    try:
        yield
    finally:
        runtime.replay_plans = previous
