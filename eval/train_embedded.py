"""Train the embedded default model: a byte-level Mamba-2 on the Python standard library.

Every machine with Python has the same corpus: the ``.py`` sources of the running interpreter's
standard library (test suites and site-packages excluded). Files are split into train and held-out
sets by a hash of their relative path, so the split is deterministic and independent of file order.

The result — config, tokenizer, ``model.safetensors`` and a model card with held-out bits per byte —
is written to ``ssm_reduce/data/embedded/`` (package data), which ``ssm_reduce.embedded_model_path()``
returns.

    python eval/train_embedded.py                 # full run (about two hours on one CPU core)
    python eval/train_embedded.py --tokens 200000 --out tiny-model   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from ssm_reduce.embedded import (
    EOT_ID,
    EXCLUDED_DIRS,
    HELDOUT_BUCKETS,
    byte_tokenizer,
    file_list_hash,
    is_heldout,
    stdlib_files,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "ssm_reduce" / "data" / "embedded"


def read_stream(root: Path, rels: list[str]) -> torch.Tensor:
    """Concatenate files as bytes, each followed by the end-of-text id; returns int16 [T]."""
    chunks = []
    for rel in rels:
        data = (root / rel).read_bytes()
        if data:
            chunks.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int16))
        chunks.append(torch.tensor([EOT_ID], dtype=torch.int16))
    return torch.cat(chunks)


HYBRID_ATTENTION = (3, 8)
# What both embedded models share: the byte-level vocabulary and its one special token, tied embeddings.
BYTE_LEVEL = dict(vocab_size=EOT_ID + 1, tie_word_embeddings=True, bos_token_id=EOT_ID, eos_token_id=EOT_ID,
                  pad_token_id=EOT_ID, use_cache=True)  # the embedded hybrid's attention layers (every other layer is Mamba-2)


def build_model(args):
    if args.arch == "hybrid":
        return build_hybrid(args)
    from transformers import Mamba2Config, Mamba2ForCausalLM

    config = Mamba2Config(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        expand=2,
        head_dim=args.head_dim,
        num_heads=2 * args.hidden // args.head_dim,
        n_groups=1,
        state_size=args.state,
        conv_kernel=4,
        chunk_size=args.chunk,
        **BYTE_LEVEL,
    )
    torch.manual_seed(args.seed)
    return Mamba2ForCausalLM(config)


def build_hybrid(args):
    """A Nemotron-H-style byte-level hybrid: Mamba-2 layers with attention layers at ``HYBRID_ATTENTION``."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    kinds = ["attention" if i in HYBRID_ATTENTION else "mamba" for i in range(args.layers)]
    config = NemotronHConfig(
        hidden_size=args.hidden,
        layers_block_type=kinds,
        num_attention_heads=args.hidden // args.head_dim,
        num_key_value_heads=2,
        head_dim=args.head_dim,
        intermediate_size=4 * args.hidden,
        mamba_num_heads=2 * args.hidden // args.head_dim,
        mamba_head_dim=args.head_dim,
        ssm_state_size=args.state,
        n_groups=1,
        conv_kernel=4,
        chunk_size=args.chunk,
        expand=2,
        **BYTE_LEVEL,
    )
    torch.manual_seed(args.seed)
    return NemotronHForCausalLM(config)


@torch.no_grad()
def heldout_bits_per_byte(model, stream: torch.Tensor, seqlen: int, windows: int) -> float:
    """Mean next-byte loss in bits over ``windows`` evenly spaced windows of the held-out stream."""
    model.eval()
    starts = torch.linspace(0, len(stream) - seqlen - 1, windows).long()
    total, count = 0.0, 0
    for chunk in starts.split(8):
        x = torch.stack([stream[s : s + seqlen + 1].long() for s in chunk.tolist()])
        logits = model(x[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count / math.log(2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="default: ssm_reduce/data/embedded[-hybrid]")
    p.add_argument("--arch", choices=("mamba2", "hybrid"), default="mamba2",
                   help="mamba2: the embedded model; hybrid: the embedded hybrid (Nemotron-H style)")
    p.add_argument("--tokens", type=int, default=12_000_000, help="training tokens (bytes) in all")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--state", type=int, default=32)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-windows", type=int, default=64)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = DEFAULT_OUT if args.arch == "mamba2" else DEFAULT_OUT.with_name("embedded-hybrid")

    torch.set_num_threads(args.threads)
    root, rels = stdlib_files()
    train_rels = [r for r in rels if not is_heldout(r)]
    held_rels = [r for r in rels if is_heldout(r)]
    train = read_stream(root, train_rels)
    held = read_stream(root, held_rels)
    print(f"stdlib files: {len(rels)} ({len(train_rels)} train / {len(held_rels)} held-out), "
          f"{len(train) / 1e6:.1f}M train bytes, {len(held) / 1e6:.2f}M held-out bytes", flush=True)

    model = build_model(args)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    steps = args.tokens // (args.batch * args.seqlen)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    history = []
    for step in range(1, steps + 1):
        lr = args.lr * min(1.0, step / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train) - args.seqlen - 1, (args.batch,), generator=gen)
        x = torch.stack([train[s : s + args.seqlen + 1].long() for s in starts.tolist()])
        logits = model(x[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            print(f"step {step}/{steps} loss {loss.item() / math.log(2):.3f} bits/byte lr {lr:.2e} "
                  f"{(time.time() - t0) / 60:.1f} min", flush=True)
        if step % args.eval_every == 0 or step == steps:
            bpb = heldout_bits_per_byte(model, held, args.seqlen, args.eval_windows)
            history.append({"step": step, "heldout_bits_per_byte": round(bpb, 4)})
            print(f"step {step}: held-out {bpb:.3f} bits/byte", flush=True)
            save(model, args, rels, train_rels, held_rels, len(train), n_params, history, time.time() - t0)
    print(f"done in {(time.time() - t0) / 60:.1f} min; wrote {args.out}", flush=True)


def save(model, args, rels, train_rels, held_rels, train_bytes, n_params, history, seconds):
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    byte_tokenizer().save_pretrained(args.out)
    card = {
        "architecture": type(model).__name__,
        "python_version": platform.python_version(),
        "stdlib_files": len(rels),
        "train_files": len(train_rels),
        "heldout_files": len(held_rels),
        "file_list_sha256": file_list_hash(rels),
        "heldout_rule": f"sha256(relative path) % {HELDOUT_BUCKETS} == 0",
        "excluded_dirs": sorted(EXCLUDED_DIRS),
        "train_bytes": train_bytes,
        "parameters": n_params,
        "training": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "tokens_seen": history[-1]["step"] * args.batch * args.seqlen,
        "train_minutes": round(seconds / 60, 1),
        "torch": torch.__version__,
        "heldout_bits_per_byte": history[-1]["heldout_bits_per_byte"],
        "history": history,
    }
    (args.out / "training.json").write_text(json.dumps(card, indent=2) + "\n")
    (args.out / "README.md").write_text(model_card(card))


def model_card(card: dict) -> str:
    t = card["training"]
    hybrid = t.get("arch") == "hybrid"
    kind = "Mamba-2 / attention hybrid" if hybrid else "Mamba-2"
    attention = f" (attention at layers {', '.join(map(str, HYBRID_ATTENTION))}, Mamba-2 elsewhere)" if hybrid else ""
    name = "embedded hybrid model" if hybrid else "embedded model"
    command = "python eval/train_embedded.py"
    if hybrid:
        command += f" --arch hybrid --tokens {t['tokens']}"
    return f"""# ssm_reduce {name}

A byte-level {kind} language model (`transformers` `{card['architecture']}`, {card['parameters'] / 1e6:.2f}M
parameters, {t['layers']} layers{attention}, hidden size {t['hidden']}, head dim {t['head_dim']}, state size {t['state']})
trained on the Python {card['python_version']} standard library sources. It ships inside the package so
that the demo, the tests and the accuracy tables run offline on any machine.

| | |
|---|---|
| held-out bits per byte | **{card['heldout_bits_per_byte']:.3f}** |
| corpus | {card['stdlib_files']} standard-library `.py` files ({card['train_files']} train / {card['heldout_files']} held-out) |
| held-out rule | {card['heldout_rule']} |
| excluded directories | {', '.join(f'`{d}`' for d in card['excluded_dirs'])} |
| file list sha256 | `{card['file_list_sha256']}` |
| training | {card['tokens_seen'] / 1e6:.1f}M bytes, batch {t['batch']} x {t['seqlen']}, AdamW lr {t['lr']}, seed {t['seed']}, {card['train_minutes']} min on CPU |

Tokenizer: ids 0-255 are raw bytes, 256 is `<|endoftext|>` (also BOS, EOS and padding).
Reproduce with `{command}`
(see `training.json` for every setting).
"""


if __name__ == "__main__":
    sys.exit(main())
