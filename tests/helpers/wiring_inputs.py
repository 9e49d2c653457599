"""The small model, optimizer settings and preference pairs the stage-wiring tests train on (tests/test_stage_wiring.py,
tests/test_dpo.py): a 2-layer model on a 128-token vocabulary with a window of 8, rows of T = 16 tokens."""

from __future__ import annotations

import torch

from moxin.config import ModelConfig, OptimConfig

CFG = ModelConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                  sliding_window=8, max_seq_len=64, attn_backend="sdpa")
T = 16


def optim(**kw) -> OptimConfig:
    """A constant learning rate of 1e-2 without warm-up or clipping (clipping would hide a constant factor)."""
    return OptimConfig(**({"lr": 1e-2, "warmup_steps": 0, "schedule": "constant", "grad_clip": None} | kw))


def dpo_pairs(n: int = 5) -> list[dict]:
    """Pairs sharing a prompt, with chosen and rejected answers of different lengths (2 to 9 tokens)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        prompt = torch.randint(3, CFG.vocab_size, (4,), generator=g)
        item = {"pair_index": torch.tensor(i)}
        for side, k in (("chosen", 2 + (i * 3) % 8), ("rejected", 9 - i)):
            ids = torch.cat([prompt, torch.randint(3, CFG.vocab_size, (T - 4,), generator=g)])
            labels = torch.full((T,), -100)
            labels[3:3 + k] = ids[4:4 + k]
            item |= {f"{side}_input_ids": ids, f"{side}_labels": labels, f"{side}_positions": torch.arange(T)}
        out.append(item)
    return out
