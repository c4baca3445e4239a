"""The scan route: one decision per anchor, and the patched models follow it."""

import pytest
import torch

import ssm_reduce
from ssm_reduce import cli
from ssm_reduce.ops import extension, route
from ssm_reduce.ops.route import AnchorScan, Scan, anchor_scan

from .conftest import random_tokens, tiny_mamba, tiny_mamba2

MAMBA2 = AnchorScan(mamba2=True, dstate=16, host_exposes_y=True)
MAMBA1 = AnchorScan(mamba2=False, dstate=16, host_exposes_y=False, host_scan=lambda *a, **k: None)


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """The front door believes a compiled extension serves CPU tensors (only the decision is tested)."""
    monkeypatch.setitem(extension._served, "module", object())
    monkeypatch.setitem(extension._served, "device_types", ("cpu",))


def test_without_kernels_y_comes_from_the_host_where_it_shows_it():
    assert anchor_scan(MAMBA2, "cpu", needs_y=True) is Scan.HOST
    assert anchor_scan(MAMBA1, "cpu", needs_y=False) is Scan.HOST
    assert anchor_scan(MAMBA1, "cpu", needs_y=True) is Scan.HOST_SCAN
    no_host_scan = AnchorScan(mamba2=False, dstate=16, host_exposes_y=False)
    assert anchor_scan(no_host_scan, "cpu", needs_y=True) is Scan.REFERENCE


def test_a_kernel_that_serves_is_used(kernels_on_cpu):
    assert anchor_scan(MAMBA2, "cpu", needs_y=True) is Scan.KERNEL
    assert anchor_scan(MAMBA1, "cpu", needs_y=False) is Scan.KERNEL
    odd_state = AnchorScan(mamba2=True, dstate=24, host_exposes_y=True)  # no kernel instantiated for N = 24
    assert anchor_scan(odd_state, "cpu", needs_y=True) is Scan.HOST
    assert anchor_scan(MAMBA2, "meta", needs_y=True) is Scan.HOST  # another device type


def test_kernels_off_by_environment(kernels_on_cpu, monkeypatch):
    monkeypatch.setenv("SSM_REDUCE_DISABLE_KERNELS", "1")
    assert anchor_scan(MAMBA2, "cpu", needs_y=True) is Scan.HOST
    assert anchor_scan(MAMBA1, "cpu", needs_y=True) is Scan.HOST_SCAN


def test_triton_backend_needs_triton_and_a_device_it_runs_on(monkeypatch):
    monkeypatch.setenv("SSM_REDUCE_SCAN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from ssm_reduce.ops import ssd_triton

    expected = Scan.TRITON if ssd_triton.available() else Scan.HOST
    assert anchor_scan(MAMBA2, "cpu", needs_y=True) is expected
    assert anchor_scan(MAMBA1, "cpu", needs_y=True) is Scan.HOST_SCAN  # Mamba-1 has no Triton scan
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert anchor_scan(MAMBA2, "cpu", needs_y=True) is Scan.HOST
    monkeypatch.setenv("SSM_REDUCE_SCAN_BACKEND", "cuDNN")
    with pytest.raises(ValueError, match="SSM_REDUCE_SCAN_BACKEND must be one of cuda, triton, got 'cudnn'"):
        anchor_scan(MAMBA2, "cpu", needs_y=True)


def test_host_only_anchors_and_forcing():
    fixed = AnchorScan(mamba2=True, dstate=16, host_exposes_y=True, replaceable=False)
    assert anchor_scan(fixed, "cpu", needs_y=True, forced=True) is Scan.HOST
    assert anchor_scan(MAMBA1, "cpu", needs_y=True, forced=False) is Scan.HOST
    assert anchor_scan(MAMBA2, "cpu", needs_y=False, forced=True) is Scan.REFERENCE
    assert all(scan.through_ops for scan in Scan if scan is not Scan.HOST) and not Scan.HOST.through_ops


def test_scan_kernel_per_call_follows_the_operands(kernels_on_cpu):
    x = torch.zeros(1, 4, 2, 8)
    dt, bc, a = torch.zeros(1, 4, 2), torch.zeros(1, 4, 1, 16), torch.zeros(2)
    assert route.scan_kernel(x, 16, (dt, bc, bc, None), (a,), (1, 2), mamba2=True) is Scan.KERNEL
    assert route.scan_kernel(x, 16, (dt.double(), bc, bc, None), (a,), (1, 2), mamba2=True) is Scan.REFERENCE


@torch.no_grad()
def test_patched_models_report_and_take_their_routes():
    """``scan_routes`` names the route of every anchor, and a forward takes it: Mamba-1 anchors that
    score y run the reference scan on a CPU (transformers' Mamba-1 gates y inside its scan), and the host's
    mixer where only the mixer output is read."""
    model = ssm_reduce.apply(tiny_mamba(), method="utr", keep_ratio=0.7, layers=[1, 3])
    assert ssm_reduce.scan_routes(model) == {1: Scan.REFERENCE, 3: Scan.REFERENCE}
    ssm_reduce.apply(model, method="utr", keep_ratio=0.7, layers=[1, 3], importance_source="block")
    assert ssm_reduce.scan_routes(model) == {1: Scan.HOST, 3: Scan.HOST}
    assert model(random_tokens(2, 40)).logits.shape[1] < 40
    mamba2 = ssm_reduce.apply(tiny_mamba2(), method="evit", keep_ratio=0.7)
    assert set(ssm_reduce.scan_routes(mamba2).values()) == {Scan.HOST}
    ssm_reduce.remove(mamba2)
    with pytest.raises(ValueError, match="not patched"):
        ssm_reduce.scan_routes(mamba2)


def test_info_prints_the_route_of_each_anchor(capsys):
    assert cli.main(["info", "--model", "embedded", "--method", "evit", "--flops-reduction", "0.1"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip().startswith("layer ")]
    anchors = ssm_reduce.ReduceConfig(flops_reduction=0.1).resolve(12, 4).anchors
    assert [int(line.split()[1].rstrip(":")) for line in lines] == list(anchors)
    assert all(": host - the host's own mixer" in line for line in lines)
