"""Speed and memory of dense vs token-reduced models, with the paper's protocols, on the public
checkpoints' shapes (random weights: speed does not depend on them).

* prefill throughput: tokens per second of one forward (``logits_to_keep=1``);
* generation throughput: new tokens per second of ``generate`` (the paper: batch 16, prompt 2048,
  100 new tokens), prefill included;
* peak memory of one forward that returns every kept position's logits (the paper: batch 96 x 2048),
  measured with ``torch.cuda.max_memory_allocated`` on a GPU and, on a CPU, as the peak resident-set
  growth of one forward in a fresh subprocess (kernel high-water mark reset after warm-up; large
  allocations forced to mmap so freed tensors leave the RSS). ``--skip`` runs update only the
  measured sections of an existing result file.

Dense and reduced settings are timed alternately (pairs) and the median ratio is reported.

    python eval/speed.py --shapes mamba2-130m --device cpu              # CPU-sized protocol
    python eval/speed.py --shapes mamba2-2.7b mamba-2.8b --device cuda --dtype bfloat16 --paper

Writes eval/results/speed_<device>.json and speed_<device>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

import ssm_reduce  # noqa: E402
from ssm_reduce.shapes import PUBLIC_SHAPES, random_model  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PAPER = {"prefill": (16, 2048), "generate": (16, 2048, 100), "memory": (96, 2048)}
CPU = {"prefill": (1, 2048), "generate": (2, 512, 16), "memory": (4, 1024)}
# The paper's efficiency figures for Mamba-2-2.7B at F = 0.1 / 0.2 / 0.3 (A100).
PAPER_FIGURES = {"throughput_speedup": [1.10, 1.22, 1.37], "peak_memory_reduction": [0.114, 0.203, 0.306]}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["mamba2-130m"], choices=sorted(PUBLIC_SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--method", default="utr", choices=list(ssm_reduce.METHODS))
    p.add_argument("--flops", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    p.add_argument("--paper", action="store_true", help="the paper's sizes (GPU); default: CPU-sized")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", nargs="*", default=[], choices=["prefill", "generate", "memory"])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _config(target):
    return None if target == 0.0 else ssm_reduce.ReduceConfig(method=ARGS.method, flops_reduction=target)


def _set(model, config):
    ssm_reduce.remove(model)
    if config is not None:
        ssm_reduce.apply(model, config)


def paired(model, targets, run, device, repeats):
    """Median seconds of ``run()`` per target, dense and reduced alternating; plus realised F."""
    out = {t: [] for t in targets}
    realised = {}
    for t in targets:  # warm-up
        _set(model, _config(t))
        harness.timed(run, device)
    for _ in range(repeats):
        for t in targets:
            _set(model, _config(t))
            out[t].append(harness.timed(run, device))
            if t:
                realised[t] = ssm_reduce.stats(model)["realised_flops_reduction"]
    ssm_reduce.remove(model)
    return {t: harness.median(v) for t, v in out.items()}, {t: [v / d for v, d in zip(out[t], out[0.0])] for t in targets}, realised


@torch.no_grad()
def measure_shape(shape, sizes, args):
    model = random_model(shape, device=args.device, dtype=DTYPES[args.dtype])
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    targets = [0.0, *args.flops]
    result = {"shape": shape, "layers": model.config.num_hidden_layers}
    if "prefill" not in args.skip:
        b, n = sizes["prefill"]
        ids = torch.randint(0, vocab, (b, n), generator=gen).to(args.device)
        med, ratios, realised = paired(model, targets, lambda: model(ids, logits_to_keep=1, use_cache=False),
                                       args.device, args.repeats)
        result["prefill"] = {
            "batch": b, "seqlen": n,
            "rows": [{"flops_reduction": t, "realised": realised.get(t, 0.0), "seconds": med[t],
                      "tokens_per_s": b * n / med[t], "speedup": 1.0 / harness.median(ratios[t])} for t in targets],
        }
        print(f"{shape} prefill {b}x{n}: " + ", ".join(f"F={t}: {1 / harness.median(ratios[t]):.2f}x" for t in targets))
    if "generate" not in args.skip:
        b, n, new = sizes["generate"]
        ids = torch.randint(0, vocab, (b, n), generator=gen).to(args.device)

        def run():
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

        med, ratios, realised = paired(model, targets, run, args.device, args.repeats)
        result["generate"] = {
            "batch": b, "prompt": n, "new_tokens": new,
            "rows": [{"flops_reduction": t, "realised": realised.get(t, 0.0), "seconds": med[t],
                      "new_tokens_per_s": b * new / med[t], "speedup": 1.0 / harness.median(ratios[t])} for t in targets],
        }
        print(f"{shape} generate {b}x{n}+{new}: " + ", ".join(f"F={t}: {1 / harness.median(ratios[t]):.2f}x" for t in targets))
    model = None  # release it before the memory runs build their own
    if "memory" not in args.skip:
        b, n = sizes["memory"]
        rows = []
        for t in targets:
            peak = peak_memory(shape, b, n, t, args)
            rows.append({"flops_reduction": t, "peak_bytes": peak})
        for row in rows:
            row["reduction"] = 1 - row["peak_bytes"] / rows[0]["peak_bytes"]
        result["memory"] = {"batch": b, "seqlen": n, "logits": "all kept positions", "rows": rows}
        print(f"{shape} peak memory {b}x{n}: " + ", ".join(f"F={r['flops_reduction']}: {r['peak_bytes'] / 2**30:.2f} GiB"
                                                        for r in rows))
    return result


def peak_memory(shape, batch, seqlen, target, args) -> int:
    """Peak memory of one full-logits forward: CUDA allocator peak, or a subprocess's RSS growth."""
    if args.device.startswith("cuda"):
        model = random_model(shape, device=args.device, dtype=DTYPES[args.dtype])
        _set(model, _config(target))
        ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), device=args.device)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            model(ids, use_cache=False)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del model
        torch.cuda.empty_cache()
        return int(peak)
    spec = json.dumps({"shape": shape, "batch": batch, "seqlen": seqlen, "target": target, "dtype": args.dtype,
                       "method": args.method})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run([sys.executable, __file__, "--memory-child", spec], capture_output=True, text=True,
                          check=True, env=env)
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"])


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(spec: str) -> None:
    """Peak resident-set growth of one forward: the kernel's high-water mark (VmHWM) is reset after the
    model is built and warmed up (``/proc/self/clear_refs`` = 5), so building the model never masks the
    forward's peak; the parent sets a fixed malloc mmap threshold so freed tensors leave the RSS at once."""
    cfg = json.loads(spec)
    model = random_model(cfg["shape"], dtype=DTYPES[cfg["dtype"]])
    if cfg["target"]:
        ssm_reduce.apply(model, method=cfg["method"], flops_reduction=cfg["target"])
    ids = torch.randint(0, model.config.vocab_size, (cfg["batch"], cfg["seqlen"]))
    with torch.no_grad():
        model(ids[:, :8], use_cache=False)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        model(ids, use_cache=False)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_bytes": (peak - base) * 1024}))


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for res in results:
        for ax, key, field, label in (
            (axes[0], "prefill", "speedup", "prefill speed-up"),
            (axes[1], "generate", "speedup", "generation speed-up"),
            (axes[2], "memory", "reduction", "peak memory reduction"),
        ):
            if key in res:
                xs = [r["flops_reduction"] for r in res[key]["rows"]]
                ax.plot(xs, [r[field] for r in res[key]["rows"]], marker="o", label=res["shape"])
                ax.set_title(label)
                ax.set_xlabel("target FLOPs reduction")
    xs = [0.1, 0.2, 0.3]
    axes[1].plot(xs, PAPER_FIGURES["throughput_speedup"], "k--", label="paper, Mamba-2-2.7B")
    axes[2].plot(xs, PAPER_FIGURES["peak_memory_reduction"], "k--", label="paper, Mamba-2-2.7B")
    ideal = [0.0, 0.1, 0.2, 0.3]
    axes[0].plot(ideal, [1 / (1 - f) for f in ideal], ":", color="grey", label="ideal 1/(1-F)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    global ARGS
    args = ARGS = parse(argv)
    if args.memory_child:
        return memory_child(args.memory_child)
    harness.set_threads()
    sizes = PAPER if args.paper else CPU
    results = [measure_shape(shape, sizes, args) for shape in args.shapes]
    payload = {
        "benchmark": "speed and memory, dense vs reduced (paired, median ratios)",
        "method": args.method,
        "dtype": args.dtype,
        "sizes": {k: list(v) for k, v in sizes.items()},
        "paper_figures_mamba2_2.7b": PAPER_FIGURES,
        "environment": harness.environment(args.device),
        "results": results,
    }
    name = f"speed_{args.device.split(':')[0]}"
    if args.skip:  # a partial run updates the sections it measured in an existing result file
        previous = harness.result_path(name, args.out)
        if previous.exists():
            before = json.loads(previous.read_text())
            for key in ("method", "dtype", "sizes"):  # the sections kept must describe the same setting
                if before.get(key) != payload[key]:
                    raise SystemExit(f"--skip would merge this run into {previous}, which was measured with "
                                     f"{key} {before.get(key)!r}, not {payload[key]!r}; rerun every section or "
                                     "write elsewhere with --out")
            old = {r["shape"]: r for r in before["results"]}
            earlier = before["environment"].pop("earlier_runs", [])
            payload["environment"]["earlier_runs"] = earlier + [before["environment"]]
            for r in results:
                old[r["shape"]] = {**old.get(r["shape"], {}), **r}
            payload["results"] = list(old.values())
            payload["environment"]["command_sections"] = {"measured": [k for k in ("prefill", "generate", "memory")
                                                                       if k not in args.skip]}
    path = harness.save(name, payload, args.out)
    plot(payload["results"], path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


ARGS = None

if __name__ == "__main__":
    main()
