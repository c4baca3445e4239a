"""Benchmarks of the CUDA kernels (GPU only), figures to eval/results/bench_kernels.json.

* scan_score vs the best available scan: mamba_ssm's Triton ``mamba_chunk_scan_combined`` (Mamba-2;
  from an unpacked, unbuilt mamba_ssm source tree, ``--mamba-ssm-source``, when mamba_ssm itself is not
  built) and CUDA ``selective_scan_fn`` (Mamba-1) when mamba_ssm loads, else transformers' torch scans —
  mamba2-2.7b (H=80, P=64, N=128, G=1) and mamba-2.8b (D=5120, N=16) shapes, bf16, B in {1, 16},
  L in {512, 2048, 8192}. Target: no slower than the scan alone (the score is free).
* match vs torch (normalise + bmm + masked argmax): time and peak memory.
* apply_plan: bytes moved / time against the measured device-to-device copy bandwidth (target >= 70%).
* end to end: prefill of the mamba2-2.7b shape (random weights), B=16, L=2048, F in {0.1, 0.2, 0.3},
  speed-up over dense against 1 / (1 - F); the dense layers run transformers' mixer with the Triton
  SSD scan where it loads (``fast_mamba2_scan``; each figure names its dense path).

    python eval/bench_kernels.py                 # everything
    python eval/bench_kernels.py --only scan match
    python eval/bench_kernels.py --mamba-ssm-source deps/mamba_ssm-2.3.2.post1
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

import ssm_reduce  # noqa: E402
from ssm_reduce import ops  # noqa: E402


def cuda_time(fn, repeats=10, warmup=3) -> float:
    """Median milliseconds of ``fn`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return harness.median(times)


def triton_ssd_from_source(source: str):
    """mamba_ssm's Triton SSD scan loaded from an unpacked source tree, without its compiled parts.

    mamba_ssm's ``__init__`` imports its CUDA extensions, so an unbuilt package cannot be imported; the
    Triton modules need none of them. The package is registered as a bare namespace over ``source``
    so that ``mamba_ssm.ops.triton.ssd_combined`` loads without running that ``__init__``.
    """
    import importlib
    import types

    root = Path(source) / "mamba_ssm"
    if not (root / "ops" / "triton" / "ssd_combined.py").is_file():
        raise SystemExit(f"--mamba-ssm-source: {source} holds no mamba_ssm/ops/triton/ssd_combined.py")
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [str(root)]
    sys.modules["mamba_ssm"] = pkg
    return importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined


def scan_backends() -> list:
    """The Mamba-2 scan backends this machine can time: ``cuda`` where the extension is loaded,
    ``triton`` where triton imports."""
    status = ops.kernel_status()
    return [name for name, ok in (("cuda", status["loaded"]), ("triton", status["triton"])) if ok]


@contextlib.contextmanager
def scan_backend(name: str):
    """``SSM_REDUCE_SCAN_BACKEND=name`` for the duration."""
    previous = os.environ.get("SSM_REDUCE_SCAN_BACKEND")
    os.environ["SSM_REDUCE_SCAN_BACKEND"] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SSM_REDUCE_SCAN_BACKEND")
        else:
            os.environ["SSM_REDUCE_SCAN_BACKEND"] = previous


@functools.lru_cache(maxsize=None)
def mamba2_scan_baseline(source: str | None = None):
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        return "mamba_ssm mamba_chunk_scan_combined", mamba_chunk_scan_combined
    except ImportError:
        sys.modules.pop("mamba_ssm", None)
    if source:
        return ("mamba_ssm mamba_chunk_scan_combined (Triton, loaded from the unbuilt source tree)",
                triton_ssd_from_source(source))
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    return "transformers torch mamba2_chunk_scan (mamba_ssm not importable)", mamba2_chunk_scan


def bench_scan(rows, source=None):
    name, baseline = mamba2_scan_baseline(source)
    h, p, n, g = 80, 64, 128, 1
    for b in (1, 16):
        for l in (512, 2048, 8192):
            gen = torch.Generator(device="cuda").manual_seed(0)
            r = lambda *s: torch.randn(*s, generator=gen, device="cuda", dtype=torch.bfloat16)  # noqa: E731
            x, dt, B, C = r(b, l, h, p), r(b, l, h), r(b, l, g, n), r(b, l, g, n)
            A, D, bias = -torch.rand(h, device="cuda") - 0.1, torch.randn(h, device="cuda"), torch.randn(h, device="cuda")
            theirs = cuda_time(lambda: baseline(x, dt, A, B, C, chunk_size=256, D=D, dt_bias=bias, dt_softplus=True))
            row = {"op": "scan_score_mamba2", "batch": b, "seqlen": l, "baseline": name, "baseline_ms": theirs}
            for backend in scan_backends():  # the compiled step-by-step kernel, the chunked Triton one
                with scan_backend(backend):
                    ms = cuda_time(lambda: ops.scan_score_mamba2(x, dt, A, B, C, D=D, dt_bias=bias))
                row[f"{backend}_ms"], row[f"{backend}_ratio"] = ms, ms / theirs
                print(f"scan_score_mamba2 ({backend}) B={b} L={l}: {ms:.3f} ms vs {theirs:.3f} ms ({name})", flush=True)
            if "triton" in scan_backends():  # the Triton scan's other chunk sizes (its default: ssd_triton.CHUNK)
                from ssm_reduce.ops import ssd_triton

                for chunk in (64, 128, 256):
                    row[f"triton_chunk{chunk}_ms"] = cuda_time(
                        lambda: ssd_triton.scan_score_mamba2(x, dt, A, B, C, D=D, dt_bias=bias, chunk=chunk))
                print("  Triton scan by chunk size: " + ", ".join(
                    f"{c}: {row[f'triton_chunk{c}_ms']:.3f} ms" for c in (64, 128, 256)), flush=True)
            rows.append(row)
    if not ops.kernel_status()["loaded"]:  # Mamba-1 has no Triton scan
        return
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        m1_name = "mamba_ssm selective_scan_fn"
    except ImportError:
        from transformers.models.mamba.modeling_mamba import mamba_selective_scan as selective_scan_fn

        m1_name = "transformers torch mamba_selective_scan (mamba_ssm not importable)"
    d, n1 = 5120, 16
    for b in (1, 16):
        for l in (512, 2048):
            gen = torch.Generator(device="cuda").manual_seed(1)
            r = lambda *s: torch.randn(*s, generator=gen, device="cuda", dtype=torch.bfloat16)  # noqa: E731
            u, delta, B, C, z = r(b, d, l), r(b, d, l), r(b, n1, l), r(b, n1, l), r(b, d, l)
            A, D, bias = -torch.rand(d, n1, device="cuda"), torch.randn(d, device="cuda"), torch.randn(d, device="cuda")
            ours = cuda_time(lambda: ops.scan_score_mamba1(u, delta, A, B, C, D=D, z=z, delta_bias=bias))
            theirs = cuda_time(lambda: selective_scan_fn(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True))
            rows.append({"op": "scan_score_mamba1", "batch": b, "seqlen": l, "ms": ours, "baseline": m1_name,
                         "baseline_ms": theirs, "ratio": ours / theirs})
            print(f"scan_score_mamba1 B={b} L={l}: {ours:.3f} ms vs {theirs:.3f} ms ({m1_name})", flush=True)


def torch_match(src, dst, src_mask, dst_mask):
    sim = torch.nn.functional.normalize(src, dim=-1) @ torch.nn.functional.normalize(dst, dim=-1).transpose(1, 2)
    sim = sim.masked_fill(~dst_mask[:, None, :], float("-inf"))
    best, idx = sim.max(-1)
    return best.masked_fill(~src_mask, float("-inf")), idx


def bench_match(rows):
    for b, n, dim in ((16, 1024, 2560), (16, 4096, 2560), (1, 4096, 2560)):
        src = torch.randn(b, n, dim, device="cuda", dtype=torch.bfloat16)
        dst = torch.randn(b, n, dim, device="cuda", dtype=torch.bfloat16)
        masks = torch.ones(b, n, dtype=torch.bool, device="cuda"), torch.ones(b, n, dtype=torch.bool, device="cuda")
        out = {}
        for label, fn in (("kernel", ops.match), ("torch", torch_match)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(src, dst, *masks)
            torch.cuda.synchronize()
            out[label] = (cuda_time(lambda: fn(src, dst, *masks)), torch.cuda.max_memory_allocated() - base)
        rows.append({"op": "match", "batch": b, "tokens": n, "dim": dim, "kernel_ms": out["kernel"][0],
                     "torch_ms": out["torch"][0], "kernel_peak_bytes": out["kernel"][1], "torch_peak_bytes": out["torch"][1]})
        print(f"match B={b} N={n}: kernel {out['kernel'][0]:.3f} ms / {out['kernel'][1] / 2**20:.0f} MiB, "
              f"torch {out['torch'][0]:.3f} ms / {out['torch'][1] / 2**20:.0f} MiB", flush=True)


def bench_apply_plan(rows):
    from ssm_reduce.methods import budgets, select
    from ssm_reduce.reduce import TokenState, build_plan

    b, n, dim = 16, 2048, 2560
    state = TokenState.initial(b, n, torch.device("cuda"), protect_last=3)
    imp = torch.rand(b, n, device="cuda")
    feats = torch.randn(b, n, 64, device="cuda")
    plan = build_plan(state, select("utr", state, budgets(state, 0.9, "utr"), imp, feats), imp, 0.5, 0.0)
    # the two streams of an anchor: bf16 hidden states and a float32 residual (residual_in_fp32)
    xs = [torch.randn(b, n, dim, device="cuda", dtype=torch.bfloat16), torch.randn(b, n, dim, device="cuda")]
    ms = cuda_time(lambda: ops.apply_plan(xs, plan.slot, [plan.hidden_weight, plan.residual_weight], plan.n_out))
    copy_ms = cuda_time(lambda: [x.clone() for x in xs])
    size = sum(x.element_size() for x in xs) * dim
    moved = b * (n + plan.n_out) * size
    copy_bw = 2 * b * n * size / (copy_ms / 1e3)
    bw = moved / (ms / 1e3)
    rows.append({"op": "apply_plan", "streams": "bf16 hidden + fp32 residual", "batch": b, "tokens": n,
                 "tokens_out": plan.n_out, "dim": dim, "ms": ms, "bytes": moved,
                 "bandwidth_GBps": bw / 1e9, "copy_bandwidth_GBps": copy_bw / 1e9, "fraction_of_copy": bw / copy_bw})
    print(f"apply_plan: {ms:.3f} ms, {bw / 1e9:.0f} GB/s = {bw / copy_bw:.0%} of copy ({copy_bw / 1e9:.0f} GB/s)", flush=True)


def fast_mamba2_scan(source=None):
    """Put mamba_ssm's Triton SSD scan under transformers' Mamba-2 mixer when it is not there already.

    Returns a description of the dense path and a function that undoes the swap. transformers (5.17 and
    later) calls the module-level ``mamba2_chunk_scan`` in its torch path; without mamba_ssm installed that
    is a torch chunked scan whose (B, chunks, L, L, H, N) intermediate makes a 2.7b-shaped prefill many times
    slower than the real thing, so the speed-up would be measured against the wrong baseline.
    """
    from transformers.models.mamba2 import modeling_mamba2 as mm

    name, scan = mamba2_scan_baseline(source)
    if not hasattr(mm, "mamba2_chunk_scan") or "transformers" in name:
        return "transformers Mamba-2 torch path", lambda: None
    accepted = set(inspect.signature(scan).parameters)

    def triton_scan(*args, **kwargs):  # transformers may pass keyword arguments the Triton scan lacks
        return scan(*args, **{k: v for k, v in kwargs.items() if k in accepted})

    original = mm.mamba2_chunk_scan
    mm.mamba2_chunk_scan = triton_scan
    return (f"transformers Mamba-2 mixer with {name} as its scan (torch depthwise conv, gated RMSNorm, cuBLAS "
            "projections)"), lambda: setattr(mm, "mamba2_chunk_scan", original)


def bench_end_to_end(rows, source=None):
    from ssm_reduce.shapes import random_model

    dense_path, undo = fast_mamba2_scan(source)
    print(f"end to end, dense path: {dense_path}", flush=True)
    try:
        _end_to_end(rows, random_model("mamba2-2.7b", device="cuda", dtype=torch.bfloat16), dense_path)
    finally:
        undo()


def _end_to_end(rows, model, dense_path):
    ids = torch.randint(0, 50000, (16, 2048), device="cuda")
    with torch.no_grad():
        dense = cuda_time(lambda: model(ids, logits_to_keep=1, use_cache=False), repeats=5, warmup=2)
        for target in (0.1, 0.2, 0.3):
            ssm_reduce.apply(model, method="utr", flops_reduction=target)
            for backend in scan_backends():  # the anchors' scan
                with scan_backend(backend):
                    reduced = cuda_time(lambda: model(ids, logits_to_keep=1, use_cache=False), repeats=5, warmup=2)
                realised = ssm_reduce.stats(model)["realised_flops_reduction"]
                speedup = dense / reduced
                rows.append({"op": "end_to_end_prefill", "shape": "mamba2-2.7b", "dense_path": dense_path,
                             "anchor_scan": backend, "batch": 16, "seqlen": 2048, "flops_reduction": target,
                             "realised": realised, "dense_ms": dense, "reduced_ms": reduced, "speedup": speedup,
                             "ideal": 1 / (1 - realised), "fraction_of_ideal": speedup * (1 - realised)})
                print(f"prefill F={target} (anchor scan: {backend}): {speedup:.3f}x (ideal {1 / (1 - realised):.3f}x)",
                      flush=True)
            ssm_reduce.remove(model)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=["scan", "match", "apply_plan", "end_to_end"])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--mamba-ssm-source", default=os.environ.get("SSM_REDUCE_MAMBA_SSM_SOURCE", "").split(os.pathsep)[0],
                   help="unpacked mamba_ssm source tree: its Triton SSD scan is the Mamba-2 baseline when mamba_ssm "
                        "itself cannot be imported (default: the first entry of SSM_REDUCE_MAMBA_SSM_SOURCE)")
    args = p.parse_args(argv)
    status = ops.kernel_status()
    if not torch.cuda.is_available() or not (status["loaded"] or status["triton"]):
        raise SystemExit(f"needs CUDA and the compiled kernels ({status['reason']}) or triton")
    if not status["loaded"]:  # the Triton scan alone: match and apply_plan would time their references
        print(f"compiled kernels not loaded ({status['reason']}): timing the Triton scan only", flush=True)
        args.only = [name for name in args.only if name in ("scan", "end_to_end")]
    source = args.mamba_ssm_source or None
    rows = []
    benches = (("scan", lambda rows: bench_scan(rows, source)), ("match", bench_match),
               ("apply_plan", bench_apply_plan), ("end_to_end", lambda rows: bench_end_to_end(rows, source)))
    payload = {"benchmark": "CUDA kernels", "environment": harness.environment("cuda"), "results": rows}
    for name, fn in benches:
        if name in args.only:
            fn(rows)
            # saved after each part, so a run cut off keeps what it measured
            print(f"wrote {harness.save('bench_kernels', payload, args.out)}", flush=True)


if __name__ == "__main__":
    main()
