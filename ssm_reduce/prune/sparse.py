"""Hardware 2:4 sparsity: store 2:4-pruned Linear weights as semi-structured sparse tensors."""

from __future__ import annotations

from typing import Callable, Optional

import torch


def _is_two_four(weight: torch.Tensor) -> bool:
    if weight.shape[1] % 4:
        return False
    groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return bool((groups <= 2).all())


@torch.no_grad()
def to_semi_structured(model: torch.nn.Module, filter_fn: Optional[Callable] = None) -> list[str]:
    """Convert every Linear whose weight is 2:4 sparse (and that ``filter_fn(module, name)`` accepts)
    to ``torch.sparse.to_sparse_semi_structured``; returns the converted names.

    Needs a CUDA GPU with semi-structured sparsity support (compute capability 8.0 or newer; Hopper
    needs cuSPARSELt) and fp16/bf16 weights. Speeds up large matrix products (about 1.1-1.7x), not
    single-token decoding.
    """
    from torch.sparse import to_sparse_semi_structured

    converted = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or (filter_fn is not None and not filter_fn(module, name)):
            continue
        weight = module.weight
        if not _is_two_four(weight):
            continue
        if not weight.is_cuda or torch.cuda.get_device_capability(weight.device)[0] < 8:
            raise RuntimeError(
                f"{name}: semi-structured sparse weights need a CUDA GPU of compute capability >= 8.0; "
                f"the weight is on {weight.device}"
            )
        if weight.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"{name}: semi-structured sparse weights need float16 or bfloat16, got {weight.dtype}")
        module.weight = torch.nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)
        converted.append(name)
    return converted
