"""Which scan runs where: the one place that decides.

At an anchor, the scan's output y (before the gate) must be visible to score tokens. Five routes exist:

* ``host``: the host's own mixer; y is read at a hook (or is not needed);
* ``kernel``: the mixer through ``ssm_reduce.ops`` with the compiled scan-and-score kernel;
* ``triton``: the same with the chunked Triton Mamba-2 scan (``SSM_REDUCE_SCAN_BACKEND=triton``);
* ``host_scan``: the mixer through ``ssm_reduce.ops`` calling the host's scan function without its gate;
* ``reference``: the mixer through ``ssm_reduce.ops`` with the torch reference scan.

:func:`anchor_scan` picks one per anchor from what the anchor needs, the environment variables, the device
and what is installed; adapters describe their anchor (:class:`AnchorScan`) and follow the answer.
:func:`scan_kernel` picks the kernel for one call of the ``ops`` scans, from its operands.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from . import extension

__all__ = ["Scan", "AnchorScan", "anchor_scan", "scan_kernel", "scan_backend", "SCAN_BACKENDS", "KERNEL_DSTATES",
           "GRID_YZ_LIMIT"]

SCAN_BACKENDS = ("cuda", "triton")
# State sizes the compiled scan kernels are instantiated for (8 lanes per channel, 1-32 states per lane).
KERNEL_DSTATES = (8, 16, 32, 64, 128, 256)
# CUDA's limit on a grid's y and z dimensions, which the scan kernels give to batch rows and heads.
GRID_YZ_LIMIT = 65535


class Scan(str, enum.Enum):
    HOST = "host"
    KERNEL = "kernel"
    TRITON = "triton"
    HOST_SCAN = "host_scan"
    REFERENCE = "reference"

    @property
    def through_ops(self) -> bool:
        """The anchor's mixer runs through ``ssm_reduce.ops`` (every route but ``host``)."""
        return self is not Scan.HOST


DESCRIPTIONS = {
    Scan.HOST: "the host's own mixer (y read at a hook)",
    Scan.KERNEL: "ssm_reduce.ops with the compiled scan-and-score kernel",
    Scan.TRITON: "ssm_reduce.ops with the chunked Triton scan",
    Scan.HOST_SCAN: "ssm_reduce.ops calling the host's scan without its gate",
    Scan.REFERENCE: "ssm_reduce.ops with the torch reference scan",
}


@dataclass(frozen=True)
class AnchorScan:
    """What an adapter knows about an anchor's mixer.

    mamba2: a Mamba-2 scan (scalar A per head; the Triton scan serves it).   dstate: the state size.
    host_exposes_y: the host's mixer hands y before its gate to a module a hook can read.
    host_scan: the host's scan function that can run without its gate, or None.
    replaceable: the mixer call may go through ``ssm_reduce.ops`` (False: arguments or a layout, such
        as tensor parallelism, only the host's path handles).
    """

    mamba2: bool
    dstate: int
    host_exposes_y: bool
    host_scan: Optional[Callable] = None
    replaceable: bool = True


def scan_backend() -> str:
    """The Mamba-2 scan's backend on CUDA (``SSM_REDUCE_SCAN_BACKEND``, read at every call): ``cuda``
    (default) — the compiled kernel where it is built; ``triton`` — the chunked Triton kernels."""
    value = os.environ.get("SSM_REDUCE_SCAN_BACKEND", "").strip().lower() or "cuda"
    if value not in SCAN_BACKENDS:
        raise ValueError(f"SSM_REDUCE_SCAN_BACKEND must be one of {', '.join(SCAN_BACKENDS)}, got {value!r}")
    return value


def triton_selected(device) -> bool:
    """The Triton Mamba-2 scan is selected and can run on ``device``: CUDA, or the CPU under
    TRITON_INTERPRET=1 (Triton's interpreter), with triton importable."""
    if extension.disabled() or scan_backend() != "triton":
        return False
    device = torch.device(device)
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1" and device.type == "cpu"
    if not (device.type == "cuda" or interpreted):
        return False
    from . import ssd_triton

    return ssd_triton.available()


def _kernel_for_anchor(device, dstate: int, mamba2: bool) -> Optional[Scan]:
    if mamba2 and triton_selected(device):
        return Scan.TRITON
    if dstate in KERNEL_DSTATES and extension.serves_device(device):
        return Scan.KERNEL
    return None


def anchor_scan(anchor: AnchorScan, device, needs_y: bool, forced: Optional[bool] = None) -> Scan:
    """The route of one anchor's mixer on ``device``. ``needs_y``: the anchor scores or matches y itself.
    ``forced`` (tests only, ``ssm_reduce.testing.force_scan``): True = through ``ssm_reduce.ops`` with
    whichever of its scans serves, False = the host's mixer.

    A scan-and-score kernel that serves is used; else y is read from the host's mixer where it shows it;
    else the host's own scan is called without its gate; else the reference scan runs.
    """
    if not anchor.replaceable or forced is False:
        return Scan.HOST
    kernel = _kernel_for_anchor(device, anchor.dstate, anchor.mamba2)
    if kernel is not None:
        return kernel
    if forced:
        return Scan.REFERENCE
    if not needs_y or anchor.host_exposes_y:
        return Scan.HOST
    return Scan.HOST_SCAN if anchor.host_scan is not None else Scan.REFERENCE


def _fits_compiled(x: torch.Tensor, dstate: int, streamed: Sequence, fixed: Sequence, grid: Sequence[int]) -> bool:
    """The compiled scan takes these operands exactly: an instantiated state size, the streamed inputs
    (dt, B, C, z) in x's dtype (the kernel reads them as x's type), every operand on x's device, and the
    sizes that index the grid within CUDA's limit."""
    return (dstate in KERNEL_DSTATES and all(t is None or t.dtype == x.dtype for t in streamed)
            and all(t is None or t.device == x.device for t in (*streamed, *fixed))
            and all(0 < n <= GRID_YZ_LIMIT for n in grid))


def scan_kernel(x: torch.Tensor, dstate: int, streamed: Sequence, fixed: Sequence, grid: Sequence[int],
                mamba2: bool) -> Scan:
    """Which of ``kernel``, ``triton`` and ``reference`` computes one ``ops`` scan of ``x`` (Mamba-2:
    (B, L, H, P); Mamba-1: (B, D, L)). ``streamed``: dt, B, C, z; ``fixed``: A, D, bias, initial state;
    ``grid``: the sizes the kernels put on the grid (batch, and heads for Mamba-2). Operands that a kernel
    cannot take exactly run the reference."""
    if mamba2 and triton_selected(x.device):
        from . import ssd_triton

        if (all(t is None or t.device == x.device for t in (*streamed, *fixed))
                and all(0 < n <= GRID_YZ_LIMIT for n in grid) and ssd_triton.fits(x, dstate)):
            return Scan.TRITON
    if extension.serves(x) and _fits_compiled(x, dstate, streamed, fixed, grid):
        return Scan.KERNEL
    return Scan.REFERENCE
