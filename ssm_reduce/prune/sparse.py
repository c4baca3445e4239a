"""Hardware 2:4 sparsity: store 2:4-pruned Linear weights as semi-structured sparse tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

# torch's shape rule for semi-structured weights (both dimensions multiples of these), per backend and
# dtype, as of torch 2.4-2.13; read from torch itself where it exposes them.
_FALLBACK_MULTIPLES = {"cusparselt": (16, 16), "cutlass": (32, 64)}


@dataclass
class SemiStructuredResult:
    """What ``to_semi_structured`` did: the Linear layers converted, and those left dense with why."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.converted)


def _is_two_four(weight: torch.Tensor) -> bool:
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return bool((groups <= 2).all())


def _shape_multiples(dtype: torch.dtype) -> tuple[str, tuple[int, int]]:
    """(backend, (row multiple, column multiple)) torch's semi-structured conversion will use."""
    from torch.sparse import SparseSemiStructuredTensor

    cutlass = bool(getattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", False))
    name = "cutlass" if cutlass else "cusparselt"
    cls = getattr(torch.sparse, "SparseSemiStructuredTensorCUTLASS" if cutlass else "SparseSemiStructuredTensorCUSPARSELT",
                  None)
    config = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
    if config is not None and hasattr(config, "sparse_min_rows"):
        return name, (int(config.sparse_min_rows), int(config.sparse_min_cols))
    return name, _FALLBACK_MULTIPLES[name]


@torch.no_grad()
def to_semi_structured(model: torch.nn.Module, filter_fn: Optional[Callable] = None) -> SemiStructuredResult:
    """Store every Linear whose weight is 2:4 sparse (and that ``filter_fn(module, name)`` accepts) as
    ``torch.sparse.to_sparse_semi_structured``, in place.

    Needs a CUDA GPU with semi-structured sparsity support (compute capability 8.0 or newer; Hopper
    needs cuSPARSELt) and fp16/bf16 weights; anything else raises before any layer changes. Layers
    whose shape the sparse kernels cannot take (both dimensions must be multiples of 16 with
    cuSPARSELt — e.g. mamba2-130m's in_proj, 3352 x 768, is not) stay dense and are listed in
    ``skipped`` with the reason. Every conversion is made before any is installed, so an error leaves
    the model as it was. Speeds up large matrix products (about 1.1-1.7x), not single-token decoding;
    the converted model cannot be saved with ``save_pretrained`` (convert after loading instead).
    """
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or (filter_fn is not None and not filter_fn(module, name)):
            continue
        if _is_two_four(module.weight):
            candidates.append((name, module))
    result = SemiStructuredResult()
    if not candidates:
        return result
    for name, module in candidates:
        weight = module.weight
        if not weight.is_cuda or torch.cuda.get_device_capability(weight.device)[0] < 8:
            raise RuntimeError(
                f"{name}: semi-structured sparse weights need a CUDA GPU of compute capability >= 8.0; "
                f"the weight is on {weight.device} (no layer was converted)"
            )
        if weight.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(
                f"{name}: semi-structured sparse weights need float16 or bfloat16, got {weight.dtype} "
                "(no layer was converted; call model.half() or model.bfloat16() first)"
            )
    from torch.sparse import to_sparse_semi_structured

    new = {}
    for name, module in candidates:
        weight = module.weight
        backend, (rows, cols) = _shape_multiples(weight.dtype)
        m, n = weight.shape
        if m % rows or n % cols:
            result.skipped[name] = (f"shape {m} x {n}: {backend} needs both dimensions to be multiples of "
                                    f"{rows} x {cols}")
            continue
        new[name] = to_sparse_semi_structured(weight.detach().contiguous())
    modules = dict(candidates)
    for name, sparse in new.items():
        modules[name].weight = torch.nn.Parameter(sparse, requires_grad=False)
        result.converted.append(name)
    return result
