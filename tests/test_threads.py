"""Concurrent forwards on one patched model give exactly what each gives alone.

An inference server's thread pool runs one model from many threads. Here 8 threads run 20 forwards each,
of differently shaped, padded batches, some under ``protect`` and some forced through the ``ssm_reduce.ops``
route, for every method on the transformers adapter (Mamba-2 and Mamba-1) and the mamba_ssm adapter; every
result, and the ``stats`` each thread reads after its forward, must equal that call run alone.
"""

import threading

import pytest
import torch

import ssm_reduce
from ssm_reduce import methods
from ssm_reduce.testing import force_scan

from .conftest import left_padded, random_tokens, tiny_mamba, tiny_mamba2
from .test_patch_mamba_ssm import _as_mamba_ssm_mixer, stand_in_classes

THREADS, FORWARDS = 8, 20


def _protect(shape, spans):
    mask = torch.zeros(shape, dtype=torch.bool)
    for row, (start, stop) in enumerate(spans):
        mask[row, start:stop] = True
    return mask


def hf_cases():
    """(input_ids, attention_mask, protect mask or None, force the ops route) of distinct shapes."""
    cases = []
    for seed, (batch, length, pads) in enumerate([(2, 24, [0, 5]), (3, 31, [0, 0, 9]), (1, 40, [0]),
                                                   (4, 17, [3, 0, 0, 6]), (2, 36, [0, 12]), (3, 28, [0, 2, 4])]):
        ids, mask = left_padded(batch, length, pads, seed=seed + 3)
        protect = None
        if seed >= 4:  # protect a few real tokens of every row
            protect = _protect((batch, length), [(pad + 2, pad + 6) for pad in pads])
        cases.append((ids, mask, protect, seed % 3 == 1))
    return cases


def mamba_ssm_cases():
    """mamba_ssm takes no padding mask: unpadded batches, protection of as many tokens in every row."""
    cases = []
    for seed, (batch, length) in enumerate([(2, 24), (3, 31), (1, 40), (4, 17), (2, 36), (3, 28)]):
        protect = _protect((batch, length), [(3 + row, 7 + row) for row in range(batch)]) if seed >= 4 else None
        cases.append((random_tokens(batch, length, seed=seed + 3), None, protect, seed % 3 == 1))
    return cases


def run_case(model, case):
    ids, mask, protect, through_ops = case
    kwargs = {} if mask is None else {"attention_mask": mask}
    with torch.no_grad(), force_scan(model, True if through_ops else None):
        if protect is None:
            out = model(ids, **kwargs)
        else:
            with ssm_reduce.protect(model, protect):
                out = model(ids, **kwargs)
    stats = ssm_reduce.stats(model)
    return out.logits, out.kept_positions, {k: v for k, v in stats.items() if k != "kept_positions"}


def assert_concurrent_equals_alone(model, cases):
    alone = [run_case(model, case) for case in cases]
    for (_, kept, _), (_, _, protect, _) in zip(alone, cases):
        if protect is not None and methods.get(ssm_reduce.stats(model)["method"]).protects:
            assert all(set(protect[b].nonzero().flatten().tolist()) <= set(kept[b].tolist()) for b in range(len(kept)))
    assert len({tuple(case[0].shape) for case in cases}) == len(cases), "the cases must differ in shape"
    barrier, failures = threading.Barrier(THREADS), []

    def worker(thread: int):
        barrier.wait()
        for step in range(FORWARDS):
            index = (thread * 5 + step * 7) % len(cases)
            try:
                logits, kept, stats = run_case(model, cases[index])
            except Exception as err:  # noqa: BLE001 - reported below with the case that raised
                failures.append(f"thread {thread}, forward {step}, case {index}: {type(err).__name__}: {err}")
                continue
            ref_logits, ref_kept, ref_stats = alone[index]
            if not (torch.equal(logits, ref_logits) and torch.equal(kept, ref_kept)):
                failures.append(f"thread {thread}, forward {step}, case {index}: output differs from the call alone")
            if stats != ref_stats:
                failures.append(f"thread {thread}, forward {step}, case {index}: stats differ from the call alone")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, f"{len(failures)} of {THREADS * FORWARDS} forwards: " + "; ".join(failures[:5])


def _reduce(model, method):
    layers = [1, 3] if method != "recent" else [1, 2, 3]
    return ssm_reduce.apply(model, method=method, keep_ratio=0.7, layers=layers)


@pytest.mark.parametrize("method", ssm_reduce.METHODS)
def test_transformers_mamba2_threads(method):
    assert_concurrent_equals_alone(_reduce(tiny_mamba2(layers=5), method), hf_cases())


@pytest.mark.parametrize("method", ssm_reduce.METHODS)
def test_transformers_mamba1_threads(method):
    assert_concurrent_equals_alone(_reduce(tiny_mamba(layers=4), method), hf_cases())


@pytest.mark.parametrize("method", ssm_reduce.METHODS)
def test_mamba_ssm_threads(method):
    model = stand_in_classes()(tiny_mamba2(layers=5)).eval()
    for block in model.backbone.layers:
        _as_mamba_ssm_mixer(block.mixer)
    assert_concurrent_equals_alone(_reduce(model, method), mamba_ssm_cases())


def test_generate_in_threads_equals_generate_alone():
    """Prefill reduced and decode steps interleaved across threads: each thread's greedy tokens and its
    stats (the prefill's) are those of its call alone."""
    model = _reduce(tiny_mamba2(layers=5), "utr")
    cases = hf_cases()[:4]

    def generate(case):
        ids, mask, _, _ = case
        with torch.no_grad():
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        return tokens, ssm_reduce.stats(model)["kept_per_row"]

    alone = [generate(case) for case in cases]
    results: dict = {}

    def worker(thread: int):
        results[thread] = [generate(cases[(thread + step) % len(cases)]) for step in range(4)]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for thread, outs in results.items():
        for step, (tokens, kept) in enumerate(outs):
            ref_tokens, ref_kept = alone[(thread + step) % len(cases)]
            assert torch.equal(tokens, ref_tokens) and kept == ref_kept, (thread, step)
    assert len(results) == THREADS


def test_protect_and_stats_are_per_thread():
    """A thread inside ``protect`` does not protect another thread's forwards, and ``stats`` reads the
    calling thread's latest forward."""
    model = _reduce(tiny_mamba2(layers=5), "evit")
    ids = random_tokens(1, 40, seed=5)
    protect = torch.zeros(1, 40, dtype=torch.bool)
    protect[0, 4:20] = True
    inside, entered, done, seen = threading.Event(), threading.Event(), threading.Event(), {}

    def protecting():
        with ssm_reduce.protect(model, protect):
            entered.set()
            inside.wait()
            with torch.no_grad():
                seen["protected"] = model(ids).kept_positions
        done.set()

    thread = threading.Thread(target=protecting)
    thread.start()
    entered.wait()
    with torch.no_grad():  # this thread's forward while the other sits inside protect
        plain = model(ids).kept_positions
        short = model(random_tokens(2, 25, seed=6))
    inside.set()
    done.wait()
    thread.join()
    assert set(range(4, 20)) <= set(seen["protected"][0].tolist())
    assert not set(range(4, 20)) <= set(plain[0].tolist())  # evit removes low scorers there: unprotected here
    assert ssm_reduce.stats(model)["input_tokens_per_row"] == [25, 25]  # this thread's latest, not the other's
    assert torch.equal(ssm_reduce.stats(model)["kept_positions"], short.kept_positions)
