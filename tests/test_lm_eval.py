"""The lm-eval model ``ssm_reduce``: exact when dense, batch-size invariant and protected when reduced."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import ssm_reduce  # noqa: E402
from ssm_reduce.embedded import byte_tokenizer  # noqa: E402
from ssm_reduce.integrations.lm_eval import ReducedLM, reduce_config_from_args  # noqa: E402
from ssm_reduce.testing import latest_plans  # noqa: E402

from .conftest import tiny_mamba2  # noqa: E402
from .hybrids import hybrids_unsupported, tiny_hybrid  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Two local tasks: 4-way multiple choice and a last-word completion, from JSONL files."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    mc, lw = [], []
    for i in range(24):
        context = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(4)]
        mc.append({"context": context, "choices": choices, "label": i % 4})
        lw.append({"text": context + " " + rng.choice(WORDS)})
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (root / "lw.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lw))
    (root / "local_mc.yaml").write_text(f"""task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'mc.jsonl'}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
""")
    (root / "local_lw.yaml").write_text(f"""task: local_lw
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'lw.jsonl'}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: acc
""")
    return root


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_mamba2(layers=8, vocab_size=257, pad_token_id=256, bos_token_id=256, eos_token_id=256), byte_tokenizer()


def loglikelihoods(lm, task_dir, tasks=("local_mc", "local_lw")):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    results = simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True, bootstrap_iters=0,
    )
    out = []
    for task in tasks:
        for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
            out.extend(float(r[0][0]) for r in sample["resps"])
    return out


def test_dense_equals_stock_hf_exactly(model_and_tokenizer, task_dir):
    model, tok = model_and_tokenizer
    stock = loglikelihoods(HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu"), task_dir)
    ours = loglikelihoods(ReducedLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu"), task_dir)
    ssm_reduce.remove(model)
    assert ours == stock


def test_reduced_scores_do_not_depend_on_batch_size(model_and_tokenizer, task_dir):
    model, tok = model_and_tokenizer
    args = dict(pretrained=model, tokenizer=tok, device="cpu", method="utr", keep_ratio=0.7, layers="1|3|5")
    one = loglikelihoods(ReducedLM(batch_size=1, **args), task_dir)
    eight = loglikelihoods(ReducedLM(batch_size=8, **args), task_dir)
    ssm_reduce.remove(model)
    dense = loglikelihoods(HFLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu"), task_dir)
    assert len(one) == len(eight) == len(dense)
    assert max(abs(a - b) for a, b in zip(one, eight)) < 1e-4
    assert all(torch.isfinite(torch.tensor(one)))
    assert max(abs(a - b) for a, b in zip(one, dense)) > 1e-3  # the reduction really ran


def test_scored_positions_are_never_removed_or_merged_into(model_and_tokenizer, task_dir, monkeypatch):
    model, tok = model_and_tokenizer
    lm = ReducedLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu", method="utr", keep_ratio=0.6,
                   layers="1|2|4|6")
    checked = []
    original = ReducedLM._model_call

    def checking_call(self, inps, attn_mask=None, labels=None):
        if self._scored_index is None:
            return original(self, inps, attn_mask, labels)
        _, protect = self._scored_masks(inps)
        logits = original(self, inps, attn_mask, labels)
        stats = ssm_reduce.stats(self.model)
        kept = stats["kept_positions"]
        for b in range(inps.shape[0]):
            assert set(protect[b].nonzero().flatten().tolist()) <= set(kept[b].tolist())
        for plan in latest_plans(self.model).values():  # a protected token's column holds it alone
            for b in range(inps.shape[0]):
                for i in plan.state.protected[b].nonzero().flatten().tolist():
                    assert int((plan.slot[b] == i).sum()) == 1
        checked.append(int(protect.sum()))
        assert stats["realised_flops_reduction"] > 0
        return logits

    monkeypatch.setattr(ReducedLM, "_model_call", checking_call)
    loglikelihoods(lm, task_dir)
    ssm_reduce.remove(model)
    assert checked and sum(checked) > 0


def test_generate_until_runs_reduced(model_and_tokenizer):
    from lm_eval.api.instance import Instance

    model, tok = model_and_tokenizer
    lm = ReducedLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu", method="utr", keep_ratio=0.7)
    requests = [
        Instance("generate_until", {}, (" ".join(WORDS[:20]), {"until": ["\n"], "max_gen_toks": 5}), 0),
        Instance("generate_until", {}, (" ".join(WORDS[3:12]), {"until": ["\n"], "max_gen_toks": 5}), 1),
    ]
    out = lm.generate_until(requests)
    ssm_reduce.remove(model)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)


def test_model_args_parsing():
    cfg = reduce_config_from_args({"method": "evit", "keep_ratio": "0.8", "layers": "3|5|7", "causal": "False",
                                   "protect_last": "2"})
    assert cfg.method == "evit" and cfg.keep_ratio == 0.8 and cfg.layers == (3, 5, 7)
    assert cfg.causal is False and cfg.protect_last == 2
    with pytest.raises(ValueError, match="layers must be"):
        reduce_config_from_args({"layers": "3,a"})
    with pytest.raises(ValueError, match="causal must be True or False"):
        reduce_config_from_args({"causal": "maybe"})
    with pytest.raises(ValueError, match="method='x' is not supported"):
        reduce_config_from_args({"method": "x"})
    with pytest.raises(ValueError, match="keep_ratio must be a number, got 'abc'"):
        reduce_config_from_args({"keep_ratio": "abc"})
    with pytest.raises(ValueError, match="protect_last must be an integer, got 'x'"):
        reduce_config_from_args({"protect_last": "x"})


def test_a_method_that_removes_scored_positions_is_refused(model_and_tokenizer, task_dir):
    """tor-official protects nothing (as the official code): where it removes a scored position, the
    model stops with an error instead of scoring that position from missing (zero) logits."""
    model, tok = model_and_tokenizer
    lm = ReducedLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu", method="tor-official",
                   keep_ratio=0.5, layers="1|3|5")
    try:
        with pytest.raises(RuntimeError, match=r"method 'tor-official' removed \d+ scored positions"):
            loglikelihoods(lm, task_dir)
    finally:
        ssm_reduce.remove(model)


def test_cli_passes_lm_eval_flags_through(model_and_tokenizer, task_dir, tmp_path):
    model, tok = model_and_tokenizer
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "results"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "ssm_reduce", "eval", "--model", "ssm_reduce",
         "--model_args", f"pretrained={tmp_path / 'model'},method=utr,keep_ratio=0.8",
         "--tasks", "local_mc", "--include_path", str(task_dir), "--device", "cpu", "--limit", "6",
         "--batch_size", "4", "--output_path", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "local_mc" in proc.stdout
    written = list(out.rglob("results*.json"))
    assert written
    saved = json.loads(written[0].read_text())
    assert saved["n-samples"]["local_mc"] == {"original": 24, "effective": 6}  # --limit took effect
    assert saved["config"]["model_args"]["method"] == "utr" and str(saved["config"]["batch_size"]) == "4"
    assert saved["results"]["local_mc"]["acc,none"] * 6 in {0, 1, 2, 3, 4, 5, 6}  # an accuracy over 6 items


def test_batch_size_auto_with_reduction(model_and_tokenizer, task_dir):
    """lm-eval's ``batch_size=auto`` probes with made-up batches that match no request: they run dense,
    and the scores are those of a fixed batch size."""
    model, tok = model_and_tokenizer
    args = dict(pretrained=model, tokenizer=tok, device="cpu", method="utr", keep_ratio=0.7, layers="1|3|5")
    auto = loglikelihoods(ReducedLM(batch_size="auto", max_batch_size=8, **args), task_dir, tasks=("local_mc",))
    fixed = loglikelihoods(ReducedLM(batch_size=8, **args), task_dir, tasks=("local_mc",))
    ssm_reduce.remove(model)
    assert len(auto) == len(fixed) and max(abs(a - b) for a, b in zip(auto, fixed)) < 1e-4


def test_mamba_ssm_checkpoint_without_a_device_uses_what_is_there(tmp_path):
    """As lm-eval's HF model does: CUDA when present, else the CPU (its CLI passes cuda:0 by default)."""
    from .test_loading import mamba_ssm_checkpoint

    mamba_ssm_checkpoint(tmp_path, "Mamba2")
    byte_tokenizer().save_pretrained(tmp_path)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    for device in ({}, {"device": "cuda:0"}):
        lm = ReducedLM(pretrained=str(tmp_path), method="utr", keep_ratio=0.8, **device)
        assert next(lm.model.parameters()).device.type == expected


@pytest.mark.skipif(bool(hybrids_unsupported()), reason=hybrids_unsupported() or "")
@pytest.mark.parametrize("name", ["granite", "zamba2"])
def test_hybrids_dense_exact_and_reduced_batch_invariant(name, task_dir):
    """On hybrids too: dense scores equal stock HFLM's; reduced scores do not depend on the batch size and
    differ from the dense ones."""
    model = tiny_hybrid(name, vocab_size=257, pad_token_id=256, bos_token_id=256, eos_token_id=256)
    tok = byte_tokenizer()
    stock = loglikelihoods(HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu"), task_dir)
    assert loglikelihoods(ReducedLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu"), task_dir) == stock
    args = dict(pretrained=model, tokenizer=tok, device="cpu", method="utr", keep_ratio=0.7)
    one = loglikelihoods(ReducedLM(batch_size=1, **args), task_dir)
    eight = loglikelihoods(ReducedLM(batch_size=8, **args), task_dir)
    assert one == pytest.approx(eight, abs=1e-4)
    assert one != pytest.approx(stock, abs=1e-4)


@pytest.mark.skipif(bool(hybrids_unsupported()), reason=hybrids_unsupported() or "")
def test_pretrained_embedded_hybrid_loads_the_embedded_hybrid(task_dir):
    """``pretrained=embedded-hybrid`` loads the packaged hybrid with its tokenizer, and it reduces."""
    lm = ReducedLM(pretrained="embedded-hybrid", device="cpu", batch_size=4, method="utr", keep_ratio=0.7)
    assert type(lm.model).__name__ == "NemotronHForCausalLM"
    reduced = loglikelihoods(lm, task_dir, tasks=("local_lw",))
    dense = loglikelihoods(ReducedLM(pretrained="embedded-hybrid", device="cpu", batch_size=4), task_dir,
                           tasks=("local_lw",))
    assert all(x < 0 for x in reduced + dense) and reduced != pytest.approx(dense, abs=1e-4)
