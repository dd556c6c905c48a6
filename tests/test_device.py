"""Device selection: `auto` picks what exists; a device that is not there is one clear line, not a crash later."""

from __future__ import annotations

import pytest
import torch

from lmforge.device import resolve_device
from lmforge.errors import UserError


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")


@pytest.mark.parametrize("name, message", [("gpu", "unknown device 'gpu'"), ("cuda:x", "unknown device")])
def test_unknown_names(name, message):
    with pytest.raises(UserError, match=message):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu():
    with pytest.raises(UserError, match="no CUDA GPU is available"):
        resolve_device("cuda:0")


def test_a_gpu_number_beyond_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UserError, match="has 2 CUDA GPU"):
        resolve_device("cuda:2")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_without_metal():
    with pytest.raises(UserError, match="MPS"):
        resolve_device("mps")
