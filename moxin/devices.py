"""Moving the host's tensors to a GPU without waiting for it."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`. A host tensor bound for a GPU goes through page-locked memory by a copy that does not block:
    PyTorch's default copy to a GPU synchronises the stream, so it waits for all queued work, and a copy from
    pageable memory cannot overlap it. The page-locked buffer is the copy's source and is kept until the copy is
    done (PyTorch's host allocator records the stream), so `t` may be changed or freed at once."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
