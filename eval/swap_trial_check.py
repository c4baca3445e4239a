"""How well a few rows predict whether mrp's swap rounds lower a layer's error (its swap trial).

mrp decides per layer, on ``MRPSettings.swap_trial_rows`` rows spread over the weight, whether to run its swap
rounds: they lower the damped loss every solve minimises, but where the damping dominates it they can
raise the undamped error the report shows. Per layer and target, this prunes every row with and without
swap rounds (``swap_rounds=1`` / ``0``, the trial switched off), takes the per-row undamped losses
``(w' - w) H (w' - w)^T`` and compares:

* ``full``: the whole layer's ratio, swaps / no swaps (below 1: swaps pay);
* ``trials``: the same ratio on ``--rows`` evenly spread rows, at ``--placements`` offsets;
* ``agree``: whether every placement lands on the same side of 1 as ``full``.

Layers: random mamba2-130m in_proj / out_proj shapes with spread and correlated inputs
(``bench_prune.random_layer``) and the embedded model's in_proj / out_proj of three blocks.

    python eval/swap_trial_check.py --rows 32     # writes eval/results/swap_trial_<device>.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from bench_prune import embedded_hessians, layer_shapes, random_layer  # noqa: E402

from ssm_reduce.prune import MRPSettings, prune_linear  # noqa: E402

TARGETS = {"50%": dict(sparsity=0.5), "2:4": dict(pattern="2:4")}


def row_losses(new, w, h):
    d = new.double() - w.double()
    return ((d @ h.double()) * d).sum(1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=MRPSettings().swap_trial_rows, help="trial rows")
    p.add_argument("--placements", type=int, default=16, help="offsets of the evenly spread rows")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    harness.set_threads()
    layers = {}
    for inputs in ("spread", "correlated"):
        for proj, (out, inp) in layer_shapes("mamba2-130m").items():
            layers[f"mamba2-130m {proj} ({inputs} inputs)"] = random_layer(out, inp, 4 * inp, "cpu", inputs=inputs)
    layers.update(embedded_hessians([0, 6, 11], 32, 512))
    no_trial = MRPSettings(swap_trial_rows=0)  # both variants on every row
    rows_out = []
    for name, (w, h) in layers.items():
        for label, target in TARGETS.items():
            swapped = row_losses(prune_linear(w, h, method="mrp", settings=no_trial, **target)[0], w, h)
            plain = row_losses(prune_linear(w, h, method="mrp", swap_rounds=0, settings=no_trial, **target)[0], w, h)
            full = float(swapped.sum() / plain.sum())
            count, trials = min(w.shape[0], args.rows), []
            for k in range(args.placements):
                idx = (torch.arange(count) * w.shape[0] // count + k * (w.shape[0] // count) // args.placements)
                idx = idx % w.shape[0]
                trials.append(float(swapped[idx].sum() / plain[idx].sum()))
            agree = all((t < 1) == (full < 1) for t in trials)
            rows_out.append({"layer": name, "target": label, "full": full, "trial_min": min(trials),
                             "trial_max": max(trials), "agree": agree})
            print(f"{name:<40} {label:>4}  full {full:.4f}  {args.rows}-row trials {min(trials):.4f}..{max(trials):.4f}"
                  f"  {'agree' if agree else 'DISAGREE'}", flush=True)
    helpful = [r["trial_max"] for r in rows_out if r["full"] < 1]
    harmful = [r["trial_min"] for r in rows_out if r["full"] >= 1]
    summary = {"cases": len(rows_out), "all_agree": all(r["agree"] for r in rows_out),
               "closest_helpful_trial": max(helpful) if helpful else None,
               "closest_harmful_trial": min(harmful) if harmful else None}
    print(summary)
    payload = {"benchmark": "swap trial: a few rows against the whole layer", "environment": harness.environment("cpu"),
               "trial_rows": args.rows, "placements": args.placements, "summary": summary, "layers": rows_out}
    print(f"wrote {harness.save('swap_trial_cpu', payload, args.out)}")


if __name__ == "__main__":
    main()
