"""The windowed perplexity protocol (reduce the context, score a protected suffix)."""

import math

import pytest
import torch

import ssm_reduce
from ssm_reduce.evaluation import compare_perplexity, windowed_perplexity, windows_of

from .conftest import random_tokens, tiny_mamba2


@torch.no_grad()
def test_dense_matches_a_hand_computation():
    model = tiny_mamba2()
    tokens = random_tokens(1, 500)[0]
    result = windowed_perplexity(model, tokens, window=96, scored=16, batch_size=3)
    nll, count = 0.0, 0
    for start in range(0, 500 - 96, 96):
        w = tokens[start : start + 97]
        logits = model(w[None, :-1]).logits[0, -16:]
        nll += torch.nn.functional.cross_entropy(logits, w[-16:], reduction="sum").item()
        count += 16
    assert result["windows"] == len(range(0, 500 - 96, 96)) and result["scored_tokens"] == count
    assert result["nll"] == pytest.approx(nll / count, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-6)


@torch.no_grad()
def test_reduced_context_scored_suffix():
    model = tiny_mamba2(layers=8)
    tokens = random_tokens(1, 800)[0]
    config = ssm_reduce.ReduceConfig(method="utr", keep_ratio=0.7)
    both = compare_perplexity(model, tokens, config, window=128, scored=16, batch_size=4)
    dense, reduced = both["dense"], both["reduced"]
    assert not ssm_reduce.is_patched(model)
    assert dense["scored_tokens"] == reduced["scored_tokens"] == 16 * len(range(0, 800 - 128, 128))
    assert reduced["realised_flops_reduction"] > 0.2
    assert math.isfinite(reduced["perplexity"]) and reduced["nll"] != dense["nll"]
    # patched without any reduction: identical to dense
    ssm_reduce.apply(model)
    same = windowed_perplexity(model, tokens, window=128, scored=16, batch_size=4)
    assert same["nll"] == dense["nll"]


def test_bad_arguments():
    model = tiny_mamba2()
    tokens = random_tokens(1, 100)[0]
    with pytest.raises(ValueError, match=r"scored must be in \[1, window\)"):
        windowed_perplexity(model, tokens, window=32, scored=32)
    with pytest.raises(ValueError, match="fewer than one window"):
        windowed_perplexity(model, tokens, window=200, scored=8)
    with pytest.raises(ValueError, match="1-D tensor"):
        windows_of(tokens[None], 16)
