"""The command line and the build switch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssm_reduce import cli

ROOT = Path(__file__).resolve().parents[1]


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "ssm_reduce" in out and "kernels:" in out
    assert "Mamba2ForCausalLM" in out and "GraniteMoeHybridForCausalLM" in out
    assert "utr" in out


def test_info_prints_a_hybrids_resolved_anchors(capsys):
    assert cli.main(["info", "--model", "embedded-hybrid", "--method", "utr", "--flops-reduction", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "Mamba layers (anchors move to the nearest): [0, 1, 2, 4, 5, 6, 7, 9, 10, 11]" in out
    assert "anchors: [" in out and "layer 2: host" in out


def test_ppl_runs_on_the_embedded_hybrid(capsys):
    assert cli.main(["ppl", "--model", "embedded-hybrid", "--method", "utr", "--flops-reduction", "0.2",
                     "--window", "256", "--scored", "64", "--windows", "2"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
            if line.strip().startswith(("dense", "utr"))}
    assert float(rows["dense"][2]) == 0.0 and abs(float(rows["utr"][2]) - 0.2) < 0.02
    assert float(rows["dense"][1]) < 3.0 and float(rows["utr"][1]) < 3.0  # bits per token of a trained model


def test_prune_runs_on_the_embedded_hybrid(tmp_path, capsys):
    """Pruning reaches the Mamba and the attention layers' linears, and the pruned hybrid still reduces."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    import ssm_reduce

    assert cli.main(["prune", "--model", "embedded-hybrid", "--pattern", "2:4", "--method", "sparsegpt",
                     "--calib", "embedded", "--nsamples", "2", "--seqlen", "128", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "prune_report.json").read_text())
    names = [layer["name"] for layer in report["layers"]]
    assert any("mixer.in_proj" in n for n in names) and any("mixer.q_proj" in n for n in names)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path)
    w = pruned.model.layers[3].mixer.q_proj.weight
    assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())
    ssm_reduce.apply(pruned, method="utr", flops_reduction=0.2)
    with torch.no_grad():
        out = pruned(torch.randint(0, 256, (1, 300)))
    assert out.logits.shape[1] < 300 and torch.isfinite(out.logits).all()


def test_demo_rejects_bad_target(capsys):
    code = cli.main(["demo", "--flops-reduction", "1.5"])
    assert code == 2
    assert "flops_reduction must be in [0.0, 1.0)" in capsys.readouterr().err


def test_unknown_method_is_refused():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--method", "fastest"])


def test_build_cuda_1_fails_loudly_without_cuda():
    import torch

    if torch.version.cuda is not None:
        pytest.skip("torch has CUDA here; the loud failure is for CPU-only builds")
    env = dict(os.environ, SSM_REDUCE_BUILD_CUDA="1")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "SSM_REDUCE_BUILD_CUDA=1 but the CUDA extension cannot be built" in proc.stderr + proc.stdout


def test_build_switch_validated():
    env = dict(os.environ, SSM_REDUCE_BUILD_CUDA="maybe")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "must be auto, 1 or 0" in proc.stderr + proc.stdout
    env = dict(os.environ, SSM_REDUCE_BUILD_CUDA="0")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "ssm_reduce" in proc.stdout


def test_prune_command(tmp_path, capsys):
    import json

    from ssm_reduce.embedded import byte_tokenizer

    from .conftest import tiny_mamba2

    model = tiny_mamba2(layers=2, vocab_size=257, pad_token_id=256, bos_token_id=256, eos_token_id=256)
    model.save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("def f(x):\n    return x * 2\n" * 200)
    code = cli.main(["prune", "--model", str(tmp_path / "model"), "--pattern", "2:4", "--method", "mrp",
                     "--calib", str(tmp_path / "calib.txt"), "--nsamples", "4", "--seqlen", "128",
                     "--out", str(tmp_path / "pruned")])
    assert code == 0
    assert "overall sparsity 0.5000" in capsys.readouterr().out
    report = json.loads((tmp_path / "pruned" / "prune_report.json").read_text())
    assert report["method"] == "mrp" and len(report["layers"]) == 4
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    w = pruned.backbone.layers[1].mixer.out_proj.weight
    assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())


def test_prune_command_rejects_bad_pattern(capsys):
    assert cli.main(["prune", "--pattern", "4:4"]) == 2
    assert "must keep 0 < N < M" in capsys.readouterr().err
    assert cli.main(["prune", "--sparsity", "0.5", "--swap-rounds", "-1"]) == 2
    assert "swap_rounds must be an integer >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["prune", "--sparsity", "0.5", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["prune", "--sparsity", "0.5", "--seqlen", "x"], "argument --seqlen: must be an integer >= 2, got 'x'"),
    (["demo", "--tokens", "0"], "argument --tokens: must be an integer >= 2, got 0"),
    (["demo", "--tokens", "-5"], "argument --tokens: must be an integer >= 2, got -5"),
    (["demo", "--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0"),
    (["demo", "--new-tokens", "0"], "argument --new-tokens: must be an integer >= 1, got 0"),
    (["ppl", "--windows", "0"], "argument --windows: must be an integer >= 1, got 0"),
    (["demo", "--device", "bogus"], "argument --device: 'bogus' is not a device"),
])
def test_bad_numbers_and_devices_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_cuda_device_is_refused_where_there_is_none(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    with pytest.raises(SystemExit):
        cli.main(["demo", "--device", "cuda"])
    assert "argument --device: 'cuda': CUDA is not available here" in capsys.readouterr().err


def test_prune_command_checks_out_before_pruning(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("")
    assert cli.main(["prune", "--sparsity", "0.5", "--model", str(tmp_path / "missing"), "--out", str(target)]) == 2
    assert "--out" in capsys.readouterr().err and target.read_text() == ""


def test_ppl_joins_the_files_with_the_tokenizer_end_of_text(monkeypatch, capsys):
    """The default text's files are separated by the checkpoint tokenizer's own end-of-text id."""
    from types import SimpleNamespace

    import ssm_reduce.evaluation

    class Tokenizer:
        eos_token_id = 7

        def __call__(self, text):
            return SimpleNamespace(input_ids=[20, 21, 22])

    seen = {}

    def compare(model, ids, config, **kwargs):
        seen["ids"] = ids
        row = {"windows": 1, "scored_tokens": 1, "perplexity": 1.0, "bits_per_token": 0.0,
               "realised_flops_reduction": 0.0}
        return {"dense": row, "reduced": row}

    from .conftest import tiny_mamba2

    monkeypatch.setattr(cli, "_load", lambda *args: (tiny_mamba2(), Tokenizer()))
    monkeypatch.setattr(ssm_reduce.evaluation, "compare_perplexity", compare)
    assert cli.main(["ppl", "--windows", "1"]) == 0
    ids = seen["ids"].tolist()
    assert ids[:4] == [20, 21, 22, 7] and ids.count(7) == len(ids) // 4 and 256 not in ids


def test_demo_with_too_many_tokens_is_a_usage_error(capsys):
    assert cli.main(["demo", "--tokens", "100000"]) == 2
    assert "--tokens is too large" in capsys.readouterr().err


def test_the_sdist_carries_the_kernel_sources_the_tests_and_the_embedded_model(tmp_path):
    import tarfile

    env = dict(os.environ, SSM_REDUCE_BUILD_CUDA="0")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    names = {name.split("/", 1)[1] for name in tarfile.open(archive).getnames() if "/" in name}
    for needed in ("csrc/bindings.cpp", "csrc/scan_score/scan_score.cu", "tests/conftest.py", "tests/__init__.py",
                   "tests/mamba_ssm_cpu.py", "ssm_reduce/data/embedded/model.safetensors",
                   "ssm_reduce/data/embedded-hybrid/model.safetensors", "LICENSE"):
        assert needed in names, needed
