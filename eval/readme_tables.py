"""Render the result tables of docs/results.md from eval/results/*.json (between <!-- results:NAME -->
markers), so that the docs always quote the saved figures.

    python eval/readme_tables.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "eval" / "results"
PAGE = ROOT / "docs" / "results.md"
WIDTH = 110
# A word that would open a Markdown block (list item, quote, heading, table row) at the start of a line.
BLOCK_START = re.compile(r"^([-+*>#|]|\d+[.)])$")


def _wrap(text: str) -> str:
    """``text`` as lines of at most WIDTH characters, never starting a line with a Markdown block marker."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > WIDTH and not BLOCK_START.match(word):
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join(lines + [line])


def _load(name):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _env(payload) -> str:
    env = payload["environment"]
    threads = env.get("cpu_threads")
    where = env.get("gpu") or f"{env['cpu']}, {threads} thread{'s' if threads != 1 else ''}"
    commands = [e["command"] for e in env.get("earlier_runs", [])] + [env["command"]]
    return _wrap(f"*{where}; torch {env['torch']}, transformers {env['transformers']}; "
                 + ", then ".join(f"`{c}`" for c in commands) + "*")


def _on_gpu(payload) -> bool:
    """Absolute times are quoted from GPU runs only; CPU runs give ratios measured side by side."""
    return bool(payload["environment"].get("gpu"))


def bench_table() -> str | None:
    payload = _load("bench_mamba2-130m_cpu_float32_b1_l2048.json")
    if payload is None:
        return None
    seconds = _on_gpu(payload)
    lines = ["| method | target F | realised F | " + ("dense s | reduced s | " if seconds else "")
             + "reduced / dense | ideal (1 − F) |", "|---|---|---|" + ("---|---|" if seconds else "") + "---|---|"]
    for r in payload["results"]:
        lines.append(f"| {r['method']} | {r['target_flops_reduction']:.1f} | {r['realised_flops_reduction']:.3f} | "
                     + (f"{r['dense_median_s']:.2f} | {r['reduced_median_s']:.2f} | " if seconds else "")
                     + f"**{r['median_ratio']:.3f}** | {r['ideal_ratio']:.3f} |")
    caption = (f"Prefill of the mamba2-130m shape (random weights), batch 1 × {payload['seqlen']} tokens, "
               f"`logits_to_keep=1`, {payload['dtype']}. Dense and reduced are timed alternately "
               f"({payload['repeats']} pairs); each ratio is the median of the per-pair ratios:")
    return _wrap(caption) + "\n\n" + "\n".join(lines) + "\n\n" + _env(payload)


def speed_table() -> str | None:
    payload = _load("speed_cpu.json")
    if payload is None:
        return None
    lines = ["| shape | F | prefill speed-up | generation speed-up | peak memory | memory reduction |",
             "|---|---|---|---|---|---|"]
    for res in payload["results"]:
        prefill = {r["flops_reduction"]: r for r in res.get("prefill", {}).get("rows", [])}
        gen = {r["flops_reduction"]: r for r in res.get("generate", {}).get("rows", [])}
        mem = {r["flops_reduction"]: r for r in res.get("memory", {}).get("rows", [])}
        for f in sorted(set(prefill) | set(gen) | set(mem)):
            p, g, m = prefill.get(f), gen.get(f), mem.get(f)
            lines.append(
                f"| {res['shape']} | {f:.1f} | {p['speedup']:.2f}× | {g['speedup']:.2f}× | "
                f"{m['peak_bytes'] / 2**20:.0f} MiB | {100 * m['reduction']:.1f}% |" if p and g and m else
                f"| {res['shape']} | {f:.1f} | – | – | – | – |"
            )
    sizes = payload["sizes"]
    caption = (f"CPU-sized protocols, method {payload['method']}: prefill {sizes['prefill'][0]} × "
               f"{sizes['prefill'][1]}; generation {sizes['generate'][0]} × {sizes['generate'][1]} + "
               f"{sizes['generate'][2]} new tokens; peak memory of one full-logits forward of {sizes['memory'][0]} × "
               f"{sizes['memory'][1]} (resident-set growth):")
    return _wrap(caption) + "\n\n" + "\n".join(lines) + "\n\n" + _env(payload)


def accuracy_table(model: str = "embedded") -> str | None:
    payload = _load(f"accuracy_{model}.json")
    md = RESULTS / f"accuracy_{model}.md"
    if payload is None or not md.exists():
        return None
    proto = payload["perplexity_protocol"]
    what = "The embedded model" if model == "embedded" else "The embedded hybrid"
    caption = (f"{what} on its held-out tasks ({payload['limit'] or 'all'} items per task) and on the "
               f"perplexity protocol ({proto['windows']} windows of {proto['window']} bytes, last {proto['scored']} "
               "scored). Realised F is measured on the perplexity windows:")
    return (_wrap(caption) + "\n\n" + md.read_text().strip() + "\n\n"
            f"![accuracy vs FLOPs reduction](../eval/results/accuracy_{model}.png)\n\n" + _env(payload))


def hybrid_bench_table() -> str | None:
    runs = [p for p in (_load("bench_hybrid_cpu.json"), _load("bench_hybrid_cpu_nemotron-h-8b.json")) if p]
    if not runs:
        return None
    lines = ["| shape (layers) | batch × prompt | F | realised F | prefill time ratio | KV bytes ratio | "
             "decode-step time ratio |", "|---|---|---|---|---|---|---|"]
    for payload in runs:
        for result in payload["results"]:
            for row in result["rows"]:
                lines.append(f"| {result['shape']} ({result['layers']}) | {result['batch']} × {result['prompt']} | "
                             f"{row['flops_reduction']:.1f} | {row['realised_flops_reduction']:.3f} | "
                             f"{row['prefill_time_ratio']:.3f} | {row['kv_bytes_ratio']:.3f} | "
                             f"{row['decode_step_time_ratio']:.3f} |")
    caption = ("Random weights at the published layer shapes, the layer stack cut to fit this machine (layers in "
               "brackets), float32, method utr. Dense and reduced prefills alternate; each ratio is the median "
               "of the pairs' ratios; KV bytes are the attention caches after the prefill:")
    return _wrap(caption) + "\n\n" + "\n".join(lines) + "\n\n" + "\n\n".join(_env(p) for p in runs)


def _timing_protocol(layers) -> str:
    """What every layer-timing table shares, said once above them."""
    text = ("Layer timings: random layers of a public checkpoint's shape. A round runs every method once, in a "
            "fresh process; a ratio is the median of the per-round ratios. A time is the whole `prune_linear` "
            "call, the reported error included (its float64 sums go a few rows at a time). sparsegpt sweeps a "
            "float32 copy, as its reference implementation does. mrp sweeps in float32 and solves exactly: "
            "conjugate gradients with bfloat16 products where the hardware does them fast, refined with float32, "
            "then float64 residuals.")
    if any(not _on_gpu(layer) for layer in layers):
        text += (" On a CPU the ratios are measured side by side and the times themselves are not quoted; there "
                 "mrp keeps its scratch buffers from call to call, as `prune` does across layers.")
    if any(r.get("inputs") == "correlated" for layer in layers for r in layer["timings"]):
        text += (" Spread inputs are a random mix plus noise. Correlated inputs have a power-law spectrum (k-th "
                 "singular value 1/k) with log-normal channel scales, like real activations; on them mrp "
                 "iterates in the removed weights.")
    return _wrap(text)


def _timing_table(layer) -> str:
    methods = ("magnitude", "wanda", "sparsegpt", "mrp", "mrp-noswap") if _on_gpu(layer) else ()
    timing = ["| layer | target | " + "".join(f"{m} s | " for m in methods)
              + "mrp / sparsegpt time | mrp (no swap) / sparsegpt | mrp / sparsegpt error | mrp (no swap) / sparsegpt error |",
              "|---|---|" + "---|" * (len(methods) + 4)]
    for r in layer["timings"]:
        kind = f" ({r['inputs']} inputs)" if "inputs" in r else ""
        error = {m: r[m]["relative_error"] / r["sparsegpt"]["relative_error"] for m in ("mrp", "mrp-noswap")}
        timing.append(f"| {r['shape']} {r['layer']} {r['size'][0]}×{r['size'][1]}{kind} | {r['target']} | " + "".join(
            f"{r[m]['seconds']:.2f} | " for m in methods) + f"{r['mrp_time_over_sparsegpt']:.1f}× |"
            f" {r['mrp_noswap_time_over_sparsegpt']:.1f}× | {error['mrp']:.3f} | {error['mrp-noswap']:.3f} |")
    shapes = sorted({r["shape"] for r in layer["timings"]})
    dtype = layer.get("time_weight_dtype", "float32")
    device = "a GPU" if _on_gpu(layer) else "a CPU"
    caption = f"The {' and '.join(shapes)} shape on {device}, {layer['repeats']} rounds, weights in {dtype}"
    if dtype != "float32":
        caption += ", which mrp solves to their precision (a sixteenth of their epsilon)"
    return _wrap(caption + ":") + "\n\n" + "\n".join(timing) + "\n\n" + _env(layer)


def prune_tables() -> str | None:
    layer = _load("bench_prune_cpu.json")
    large = _load("bench_prune_cpu_2.7b.json")
    model = _load("prune_embedded.json")
    parts = []
    if layer is not None:
        lines = ["| target | mrp / sparsegpt layer error | mrp (no swap) / sparsegpt |", "|---|---|---|"]
        lines += [f"| {k} | {v['mean_mrp_over_sparsegpt_error']:.3f} | {v['mean_mrp_noswap_over_sparsegpt_error']:.3f} |"
                  for k, v in layer["summary"].items()]
        parts.append(_wrap("Layer level: the relative error ‖WX − W'X‖²/‖WX‖² on the embedded model's own inputs "
                           "(in_proj and out_proj of three blocks), as a mean ratio to SparseGPT's. mrp is the "
                           "default, one swap round; no swap is `swap_rounds=0`:") + "\n\n" + "\n".join(lines))
    # (bench_prune_cpu_<N>t.json: the GPU suite's cpubench stage, every core of that machine)
    many_threads = sorted(path.name for path in RESULTS.glob("bench_prune_cpu_*t.json"))
    timed = [t for t in [layer, large] + [_load(name) for name in ["bench_prune_cpu_bf16.json", *many_threads,
                                                                   "bench_prune_cuda.json", "bench_prune_cuda_bf16.json"]]
             if t is not None]
    if timed:
        parts.append(_timing_protocol(timed))
        parts += [_timing_table(t) for t in timed]
    if model is not None:
        md = (RESULTS / "prune_embedded.md").read_text().strip()
        proto = model["protocol"]
        caption = (f"Model level: the embedded model's held-out bits per byte (windowed protocol: {proto['windows']} "
                   f"windows of {proto['window']}, last {proto['scored']} scored) after pruning with "
                   f"{proto['calibration']['samples']} × {proto['calibration']['seqlen']} calibration bytes. The "
                   "figures move by up to 0.002 bits/byte with the number of threads, which changes the order of "
                   "float sums" + _one_thread_note() + ". Smaller differences are noise:")
        parts.append(_wrap(caption) + "\n\n" + md + "\n\n" + _env(model))
    return "\n\n".join(parts) or None


def _one_thread_note() -> str:
    """The same mrp 50% row rerun with one thread, where that file exists."""
    one = _load("prune_embedded_mrp50_1thread.json")
    if one is None:
        return ""
    row = next(r for r in one["results"] if r["method"] == "mrp")
    return (f": mrp at 50% with {one['environment']['cpu_threads']} thread gives {row['bits_per_byte']:.4f} and "
            f"{row['bits_per_byte_reduced']:.4f} (`eval/results/prune_embedded_mrp50_1thread.json`)")


TABLES = {"bench": bench_table, "speed": speed_table, "accuracy": accuracy_table, "prune": prune_tables,
          "accuracy_hybrid": lambda: accuracy_table("embedded-hybrid"), "bench_hybrid": hybrid_bench_table}


def main():
    name_of_page = PAGE.relative_to(ROOT).as_posix()
    text = PAGE.read_text()
    for name, render in TABLES.items():
        body = render()
        if body is None:
            continue
        pattern = re.compile(rf"(<!-- results:{name} -->\n)(?:.*?\n)?(<!-- /results:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{name_of_page} has no <!-- results:{name} --> markers")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    PAGE.write_text(text)
    print(f"{name_of_page}: result tables updated")


if __name__ == "__main__":
    main()
