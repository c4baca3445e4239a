"""Capture of what a model calls each of its blocks with, so that ``prune`` can replay every block alone with
the arguments the model gives it (its own attention mask, the residual of blocks returning
``(hidden, residual)``) and the outputs of the pruned block before it."""

from __future__ import annotations

import inspect
from typing import Optional

import torch

class _Captured(Exception):
    """Raised to stop a capture forward once the blocks it records have been called."""


class _Slot:
    """In a block's recorded arguments: output ``index`` of the block before it."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def block_outputs(output) -> tuple:
    """A block's output as a tuple (a tensor, or the tuple some blocks return: ``(hidden, residual)``)."""
    return tuple(output) if isinstance(output, (tuple, list)) else (output,)


def _map(obj, leaf):
    """``obj`` with every tensor or ``_Slot`` ``x`` in its tuples, lists and dicts replaced by ``leaf(x)``."""
    if isinstance(obj, (torch.Tensor, _Slot)):
        return leaf(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(o, leaf) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, leaf) for k, v in obj.items()}
    return obj


def _to(obj, device, memo: Optional[dict] = None):
    """``obj``'s tensors on ``device``; a tensor met again (one mask shared by many blocks) is moved once."""
    memo = {} if memo is None else memo

    def move(t):
        if isinstance(t, _Slot):
            return t
        if id(t) not in memo:
            memo[id(t)] = (t, t.to(device))  # (the source is held, so that its id stays its own)
        return memo[id(t)][1]
    return _map(obj, move)


def fill_slots(call, outputs: tuple):
    """A recorded ``(args, kwargs)`` with its ``_Slot``s replaced by the previous block's ``outputs``."""
    return _map(call, lambda t: outputs[t.index] if isinstance(t, _Slot) else t)


def _call_model(model, batch):
    """One forward of ``model`` on token ids; ``use_cache=False`` where its forward names that option."""
    try:
        takes_cache = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_cache = False
    return model(batch, use_cache=False) if takes_cache else model(batch)


def capture_inputs(model, blocks, tokens, batch_size, device):
    """What the model calls each block with, per calibration batch: a list over batches of lists over
    blocks of ``(args, kwargs)``, on ``device``. Block 0's are its real inputs; a later block's hold a
    ``_Slot`` where the previous block's outputs go (its hidden states, and the residual of blocks that
    return ``(hidden, residual)``) and, for everything else, what the model made for that block:
    attention masks differ per layer in models mixing sliding-window, full-attention and recurrent
    layers, and some models give each layer inputs of its own.

    Three passes, in which no block computes anything but block 0 once: (1) a forward of the first batch
    up to block 0; (2) block 0 on it, for the structure of a block's output; (3) forwards of every batch
    in which every block is a stand-in that records its arguments and returns placeholders of that
    structure, which the next block's arguments hold by identity. (A model of one block: pass 1 only.)"""
    model_device = next(model.parameters()).device
    batches = list(tokens.split(batch_size))
    first = _first_block_inputs(model, blocks, batches if len(blocks) == 1 else batches[:1], model_device)
    memo: dict = {}  # (a tensor that several calls share is moved once)
    if len(blocks) == 1:
        return [[_to(call, device, memo)] for call in first]
    home = next(blocks[0].parameters()).device
    blocks[0].to(device)
    try:
        args, kwargs = _to(first[0], device)
        output = blocks[0](*args, **kwargs)
        structure, bare = block_outputs(output), not isinstance(output, (tuple, list))
    finally:
        blocks[0].to(home)
    del first, args, kwargs, output
    if not isinstance(structure[0], torch.Tensor):
        raise TypeError(f"{type(blocks[0]).__name__} returned {type(structure[0]).__name__} first; prune "
                        "replays blocks that return their hidden states (or a tuple that starts with them)")
    captured = _record_blocks(model, blocks, batches, structure, bare, model_device)
    return [[_to(call, device, memo) for call in calls] for calls in captured]


def _first_block_inputs(model, blocks, batches, model_device) -> list:
    """Pass (1) of ``capture_inputs``: block 0's ``(args, kwargs)`` for each batch, from forwards that
    stop there."""
    captured: list = []

    def stop(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for batch in batches:
            try:
                _call_model(model, batch.to(model_device))
            except _Captured:
                pass
    except IndexError as err:  # (a learned position embedding shorter than the windows, typically)
        config = getattr(model, "config", None)
        limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        raise ValueError(
            f"the model failed on calibration windows of {batches[0].shape[1]} tokens (IndexError: {err})"
            + (f"; it takes at most {limit} positions: lower seqlen" if limit else "")
        ) from err
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError(f"the model's forward did not call its first block ({len(captured)} of {len(batches)} "
                           "calibration batches reached it)")
    return captured


def _record_blocks(model, blocks, batches, structure, bare, model_device) -> list:
    """Pass (3) of ``capture_inputs``: per batch, the recorded arguments of every block. The stand-ins
    return a tensor where block 0 did (``bare``), else a tuple (a 1-tuple too)."""
    captured: list = [[] for _ in batches]
    last = len(blocks) - 1
    saved = {i: block.__dict__["forward"] for i, block in enumerate(blocks) if "forward" in block.__dict__}
    state: dict = {}

    def stand_in(index):
        def forward(*args, **kwargs):
            markers, ids = state["markers"], state["ids"]
            if index:
                found = set()

                def slot(t):
                    if isinstance(t, torch.Tensor) and id(t) in ids:
                        found.add(ids[id(t)])
                        return _Slot(ids[id(t)])
                    return t
                call = _map((args, kwargs), slot)
                if 0 not in found:
                    raise TypeError(
                        f"{type(model).__name__} does not pass block {index - 1}'s output to block {index} as it "
                        "is (it changes the hidden states between blocks); prune cannot replay it block by block"
                    )
            else:
                call = (args, kwargs)
            state["calls"].append(call)
            if index == last:
                raise _Captured
            return markers[0] if bare else markers
        return forward

    try:
        for i, block in enumerate(blocks):
            block.forward = stand_in(i)
        for b, batch in enumerate(batches):
            # placeholders shaped like this batch's outputs (block 0's on the first batch otherwise)
            state["markers"] = tuple(
                torch.empty((batch.shape[0],) + t.shape[1:], dtype=t.dtype, device=model_device)
                if isinstance(t, torch.Tensor) else t for t in structure)
            state["ids"] = {id(t): j for j, t in enumerate(state["markers"]) if isinstance(t, torch.Tensor)}
            state["calls"] = captured[b]
            try:
                _call_model(model, batch.to(model_device))
            except _Captured:
                pass
            if len(captured[b]) != len(blocks):
                raise RuntimeError(f"the model's forward called {len(captured[b])} of its {len(blocks)} blocks")
    finally:
        for i, block in enumerate(blocks):
            if i in saved:
                block.forward = saved[i]
            else:
                block.__dict__.pop("forward", None)
    return captured
