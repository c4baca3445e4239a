"""Host-independent state of a patched model: its resolved config, and one :class:`Session` per forward.

A :class:`Runtime` belongs to a patched model and holds only what does not change between forwards.
Everything about one forward (token state, plans, captured tensors, the protection in force, that
forward's stats) lives in the forward's own :class:`Session`, which the patched modules of that call find
through a context variable: any number of threads can run one patched model at once. What a thread last
saw (``stats``, kept positions) is kept per thread.

Adapters (``ssm_reduce.patch.*``) wrap a backbone forward in :meth:`Runtime.forward`, call
:meth:`Session.reduce` inside every anchor block and :meth:`Runtime.record` at the end; *what* is reduced
comes from ``ssm_reduce.methods`` and ``ssm_reduce.reduce``, *which scan runs* from ``ssm_reduce.ops.route``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import methods
from .config import ResolvedConfig
from .ops import route
from .reduce import Plan, TokenState, build_plan, importance_scores

logger = logging.getLogger(__name__)

# The Session class a forward opens: ``ssm_reduce.testing`` sets a subclass for the forwards of its blocks.
SESSION_CLASS: contextvars.ContextVar = contextvars.ContextVar("ssm_reduce_session_class", default=None)


class Session:
    """One multi-token forward of a patched model."""

    def __init__(self, runtime: "Runtime", state: TokenState, mask_dtype: torch.dtype):
        self.runtime = runtime
        self.resolved = runtime.resolved
        self.method = runtime.method
        self.state = state
        self.mask_dtype = mask_dtype
        self.reduced = False
        self.all_valid = True  # no padding left after the latest reduction
        self.n_real_after: dict[int, torch.Tensor] = {}
        self.n_real_input = state.n_real
        self.captured: dict[str, torch.Tensor] = {}
        self.captured_scores: dict[tuple[str, str], torch.Tensor] = {}
        self.plans: dict[int, Plan] = {}
        self.mixer_routes: dict[int, tuple] = {}  # id(mixer) -> (route, session) while an anchor replaces its call
        self._budget: Optional[tuple[int, torch.Tensor]] = None

    @property
    def anchors(self) -> tuple[int, ...]:
        return self.resolved.anchors

    @property
    def needs_y(self) -> bool:
        """Anchors read the scan output y itself (``importance_source`` or ``similarity_source`` ``ssm``)."""
        return "ssm" in self.runtime.sources

    def block_mask(self, host_mask: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
        """The padding mask a block on ``device`` must see: the host's until the first reduction, then
        ours (``None`` when no padding is left, as the hosts do for all-ones masks)."""
        if not self.reduced:
            return host_mask
        if self.all_valid:
            return None
        return self.state.valid.to(device=device, dtype=self.mask_dtype)

    def scan_route(self, anchor: route.AnchorScan, device) -> route.Scan:
        """Which scan this forward's anchor runs (``ops.route.anchor_scan``)."""
        return route.anchor_scan(anchor, device, self.needs_y)

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
        budget = self.method.budget(self.state, self.resolved.keep_ratio)
        self._budget = (layer, budget)
        return int(budget.max()) > 0

    def reduce(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor):
        """Reduce the mixer output ``hidden`` and the ``residual`` (both (B, N, D)) after anchor ``layer``
        (which ``reduces_at`` said removes tokens)."""
        try:
            state = self.state = self.state.to(hidden.device)
            if self._budget is not None and self._budget[0] == layer:
                r = self._budget[1].to(hidden.device)
            else:
                r = self.method.budget(state, self.resolved.keep_ratio)
            if self.method.reduce is not None:
                hidden, residual, self.state = self.method.reduce(hidden, residual, state, r,
                                                                  self.resolved.config.importance)
            else:
                plan = self._plan(layer, state, r, hidden)
                hidden, residual = plan.apply(hidden, residual)
                self.state = plan.state
                self.plans[layer] = plan
            self._after_reduction(layer)
            return hidden, residual
        finally:
            self._budget = None
            self.captured.clear()
            self.captured_scores.clear()

    def _plan(self, layer: int, state: TokenState, r: torch.Tensor, hidden: torch.Tensor) -> Plan:
        config = self.resolved.config
        with torch.no_grad():
            importance = self._importance(config, hidden)
            features = self._source(config.similarity_source, hidden) if self.method.matches else None
            selection = self.method.select(state, r, importance, features, config.seed, layer)
            q_hidden, q_residual = config.stream_q()
            return build_plan(state, selection, importance, q_hidden, q_residual, config.causal, config.size_weighted)

    def _after_reduction(self, layer: int) -> None:
        self.reduced = True
        self.all_valid = bool(self.state.valid.all())
        self.n_real_after[layer] = self.state.n_real

    def summary(self) -> dict:
        """Statistics of this forward (see ``ssm_reduce.stats``)."""
        resolved = self.resolved
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


@dataclass
class Latest:
    """What one thread's latest forwards left: the stats and plans of its latest multi-token forward,
    and the (B, N') original indices of the output columns of its latest forward, decode steps included."""

    stats: Optional[dict] = None
    plans: dict = field(default_factory=dict)
    kept: Optional[torch.Tensor] = None


class Runtime:
    """The configuration shared by the patched modules of one model (read-only during forwards), and
    each thread's :class:`Latest`."""

    def __init__(self, resolved: ResolvedConfig):
        self.resolved = resolved
        self.method = methods.get(resolved.config.method)
        config = resolved.config
        self.sources = self.method.sources(config.importance_source, config.similarity_source)
        # Patched through the causal LM (which owns the patch of its backbone) or a bare backbone.
        self.patched_whole_lm = False
        self._init_call_state()

    def _init_call_state(self) -> None:
        self._session = contextvars.ContextVar(f"ssm_reduce_session_{id(self)}", default=None)
        self._protect = contextvars.ContextVar(f"ssm_reduce_protect_{id(self)}", default=None)
        self._local = threading.local()

    # A copy (``copy.deepcopy`` of a patched model, pickling) shares no call state with the original.
    def __deepcopy__(self, memo):
        twin = Runtime.__new__(Runtime)
        memo[id(self)] = twin
        twin.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("_session", "_protect", "_local")})
        twin._init_call_state()
        return twin

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_session", "_protect", "_local")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_call_state()

    @property
    def config(self):
        return self.resolved.config

    def session(self) -> Optional[Session]:
        """The session of the forward running in this thread (None outside one, or in a forward that
        does not reduce)."""
        return self._session.get()

    @property
    def latest(self) -> Latest:
        """This thread's :class:`Latest`."""
        latest = getattr(self._local, "latest", None)
        if latest is None:
            latest = self._local.latest = Latest()
        return latest

    @contextlib.contextmanager
    def protecting(self, mask: torch.Tensor):
        """Within the block, this thread's forwards protect ``mask`` (bool (B, N))."""
        token = self._protect.set(mask)
        try:
            yield
        finally:
            self._protect.reset(token)

    @property
    def protect_mask(self) -> Optional[torch.Tensor]:
        """The protection mask in force in this thread."""
        return self._protect.get()

    @contextlib.contextmanager
    def forward(self, batch: int, seq_len: int, device, attention_mask: Optional[torch.Tensor], reduce: bool = True):
        """Run one backbone forward over (batch, seq_len) tokens: yields its session, or ``None`` when this
        forward cannot reduce (no anchors, a single-token decode step, or ``reduce=False``)."""
        session = self._open(batch, seq_len, device, attention_mask) if reduce else None
        token = self._session.set(session)
        try:
            yield session
        finally:
            self._session.reset(token)

    def _open(self, batch: int, seq_len: int, device, attention_mask: Optional[torch.Tensor]) -> Optional[Session]:
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
        session_class = SESSION_CLASS.get() or Session
        return session_class(self, state, mask_dtype)

    def record(self, session: Optional[Session], positions: torch.Tensor) -> None:
        """Keep a finished forward's kept positions ((B, N), ``kept_positions_for``) as this thread's latest,
        and its statistics and plans when it was a multi-token forward (a model with nothing to reduce
        records those too)."""
        latest = self.latest
        latest.kept = positions
        if session is not None:
            latest.stats, latest.plans = session.summary(), dict(session.plans)
        elif not self.resolved.anchors and positions.shape[1] > 1:
            real = (positions >= 0).sum(1)
            entering = real.expand(self.resolved.num_layers, -1)
            latest.stats, latest.plans = forward_stats(self.resolved, entering, real, real, positions), {}


def kept_positions_for(session: Optional[Session], batch: int, seq_len: int, device, attention_mask) -> torch.Tensor:
    """(B, N') original indices of the output columns of a forward (-1 for padding columns)."""
    if session is not None:
        return session.state.pos
    positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
    if attention_mask is not None and attention_mask.dim() == 2:
        positions = torch.where(attention_mask[:, -seq_len:].to(device).bool(), positions, -1)
    return positions
