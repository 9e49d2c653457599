"""Numerical building blocks that the model core and the loss functions both use (plain torch, no moxin code)."""

from __future__ import annotations

import torch

__all__ = ["mm_f32"]


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b returned in fp32; 16-bit CUDA operands accumulate straight into fp32 (cuBLAS's `out_dtype`), elsewhere
    the product is rounded to their dtype and then cast."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()
