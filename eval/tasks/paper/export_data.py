"""Export the six paper tasks' evaluation splits to JSONL, on a machine that can reach the Hugging
Face hub, for lm-eval runs on air-gapped machines (see README.md in this folder).

    python eval/tasks/paper/export_data.py            # writes eval/tasks/paper/data/*.jsonl
"""

import argparse
import json
from pathlib import Path

# task -> (hub dataset, config, split) as used by lm-eval's own task definitions
SOURCES = {
    "lambada_openai": ("EleutherAI/lambada_openai", "default", "test"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "piqa": ("baber/piqa", None, "validation"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    p.add_argument("--tasks", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    args = p.parse_args(argv)
    import datasets

    args.out.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        path, name, split = SOURCES[task]
        data = datasets.load_dataset(path, name, split=split)
        with open(args.out / f"{task}.jsonl", "w") as f:
            for row in data:
                f.write(json.dumps(row) + "\n")
        print(f"{task}: {len(data)} documents -> {args.out / (task + '.jsonl')}")


if __name__ == "__main__":
    main()
