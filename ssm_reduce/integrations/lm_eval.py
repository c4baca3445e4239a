"""lm-eval model ``ssm_reduce``: lm-eval's HF model with token reduction, scored correctly.

A model that returns fewer logits than it was given makes lm-eval slice the wrong positions: it
computes the scored window from the number of returned columns, so scores silently shift and depend
on the batch size. This model instead tells the reduced model, for every request, which positions
are scored (they are protected: never removed, never merged into), gives it the padding mask (lm-eval
pads on the right without one, which would make padding count as real tokens), and scatters the
kept logits back to their original positions, so lm-eval reads exactly the scored positions.

    lm-eval --model ssm_reduce \\
        --model_args pretrained=state-spaces/mamba2-2.7b,method=utr,flops_reduction=0.2 \\
        --tasks lambada_openai,hellaswag,piqa,arc_easy,arc_challenge,winogrande

Every ``ReduceConfig`` field is a model argument; ``layers`` takes ``|``-separated indices
(``layers=12|17|22``); ``pretrained=embedded`` selects the embedded model.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import ssm_reduce
from ssm_reduce.config import ReduceConfig
from ssm_reduce.embedded import resolve_model_name
from ssm_reduce.loading import checkpoint_format, load_model, load_tokenizer

REDUCE_FIELDS = {f.name for f in fields(ReduceConfig)}
_INT_FIELDS = ("protect_last", "protect_first", "seed")
_FLOAT_FIELDS = ("keep_ratio", "flops_reduction", "q_hidden", "q_residual")
_BOOL_FIELDS = ("causal", "size_weighted")


def reduce_config_from_args(args: dict) -> ReduceConfig:
    """A ReduceConfig from lm-eval model arguments (strings or already-typed values)."""
    values = {}
    for name, value in args.items():
        if value is None or value == "":
            continue
        if name == "layers":
            if isinstance(value, str):
                parts = [p for p in value.replace(":", "|").replace(";", "|").replace(" ", "|").split("|") if p]
                try:
                    value = [int(p) for p in parts]
                except ValueError:
                    raise ValueError(f"layers must be |-separated integers such as 12|17|22, got {value!r}") from None
            elif isinstance(value, int):
                value = [value]
        elif name in _FLOAT_FIELDS and isinstance(value, (str, int)) and not isinstance(value, bool):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{name} must be a number, got {value!r}") from None
        elif name in _INT_FIELDS and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {value!r}") from None
        elif name in _BOOL_FIELDS and isinstance(value, str):
            if value.lower() not in ("true", "false"):
                raise ValueError(f"{name} must be True or False, got {value!r}")
            value = value.lower() == "true"
        values[name] = value
    return ReduceConfig(**values)


@register_model("ssm_reduce")
class ReducedLM(HFLM):
    """lm-eval's ``HFLM`` plus token reduction (model arguments: every ``ReduceConfig`` field)."""

    def __init__(self, pretrained="embedded", **kwargs):
        config = reduce_config_from_args({k: kwargs.pop(k) for k in list(kwargs) if k in REDUCE_FIELDS})
        if isinstance(pretrained, str):
            pretrained = resolve_model_name(pretrained)
            if checkpoint_format(pretrained) == "mamba_ssm":
                # lm-eval cannot read this format: convert in memory (single process; for accelerate
                # data parallelism save it once with ssm_reduce.save_model(..., format="hf")).
                if kwargs.get("tokenizer") is None:
                    kwargs["tokenizer"] = load_tokenizer(pretrained)
                dtype = kwargs.get("dtype", "auto")
                pretrained = load_model(pretrained, dtype=None if dtype in (None, "auto") else dtype,
                                        device=_available(kwargs.get("device")))
        kwargs.setdefault("backend", "causal")
        super().__init__(pretrained=pretrained, **kwargs)
        ssm_reduce.apply(self.model, config)
        self.reduce_config = config
        self._scored_index = None

    @property
    def reducing(self) -> bool:
        return self.reduce_config.enabled

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        # lm-eval feeds (context + continuation)[-(max_length + 1):][:-1] and scores the last
        # len(continuation) logits; index those inputs so that _model_call can protect them.
        index: dict[tuple, int] = {}
        for _, context, continuation in requests:
            inp = tuple((context + continuation)[-(self.max_length + 1) :][:-1])
            index[inp] = max(index.get(inp, 0), len(continuation))
        self._scored_index = index
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._scored_index = None

    def _detect_batch_size(self, requests=None, pos: int = 0):
        # lm-eval's batch_size=auto probes with batches of made-up tokens that match no request: those
        # run dense (a bound on the reduced forward's memory)
        saved, self._scored_index = self._scored_index, None
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            self._scored_index = saved

    def _scored_masks(self, inps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(padding mask, protect mask) of a right-padded batch, from the request index."""
        batch, width = inps.shape
        attention = torch.zeros(batch, width, dtype=torch.long, device=inps.device)
        protect = torch.zeros(batch, width, dtype=torch.bool, device=inps.device)
        rows = inps.tolist()
        for b, row in enumerate(rows):
            trailing = len(row) - len(list(_rstrip_zeros(row)))
            found = False
            # Every split of the row into (request, zero padding) that matches a request is protected:
            # protecting a position too many is harmless, missing a scored one is not.
            for length in range(width, width - trailing - 1, -1):
                contlen = self._scored_index.get(tuple(row[:length]))
                if contlen is None:
                    continue
                if not found:
                    attention[b, :length] = 1
                    found = True
                protect[b, length - contlen : length] = True
            if not found:
                raise RuntimeError("ssm_reduce: a batch row matches no loglikelihood request; cannot protect its scored tokens")
        return attention, protect

    def _model_call(self, inps, attn_mask=None, labels=None):
        if not self.reducing or self._scored_index is None or attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        attention, protect = self._scored_masks(inps)
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
            ssm_reduce.protect(self.model, protect),
        ):
            out = self.model(inps, attention_mask=attention)
        kept = out.kept_positions.to(protect.device)
        missing = int(protect.sum()) - int((protect.gather(1, kept.clamp_min(0)) & (kept >= 0)).sum())
        if missing:  # only a method that ignores protection gets here (tor-official, as the official code)
            raise RuntimeError(
                f"ssm_reduce: method {self.reduce_config.method!r} removed {missing} scored positions of this batch "
                "(it ignores ssm_reduce.protect); lm-eval cannot score them correctly. Use another method."
            )
        return scatter_to_positions(out.logits, out.kept_positions, inps.shape[1])


def _available(device) -> str:
    """lm-eval's device argument as HFLM treats it: CUDA when asked for (or by default) and present, else
    the CPU."""
    if device in (None, "") or str(device).startswith("cuda"):
        return str(device or "cuda") if torch.cuda.is_available() else "cpu"
    return str(device)


def scatter_to_positions(logits: torch.Tensor, kept: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, N', V) logits of kept columns -> (B, N, V) at their original positions (zeros elsewhere)."""
    batch, _, vocab = logits.shape
    full = logits.new_zeros(batch, seq_len + 1, vocab)
    target = torch.where(kept >= 0, kept, seq_len)
    full.scatter_(1, target[..., None].expand(-1, -1, vocab), logits)
    return full[:, :seq_len]


def _rstrip_zeros(row: list[int]) -> list[int]:
    end = len(row)
    while end and row[end - 1] == 0:
        end -= 1
    return row[:end]
