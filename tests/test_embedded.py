"""The embedded default model: ships with the package, loads offline, is really trained."""

import json
import math

import pytest
import torch

import ssm_reduce
from ssm_reduce import cli
from ssm_reduce.embedded import EMBEDDED_DIR, heldout_files

from .hybrids import hybrids_unsupported

needs_hybrids = pytest.mark.skipif(bool(hybrids_unsupported()), reason=hybrids_unsupported() or "")


def _heldout_ids(tokenizer):
    """The first 513 bytes of the first held-out file, as ids."""
    root, rels = heldout_files()
    text = (root / sorted(rels)[0]).read_text(encoding="utf-8", errors="replace")
    return tokenizer(text, return_tensors="pt").input_ids[:, :513]


def _heldout_bits(model, ids):
    """Mean next-byte loss in bits over ``ids``."""
    logits = model(ids[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item() / math.log(2)


@pytest.fixture(scope="module")
def embedded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ssm_reduce.embedded_model_path()
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval(), AutoTokenizer.from_pretrained(path)


def test_card_and_size():
    card = json.loads((EMBEDDED_DIR / "training.json").read_text())
    assert card["heldout_bits_per_byte"] < 2.0
    assert (EMBEDDED_DIR / "model.safetensors").stat().st_size <= 20 * 2**20
    assert card["training"]["layers"] >= 12
    assert "file_list_sha256" in card and card["python_version"]
    assert (EMBEDDED_DIR / "README.md").read_text().count("held-out bits per byte") == 1


@torch.no_grad()
def test_heldout_bits_per_byte_only_a_trained_model_reaches(embedded):
    model, tokenizer = embedded
    assert type(model).__name__ == "Mamba2ForCausalLM" and model.config.num_hidden_layers >= 12
    # A uniform guess over 257 ids costs 8 bits per byte; random weights cost about as much.
    assert _heldout_bits(model, _heldout_ids(tokenizer)) < 3.0


@torch.no_grad()
def test_tokenizer_is_byte_level(embedded):
    _, tokenizer = embedded
    text = "def f(x):\n    return x  # é"
    ids = tokenizer(text).input_ids
    assert ids == list(text.encode())
    assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 256


def test_demo_uses_the_embedded_model(capsys):
    assert cli.main(["demo", "--tokens", "384", "--new-tokens", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "model: embedded (Mamba2ForCausalLM" in out
    assert "realised FLOPs reduction" in out and "reduced greedy" in out


@pytest.fixture(scope="module")
def embedded_hybrid():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ssm_reduce.embedded_model_path("embedded-hybrid")
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval(), AutoTokenizer.from_pretrained(path)


def test_hybrid_card_and_size():
    from ssm_reduce.embedded import EMBEDDED_HYBRID_DIR

    card = json.loads((EMBEDDED_HYBRID_DIR / "training.json").read_text())
    assert card["architecture"] == "NemotronHForCausalLM" and card["training"]["arch"] == "hybrid"
    assert card["heldout_bits_per_byte"] < 2.5
    assert (EMBEDDED_HYBRID_DIR / "model.safetensors").stat().st_size <= 15 * 2**20
    assert card["file_list_sha256"] == json.loads((EMBEDDED_DIR / "training.json").read_text())["file_list_sha256"]


@needs_hybrids
@torch.no_grad()
def test_hybrid_is_trained_and_reduces(embedded_hybrid):
    model, tokenizer = embedded_hybrid
    kinds = [layer.block_type for layer in model.model.layers]
    assert kinds.count("full_attention") + kinds.count("attention") in (2, 3)
    ids = _heldout_ids(tokenizer)
    assert _heldout_bits(model, ids) < 3.5
    ssm_reduce.apply(model, method="utr", flops_reduction=0.2)
    try:
        out = model(ids[:, :-1])
        stats = ssm_reduce.stats(model)
        assert out.logits.shape[1] < 512 and stats["realised_flops_reduction"] == pytest.approx(0.2, abs=0.02)
        assert all(e["attended_tokens"] <= e["dense_attended_tokens"] for e in stats["attention_layers"].values())
    finally:
        ssm_reduce.remove(model)


@needs_hybrids
def test_demo_runs_the_embedded_hybrid(capsys):
    assert cli.main(["demo", "--model", "embedded-hybrid", "--tokens", "384", "--new-tokens", "8",
                     "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "NemotronHForCausalLM" in out and "reduced greedy" in out
