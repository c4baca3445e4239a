"""Layer-level pruning benchmark: relative reconstruction error and time of every method.

* error: on the Linear layers of the embedded model with their real calibration Hessians (inputs
  captured on training text), at 50 / 60 / 70 % and 2:4 / 4:8;
* ``mrp-noswap``: mrp with ``swap_rounds=0`` (its cheaper setting), next to the default;
* time (median of ``--repeats`` rounds, each running every method once; ratios are medians of the
  per-round ratios; in a fresh process, apart from the error pass): on random layers of public
  checkpoint shapes (mamba2-130m; add mamba2-2.7b on a GPU), with two kinds of random inputs
  (``--time-inputs``: spread, correlated; ``random_layer``). On a CPU,
  mrp keeps its scratch buffers from call to call (``workspace``), as ``prune`` does from layer to
  layer of a model (whose blocks repeat the same shapes).

    python eval/bench_prune.py --repeats 7         # CPU
    python eval/bench_prune.py --device cuda --time-shapes mamba2-130m mamba2-2.7b
    python eval/bench_prune.py --weight-dtype bfloat16 --repeats 7 --out eval/results/bench_prune_cpu_bf16.json

Writes eval/results/bench_prune_<device>.json and prints tables.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

from ssm_reduce.prune import METHODS, Workspace, prune_linear  # noqa: E402
from ssm_reduce.prune.driver import _HessianHook, calibration_tokens  # noqa: E402
from ssm_reduce.shapes import PUBLIC_SHAPES  # noqa: E402

# every method with its defaults, plus mrp without swap rounds (its cheaper setting)
VARIANTS = {**{m: dict(method=m) for m in METHODS}, "mrp-noswap": dict(method="mrp", swap_rounds=0)}
TARGETS = {"50%": dict(sparsity=0.5), "60%": dict(sparsity=0.6), "70%": dict(sparsity=0.7),
           "2:4": dict(pattern="2:4"), "4:8": dict(pattern="4:8")}


@torch.no_grad()
def embedded_hessians(layers, nsamples, seqlen):
    """{name: (weight, H)} of in_proj / out_proj of the given blocks of the embedded model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ssm_reduce
    from ssm_reduce.embedded import training_texts

    path = ssm_reduce.embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokens = calibration_tokens(training_texts(max_bytes=4 * nsamples * seqlen), tokenizer, nsamples, seqlen, 0)
    hooks, handles = {}, []
    for i in layers:
        for proj in ("in_proj", "out_proj"):
            linear = getattr(model.backbone.layers[i].mixer, proj)
            name = f"layers.{i}.mixer.{proj}"
            hooks[name] = (linear, _HessianHook(linear.in_features, "cpu"))
            handles.append(linear.register_forward_hook(lambda m, a, o, h=hooks[name][1]: h.add(a[0])))
    for batch in tokens.split(8):
        model(batch, use_cache=False)
    for h in handles:
        h.remove()
    return {name: (linear.weight.data.clone(), hook.h) for name, (linear, hook) in hooks.items()}


def random_layer(out, inp, tokens, device, seed=0, inputs="spread"):
    """A random weight and the Hessian of random inputs: ``spread`` — a random mix plus noise (eigenvalues
    within ~70x of each other after Jacobi scaling); ``correlated`` — a power-law spectrum (k-th singular
    value 1/k) in a random basis and log-normal channel scales, the strongly correlated features of real
    models' activations (the embedded model's first in_proj has a Jacobi-scaled condition number ~8000)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if inputs == "correlated":
        q, _ = torch.linalg.qr(torch.randn(inp, inp, generator=gen))
        x = (torch.randn(tokens, inp, generator=gen) * torch.arange(1, inp + 1) ** -1.0) @ q.T
        x = x * torch.exp(torch.randn(inp, generator=gen))
    else:
        mix = torch.randn(inp, inp, generator=gen) / inp**0.5
        x = (torch.randn(tokens, inp, generator=gen) @ mix + 0.3 * torch.randn(tokens, inp, generator=gen))
        x = x * torch.linspace(0.2, 3.0, inp)
    h = (2 * x.T @ x / tokens).to(device)
    return (torch.randn(out, inp, generator=gen) * 0.02).to(device), h


def layer_shapes(name):
    family, _, d = PUBLIC_SHAPES[name]
    d_inner, n = 2 * d, 128
    if family != "mamba2":
        raise ValueError("time shapes are Mamba-2 layers")
    return {"in_proj": (2 * d_inner + 2 * n + d_inner // 64, d), "out_proj": (d, d_inner)}


def time_methods(shapes, targets, repeats, device, inputs=("spread",), weight_dtype="float32"):
    """Median seconds of every variant on random layers of the given checkpoint shapes and kinds of
    inputs (``random_layer``), their weights in ``weight_dtype`` (run in its own process by ``main``)."""
    harness.set_threads()
    timings = []
    for kind in inputs:
        for shape in shapes:
            for proj, (out, inp) in layer_shapes(shape).items():
                w, h = random_layer(out, inp, 4 * inp, device, inputs=kind)
                w = w.to(getattr(torch, weight_dtype))
                for label in targets:
                    row = {"shape": shape, "layer": proj, "size": [out, inp], "target": label, "inputs": kind,
                           "weight_dtype": weight_dtype}
                    # round robin: every repeat runs each variant once, so drifts of a shared machine hit
                    # all of them alike; ratios are medians of the per-round ratios
                    runs = {variant: [] for variant in VARIANTS}
                    spaces = {variant: Workspace() if kwargs["method"] == "mrp" and w.device.type == "cpu" else None
                              for variant, kwargs in VARIANTS.items()}
                    for _ in range(repeats):
                        for variant, kwargs in VARIANTS.items():
                            extra = {} if spaces[variant] is None else {"workspace": spaces[variant]}
                            runs[variant].append(prune_linear(w, h, **kwargs, **extra, **TARGETS[label])[2])
                    for variant, stats in runs.items():
                        row[variant] = {"seconds": harness.median([r.seconds for r in stats]),
                                        "relative_error": stats[0].relative_error}
                    for key, variant in (("mrp_time_over_sparsegpt", "mrp"), ("mrp_noswap_time_over_sparsegpt", "mrp-noswap")):
                        row[key] = harness.median([a.seconds / b.seconds for a, b in zip(runs[variant], runs["sparsegpt"])])
                    timings.append(row)
    return timings


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", nargs="+", type=int, default=[0, 6, 11], help="embedded-model blocks")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--time-shapes", nargs="*", default=["mamba2-130m"])
    p.add_argument("--time-targets", nargs="+", default=["50%", "2:4"], choices=list(TARGETS))
    p.add_argument("--time-inputs", nargs="+", default=["spread", "correlated"], choices=["spread", "correlated"],
                   help="kinds of random inputs for the timing layers (random_layer)")
    p.add_argument("--weight-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the timing layers' weights (mrp solves half-precision weights to their "
                        "precision: weight_tolerance)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    harness.set_threads()

    errors = []
    print("relative error ||WX - W'X||^2 / ||WX||^2 on the embedded model's real inputs")
    print(f"{'layer':<24} {'target':>6} " + " ".join(f"{m:>10}" for m in VARIANTS) + "   mrp/sparsegpt")
    for name, (w, h) in embedded_hessians(args.layers, args.nsamples, args.seqlen).items():
        for label, target in TARGETS.items():
            row = {"layer": name, "shape": list(w.shape), "target": label}
            for variant, kwargs in VARIANTS.items():
                _, _, stats = prune_linear(w.to(args.device), h.to(args.device), **kwargs, **target)
                row[variant] = {"relative_error": stats.relative_error, "seconds": stats.seconds}
            row["mrp_over_sparsegpt"] = row["mrp"]["relative_error"] / row["sparsegpt"]["relative_error"]
            errors.append(row)
            print(f"{name:<24} {label:>6} " + " ".join(f"{row[m]['relative_error']:>10.4g}" for m in VARIANTS)
                  + f"   {row['mrp_over_sparsegpt']:.3f}", flush=True)

    # timing runs in a fresh process: the error pass above (a model, its activations, many solves) leaves
    # the allocator in a state that adds a noise of about 20% to the timings, unevenly across methods
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        timings = pool.submit(time_methods, args.time_shapes, args.time_targets, args.repeats, args.device,
                              args.time_inputs, args.weight_dtype).result()
    for row in timings:
        print(f"time {row['shape']} {row['layer']} ({row['inputs']} inputs, {row['weight_dtype']} weights) {row['size'][0]}x{row['size'][1]} {row['target']}: " + ", ".join(
            f"{m} {row[m]['seconds']:.2f}s" for m in VARIANTS) + f" (mrp/sparsegpt {row['mrp_time_over_sparsegpt']:.1f}x,"
            f" without swaps {row['mrp_noswap_time_over_sparsegpt']:.1f}x)", flush=True)

    def mean_ratio(label, variant):
        vals = [r[variant]["relative_error"] / r["sparsegpt"]["relative_error"] for r in errors if r["target"] == label]
        return sum(vals) / len(vals)

    summary = {label: {"mean_mrp_over_sparsegpt_error": mean_ratio(label, "mrp"),
                       "mean_mrp_noswap_over_sparsegpt_error": mean_ratio(label, "mrp-noswap")} for label in TARGETS}
    print("mean mrp / sparsegpt error ratio: " + ", ".join(f"{k} {v['mean_mrp_over_sparsegpt_error']:.3f}" for k, v in summary.items()))
    print("  without swap rounds:           " + ", ".join(f"{k} {v['mean_mrp_noswap_over_sparsegpt_error']:.3f}" for k, v in summary.items()))
    payload = {"benchmark": "layer-level pruning error and time", "environment": harness.environment(args.device),
               "calibration": {"samples": args.nsamples, "seqlen": args.seqlen}, "repeats": args.repeats,
               "time_weight_dtype": args.weight_dtype,
               "summary": summary,
               "errors": errors, "timings": timings}
    path = harness.save(f"bench_prune_{args.device.split(':')[0]}", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
