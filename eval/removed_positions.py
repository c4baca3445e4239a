"""Where in a window each token-reduction method removes tokens, on the embedded model.

The windows and protection of the perplexity protocol (``ssm_reduce.evaluation``): windows of W bytes
of the held-out files, the last S positions protected. For each method at the target F, the positions
missing from ``kept_positions`` are pooled over the windows and summarised as a histogram over tenths
of the reducible part of the window, with their quartiles — which tells, for example, whether a
method mostly drops the oldest tokens.

    python eval/removed_positions.py --flops 0.3 --windows 16

Writes eval/results/removed_positions_embedded.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from accuracy import heldout_stream  # noqa: E402

import ssm_reduce  # noqa: E402
from ssm_reduce.evaluation import windows_of  # noqa: E402


@torch.no_grad()
def removed_positions(model, windows: torch.Tensor, scored: int) -> torch.Tensor:
    """Original positions removed by the patched ``model`` in each window, pooled (1-D LongTensor)."""
    inputs = windows[:, :-1]
    mask = torch.zeros_like(inputs, dtype=torch.bool)
    mask[:, -scored:] = True
    removed = []
    for row, protect_row in zip(inputs.split(1), mask.split(1)):
        with ssm_reduce.protect(model, protect_row):
            kept = model(row, use_cache=False).kept_positions[0]  # every kept position
        gone = torch.ones(row.shape[1], dtype=torch.bool)
        gone[kept[kept >= 0]] = False
        removed.append(gone.nonzero().flatten())
    return torch.cat(removed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(ssm_reduce.METHODS), choices=list(ssm_reduce.METHODS))
    p.add_argument("--flops", type=float, default=0.3)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--scored", type=int, default=128)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    harness.set_threads()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ssm_reduce.embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = windows_of(heldout_stream(tokenizer), args.window, None, args.windows)
    reducible = args.window - args.scored  # input positions that may be removed
    rows = []
    print(f"{'method':<13} {'removed/window':>14}  {'quartiles of removed positions':<32} share per tenth of the reducible part")
    for method in args.methods:
        ssm_reduce.apply(model, method=method, flops_reduction=args.flops)
        pos = removed_positions(model, windows, args.scored)
        ssm_reduce.remove(model)
        tenths = torch.bincount((pos * 10 // reducible).clamp(max=9), minlength=10).double()
        share = (tenths / tenths.sum()).tolist()
        quartiles = torch.quantile(pos.double(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)).tolist()
        rows.append({"method": method, "removed_per_window": len(pos) / len(windows),
                     "quartiles": [int(q) for q in quartiles], "share_per_tenth": share})
        print(f"{method:<13} {len(pos) / len(windows):>14.1f}  {str([int(q) for q in quartiles]):<32} "
              + " ".join(f"{s:.2f}" for s in share))
    payload = {"benchmark": "positions removed by each method (embedded model, perplexity windows)",
               "flops_reduction": args.flops,
               "protocol": {"window": args.window, "scored": args.scored, "windows": len(windows)},
               "environment": harness.environment("cpu"), "results": rows}
    out = harness.save("removed_positions_embedded", payload, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
