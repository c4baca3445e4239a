"""Accuracy of the embedded model (or the embedded hybrid) under every token-reduction method at F = 0.1 / 0.2 / 0.3.

For each setting (dense, and each method at each target): the held-out lm-eval tasks
(``embedded_nextline`` accuracy, ``embedded_lastident`` accuracy) through the ``ssm_reduce`` lm-eval
model, and held-out bits per byte with the windowed perplexity protocol (``ssm_reduce.evaluation``).

    python eval/accuracy.py                      # full table (about an hour on two CPU cores)
    python eval/accuracy.py --limit 50 --windows 16 --methods utr evit --flops 0.2
    python eval/accuracy.py --model embedded-hybrid    # the hybrid: eval/results/accuracy_embedded-hybrid.*

Writes eval/results/accuracy_<model>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

import ssm_reduce  # noqa: E402
from ssm_reduce.embedded import EOT_ID, heldout_files  # noqa: E402
from ssm_reduce.evaluation import ScoredPositionsRemoved, windowed_perplexity  # noqa: E402

TASKS = ["embedded_nextline", "embedded_lastident"]
TASK_DIR = Path(__file__).resolve().parent / "tasks" / "embedded"


def heldout_stream(tokenizer) -> torch.Tensor:
    root, rels = heldout_files()
    ids = []
    for rel in rels:
        ids += tokenizer((root / rel).read_text(encoding="utf-8", errors="replace")).input_ids + [EOT_ID]
    return torch.tensor(ids)


def _serves(model, method: str) -> bool:
    try:
        ssm_reduce.check(model, method=method, flops_reduction=0.2)
        return True
    except ValueError:
        return False


def evaluate_setting(model, tokenizer, config, args, stream) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from ssm_reduce.integrations.lm_eval import ReducedLM

    reduce_args = {} if config is None else {"method": config.method, "flops_reduction": config.flops_reduction}
    lm = ReducedLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device="cpu", **reduce_args)
    results = simple_evaluate(
        model=lm, tasks=TASKS, task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False),
        limit=args.limit, bootstrap_iters=0,
    )["results"]
    row = {"nextline_acc": results["embedded_nextline"]["acc,none"],
           "lastident_acc": results["embedded_lastident"]["acc,none"]}
    try:
        ppl = windowed_perplexity(model, stream, window=args.window, scored=args.scored, batch_size=args.batch_size,
                                  max_windows=args.windows)
    except ScoredPositionsRemoved:
        # tor-official protects no position; where it removes a scored byte the protocol has no score to give.
        return row | {"heldout_bits_per_byte": None, "realised_flops_reduction": None,
                      "note": "removed scored positions (the method protects none): no bits/byte"}
    finally:
        ssm_reduce.remove(model)
    return row | {"heldout_bits_per_byte": ppl["bits_per_token"],
                  "realised_flops_reduction": ppl.get("realised_flops_reduction", 0.0)}


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(rows) -> str:
    lines = [
        "| method | F | realised F (ppl windows) | next-line acc | last-identifier acc | held-out bits/byte |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['flops_reduction']:.1f} | {_fmt(r['realised_flops_reduction'], '.3f')} | "
            f"{100 * r['nextline_acc']:.1f} | {100 * r['lastident_acc']:.1f} | "
            f"{_fmt(r['heldout_bits_per_byte'], '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in rows if r["method"] == "dense")
    methods = sorted({r["method"] for r in rows} - {"dense"})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in ((axes[0], "nextline_acc", "next-line accuracy (4-way)"),
                           (axes[1], "lastident_acc", "last-identifier accuracy"),
                           (axes[2], "heldout_bits_per_byte", "held-out bits per byte (lower is better)")):
        for method in methods:
            pts = sorted((r["flops_reduction"], r[key]) for r in rows if r["method"] == method and r[key] is not None)
            ax.plot([0.0] + [x for x, _ in pts], [dense[key]] + [y for _, y in pts], marker="o", label=method)
        ax.set_title(title)
        ax.set_xlabel("target FLOPs reduction")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", choices=["embedded", "embedded-hybrid"])
    p.add_argument("--methods", nargs="+", default=None, choices=list(ssm_reduce.METHODS),
                   help="default: every method the model serves")
    p.add_argument("--flops", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    p.add_argument("--limit", type=int, default=None, help="items per task")
    p.add_argument("--windows", type=int, default=64, help="perplexity windows")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--scored", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--resume", action="store_true",
                   help="reuse the settings already measured in the partial file of an interrupted run")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    harness.set_threads()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ssm_reduce.embedded_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if args.methods is None:
        args.methods = [m for m in ssm_reduce.METHODS if _serves(model, m)]
    tokenizer = AutoTokenizer.from_pretrained(path)
    stream = heldout_stream(tokenizer)
    settings = [("dense", 0.0, None)] + [
        (m, f, ssm_reduce.ReduceConfig(method=m, flops_reduction=f)) for m in args.methods for f in args.flops
    ]
    protocol = {"limit": args.limit, "window": args.window, "scored": args.scored, "windows": args.windows}
    name = f"accuracy_{args.model}"
    final = harness.result_path(name, args.out)
    partial = final.with_suffix(".partial.json")
    done = {}
    if args.resume and partial.exists():
        previous = json.loads(partial.read_text())
        if previous.get("protocol") == protocol:
            done = {(r["method"], r["flops_reduction"]): r for r in previous["rows"]}
            print(f"resuming: {len(done)} settings from {partial}")
    rows = []
    for method, target, config in settings:
        row = done.get((method, target))
        if row is None:
            row = {"method": method, "flops_reduction": target, **evaluate_setting(model, tokenizer, config, args, stream)}
        rows.append(row)
        harness.save(f"{name}_partial", {"protocol": protocol, "rows": rows}, partial)
        print(markdown([row]).splitlines()[-1], flush=True)
    payload = {
        "benchmark": f"{args.model} model accuracy under token reduction",
        "model": args.model,
        "tasks": TASKS,
        "limit": args.limit,
        "perplexity_protocol": {"window": args.window, "scored": args.scored, "windows": args.windows},
        "environment": harness.environment("cpu"),
        "results": rows,
    }
    out = harness.save(name, payload, args.out)
    out.with_suffix(".md").write_text(markdown(rows))
    plot(rows, out.with_suffix(".png"))
    print(markdown(rows))
    partial.unlink(missing_ok=True)
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
