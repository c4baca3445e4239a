"""Dense held-out bits per byte of an embedded model over windows of several lengths (last 128 bytes scored).

Shows how a model does on windows longer than the sequences it was trained on, which is what the accuracy
protocol's 1024-byte windows ask of the embedded hybrid (trained on 512-byte sequences).

    python eval/context_length.py --model embedded-hybrid      # eval/results/context_length_embedded-hybrid.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from accuracy import heldout_stream  # noqa: E402

import ssm_reduce  # noqa: E402
from ssm_reduce.evaluation import windowed_perplexity  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("embedded", "embedded-hybrid"), default="embedded-hybrid")
    p.add_argument("--windows-of", type=int, nargs="+", default=[384, 512, 1024], help="window lengths")
    p.add_argument("--scored", type=int, default=128)
    p.add_argument("--windows", type=int, default=48)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    harness.set_threads()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ssm_reduce.embedded_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    stream = heldout_stream(AutoTokenizer.from_pretrained(path))
    rows = []
    for window in args.windows_of:
        ppl = windowed_perplexity(model, stream, window=window, scored=args.scored, max_windows=args.windows)
        rows.append({"window": window, "heldout_bits_per_byte": round(ppl["bits_per_token"], 4)})
        print(f"window {window}: {rows[-1]['heldout_bits_per_byte']:.4f} bits/byte", flush=True)
    out = harness.save(f"context_length_{args.model}", {
        "benchmark": f"{args.model}: dense held-out bits per byte by window length",
        "scored": args.scored, "windows": args.windows, "environment": harness.environment("cpu"), "results": rows,
    }, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
