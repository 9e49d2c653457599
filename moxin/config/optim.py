"""OptimConfig: AdamW with a warmup and a decay schedule (``stage.optim``), as every stage uses it."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["OptimConfig"]


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate after warmup."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas; Moxin pretraining used (0.9, 0.95). beta2=0.999 is slow to react to loss spikes at scale."""
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices only (embeddings, norms and biases are not decayed)."""
    warmup_steps: int | None = None
    """Linear warmup steps. Mutually exclusive with warmup_fraction."""
    warmup_fraction: float = 0.01
    """Warmup as a fraction of the total steps (SFT: 0.03, DPO: 0.1 in the Tulu 3 recipe)."""
    schedule: str = "cosine"
    """After warmup: cosine (to min_lr_ratio * lr), linear (to min_lr_ratio * lr) or constant."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak; Moxin decays to 10 %. SFT/DPO in Tulu 3 decay linearly to 0."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm (after token normalisation). None: no clipping."""

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        problems = []

        def finite(name, v):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok:
                problems.append(f"stage.optim.{name}={v!r} must be a finite number")
            return ok

        if finite("lr", self.lr) and self.lr <= 0:
            problems.append(f"stage.optim.lr={self.lr} must be > 0")
        if len(self.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):
            problems.append(f"stage.optim.betas={list(self.betas)} must be two numbers in [0, 1)")
        if finite("eps", self.eps) and self.eps <= 0:
            problems.append(f"stage.optim.eps={self.eps} must be > 0")
        if finite("weight_decay", self.weight_decay) and self.weight_decay < 0:
            problems.append(f"stage.optim.weight_decay={self.weight_decay} must be >= 0")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            problems.append(f"stage.optim.warmup_steps={self.warmup_steps!r} must be an integer >= 0 or null")
        if finite("warmup_fraction", self.warmup_fraction) and not 0 <= self.warmup_fraction < 1:
            problems.append(f"stage.optim.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if self.schedule not in ("cosine", "linear", "constant"):
            problems.append(f"stage.optim.schedule={self.schedule!r}: choose cosine, linear or constant")
        if finite("min_lr_ratio", self.min_lr_ratio) and not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"stage.optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.grad_clip is not None and finite("grad_clip", self.grad_clip) and self.grad_clip <= 0:
            problems.append(f"stage.optim.grad_clip={self.grad_clip} must be > 0 (or null for no clipping; 0 would "
                            "zero every gradient, a negative value flip its sign)")
        if problems:
            raise ValueError("; ".join(problems))
