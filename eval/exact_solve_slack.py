"""How far inside its guarantee mrp's exact solve stops, and what looser tolerances would save.

The exact solve stops once every row's kept residual r_K satisfies ``|r_K| / floor <= tol |x|``
(``floor``: a verified lower bound on lambda_min(H)), which proves ``|x - x*| <= tol |x*|``
(``MRPSettings.weight_tol`` = 5e-5 for float32 weights). Per layer, at 50% with the sweep's mask (no swap rounds):

* ``true``: the relative error of the returned kept weights against an independent float64 solve
  (every ``--row-step``-th row), median and max over those rows;
* ``certified``: the bound the solve proved, ``|r_K| / floor / |x|``, and its ratio to the true error;
* ``h_norm``: the (also rigorous) bound ``sqrt(r_K (H^-1)_KK r_K^T / floor) / |x|`` and its ratio;
* ``floor_ratio``: lambda_min(H_KK) / floor on those rows (how much of the slack the floor explains).

Time (random layers of the mamba2-130m in_proj shape, ``prune_linear(method="mrp")`` with its defaults,
``--repeats`` interleaved rounds): median seconds with ``weight_tol`` at each of ``--tols``, and the
ratio to the default's. Layers: random spread / correlated ones (``bench_prune.random_layer``) and the
embedded model's in_proj / out_proj (real calibration Hessians; error columns only).

    python eval/exact_solve_slack.py            # writes eval/results/exact_solve_slack_<device>.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from bench_prune import embedded_hessians, random_layer  # noqa: E402

from ssm_reduce.prune import MRPSettings, SolveStats, Workspace, prune_linear  # noqa: E402
from ssm_reduce.prune.linalg import eig_floor, inverse_upper  # noqa: E402

DEFAULT_TOL = MRPSettings().weight_tol


@torch.no_grad()
def slack(weight, hessian, row_step):
    """The columns of one row of the table (module docstring) for a swap-free 50% mrp run."""
    stats = SolveStats("mrp", 0.0, 0.0, 0.0, 0.01)
    h, hinv, _ = inverse_upper(hessian, 0.01, stats, MRPSettings().max_pivot_ratio)
    floor = eig_floor(h, hinv, 0.9 * float((torch.diag(h) - torch.diag(hessian).double()).min()))
    new, mask, _ = prune_linear(weight, hessian, method="mrp", sparsity=0.5, swap_rounds=0)
    x, w = new.double(), weight.double()
    rows = torch.arange(0, w.shape[0], row_step)
    r = ((w[rows] - x[rows]) @ h).masked_fill(mask[rows], 0.0)
    x_norm = x[rows].norm(dim=1)
    certified = r.norm(dim=1) / floor / x_norm
    h_norm = ((r @ hinv) * r).sum(1).clamp_min(0).sqrt() / floor**0.5 / x_norm
    true, floor_ratio = [], []
    for row in rows.tolist():
        kept = (~mask[row]).nonzero().flatten()
        block = h[kept][:, kept]
        optimum = torch.linalg.solve(block, (w[row] @ h)[kept])
        true.append(float((x[row, kept] - optimum).norm() / optimum.norm()))
        floor_ratio.append(float(torch.linalg.eigvalsh(block)[0]) / floor)
    true = torch.tensor(true, dtype=torch.float64)

    def summary(t):
        return {"median": float(t.median()), "max": float(t.max())}

    return {
        "rows_checked": len(rows), "floor": floor, "true": summary(true),
        "certified": summary(certified), "certified_over_true": float((certified / true).median()),
        "h_norm": summary(h_norm), "h_norm_over_true": float((h_norm / true).median()),
        "floor_ratio": summary(torch.tensor(floor_ratio)),
    }


def time_tolerances(weight, hessian, tols, repeats):
    """Median seconds of prune_linear(method="mrp", sparsity=0.5) with ``weight_tol`` at each of ``tols``,
    interleaved rounds, a shared workspace (as ``prune`` keeps on a CPU)."""
    runs = {tol: [] for tol in tols}
    errors = {}
    workspace = Workspace()
    for round_ in range(repeats + 1):
        for tol in tols:
            start = time.perf_counter()
            _, _, stats = prune_linear(weight, hessian, method="mrp", sparsity=0.5, workspace=workspace,
                                       settings=MRPSettings(weight_tol=tol))
            if round_:  # the first round warms the workspace up
                runs[tol].append(time.perf_counter() - start)
            errors[tol] = stats.relative_error
    seconds = {tol: harness.median(v) for tol, v in runs.items()}
    return [{"weight_tol": tol, "seconds": seconds[tol], "over_default": seconds[tol] / seconds[DEFAULT_TOL],
             "relative_error": errors[tol]} for tol in tols]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row-step", type=int, default=200, help="check every this-many-th row of a random layer")
    p.add_argument("--tols", nargs="+", type=float, default=[DEFAULT_TOL, 3e-4, 1e-3])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", nargs="+", type=int, default=[0, 6, 11], help="embedded-model blocks")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if DEFAULT_TOL not in args.tols:
        p.error(f"--tols must include the default weight_tol {DEFAULT_TOL} (the ratios' reference)")
    harness.set_threads()
    rows = []
    for kind in ("spread", "correlated"):
        w, h = random_layer(3352, 768, 4 * 768, "cpu", inputs=kind)
        row = {"layer": f"random mamba2-130m in_proj 3352x768 ({kind} inputs)", **slack(w, h, args.row_step),
               "time": time_tolerances(w, h, args.tols, args.repeats)}
        rows.append(row)
        print(row["layer"], {k: row[k] for k in ("true", "certified_over_true", "h_norm_over_true")},
              [(t["weight_tol"], round(t["over_default"], 3)) for t in row["time"]], flush=True)
    for name, (w, h) in embedded_hessians(args.layers, 32, 512).items():
        row = {"layer": f"embedded {name} {w.shape[0]}x{w.shape[1]}", **slack(w, h, max(1, w.shape[0] // 16))}
        rows.append(row)
        print(row["layer"], {k: row[k] for k in ("true", "certified_over_true", "h_norm_over_true")}, flush=True)
    payload = {"benchmark": "exact solve: true error at its stop against its certified bound; time by tolerance",
               "environment": harness.environment("cpu"), "repeats": args.repeats, "rows": rows}
    print("saved", harness.save("exact_solve_slack_cpu", payload, args.out))


if __name__ == "__main__":
    main()
