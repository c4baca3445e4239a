"""Model-level one-shot pruning: sequential, block by block, on calibration tokens.

For every block (a Mamba / Mamba-2 block, or a decoder layer of any transformers causal LM): capture
its inputs, accumulate the Hessian ``H = 2 X X^T / n`` of each target Linear with forward hooks, prune
each target with ``prune_linear``, recompute the block's outputs with the pruned weights and feed them
to the next block. Only one block sits on the compute device at a time; embeddings and the LM head are
never pruned. The layer-wise setting of Zhao et al., "Pruning Foundation Models for High Accuracy without
Retraining" (EMNLP 2024 Findings, Sec. 3), as SparseGPT's sequential driver runs it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from .. import validation
from ..loading import check_device
from .capture import block_outputs, capture_inputs, fill_slots
from .settings import MRPSettings, resolve
from .solvers import check_options, check_swap_rounds, check_target, prune_linear
from .workspace import Workspace

logger = logging.getLogger("ssm_reduce.prune")


@dataclass
class LayerReport:
    name: str
    shape: tuple
    sparsity: float
    relative_error: float
    seconds: float
    damp: float
    cholesky_retries: int = 0
    notes: list = field(default_factory=list)
    swaps_skipped: bool = False  # mrp: its swap trial found the swap rounds would not lower this layer's error


@dataclass
class PruneReport:
    """Per-Linear results of ``ssm_reduce.prune``; ``str(report)`` is a table, ``to_json()`` JSON."""

    method: str
    target: str
    calibration: dict
    layers: list = field(default_factory=list)
    seconds: float = 0.0
    skipped: list = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Fraction of removed weights over all pruned Linears."""
        total = sum(l.shape[0] * l.shape[1] for l in self.layers)
        removed = sum(l.sparsity * l.shape[0] * l.shape[1] for l in self.layers)
        return removed / total if total else 0.0

    @property
    def mean_relative_error(self) -> float:
        return sum(l.relative_error for l in self.layers) / len(self.layers) if self.layers else 0.0

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "target": self.target,
            "calibration": self.calibration,
            "sparsity": self.sparsity,
            "mean_relative_error": self.mean_relative_error,
            "seconds": self.seconds,
            "skipped": self.skipped,
            "layers": [asdict(l) | {"shape": list(l.shape)} for l in self.layers],
        }

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def __str__(self) -> str:
        width = max([len(l.name) for l in self.layers] + [5])
        lines = [
            f"{self.method} {self.target}: {len(self.layers)} Linear layers, overall sparsity {self.sparsity:.4f}, "
            f"mean relative error {self.mean_relative_error:.4g}, {self.seconds:.1f} s",
            f"{'layer':<{width}}  {'shape':>12}  {'sparsity':>8}  {'rel. error':>10}  {'time s':>7}  note",
        ]
        for l in self.layers:
            shape = f"{l.shape[0]}x{l.shape[1]}"
            note = "; ".join(l.notes)
            lines.append(f"{l.name:<{width}}  {shape:>12}  {l.sparsity:>8.4f}  {l.relative_error:>10.4g}  {l.seconds:>7.2f}  {note}")
        lines += [f"skipped: {name}" for name in self.skipped]
        return "\n".join(lines)


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(qualified name, ModuleList) of the model's repeated blocks: the largest ModuleList whose
    children all share one class (Mamba ``backbone.layers``, LLaMA ``model.layers``, GPT-2
    ``transformer.h``, OPT ``model.decoder.layers``, ...) or that holds as many layers as the config
    says the model has (hybrid stacks of several layer classes: Jamba's Mamba and attention layers)."""
    config = getattr(model, "config", None)
    depth = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    best, best_params = None, -1
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) != 1 and len(module) != depth:
                continue
            params = sum(p.numel() for p in module.parameters())
            if params > best_params:
                best, best_params = (name, module), params
    if best is None:
        raise TypeError(f"found no repeated blocks (a ModuleList of layers) in {type(model).__name__}")
    return best


def _is_conv1d(module: torch.nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and its kin): a Linear whose weight is stored (in, out)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return False
    return isinstance(module, Conv1D)


def is_prunable(module: torch.nn.Module) -> bool:
    """A ``torch.nn.Linear`` or a transformers ``Conv1D``."""
    return isinstance(module, torch.nn.Linear) or _is_conv1d(module)


def weight_view(module: torch.nn.Module) -> torch.Tensor:
    """The (out, in) weight of a Linear, or a transposed view of a ``Conv1D``'s (in, out) one; writing into
    it writes the module's weight."""
    return module.weight.data.T if _is_conv1d(module) else module.weight.data


def select_targets(blocks: torch.nn.ModuleList, filter_fn: Optional[Callable]) -> list[list[tuple[str, torch.nn.Module]]]:
    """Per block, the (name, module) pairs to prune. Default: every Linear (or transformers ``Conv1D``,
    GPT-2's) inside the blocks. ``filter_fn(module, name) -> bool`` chooses instead; choosing anything
    else is an error."""
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable as filter_fn(module, name) -> bool, got {filter_fn!r}")
    out = []
    for block in blocks:
        chosen = []
        for name, module in block.named_modules():
            if not name:
                continue
            keep = is_prunable(module) if filter_fn is None else bool(filter_fn(module, name))
            if keep and not is_prunable(module):
                raise TypeError(
                    f"filter_fn selected {name} ({type(module).__name__}); only torch.nn.Linear layers "
                    "(and transformers' Conv1D) can be pruned"
                )
            if keep:
                chosen.append((name, module))
        out.append(chosen)
    if not any(out):
        raise ValueError("no Linear layer was selected for pruning")
    return out


def check_batch_size(batch_size) -> int:
    return validation.integer("batch_size", batch_size, 1, "calibration windows per forward")


def calibration_tokens(calib, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(n, L) token windows: rows of a 2-D tensor (capped at ``nsamples`` x ``seqlen``), or ``nsamples``
    random windows of ``seqlen`` tokens from a 1-D tensor or from texts tokenised with ``tokenizer`` —
    from a stream shorter than ``nsamples * seqlen`` tokens, its consecutive windows instead (fewer than
    ``nsamples``: random ones would repeat its tokens)."""
    nsamples = validation.integer("nsamples", nsamples, 1, "calibration windows")
    seqlen = validation.integer("seqlen", seqlen, 2, "tokens per calibration window")
    seed = validation.integer("seed", seed, 0)
    if isinstance(calib, str) or (isinstance(calib, Sequence) and calib and all(isinstance(t, str) for t in calib)):
        if tokenizer is None:
            raise ValueError("calibration texts need a tokenizer: prune(model, texts, tokenizer=tok, ...)")
        texts = [calib] if isinstance(calib, str) else list(calib)
        ids = []
        for text in texts:
            ids += tokenizer(text).input_ids
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        calib = torch.tensor(ids, dtype=torch.long)
    if not isinstance(calib, torch.Tensor) or calib.dtype not in (torch.long, torch.int, torch.int32, torch.int16):
        raise TypeError("calib must be a LongTensor of token ids ([n, L] or [T]) or texts with a tokenizer")
    calib = calib.long()
    if calib.dim() == 2:
        if calib.shape[1] < 2 or calib.shape[0] < 1:
            raise ValueError(f"calib has shape {tuple(calib.shape)}; need at least one row of 2 tokens")
        return calib[:nsamples, :seqlen]
    if calib.dim() != 1:
        raise ValueError(f"calib must be 1-D or 2-D, got shape {tuple(calib.shape)}")
    if len(calib) < seqlen:
        raise ValueError(
            f"calib is too short: {len(calib)} tokens, but one window needs seqlen={seqlen}; "
            "give more text or lower seqlen"
        )
    if len(calib) < nsamples * seqlen:
        count = len(calib) // seqlen
        return calib[: count * seqlen].view(count, seqlen)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(calib) - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([calib[s : s + seqlen] for s in starts.tolist()])


# Device types whose Hessian products X^T X run in full float32 (TF32 off), summed in float64: most GPUs
# multiply float64 matrices far slower, and one batch's float32 Gram matrix is accurate to about
# sqrt(tokens) float32 roundings. On CPUs the products stay float64.
GRAM_FLOAT32_DEVICES = ("cuda",)


class _HessianHook:
    """Accumulates H = 2 X X^T / n over the inputs of one Linear (or a slice of another module's output),
    in float64 (per batch, the product in float32 on ``GRAM_FLOAT32_DEVICES``)."""

    def __init__(self, features: int, device):
        self.h = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if self.h.device.type in GRAM_FLOAT32_DEVICES:
            x = x.float()
            with _full_float32():
                gram = (x.T @ x).double()
        else:
            x = x.double()
            gram = x.T @ x
        total = self.n + x.shape[0]
        self.h *= self.n / total
        self.h += (2.0 / total) * gram
        self.n = total


class _full_float32:
    """Float32 matmuls in full float32 inside the block, whatever the user set (TF32 keeps 10 mantissa
    bits): ``torch.set_float32_matmul_precision("highest")``, restored on exit."""

    def __enter__(self):
        self.saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.saved)


@torch.no_grad()
def prune_model(
    model: torch.nn.Module,
    calib,
    *,
    sparsity: Optional[float] = None,
    pattern: Optional[str] = None,
    method: str = "mrp",
    filter_fn: Optional[Callable] = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    tokenizer=None,
    device: Optional[Union[str, torch.device]] = None,
    batch_size: int = 8,
    blocksize: int = 128,
    damp: float = 0.01,
    swap_rounds: int = 1,
    settings: Optional[MRPSettings] = None,
    seed: int = 0,
    progress: bool = True,
) -> PruneReport:
    """Prune ``model`` in place, block by block (see the module docstring); returns a PruneReport.

    Args:
        calib: token ids ([n, L] windows or a 1-D stream) or text(s) with ``tokenizer``.
        sparsity / pattern: exactly one: unstructured fraction per row in [0, 1), or ``"N:M"``.
        method: ``magnitude``, ``wanda``, ``sparsegpt`` or ``mrp`` (``prune_linear``).
        filter_fn: ``filter_fn(module, name) -> bool`` over the modules inside each block (default:
            every Linear: Mamba-2 in_proj/out_proj, Mamba-1 also x_proj/dt_proj, all Linears of a
            transformer decoder layer).
        nsamples, seqlen: calibration windows and their length (a cap for 2-D ``calib``).
        device: where each block is processed (default: the model's device); the model stays put.
        blocksize, damp: lazy-block width and Hessian damping (fraction of its mean diagonal).
        swap_rounds: ``mrp`` only: at most this many swap rounds per layer, where its swap trial finds
            that they lower the layer's error (0 = none).
        settings: the solvers' tolerances and tuning knobs (``MRPSettings``; None: the defaults), passed
            to every ``prune_linear`` call.
    Every block is replayed with the arguments the model itself gives it (its own attention mask, say),
    and with the outputs of the pruned block before it. Everything is validated before the first weight
    changes; an error in the middle of the run names the layer and says how many were already pruned
    (every module keeps its train/eval mode). A target that received no calibration inputs is skipped
    and listed in ``PruneReport.skipped``.
    """
    nm = check_target(sparsity, pattern, method)
    swap_rounds = check_swap_rounds(swap_rounds)
    blocksize, damp = check_options(blocksize, damp)
    settings = resolve(settings)
    batch_size = check_batch_size(batch_size)
    nsamples = validation.integer("nsamples", nsamples, 1, "calibration windows")
    seqlen = validation.integer("seqlen", seqlen, 2, "tokens per calibration window")
    seed = validation.integer("seed", seed, 0)
    device = check_device(device) if device is not None else next(model.parameters()).device
    if device.type == "meta":
        raise ValueError("device='meta' holds no data; give the device to prune on (cpu, cuda, cuda:1, ...)")
    if type(model).__module__.split(".")[0] == "mamba_ssm":
        raise TypeError(
            f"prune works on transformers models, not mamba_ssm's {type(model).__name__}: its fused kernels apply "
            "in_proj and out_proj by their weights, so their inputs cannot be captured. Load the checkpoint with "
            "ssm_reduce.load_model(path) (a transformers model), prune that, and write it back with "
            "ssm_reduce.save_model(model, out_dir, format='mamba_ssm')"
        )
    blocks_name, blocks = find_blocks(model)
    if any(p.is_meta for p in blocks.parameters()):
        raise ValueError(f"{blocks_name} has weights on the meta device (not loaded); load the weights first")
    targets = select_targets(blocks, filter_fn)
    skipped = []
    if nm is not None:
        # An N:M pattern needs in_features divisible by M: layers chosen by default that are not
        # (Mamba-1's narrow dt_proj, say) are skipped and reported; layers a filter_fn chose are an error.
        for i, block_targets in enumerate(targets):
            for name, linear in list(block_targets):
                in_features = weight_view(linear).shape[1]
                if in_features % nm[1] == 0:
                    continue
                if filter_fn is not None:
                    raise ValueError(
                        f"pattern {pattern!r} needs in_features divisible by {nm[1]}; {name} has {in_features}"
                    )
                block_targets.remove((name, linear))
                skipped.append(f"{blocks_name}.{i}.{name} (in_features {in_features} not divisible by {nm[1]})")
        if not any(targets):
            raise ValueError(f"no Linear layer has in_features divisible by {nm[1]} for pattern {pattern!r}")
    tokens = calibration_tokens(calib, tokenizer, nsamples, seqlen, seed)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ValueError(
            f"calib has token ids outside the model's vocabulary [0, {vocab}): min {int(tokens.min())}, "
            f"max {int(tokens.max())}"
        )
    report = PruneReport(
        method=method,
        target=f"pattern {pattern}" if pattern else f"sparsity {sparsity}",
        calibration={"samples": tokens.shape[0], "seqlen": tokens.shape[1], "tokens": tokens.numel()},
        skipped=skipped,
    )
    if skipped:
        logger.warning("skipped %d layers the pattern does not fit: %s", len(skipped), ", ".join(skipped))
    start = time.perf_counter()
    modes = [(module, module.training) for module in model.modules()]  # restored exactly at the end
    model.eval()
    done = 0  # Linears pruned so far (for the message of an error in the middle of the run)
    try:
        calls = capture_inputs(model, blocks, tokens, batch_size, device)
        outputs = None  # per batch, the outputs of the block before (block 0's inputs are recorded as they are)
        # mrp's scratch buffers, kept from layer to layer of the same shape on a CPU (CUDA's caching
        # allocator already reuses memory); dropped when the run ends
        workspace = Workspace() if method == "mrp" and device.type == "cpu" else None
        bar = tqdm(range(len(blocks)), desc=f"pruning {method}", disable=not progress)
        for i in bar:
            block = blocks[i]
            home = next(block.parameters()).device
            inputs = [batch[i] if outputs is None else fill_slots(batch[i], outputs[b]) for b, batch in enumerate(calls)]
            block.to(device)
            hooks, handles = {}, []
            try:
                for name, linear in targets[i]:
                    hooks[name] = _HessianHook(weight_view(linear).shape[1], device)
                    handles.append(_register_input_hook(block, name, linear, hooks[name]))
                for args, kwargs in inputs:
                    block(*args, **kwargs)
                for handle in handles:
                    handle.remove()
                for name, linear in targets[i]:
                    if hooks[name].n == 0:  # never called on this block's inputs (an expert no token reached)
                        report.skipped.append(f"{blocks_name}.{i}.{name} (received no calibration inputs)")
                        logger.warning("skipped %s.%d.%s: it received no calibration inputs", blocks_name, i, name)
                        continue
                    weight = weight_view(linear)
                    try:
                        new, _, stats = prune_linear(
                            weight, hooks[name].h, sparsity=sparsity, pattern=pattern, method=method,
                            blocksize=blocksize, damp=damp, swap_rounds=swap_rounds, settings=settings,
                            workspace=workspace,
                        )
                    except (ValueError, RuntimeError) as err:
                        raise type(err)(f"{blocks_name}.{i}.{name}: {err}") from err
                    weight.copy_(new)
                    done += 1
                    report.layers.append(LayerReport(
                        name=f"{blocks_name}.{i}.{name}", shape=tuple(weight.shape), sparsity=stats.sparsity,
                        relative_error=stats.relative_error, seconds=stats.seconds, damp=stats.damp,
                        cholesky_retries=stats.cholesky_retries, notes=list(stats.notes),
                        swaps_skipped=stats.swaps_skipped,
                    ))
                    if stats.cholesky_retries:
                        logger.warning("%s: %s", name, "; ".join(stats.notes))
                outputs = [block_outputs(block(*args, **kwargs)) for args, kwargs in inputs]
            except BaseException:
                for handle in handles:
                    handle.remove()
                try:
                    block.to(home)
                except Exception as move_err:  # (the error under way is the one to see)
                    logger.warning("could not move block %d back to %s: %s", i, home, move_err)
                raise
            block.to(home)
            if report.layers:
                bar.set_postfix(error=f"{report.layers[-1].relative_error:.3g}")
    except BaseException as err:
        if done:
            err.add_note(f"ssm_reduce.prune stopped after pruning {done} Linear layers in place; "
                         "the model is partly pruned")
        raise
    finally:
        for module, training in modes:
            module.training = training
    report.seconds = time.perf_counter() - start
    return report


def _register_input_hook(block, name, linear, hook: _HessianHook):
    """Feed ``hook`` with the inputs of ``linear``. transformers' Mamba-1 mixer applies ``dt_proj`` by
    its weight (``dt_proj.weight @ x``), never calling the module: its input is then taken from the
    first ``time_step_rank`` outputs of ``x_proj``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    if leaf == "dt_proj" and hasattr(parent, "x_proj") and hasattr(parent, "time_step_rank"):
        rank = parent.time_step_rank
        return parent.x_proj.register_forward_hook(lambda m, a, out: hook.add(out[..., :rank]))
    return linear.register_forward_hook(lambda m, a, out: hook.add(a[0]))
