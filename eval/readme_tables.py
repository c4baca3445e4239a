"""Render the README's result tables from eval/results/*.json (between <!-- results:NAME --> markers),
so that the README always quotes the saved figures.

    python eval/readme_tables.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "eval" / "results"


def _load(name):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _env(payload) -> str:
    env = payload["environment"]
    where = env.get("gpu") or f"{env['cpu']}, {env['cpu_threads']} threads"
    commands = [e["command"] for e in env.get("earlier_runs", [])] + [env["command"]]
    return f"*{where}; torch {env['torch']}, transformers {env['transformers']}; " + ", then ".join(f"`{c}`" for c in commands) + "*"


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
    return (f"Prefill of the mamba2-130m shape (random weights), batch 1 × {payload['seqlen']} tokens, "
            f"`logits_to_keep=1`, {payload['dtype']}, dense and reduced timed alternately "
            f"({payload['repeats']} pairs, median of the per-pair ratios):\n\n" + "\n".join(lines) + "\n\n" + _env(payload))


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
    return (f"CPU-sized protocols: prefill {sizes['prefill'][0]} × {sizes['prefill'][1]}, generation "
            f"{sizes['generate'][0]} × {sizes['generate'][1]} + {sizes['generate'][2]} new tokens, peak memory of one "
            f"full-logits forward of {sizes['memory'][0]} × {sizes['memory'][1]} (resident-set growth); method "
            f"{payload['method']}:\n\n" + "\n".join(lines) + "\n\n" + _env(payload))


def accuracy_table() -> str | None:
    payload = _load("accuracy_embedded.json")
    md = RESULTS / "accuracy_embedded.md"
    if payload is None or not md.exists():
        return None
    proto = payload["perplexity_protocol"]
    return (f"The embedded model on its held-out tasks ({payload['limit'] or 'all'} items per task) and the "
            f"perplexity protocol ({proto['windows']} windows of {proto['window']} bytes, last {proto['scored']} "
            f"scored); realised F is measured on the perplexity windows:\n\n" + md.read_text().strip() + "\n\n"
            "![accuracy vs FLOPs reduction](eval/results/accuracy_embedded.png)\n\n" + _env(payload))


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
    weights = "" if dtype == "float32" else (
        f"; weights in {dtype}, which mrp solves to their precision (a sixteenth of their epsilon)")
    return (f"Time on random layers of the {' and '.join(shapes)} shape ({layer['repeats']} rounds that "
            "run every method once, in a fresh process; ratios: median of the per-round ratios"
            + ("" if _on_gpu(layer) else ", measured side by side; CPU times themselves are not quoted") + "; each time is "
            "the whole `prune_linear` call, the reported error included, whose float64 sums go a few rows at a "
            "time; sparsegpt sweeps a float32 copy as its reference implementation; mrp sweeps in float32 and solves exactly — conjugate gradients with "
            "bfloat16 products where the hardware does them fast, refined with float32 then float64 "
            "residuals"
            + (" — keeping its scratch buffers from call to call as `prune` does across layers on a CPU"
               if layer["environment"].get("device", "cpu") == "cpu" else "")
            + ("; spread inputs: a random mix plus noise, correlated ones: a power-law spectrum (k-th singular "
               "value 1/k) with log-normal channel scales, like real activations, where mrp iterates in the removed "
               "weights" if any(r.get("inputs") == "correlated" for r in layer["timings"]) else "")
            + weights + "):\n\n"
            + "\n".join(timing) + "\n\n" + _env(layer))


def prune_tables() -> str | None:
    layer = _load("bench_prune_cpu.json")
    large = _load("bench_prune_cpu_2.7b.json")
    model = _load("prune_embedded.json")
    parts = []
    if layer is not None:
        lines = ["| target | mrp / sparsegpt layer error | mrp (no swap) / sparsegpt |", "|---|---|---|"]
        lines += [f"| {k} | {v['mean_mrp_over_sparsegpt_error']:.3f} | {v['mean_mrp_noswap_over_sparsegpt_error']:.3f} |"
                  for k, v in layer["summary"].items()]
        parts.append("Layer level — relative error ‖WX − W'X‖²/‖WX‖² on the embedded model's own inputs "
                     "(in_proj and out_proj of three blocks), mean ratio to SparseGPT's (mrp: default, one swap "
                     "round; no swap: `swap_rounds=0`):\n\n" + "\n".join(lines) + "\n\n" + _timing_table(layer))
    # (bench_prune_cpu_<N>t.json: the GPU suite's cpubench stage, every core of that machine)
    many_threads = sorted(path.name for path in RESULTS.glob("bench_prune_cpu_*t.json"))
    for extra in [large] + [_load(name) for name in ["bench_prune_cpu_bf16.json", *many_threads,
                                                     "bench_prune_cuda.json", "bench_prune_cuda_bf16.json"]]:
        if extra is not None:
            parts.append(_timing_table(extra))
    if model is not None:
        md = (RESULTS / "prune_embedded.md").read_text().strip()
        proto = model["protocol"]
        parts.append(f"Model level — the embedded model's held-out bits per byte (windowed protocol, "
                     f"{proto['windows']} windows of {proto['window']}, last {proto['scored']} scored), after pruning "
                     f"with {proto['calibration']['samples']} × {proto['calibration']['seqlen']} calibration bytes "
                     "(the figures move by up to 0.002 bits/byte with the number of threads, which changes the "
                     "order of float sums" + _one_thread_note() + "; smaller differences are noise):\n\n"
                     + md + "\n\n" + _env(model))
    return "\n\n".join(parts) or None


def _one_thread_note() -> str:
    """The same mrp 50% row rerun with one thread, where that file exists."""
    one = _load("prune_embedded_mrp50_1thread.json")
    if one is None:
        return ""
    row = next(r for r in one["results"] if r["method"] == "mrp")
    return (f": mrp at 50% with {one['environment']['cpu_threads']} thread gives {row['bits_per_byte']:.4f} and "
            f"{row['bits_per_byte_reduced']:.4f}, `eval/results/prune_embedded_mrp50_1thread.json`")


TABLES = {"bench": bench_table, "speed": speed_table, "accuracy": accuracy_table, "prune": prune_tables}


def main():
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, render in TABLES.items():
        body = render()
        if body is None:
            continue
        pattern = re.compile(rf"(<!-- results:{name} -->\n)(?:.*?\n)?(<!-- /results:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- results:{name} --> markers")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    readme.write_text(text)
    print("README tables updated")


if __name__ == "__main__":
    main()
