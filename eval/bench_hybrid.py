"""Dense vs token-reduced hybrids at the layer shapes of public checkpoints (random weights).

For each shape, batch size and prompt length: the prefill time ratio reduced / dense at each FLOPs target
(``utr`` by default), measured side by side (dense and reduced forwards alternate; median of the pairs'
ratios), the attention KV-cache bytes after the prefill (reduced / dense, from ``ssm_reduce.stats``), and the
time per decode step over the steps after that prefill (reduced / dense).

Shapes follow the published configs of Granite-4.0-H-Tiny, Nemotron-H-8B and Falcon-H1-1.5B (hidden size,
heads, state size, experts, which layers attend); the layer stack is cut to ``--layers`` keeping the
model's ratio of attention to Mamba layers, and the vocabulary is small (it only sizes the LM head). Pass
``--config path/config.json`` to time a checkpoint's exact config instead.

    python eval/bench_hybrid.py                                   # CPU-sized: batch 1, prompt 2048
    python eval/bench_hybrid.py --device cuda --dtype bfloat16 --batch 1 4 --prompt 2048 8192 --layers 0

Writes eval/results/bench_hybrid_<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

import ssm_reduce  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VOCAB = 1024


def _pattern(layers: int, attention_every: int, offset: int) -> list[str]:
    return ["attention" if i % attention_every == offset else "mamba" for i in range(layers)]


def _granite_tiny(t, layers):
    layers = layers or 40
    return t.GraniteMoeHybridConfig(
        vocab_size=VOCAB, hidden_size=1536, intermediate_size=512, shared_intermediate_size=1024,
        num_local_experts=64, num_experts_per_tok=6, num_attention_heads=12, num_key_value_heads=4,
        layer_types=_pattern(layers, 10, 5), num_hidden_layers=layers, mamba_n_heads=48, mamba_d_head=64,
        mamba_d_state=128, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256,
        position_embedding_type="nope"), t.GraniteMoeHybridForCausalLM


def _nemotron_h_8b(t, layers):
    layers = layers or 52
    kinds = [("attention" if i % 13 == 6 else "mlp" if i % 2 else "mamba") for i in range(layers)]
    return t.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=4096, layers_block_type=kinds, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=21504, mamba_num_heads=128, mamba_head_dim=64, ssm_state_size=128,
        n_groups=8, conv_kernel=4, expand=2, chunk_size=256), t.NemotronHForCausalLM


def _falcon_h1_1_5b(t, layers):
    layers = layers or 24
    return t.FalconH1Config(
        vocab_size=VOCAB, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128, mamba_d_ssm=3072, mamba_n_heads=48,
        mamba_d_head=64, mamba_d_state=256, mamba_n_groups=1, mamba_d_conv=4, mamba_chunk_size=256), t.FalconH1ForCausalLM


SHAPES = {"granite-4.0-h-tiny": (_granite_tiny, 10), "nemotron-h-8b": (_nemotron_h_8b, 7),
          "falcon-h1-1.5b": (_falcon_h1_1_5b, 8)}


def build(shape: str, layers: int, dtype, device, config_path=None):
    import transformers

    if config_path:
        config = transformers.AutoConfig.from_pretrained(config_path)
        model_class = transformers.AutoModelForCausalLM
        torch.manual_seed(0)
        return model_class.from_config(config).to(device=device, dtype=dtype).eval()
    config, model_class = SHAPES[shape][0](transformers, layers)
    torch.manual_seed(0)
    return model_class(config).to(device=device, dtype=dtype).eval()


def kv_bytes(stats) -> tuple[int, int]:
    layers = stats.get("attention_layers", {}).values()
    return (sum(e["kv_cache_bytes"] or 0 for e in layers), sum(e["dense_kv_cache_bytes"] or 0 for e in layers))


@torch.inference_mode()
def measure(model, batch: int, prompt: int, targets, method: str, repeats: int, device: str, steps: int) -> dict:
    ids = torch.randint(3, VOCAB, (batch, prompt), device=device)
    step = torch.randint(3, VOCAB, (batch, 1), device=device)

    def prefill():
        return model(ids, use_cache=True, logits_to_keep=1)

    def timed(fn):
        harness.synchronize(device)
        start = time.perf_counter()
        out = fn()
        harness.synchronize(device)
        return time.perf_counter() - start, out

    def decode_step(out):
        """Seconds per step of ``steps`` greedy-shaped decode steps continuing ``out``'s cache."""
        def run():
            for _ in range(steps):
                model(step, cache=out.cache, use_cache=True)
        return timed(run)[0] / steps

    ssm_reduce.remove(model)
    prefill()  # warm-up
    rows = []
    for target in targets:
        dense_times, reduced_times, dense_steps, reduced_steps = [], [], [], []
        for _ in range(repeats):
            ssm_reduce.remove(model)
            seconds, out = timed(prefill)
            dense_times.append(seconds)
            dense_steps.append(decode_step(out))
            ssm_reduce.apply(model, method=method, flops_reduction=target)
            seconds, out = timed(prefill)
            reduced_times.append(seconds)
            stats = ssm_reduce.stats(model)
            reduced_steps.append(decode_step(out))
        reduced_kv, dense_kv = kv_bytes(stats)
        ratios = [r / d for r, d in zip(reduced_times, dense_times)]
        step_ratios = [r / d for r, d in zip(reduced_steps, dense_steps)]
        row = {
            "flops_reduction": target,
            "realised_flops_reduction": round(stats["realised_flops_reduction"], 4),
            "anchors": stats["anchors"],
            "prefill_dense_s": round(harness.median(dense_times), 4),
            "prefill_reduced_s": round(harness.median(reduced_times), 4),
            "prefill_time_ratio": round(harness.median(ratios), 4),
            "kv_bytes_dense": dense_kv,
            "kv_bytes_reduced": reduced_kv,
            "kv_bytes_ratio": round(reduced_kv / dense_kv, 4) if dense_kv else None,
            "decode_step_dense_s": round(harness.median(dense_steps), 5),
            "decode_step_reduced_s": round(harness.median(reduced_steps), 5),
            "decode_step_time_ratio": round(harness.median(step_ratios), 4),
        }
        rows.append(row)
        print(f"  F={target}: prefill x{row['prefill_time_ratio']:.3f}, KV bytes x{row['kv_bytes_ratio']}, "
              f"decode step x{row['decode_step_time_ratio']:.3f} (realised F {row['realised_flops_reduction']:.3f})",
              flush=True)
    ssm_reduce.remove(model)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--config", default=None, help="a checkpoint's config.json (directory or file) instead of --shapes")
    p.add_argument("--layers", type=int, default=None,
                   help="layers per model (0: the checkpoint's full depth; default: cut to fit a CPU)")
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--prompt", nargs="+", type=int, default=[2048])
    p.add_argument("--flops", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    p.add_argument("--method", default="utr", choices=list(ssm_reduce.METHODS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps timed after each prefill")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    harness.set_threads()
    results = []
    shapes = ["config"] if args.config else args.shapes
    for shape in shapes:
        layers = args.layers if args.layers is not None else SHAPES.get(shape, (None, 0))[1]
        model = build(shape, layers, DTYPES[args.dtype], args.device, args.config)
        kinds = sorted({type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__
                        and not any("Attention" in type(c).__name__ for c in m.children())})
        print(f"{shape}: {len(ssm_reduce.patch.hybrid.ADAPTER.blocks(model))} layers "
              f"(Mamba layers {ssm_reduce.patch.hybrid.ADAPTER.mamba_layers(model)}), {kinds}", flush=True)
        for batch in args.batch:
            for prompt in args.prompt:
                print(f" batch {batch}, prompt {prompt}", flush=True)
                rows = measure(model, batch, prompt, args.flops, args.method, args.repeats, args.device,
                               args.decode_steps)
                results.append({"shape": shape, "layers": len(ssm_reduce.patch.hybrid.ADAPTER.blocks(model)),
                                "batch": batch, "prompt": prompt, "method": args.method, "rows": rows})
        del model
    payload = {"environment": harness.environment(args.device), "dtype": args.dtype, "vocab": VOCAB,
               "note": "random weights at the published layer shapes, layer stack cut to 'layers'; ratios are "
                       "measured side by side in one run", "results": results}
    path = harness.save(f"bench_hybrid_{args.device.split(':')[0]}", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
