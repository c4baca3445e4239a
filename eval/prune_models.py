"""Model-level pruning benchmark on the embedded model: held-out bits per byte after each method at
50 % / 60 % / 2:4 / 4:8, alone and combined with token reduction (utr at F = 0.2).

The score is the windowed perplexity protocol of ``ssm_reduce.evaluation`` on the held-out
standard-library files (the same windows for every row); calibration uses training text only.

    python eval/prune_models.py
    python eval/prune_models.py --methods sparsegpt mrp --targets 50% 2:4 --windows 16

Writes eval/results/prune_embedded.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from accuracy import heldout_stream  # noqa: E402

import ssm_reduce  # noqa: E402
from ssm_reduce.embedded import training_texts  # noqa: E402
from ssm_reduce.evaluation import windowed_perplexity  # noqa: E402

TARGETS = {"50%": dict(sparsity=0.5), "60%": dict(sparsity=0.6), "2:4": dict(pattern="2:4"), "4:8": dict(pattern="4:8")}
# row label -> prune() arguments
VARIANTS = {"magnitude": dict(method="magnitude"), "wanda": dict(method="wanda"), "sparsegpt": dict(method="sparsegpt"),
            "mrp": dict(method="mrp"), "mrp-noswap": dict(method="mrp", swap_rounds=0)}


def score(model, stream, args, reduce: bool) -> dict:
    if reduce:
        ssm_reduce.apply(model, method="utr", flops_reduction=args.flops)
    result = windowed_perplexity(model, stream, window=args.window, scored=args.scored,
                                 batch_size=args.batch_size, max_windows=args.windows)
    ssm_reduce.remove(model)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="mrp-noswap: mrp with swap_rounds=0")
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--flops", type=float, default=0.2, help="token-reduction target of the combined rows")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=48)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--scored", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    harness.set_threads()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ssm_reduce.embedded_model_path()
    dense = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    stream = heldout_stream(tokenizer)
    calib = training_texts(max_bytes=4 * args.nsamples * args.seqlen)
    rows = [{"method": "dense", "target": "-", "bits_per_byte": score(dense, stream, args, False)["bits_per_token"],
             "bits_per_byte_reduced": score(dense, stream, args, True)["bits_per_token"], "mean_layer_error": 0.0,
             "seconds": 0.0}]
    print(f"{'method':>10} {'target':>6} {'bits/byte':>10} {'+ utr F=' + str(args.flops):>14} {'layer err':>10} {'time s':>7}")
    for target in args.targets:
        for method in args.methods:
            model = copy.deepcopy(dense)
            report = ssm_reduce.prune(model, calib, tokenizer=tokenizer, **VARIANTS[method], nsamples=args.nsamples,
                                      seqlen=args.seqlen, progress=False, **TARGETS[target])
            rows.append({
                "method": method, "target": target,
                "bits_per_byte": score(model, stream, args, False)["bits_per_token"],
                "bits_per_byte_reduced": score(model, stream, args, True)["bits_per_token"],
                "mean_layer_error": report.mean_relative_error, "sparsity": report.sparsity,
                "seconds": report.seconds,
                "layers_swaps_skipped": sum(layer.swaps_skipped for layer in report.layers),
                "layers": len(report.layers),
            })
            r = rows[-1]
            print(f"{method:>10} {target:>6} {r['bits_per_byte']:>10.4f} {r['bits_per_byte_reduced']:>14.4f} "
                  f"{r['mean_layer_error']:>10.4g} {r['seconds']:>7.1f}", flush=True)
    # (the table leaves out time: a model-level run's time here is mostly the blocks' calibration forwards;
    # bench_prune.py times the solvers side by side, and the JSON keeps every run's seconds)
    lines = [f"| method | target | held-out bits/byte | + token reduction (utr, F = {args.flops}) | mean layer error |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['target']} | {r['bits_per_byte']:.4f} | {r['bits_per_byte_reduced']:.4f} | "
              f"{r['mean_layer_error']:.4g} |" for r in rows]
    payload = {"benchmark": "embedded model after pruning (and token reduction)", "environment": harness.environment("cpu"),
               "protocol": {"window": args.window, "scored": args.scored, "windows": args.windows,
                            "calibration": {"samples": args.nsamples, "seqlen": args.seqlen}},
               "results": rows}
    out = harness.save("prune_embedded", payload, args.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
