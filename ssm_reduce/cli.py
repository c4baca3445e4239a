"""Command line: ``ssm-reduce demo | ppl | prune | eval | info``."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import time

DTYPES = ("float32", "bfloat16", "float16")


def _load(name: str, device: str, dtype: str):
    """Model and tokenizer of ``embedded``, a HF or mamba_ssm checkpoint directory, or a hub id."""
    import torch

    from .loading import load_model, load_tokenizer

    model = load_model(name, device=device, dtype=getattr(torch, dtype))
    return model, load_tokenizer(name)


def _demo_text(min_bytes: int) -> tuple[str, str]:
    """A slice of held-out standard-library source (never seen in the embedded model's training)."""
    from .embedded import heldout_files

    root, rels = heldout_files()
    longest = 0
    for rel in sorted(rels, key=lambda r: (root / r).stat().st_size, reverse=True):
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
        longest = max(longest, len(text.encode()))
        if len(text.encode()) >= min_bytes + 4096:
            start = text.find("\ndef ", len(text) // 3) + 1
            return text[start:], rel
    raise ValueError(f"--tokens is too large: the longest held-out file has {longest} bytes, and the demo's "
                     f"prompt needs about {min_bytes + 4096}; ask for fewer tokens")


def _time_prefill(model, ids, repeats: int) -> float:
    import torch

    times = []
    for _ in range(repeats):
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(ids, logits_to_keep=1, use_cache=False)
        if ids.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cmd_demo(args) -> int:
    import torch

    import ssm_reduce

    torch.manual_seed(0)
    config = ssm_reduce.ReduceConfig(method=args.method, flops_reduction=args.flops_reduction)
    model, tokenizer = _load(args.model, args.device, args.dtype)
    text, source = _demo_text(args.tokens * 4)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens].to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model} ({type(model).__name__}, {model.config.num_hidden_layers} layers, "
          f"{n_params / 1e6:.1f}M parameters) on {args.device}, {args.dtype}")
    print(f"prompt: {ids.shape[1]} tokens of held-out source ({source})")

    with torch.no_grad():
        dense_logits = model(ids, logits_to_keep=1).logits[0, -1].float()
        dense_times, reduced_times = [], []
        model(ids, logits_to_keep=1)  # warm-up, dense and reduced
        ssm_reduce.apply(model, config)
        model(ids, logits_to_keep=1)
        ssm_reduce.remove(model)
        for _ in range(args.repeats):
            dense_times.append(_time_prefill(model, ids, 1))
            ssm_reduce.apply(model, config)
            reduced_times.append(_time_prefill(model, ids, 1))
            ssm_reduce.remove(model)
        ssm_reduce.apply(model, config)
        reduced_out = model(ids, logits_to_keep=1)
        stats = ssm_reduce.stats(model)
        reduced_logits = reduced_out.logits[0, -1].float()

    anchors = stats["anchors"]
    print(f"method: {args.method}, target FLOPs reduction {100 * args.flops_reduction:.1f}% -> "
          f"anchor layers {anchors}, keep ratio {stats['keep_ratio']:.4f} per anchor")
    per_layer = " ".join(f"{t:.0f}" for t in stats["tokens_per_layer"])
    print(f"tokens entering each layer: {per_layer}")
    print(f"realised FLOPs reduction: {100 * stats['realised_flops_reduction']:.2f}%")
    dense_t, reduced_t = statistics.median(dense_times), statistics.median(reduced_times)
    ratios = [r / d for d, r in zip(dense_times, reduced_times)]
    print(f"prefill wall time (logits_to_keep=1, {args.repeats} alternating pairs): median dense {dense_t * 1e3:.1f} ms, "
          f"median reduced {reduced_t * 1e3:.1f} ms, median per-pair reduced/dense {statistics.median(ratios):.3f} "
          f"(ideal {1 - stats['realised_flops_reduction']:.3f})")

    p_dense = torch.softmax(dense_logits, -1)
    p_reduced = torch.softmax(reduced_logits, -1)
    kl = torch.sum(p_dense * (torch.log(p_dense + 1e-12) - torch.log(p_reduced + 1e-12))).item()
    top_d, top_r = int(p_dense.argmax()), int(p_reduced.argmax())
    overlap = len(set(p_dense.topk(5).indices.tolist()) & set(p_reduced.topk(5).indices.tolist()))
    print(f"last-token agreement: top-1 {'same' if top_d == top_r else 'different'} "
          f"(dense {tokenizer.decode([top_d])!r} p={p_dense[top_d]:.2f}, reduced {tokenizer.decode([top_r])!r} "
          f"p={p_reduced[top_r]:.2f}), top-5 overlap {overlap}/5, KL(dense||reduced) {kl:.4f} nats")

    with torch.no_grad():
        reduced_gen = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
        ssm_reduce.remove(model)
        dense_gen = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
    tail = tokenizer.decode(ids[0, -60:])
    print(f"prompt ends: {tail!r}")
    print(f"dense   greedy: {tokenizer.decode(dense_gen[0, ids.shape[1]:])!r}")
    print(f"reduced greedy: {tokenizer.decode(reduced_gen[0, ids.shape[1]:])!r}")
    return 0


def cmd_ppl(args) -> int:
    import torch

    import ssm_reduce
    from .embedded import heldout_files
    from .evaluation import compare_perplexity

    config = ssm_reduce.ReduceConfig(method=args.method, flops_reduction=args.flops_reduction)
    model, tokenizer = _load(args.model, args.device, args.dtype)
    ssm_reduce.patch.check(model, config)  # before the text is read and the dense pass runs
    if args.scored >= args.window:
        raise ValueError(f"--scored must be below --window, got --scored {args.scored} and --window {args.window}")
    if args.text_file:
        ids = tokenizer(open(args.text_file, encoding="utf-8").read()).input_ids
        source = args.text_file
    else:
        root, rels = heldout_files()
        eot = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]  # the files' separator
        ids = []
        for rel in rels:
            ids += tokenizer((root / rel).read_text(encoding="utf-8", errors="replace")).input_ids + eot
        source = f"{len(rels)} held-out standard-library files"
    both = compare_perplexity(
        model, torch.tensor(ids), config, window=args.window, scored=args.scored, batch_size=args.batch_size,
        max_windows=args.windows, progress=True,
    )
    dense, reduced = both["dense"], both["reduced"]
    print(f"text: {source}; {dense['windows']} windows of {args.window} tokens, the last {args.scored} of each "
          f"scored and protected ({dense['scored_tokens']} tokens)")
    print(f"{'':>8} {'perplexity':>11} {'bits/token':>11} {'FLOPs reduction':>16}")
    print(f"{'dense':>8} {dense['perplexity']:>11.4f} {dense['bits_per_token']:>11.4f} {0.0:>16.4f}")
    print(f"{args.method:>8} {reduced['perplexity']:>11.4f} {reduced['bits_per_token']:>11.4f} "
          f"{reduced['realised_flops_reduction']:>16.4f}")
    return 0


def cmd_prune(args) -> int:
    from pathlib import Path

    import ssm_reduce
    from .embedded import training_texts
    from .prune.solvers import check_swap_rounds, check_target

    check_target(args.sparsity, args.pattern, args.method)
    check_swap_rounds(args.swap_rounds)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; give a directory for the pruned model")
    model, tokenizer = _load(args.model, args.device, args.dtype)
    if args.calib == "embedded":
        calib = training_texts(max_bytes=4 * args.nsamples * args.seqlen)
    else:
        calib = Path(args.calib).read_text(encoding="utf-8", errors="replace")
    report = ssm_reduce.prune(
        model, calib, tokenizer=tokenizer, sparsity=args.sparsity, pattern=args.pattern, method=args.method,
        nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, device=args.device,
        swap_rounds=args.swap_rounds,
    )
    print(report)
    if args.out:
        out = Path(args.out)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        report.to_json(out / "prune_report.json")
        print(f"saved the pruned model and prune_report.json to {out}")
    return 0


def cmd_info(args) -> int:
    import torch
    import transformers

    import ssm_reduce
    from .ops import kernel_status

    print(f"ssm_reduce {ssm_reduce.__version__}")
    print(f"python {platform.python_version()} ({platform.platform()})")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    for name in ("einops", "mamba_ssm", "causal_conv1d", "lm_eval", "triton"):
        spec = importlib.util.find_spec(name)  # found, never imported: mamba_ssm needs a GPU to import
        version = "not installed"
        if spec is not None:
            try:
                from importlib.metadata import version as dist_version

                version = dist_version(name.replace("_", "-"))
            except Exception:  # noqa: BLE001 - any metadata problem just means "unknown"
                version = "installed"
        print(f"  {name}: {version}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"device cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("devices: cpu only (torch.cuda.is_available() is False)")
    status = kernel_status()
    if status["loaded"]:
        print(f"kernels: loaded ({', '.join(status['ops']) or 'no ops'})")
    else:
        print(f"kernels: not loaded - {status['reason']}")
    triton_note = "" if status["triton"] else " (triton not installed: the Triton scan cannot serve)"
    print(f"Mamba-2 scan backend on CUDA: {status['scan_backend']} (SSM_REDUCE_SCAN_BACKEND=cuda|triton){triton_note}")
    for host, classes in ssm_reduce.supported_hosts().items():
        print(f"supported ({host}): {', '.join(classes)}")
    for name in ("embedded", "embedded-hybrid"):
        try:
            print(f"{name} model: {ssm_reduce.embedded_model_path(name)}")
        except FileNotFoundError as err:
            print(f"{name} model: missing ({err})")
    print(f"methods: {', '.join(ssm_reduce.METHODS)}")
    if args.model is None:
        print("scan routes: pass --model (and --method, --device) to see which scan each anchor runs")
        return 0
    from .ops.route import DESCRIPTIONS

    model, _ = _load(args.model, args.device, args.dtype)
    ssm_reduce.apply(model, method=args.method, flops_reduction=args.flops_reduction)
    from .patch.base import adapter_for

    mamba_layers = adapter_for(model).mamba_layers(model)
    if mamba_layers is not None:
        print(f"Mamba layers (anchors move to the nearest): {mamba_layers}")
    print(f"anchors: {ssm_reduce.stats(model)['anchors']}")
    print(f"scan routes of {args.model} on {args.device}, {args.dtype}, method {args.method} "
          f"(flops_reduction={args.flops_reduction}):")
    for layer, scan in ssm_reduce.scan_routes(model).items():
        print(f"  layer {layer}: {scan.value} - {DESCRIPTIONS[scan]}")
    return 0


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def _device(text: str) -> str:
    from .loading import check_device

    try:
        check_device(text)
    except ValueError as err:  # (argparse names the option)
        raise argparse.ArgumentTypeError(str(err).removeprefix("device=")) from None
    return text


def _model_options(parser, methods, default_method: str, reduction: bool) -> None:
    parser.add_argument("--model", default="embedded",
                        help="'embedded', 'embedded-hybrid', a HF or mamba_ssm checkpoint directory, or a hub id")
    parser.add_argument("--method", default=default_method, choices=methods)
    if reduction:
        parser.add_argument("--flops-reduction", type=float, default=0.2)
    parser.add_argument("--device", default="cpu", type=_device)
    parser.add_argument("--dtype", default="float32", choices=DTYPES)


def build_parser() -> argparse.ArgumentParser:
    import ssm_reduce

    parser = argparse.ArgumentParser(prog="ssm-reduce", description="Token reduction for Mamba / Mamba-2 models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="dense vs reduced on the embedded model (offline, seconds on CPU)")
    _model_options(demo, ssm_reduce.METHODS, "utr", reduction=True)
    demo.add_argument("--tokens", type=_at_least(2), default=1024, help="prompt length in tokens")
    demo.add_argument("--new-tokens", type=_at_least(1), default=48)
    demo.add_argument("--repeats", type=_at_least(1), default=3)
    demo.set_defaults(func=cmd_demo)
    ppl = sub.add_parser("ppl", help="windowed perplexity, dense vs reduced (reduce the context, score the suffix)")
    _model_options(ppl, ssm_reduce.METHODS, "utr", reduction=True)
    ppl.add_argument("--window", type=_at_least(2), default=1024)
    ppl.add_argument("--scored", type=_at_least(1), default=128)
    ppl.add_argument("--windows", type=_at_least(1), default=64, help="at most this many windows")
    ppl.add_argument("--text-file", default=None, help="default: the held-out standard-library files")
    ppl.add_argument("--batch-size", type=_at_least(1), default=8)
    ppl.set_defaults(func=cmd_ppl)
    prune = sub.add_parser("prune", help="one-shot weight pruning (magnitude, wanda, sparsegpt, mrp)")
    _model_options(prune, ssm_reduce.prune.METHODS, "mrp", reduction=False)
    target = prune.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float, help="unstructured fraction of each row, in [0, 1)")
    target.add_argument("--pattern", help="N:M, e.g. 2:4")
    prune.add_argument("--calib", default="embedded", help="a text file, or 'embedded' (the embedded model's training text)")
    prune.add_argument("--nsamples", type=_at_least(1), default=128)
    prune.add_argument("--seqlen", type=_at_least(2), default=2048)
    prune.add_argument("--batch-size", type=_at_least(1), default=8)
    prune.add_argument("--swap-rounds", type=int, default=1,
                       help="mrp: at most this many swap rounds per layer after the exact solve (0 = none: faster, "
                            "higher error)")
    prune.add_argument("--out", default=None, help="directory for the pruned model (save_pretrained) and report")
    prune.set_defaults(func=cmd_prune)
    sub.add_parser("eval", help="lm-eval with the ssm_reduce model registered (all lm-eval flags pass through)")
    info = sub.add_parser("info", help="versions, devices, kernels, supported models; with --model, each anchor's scan")
    _model_options(info, ssm_reduce.METHODS, "utr", reduction=True)
    info.set_defaults(model=None, func=cmd_info)
    return parser


def cmd_eval(argv: list[str]) -> int:
    """Run lm-eval's command line with the ``ssm_reduce`` model registered; every flag passes through."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("ssm-reduce eval: error: lm-eval is not installed; pip install 'ssm_reduce[eval]'", file=sys.stderr)
        return 2
    from .integrations import lm_eval as _registers_model  # noqa: F401

    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
    return 0


def main(argv=None) -> int:
    import logging

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "eval":
        return cmd_eval(argv[1:])
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as err:
        print(f"ssm-reduce {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
