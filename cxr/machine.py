"""The machine a figure was measured on, named in every benchmark's JSON and the demo's metrics:
speed and float sums depend on the processor, and `platform.processor()` is empty or just
"x86_64" on Linux."""
from __future__ import annotations

import platform
from pathlib import Path


def cpu() -> dict:
    """The processor's model name and the vector instructions torch's kernels use (they set the
    order of float sums)."""
    import torch

    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        info = []
    model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                 platform.processor() or platform.machine() or "unknown")
    return {"model": model, "torch_capability": torch.backends.cpu.get_cpu_capability()}


def cpu_name() -> str:
    """`cpu()`'s model name alone, e.g. "AMD EPYC 7B13"."""
    return cpu()["model"]
