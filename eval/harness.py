"""Shared benchmark harness: environment record, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: str) -> dict:
    """Command, hardware and versions, recorded with every result."""
    import transformers

    import ssm_reduce
    from ssm_reduce.ops import kernel_status

    info = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ssm_reduce": ssm_reduce.__version__,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "device": device,
        "kernels": kernel_status(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, device: str) -> float:
    """Wall time of one call of ``fn`` in seconds (device work included)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median(values) -> float:
    return float(statistics.median(values))


def result_path(name: str, out: Path | None = None) -> Path:
    """``out`` when given, else ``eval/results/<name>.json``."""
    return Path(out) if out else RESULTS / f"{name}.json"


def save(name: str, payload: dict, out: Path | None = None) -> Path:
    """Write ``payload`` as JSON to ``result_path(name, out)``; returns the path."""
    path = result_path(name, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def set_threads() -> None:
    """Honour OMP_NUM_THREADS when given, else use every core."""
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
