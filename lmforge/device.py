"""Which device a command runs on: one place every layer may import (engine, serve, train and the CLI).

It used to live in train/pretrain.py, so the server and the CLI's `generate` imported the trainer to pick a
device. Mistakes (an unknown name, a GPU that is not there) are one `UserError` line, before any work.
"""

from __future__ import annotations

import os

import torch

from lmforge.errors import UserError

__all__ = ["available_memory", "resolve_device"]


def available_memory() -> int | None:
    """Bytes of memory the OS could give this process now (Linux MemAvailable, else free physical pages),
    or None where that is unknown: what loading a model or building its tables is checked against."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA, else Apple's MPS, else the CPU), `cpu`, `cuda`, `cuda:N` or `mps` -> a torch.device
    that exists on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but no CUDA GPU is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"numbered from 0")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for, but Apple's Metal (MPS) backend is not available")
    return dev
