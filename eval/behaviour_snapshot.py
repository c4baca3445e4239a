"""A fixed record of what ssm_reduce computes, to prove that a refactor changes nothing.

Records, bit for bit: every reduction method at F = 0.1 and 0.3 on the embedded Mamba-2 model and a tiny
Mamba-1 (logits, kept positions, stats and greedy generations of a left-padded batch), and
``prune_linear`` of every method at 50% and 2:4 on fixed layers of the embedded model.

    python eval/behaviour_snapshot.py --save before.pt      # on the old code
    python eval/behaviour_snapshot.py --compare before.pt   # on the new code: "identical" or the differences

Runs single-threaded so that float sums are reproducible from run to run.
"""

from __future__ import annotations

import argparse
import hashlib
import sys

import torch

import ssm_reduce
from ssm_reduce.prune import prune_linear

FRACTIONS = (0.1, 0.3)
PROMPT_LEN = 48
NEW_TOKENS = 6


def _tiny_mamba1():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=6, state_size=16)
    return MambaForCausalLM(config).eval()


def _batch(vocab: int):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(vocab, 256), (3, PROMPT_LEN), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding
    mask[2, :20] = 0
    return ids, mask


def _record_reduction(name: str, model, out: dict) -> None:
    ids, mask = _batch(model.config.vocab_size)
    for method in ssm_reduce.METHODS:
        for fraction in FRACTIONS:
            key = f"{name}/{method}/F{fraction}"
            try:
                ssm_reduce.apply(model, method=method, flops_reduction=fraction)
            except ValueError as err:
                out[key + "/error"] = str(err)
                continue
            with torch.no_grad():
                result = model(input_ids=ids, attention_mask=mask)
            stats = ssm_reduce.stats(model)
            out[key + "/logits"] = result.logits
            out[key + "/kept"] = result.kept_positions
            out[key + "/stats"] = repr({k: v for k, v in stats.items() if k != "kept_positions"})
            with torch.no_grad():
                generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                           do_sample=False, pad_token_id=0)
            out[key + "/generate"] = generated
            ssm_reduce.remove(model)


def _record_pruning(out: dict) -> None:
    model = ssm_reduce.load_model(ssm_reduce.embedded_model_path())
    gen = torch.Generator().manual_seed(2)
    for layer, name in ((2, "in_proj"), (7, "out_proj")):
        weight = getattr(model.backbone.layers[layer].mixer, name).weight.detach()
        cols = weight.shape[1]
        x = torch.randn(4 * cols, cols, generator=gen) @ torch.randn(cols, cols, generator=gen) / cols**0.5
        hessian = 2 * x.T @ x
        for method in ssm_reduce.prune.METHODS:
            for target in ({"sparsity": 0.5}, {"pattern": "2:4"}):
                key = f"prune/{layer}.{name}/{method}/{next(iter(target.values()))}"
                new, mask, stats = prune_linear(weight, hessian, method=method, **target)
                out[key + "/weight"], out[key + "/mask"] = new, mask
                out[key + "/error"] = float(stats.relative_error)


def snapshot() -> dict:
    torch.set_num_threads(1)
    out: dict = {}
    _record_reduction("embedded", ssm_reduce.load_model(ssm_reduce.embedded_model_path()).eval(), out)
    _record_reduction("mamba1", _tiny_mamba1(), out)
    _record_pruning(out)
    return out


def _digest(value) -> str:
    if torch.is_tensor(value):
        return hashlib.sha256(value.contiguous().numpy().tobytes() + str(value.dtype).encode()).hexdigest()[:16]
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def compare(old: dict, new: dict) -> list[str]:
    """The keys whose values differ (tensors bit for bit), or that only one side has."""
    diffs = [f"only before: {k}" for k in sorted(set(old) - set(new))]
    diffs += [f"only after: {k}" for k in sorted(set(new) - set(old))]
    for key in sorted(set(old) & set(new)):
        a, b = old[key], new[key]
        same = (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a, b)) if torch.is_tensor(a) else a == b
        if not same:
            diffs.append(f"differs: {key}")
    return diffs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", help="write the snapshot to this file")
    group.add_argument("--compare", help="compare against a snapshot saved earlier")
    args = parser.parse_args(argv)
    out = snapshot()
    digest = hashlib.sha256("".join(f"{k}={_digest(v)}" for k, v in sorted(out.items())).encode()).hexdigest()
    print(f"{len(out)} records, digest {digest[:16]}")
    if args.save:
        torch.save(out, args.save)
        print(f"saved to {args.save}")
        return 0
    diffs = compare(torch.load(args.compare), out)
    for line in diffs:
        print(line)
    print("identical" if not diffs else f"{len(diffs)} of {len(out)} records differ")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
