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
    assert "Mamba2ForCausalLM" in out
    assert "utr" in out


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
