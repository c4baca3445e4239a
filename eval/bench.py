"""Prefill time of dense vs token-reduced models of the public checkpoints' shapes (random weights).

Dense and reduced forwards are timed alternately in one run (dense, reduced, dense, reduced, ...) and
the median of the per-pair ratios is reported, so slow drifts of the machine cancel out.

    python eval/bench.py --shape mamba2-130m --seqlen 2048 --logits-to-keep 1        # CPU target run
    python eval/bench.py --shape mamba2-2.7b --device cuda --dtype bfloat16 --batch 16

Writes ``eval/results/bench_<shape>_<device>_<dtype>_b<batch>_l<seqlen>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

import ssm_reduce  # noqa: E402
from ssm_reduce.shapes import PUBLIC_SHAPES, random_model  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="mamba2-130m", choices=sorted(PUBLIC_SHAPES))
    p.add_argument("--layers", type=int, default=None, help="override the depth (quick runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--logits-to-keep", type=int, default=1, help="0 = logits for every kept position")
    p.add_argument("--methods", nargs="+", default=list(ssm_reduce.METHODS), choices=list(ssm_reduce.METHODS))
    p.add_argument("--flops", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    p.add_argument("--repeats", type=int, default=3, help="timed dense/reduced pairs per setting")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


@torch.no_grad()
def main(argv=None):
    args = parse(argv)
    harness.set_threads()
    model = random_model(args.shape, device=args.device, dtype=DTYPES[args.dtype], num_layers=args.layers)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen), generator=gen).to(args.device)

    def forward():
        model(ids, logits_to_keep=args.logits_to_keep, use_cache=False)

    harness.timed(forward, args.device)  # warm-up
    rows = []
    print(f"{args.shape} ({model.config.num_hidden_layers} layers), batch {args.batch} x {args.seqlen}, "
          f"{args.dtype} on {args.device}, logits_to_keep={args.logits_to_keep}")
    print(f"{'method':>13} {'F':>5} {'realised':>8} {'dense s':>9} {'reduced s':>9} {'ratio':>6} {'ideal':>6}")
    for method in args.methods:
        for target in args.flops:
            config = ssm_reduce.ReduceConfig(method=method, flops_reduction=target)
            dense, reduced, ratios = [], [], []
            ssm_reduce.apply(model, config)
            harness.timed(forward, args.device)  # warm-up of this setting
            for _ in range(args.repeats):
                ssm_reduce.remove(model)
                dense.append(harness.timed(forward, args.device))
                ssm_reduce.apply(model, config)
                reduced.append(harness.timed(forward, args.device))
                ratios.append(reduced[-1] / dense[-1])
            stats = ssm_reduce.stats(model)
            ssm_reduce.remove(model)
            row = {
                "method": method,
                "target_flops_reduction": target,
                "realised_flops_reduction": round(stats["realised_flops_reduction"], 4),
                "keep_ratio": round(stats["keep_ratio"], 4),
                "dense_median_s": round(harness.median(dense), 4),
                "reduced_median_s": round(harness.median(reduced), 4),
                "median_ratio": round(harness.median(ratios), 4),
                "ideal_ratio": round(1 - stats["realised_flops_reduction"], 4),
                "dense_s": [round(t, 4) for t in dense],
                "reduced_s": [round(t, 4) for t in reduced],
            }
            rows.append(row)
            print(f"{method:>13} {target:>5.2f} {row['realised_flops_reduction']:>8.4f} {row['dense_median_s']:>9.4f} "
                  f"{row['reduced_median_s']:>9.4f} {row['median_ratio']:>6.3f} {row['ideal_ratio']:>6.3f}", flush=True)
    payload = {
        "benchmark": "prefill time, dense vs reduced (alternating pairs, median ratio)",
        "shape": args.shape,
        "layers": model.config.num_hidden_layers,
        "batch": args.batch,
        "seqlen": args.seqlen,
        "dtype": args.dtype,
        "logits_to_keep": args.logits_to_keep,
        "repeats": args.repeats,
        "environment": harness.environment(args.device),
        "results": rows,
    }
    name = f"bench_{args.shape}_{args.device.split(':')[0]}_{args.dtype}_b{args.batch}_l{args.seqlen}"
    path = harness.save(name, payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
