"""Host-to-device copies that never make the host wait for the device."""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """``t`` on ``device``. A host tensor bound for CUDA goes through pinned memory and is queued on the current
    stream without blocking the host, so a loop that feeds small tensors every step (batch orders, augmentation
    draws) keeps running ahead of the kernels it has queued; anywhere else this is ``t.to(device)``."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
