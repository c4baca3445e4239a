"""Generate the held-out lm-eval tasks of the embedded model from held-out standard-library files.

* ``embedded_nextline``: 4-way multiple choice — given about a kilobyte of source, which line comes
  next? The distractors are other lines of the same file with the same indentation.
* ``embedded_lastident``: LAMBADA-style completion — the last identifier of a line, where that
  identifier already occurred in the context (so it can be recalled, not guessed from the line).

Both read only files the embedded model never saw in training (``ssm_reduce.embedded.is_heldout``),
except the generated codec tables under ``encodings/``.

    python eval/make_embedded_tasks.py          # writes eval/tasks/embedded/*.jsonl and manifest.json
"""

from __future__ import annotations

import argparse
import json
import keyword
import platform
import random
import re
from pathlib import Path

from ssm_reduce.embedded import file_list_hash, heldout_files

OUT = Path(__file__).resolve().parent / "tasks" / "embedded"
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def context_before(lines: list[str], index: int, max_bytes: int) -> str:
    """The longest run of whole lines ending just before ``lines[index]`` within ``max_bytes``."""
    out, size = [], 0
    for line in reversed(lines[:index]):
        size += len(line.encode())
        if size > max_bytes:
            break
        out.append(line)
    return "".join(reversed(out))


def nextline_items(rel: str, lines: list[str], rng: random.Random, min_ctx: int, max_ctx: int) -> list[dict]:
    items = []
    by_indent: dict[str, list[str]] = {}
    for line in lines:
        body = line.rstrip("\n")
        if len(body.strip()) >= 10:
            indent = body[: len(body) - len(body.lstrip())]
            by_indent.setdefault(indent, []).append(body)
    for i, line in enumerate(lines):
        body = line.rstrip("\n")
        if len(body.strip()) < 10:
            continue
        context = context_before(lines, i, max_ctx)
        if len(context.encode()) < min_ctx:
            continue
        indent = body[: len(body) - len(body.lstrip())]
        pool = sorted(set(by_indent.get(indent, [])) - {body})
        if len(pool) < 3:
            continue
        choices = rng.sample(pool, 3) + [body]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(body), "file": rel})
    return items


def lastident_items(rel: str, lines: list[str], min_ctx: int, max_ctx: int) -> list[dict]:
    items = []
    for i, line in enumerate(lines):
        matches = list(IDENT.finditer(line))
        if not matches:
            continue
        last = matches[-1]
        name = last.group()
        if len(name) < 4 or keyword.iskeyword(name) or line[last.end() :].strip() not in ("", ")", "):", ":", "()", "]", ","):
            continue
        context = context_before(lines, i, max_ctx - last.start())
        if len(context.encode()) < min_ctx or not re.search(rf"\b{re.escape(name)}\b", context):
            continue
        items.append({"context": context + line[: last.start()], "target": name, "file": rel})
    return items


def pick(items: list[dict], count: int, rng: random.Random, per_file: int) -> list[dict]:
    """``count`` items, at most ``per_file`` from one file, in a seeded random order."""
    rng.shuffle(items)
    taken, per = [], {}
    for item in items:
        if per.get(item["file"], 0) < per_file:
            taken.append(item)
            per[item["file"]] = per.get(item["file"], 0) + 1
        if len(taken) == count:
            break
    return taken


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--min-context", type=int, default=512, help="bytes")
    p.add_argument("--max-context", type=int, default=1024, help="bytes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    root, rels = heldout_files()
    # Codec modules are generated lookup tables, not code: they would make items about hex counting.
    rels = [r for r in rels if not r.startswith("encodings/")]
    rng = random.Random(args.seed)
    nextline, lastident = [], []
    for rel in rels:
        lines = (root / rel).read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        nextline += nextline_items(rel, lines, rng, args.min_context, args.max_context)
        lastident += lastident_items(rel, lines, args.min_context, args.max_context)
    per_file = max(1, args.count // 10)
    tasks = {
        "nextline": pick(nextline, args.count, rng, per_file),
        "lastident": pick(lastident, args.count, rng, per_file),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, items in tasks.items():
        with open(args.out / f"{name}.jsonl", "w") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
        print(f"{name}: {len(items)} items from {len({i['file'] for i in items})} files")
    manifest = {
        "python_version": platform.python_version(),
        "source_files": len(rels),
        "source_file_list_sha256": file_list_hash(rels),
        "seed": args.seed,
        "context_bytes": [args.min_context, args.max_context],
        "items": {name: len(items) for name, items in tasks.items()},
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
